"""RMSNorm and fused residual + RMSNorm: every impl against the reference, forward and jax.vjp.

Errors are relative L2 norms against ``rms_norm_reference`` on the same inputs; cotangents are random.
The reference itself is checked against transformers' LlamaRMSNorm / GemmaRMSNorm.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastjax.pallas_kernels import _common
from fastjax.pallas_kernels import rms_norm as R

from benchmarks.shapes import TEST_SHAPES

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # relative L2 error, per input dtype
IMPLS = ["xla", "pallas", pytest.param("pallas-gpu", marks=pytest.mark.gpu)]
EPS = 1e-6


def _key(*tag) -> jax.Array:
    return jax.random.key(zlib.crc32(repr(tag).encode()))


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _normal(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _impl_kwargs(impl: str) -> dict:
    if impl == "pallas-gpu":
        return {"impl": "pallas", "interpret": False}
    return {"impl": impl, "interpret": True} if impl == "pallas" else {"impl": impl}


# (leading shape, D, dtype, offset, block sizes or None for the picker)
CASES = [
    ((TEST_SHAPES["tokens"][2],), TEST_SHAPES["hidden"][0], jnp.float32, 0.0, None),
    ((2, TEST_SHAPES["tokens"][1]), TEST_SHAPES["hidden"][1], jnp.bfloat16, 1.0, None),
    ((3, 41), 72, jnp.bfloat16, 0.0, R.BlockSizes(block_rows=4, num_warps=4, bwd_programs=5)),
    ((TEST_SHAPES["tokens"][0],), 40, jnp.float32, 1.0, None),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{jnp.dtype(c[2]).name}-o{c[3]}"
)
def test_rms_norm_matches_reference(impl, case, run_fast):
    lead, d, dtype, offset, bs = case
    ks = jax.random.split(_key("rms", impl, case[:4]), 3)
    x = _normal(ks[0], (*lead, d), dtype)
    w = _normal(ks[1], (d,), dtype, 0.5)
    dy = _normal(ks[2], (*lead, d), dtype)

    def fwd_vjp(fn):
        def run(x, w, dy):
            y, vjp = jax.vjp(fn, x, w)
            return (y, *vjp(dy))

        return run_fast(run, x, w, dy)

    got = fwd_vjp(
        lambda x, w: R.rms_norm(x, w, eps=EPS, offset=offset, block_sizes=bs, **_impl_kwargs(impl))
    )
    want = fwd_vjp(lambda x, w: R.rms_norm_reference(x, w, eps=EPS, offset=offset))
    for name, g, r in zip(("y", "dx", "dw"), got, want):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert _rel(g, r) < TOL[dtype], (name, _rel(g, r))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,offset", [(jnp.float32, 1.0), (jnp.bfloat16, 0.0)])
def test_rms_norm_residual_matches_reference(impl, dtype, offset, run_fast):
    ks = jax.random.split(_key("res", impl, dtype, offset), 5)
    shape, d = (2, 23), 72
    x, r = _normal(ks[0], (*shape, d), dtype), _normal(ks[1], (*shape, d), dtype)
    w = _normal(ks[2], (d,), dtype, 0.5)
    cts = (_normal(ks[3], (*shape, d), dtype), _normal(ks[4], (*shape, d), dtype))
    bs = R.BlockSizes(block_rows=2, num_warps=4, bwd_programs=3)

    def fwd_vjp(fn):
        def run(x, r, w, ds, dy):
            out, vjp = jax.vjp(fn, x, r, w)
            return (*out, *vjp((ds, dy)))

        return run_fast(run, x, r, w, *cts)

    got = fwd_vjp(
        lambda x, r, w: R.rms_norm_residual(
            x, r, w, eps=EPS, offset=offset, block_sizes=bs, **_impl_kwargs(impl)
        )
    )
    want = fwd_vjp(lambda x, r, w: R.rms_norm_residual_reference(x, r, w, eps=EPS, offset=offset))
    for name, g, rr in zip(("sum", "y", "dx", "dresidual", "dw"), got, want):
        assert _rel(g, rr) < TOL[dtype], (name, _rel(g, rr))


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_reference_matches_transformers(offset):
    """Llama (offset 0) and Gemma (offset 1) RMSNorm from transformers, bf16 activations."""
    import torch
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.gemma.modeling_gemma as gemma

    ks = jax.random.split(_key("hf", offset), 2)
    x = _normal(ks[0], (5, 72), jnp.bfloat16, 3.0)
    w = _normal(ks[1], (72,), jnp.bfloat16, 0.5)
    mod = llama.LlamaRMSNorm(72, eps=EPS) if offset == 0.0 else gemma.GemmaRMSNorm(72, eps=EPS)
    with torch.no_grad():
        mod.weight.copy_(torch.tensor(np.asarray(w, np.float32)).to(torch.bfloat16))
        want = mod.to(torch.bfloat16)(torch.tensor(np.asarray(x, np.float32)).to(torch.bfloat16))
    got = R.rms_norm_reference(x, w, eps=EPS, offset=offset)
    np.testing.assert_array_equal(np.asarray(got, np.float32), want.float().numpy())


def test_pallas_path_really_runs(lower_for_cuda):
    """The pallas impl is a pallas_call (fwd and bwd), the env switch reaches it, and both kernels lower
    through Pallas' Triton backend for CUDA. (Fresh closures each time: jit caches traces per function.)"""
    x = _normal(_key("sw", 0), (9, 72), jnp.float32)
    w = _normal(_key("sw", 1), (72,), jnp.float32)

    def fwd_bwd():
        def f(x, w):
            y, vjp = jax.vjp(lambda x, w: R.rms_norm(x, w, eps=EPS), x, w)
            return y, vjp(y)

        return f

    def res_fwd_bwd(x, w):
        out, vjp = jax.vjp(lambda x, w: R.rms_norm_residual(x, x, w, eps=EPS), x, w)
        return out, vjp(out)

    assert "pallas_call" in str(jax.make_jaxpr(fwd_bwd())(x, w))
    assert lower_for_cuda(fwd_bwd(), x, w) == 2
    assert lower_for_cuda(fwd_bwd(), x, w, interpret="1") == 0
    assert lower_for_cuda(res_fwd_bwd, x, w) == 2
    bs = R.BlockSizes(block_rows=1, num_warps=4, bwd_programs=4, bwd_num_warps=8)

    def own_bwd_warps(x, w):
        y, vjp = jax.vjp(lambda x, w: R.rms_norm(x, w, eps=EPS, block_sizes=bs), x, w)
        return y, vjp(y)

    assert lower_for_cuda(own_bwd_warps, x, w) == 2


