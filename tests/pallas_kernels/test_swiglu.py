"""SwiGLU / GeGLU: every impl against the reference, forward and jax.vjp (random cotangents).

Errors are relative L2 norms against ``glu_reference`` on the same inputs (fp32 math in both).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastjax.pallas_kernels import _common
from fastjax.pallas_kernels import swiglu as S

from benchmarks.shapes import TEST_SHAPES

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # relative L2 error, per input dtype
IMPLS = ["xla", "xla_recompute", "pallas", pytest.param("pallas-gpu", marks=pytest.mark.gpu)]


def _key(*tag) -> jax.Array:
    return jax.random.key(zlib.crc32(repr(tag).encode()))


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _impl_kwargs(impl: str) -> dict:
    if impl == "pallas-gpu":
        return {"impl": "pallas", "interpret": False}
    return {"impl": impl, "interpret": True} if impl == "pallas" else {"impl": impl}


# (shape, dtype, activation, block sizes or None for the picker)
CASES = [
    ((TEST_SHAPES["tokens"][2], TEST_SHAPES["hidden"][0]), jnp.float32, "silu", None),
    ((2, TEST_SHAPES["tokens"][1], 96), jnp.bfloat16, "silu", S.BlockSizes(block=256, num_warps=4)),
    ((TEST_SHAPES["tokens"][2], 40), jnp.bfloat16, "gelu_tanh", None),
    ((3, 5, 72), jnp.float32, "gelu_tanh", S.BlockSizes(block=128, num_warps=4)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{jnp.dtype(c[1]).name}-{c[2]}")
def test_glu_matches_reference(impl, case, run_fast):
    shape, dtype, act, bs = case
    ks = jax.random.split(_key("glu", impl, case[:3]), 3)
    # scale 3: both tails of the activations (saturated sigmoid / tanh) are exercised
    gate, up, dout = (
        jax.random.normal(k, shape, jnp.float32).astype(dtype) * s
        for k, s in zip(ks, (3.0, 1.0, 1.0))
    )

    def fwd_vjp(fn):
        def run(g, u, do):
            out, vjp = jax.vjp(fn, g, u)
            return (out, *vjp(do))

        return run_fast(run, gate, up, dout)

    got = fwd_vjp(lambda g, u: S.glu(g, u, activation=act, block_sizes=bs, **_impl_kwargs(impl)))
    want = fwd_vjp(lambda g, u: S.glu_reference(g, u, activation=act))
    for name, g, r in zip(("out", "dgate", "dup"), got, want):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert _rel(g, r) < TOL[dtype], (name, _rel(g, r))


def test_xla_recompute_saves_only_its_inputs():
    """What "xla_recompute" is for: its vjp keeps gate and up only (bf16, as given), where plain
    autodiff of the reference keeps fp32 intermediates (93.9 GiB on Llama-3-8B without remat)."""
    g, u = (
        jax.random.normal(k, (7, 48), jnp.float32).astype(jnp.bfloat16)
        for k in jax.random.split(_key("res"), 2)
    )

    def residuals(impl):
        _, vjp = jax.vjp(lambda g, u: S.glu(g, u, impl=impl), g, u)
        return [(leaf.shape, jnp.dtype(leaf.dtype)) for leaf in jax.tree.leaves(vjp)]

    assert residuals("xla_recompute") == [((7, 48), jnp.dtype(jnp.bfloat16))] * 2
    assert ((7, 48), jnp.dtype(jnp.float32)) in residuals("xla")  # the check can fail


@pytest.mark.parametrize("act", S.ACTIVATIONS)
def test_reference_matches_transformers_activation(act):
    """Our fp32 math equals HF's activation functions (silu / gelu_pytorch_tanh) in fp32."""
    import torch
    import transformers.activations as activations

    g = jax.random.normal(_key("hf", act), (257,), jnp.float32) * 4
    u = jax.random.normal(_key("hf-u", act), (257,), jnp.float32)
    fn = activations.ACT2FN["silu" if act == "silu" else "gelu_pytorch_tanh"]
    want = (fn(torch.tensor(np.asarray(g))) * torch.tensor(np.asarray(u))).numpy()
    assert _rel(S.glu_reference(g, u, activation=act), want) < 1e-6


def test_pallas_path_really_runs(lower_for_cuda):
    g = jax.random.normal(_key("sw", 0), (4, 256))

    def fwd_bwd():  # fresh closure per lowering: jit caches traces per function
        def f(g, u):
            out, vjp = jax.vjp(lambda g, u: S.glu(g, u, activation="gelu_tanh"), g, u)
            return out, vjp(out)

        return f

    assert "pallas_call" in str(jax.make_jaxpr(fwd_bwd())(g, g))
    assert lower_for_cuda(fwd_bwd(), g, g) == 2
    assert lower_for_cuda(fwd_bwd(), g, g, interpret="1") == 0


def test_interpret_switch_takes_effect(monkeypatch):
    if _common.on_gpu():
        pytest.skip("on a GPU interpret=0 compiles the kernel")
    g = jax.random.normal(_key("env", 0), (3, 77))
    monkeypatch.setenv(_common.ENV_INTERPRET, "0")  # compiled Triton cannot run on a CPU
    with pytest.raises(Exception, match="interpret"):
        jax.block_until_ready(S.glu(g, g))
    monkeypatch.setenv(_common.ENV_INTERPRET, "1")
    assert _rel(S.glu(g, g), S.glu_reference(g, g)) < 1e-5


def test_validation_and_picker():
    g = jnp.ones((2, 8))
    with pytest.raises(ValueError, match="activation"):
        S.glu(g, g, activation="relu")
    with pytest.raises(ValueError, match="impl"):
        S.glu(g, g, impl="mosaic")
    with pytest.raises(ValueError, match="must match"):
        S.glu(g, g.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="power of 2"):
        S.BlockSizes(block=1000, num_warps=4)
    for n in (1, 123 * 72, 16384 * 14336):
        bs = S.pick_block_sizes(n)
        assert bs.block & (bs.block - 1) == 0
