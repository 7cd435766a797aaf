"""Which NF4 linear implementation ``ops.linear`` runs: the rule of ``nf4_linear_impl`` (decode-sized
linears on a GPU take the fused forward with the XLA backward) and that ``linear`` really runs it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastjax.models import ops as O
from fastjax.pallas_kernels import nf4_lora as k

from fastjax import quant


def _nf4_shape(out: int, n_in: int):
    return jax.eval_shape(quant.quantize_nf4, jax.ShapeDtypeStruct((out, n_in), jnp.bfloat16))


def _x(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16)


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(O._common, "on_gpu", lambda: True)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "linear", "want"),
    [
        ((1, 8, 4096), (14336, 4096), "auto", "pallas_fwd"),  # gate/up, 8 decode rows
        ((16, 4096), (4096, 4096), "auto", "pallas_fwd"),  # q/o at the 16-token bound
        ((1, 17, 4096), (4096, 4096), "auto", "xla"),  # one token over the bound
        ((2048, 4096), (14336, 4096), "auto", "xla"),  # training rows
        ((1, 8, 4096), (1024, 4096), "auto", "xla"),  # k/v: 4M elements, where XLA wins
        ((1, 8, 4096), (14336, 4096), "xla", "xla"),  # an explicit choice is kept
        ((1, 8, 4096), (14336, 4096), "pallas", "pallas"),
    ],
)
def test_rule_on_gpu(gpu, x_shape, w_shape, linear, want):
    ops = O.Ops(linear=linear)
    assert O.nf4_linear_impl(ops, _x(*x_shape), _nf4_shape(*w_shape)) == want


def test_rule_off_gpu_and_for_unsupported_weights(gpu, monkeypatch):
    w = _nf4_shape(14336, 4096)
    big_rank = jax.ShapeDtypeStruct((256, 4096), jnp.bfloat16)  # the kernel takes rank <= 128
    assert O.nf4_linear_impl(O.Ops(linear="auto"), _x(8, 4096), w, big_rank) == "xla"
    monkeypatch.setattr(O._common, "on_gpu", lambda: False)
    assert O.nf4_linear_impl(O.Ops(linear="auto"), _x(8, 4096), w) == "xla"


def test_linear_runs_the_chosen_impl(gpu, monkeypatch):
    """With the weight bound lowered to a tiny weight, ``linear`` at 3 tokens runs "pallas_fwd" (the
    kernel in interpret mode on CPU): forward and gradients equal the XLA path's."""
    monkeypatch.setattr(O, "FUSED_NF4_MIN_WEIGHT", 64 * 128)
    seen = []
    real = k.nf4_lora_linear
    monkeypatch.setattr(
        k, "nf4_lora_linear", lambda *a, **kw: seen.append(kw["impl"]) or real(*a, **kw)
    )
    ks = jax.random.split(jax.random.key(3), 4)
    w = quant.quantize_nf4(jax.random.normal(ks[0], (128, 192)) * 0.05)
    lora = {
        "lora_A": jax.random.normal(ks[1], (4, 192)) * 0.1,
        "lora_B": jax.random.normal(ks[2], (128, 4)) * 0.1,
    }
    x = jax.random.normal(ks[3], (1, 3, 192), jnp.float32)

    def loss(x, lora, ops):
        y = O.linear(x, w, lora=lora, lora_scale=0.5, ops=ops)
        return jnp.sum(y * jnp.cos(y)), y

    (_, y), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        x, lora, O.Ops(linear="auto", interpret=True)
    )
    assert seen == ["pallas_fwd"]
    (_, y_ref), g_ref = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        x, lora, O.Ops(linear="xla")
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