def test_interpret_switch_takes_effect(monkeypatch):
    if _common.on_gpu():
        pytest.skip("on a GPU interpret=0 compiles the kernel")
    x = _normal(_key("env", 0), (9, 72), jnp.float32)
    w = _normal(_key("env", 1), (72,), jnp.float32)
    monkeypatch.setenv(_common.ENV_INTERPRET, "0")  # compiled Triton cannot run on a CPU
    with pytest.raises(Exception, match="interpret"):
        jax.block_until_ready(R.rms_norm(x, w, eps=EPS))
    monkeypatch.setenv(_common.ENV_INTERPRET, "1")
    assert _rel(R.rms_norm(x, w, eps=EPS), R.rms_norm_reference(x, w, eps=EPS)) < 1e-5


def test_validation_and_picker():
    x = jnp.ones((3, 8))
    with pytest.raises(ValueError, match="impl"):
        R.rms_norm(x, jnp.ones(8), eps=EPS, impl="triton")
    with pytest.raises(ValueError, match="normalized dimension"):
        R.rms_norm(x, jnp.ones(7), eps=EPS)
    with pytest.raises(ValueError, match="power of 2"):
        R.BlockSizes(block_rows=3, num_warps=4, bwd_programs=1)
    for n, d in [(1, 72), (16384, 4096), (123, 3584)]:
        bs = R.pick_block_sizes(n, d, jnp.bfloat16)
        assert bs.block_rows & (bs.block_rows - 1) == 0 and bs.block_rows * d <= 16384
