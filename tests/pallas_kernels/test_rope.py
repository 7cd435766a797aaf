"""RoPE (rotate-half, fused q and k): every impl against the reference, forward and jax.vjp; inverse
frequencies and the reference against transformers.

Errors are relative L2 norms against ``rope_reference`` on the same inputs; cotangents are random.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastjax.pallas_kernels import _common
from fastjax.pallas_kernels import rope as R

from benchmarks.shapes import TEST_SHAPES

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # relative L2 error, per input dtype
IMPLS = ["xla", "pallas", pytest.param("pallas-gpu", marks=pytest.mark.gpu)]
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _key(*tag) -> jax.Array:
    return jax.random.key(zlib.crc32(repr(tag).encode()))


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _impl_kwargs(impl: str) -> dict:
    if impl == "pallas-gpu":
        return {"impl": "pallas", "interpret": False}
    return {"impl": impl, "interpret": True} if impl == "pallas" else {"impl": impl}


def _packed_positions(key, b: int, t: int) -> jax.Array:
    """Rows of packed segments: positions restart at 0 at random boundaries, large offsets included."""
    starts = jax.random.uniform(key, (b, t)) < 0.1
    idx = jnp.arange(t)[None, :]
    last_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return (idx - last_start + jnp.where(jnp.arange(b)[:, None] == 0, 70000, 0)).astype(jnp.int32)


# (B, T, (H, KV), Dh, dtype, rope_scaling, attention_scaling, block sizes or None)
CASES = [
    (2, TEST_SHAPES["tokens"][1], TEST_SHAPES["heads"][1], 64, jnp.float32, None, 1.0, None),
    (1, TEST_SHAPES["tokens"][2], TEST_SHAPES["heads"][2], 128, jnp.bfloat16, LLAMA3, 1.0, None),
    (
        2,
        9,
        (6, 3),
        72,
        jnp.float32,
        {"type": "linear", "factor": 2.0},
        1.25,
        R.BlockSizes(block_t=4, num_warps=4),
    ),
    # layout="rows": odd head_dim (masked lanes), row counts not a multiple of the block (108 q rows,
    # 54 k rows, blocks of 8), and a bf16 llama3 case
    (
        2,
        9,
        (6, 3),
        72,
        jnp.float32,
        {"type": "linear", "factor": 2.0},
        1.25,
        R.BlockSizes(block_t=1, num_warps=4, layout="rows", block_rows=8),
    ),
    (
        1,
        TEST_SHAPES["tokens"][2],
        TEST_SHAPES["heads"][2],
        128,
        jnp.bfloat16,
        LLAMA3,
        1.0,
        R.BlockSizes(block_t=1, num_warps=4, layout="rows", block_rows=16),
    ),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}D{c[3]}-{jnp.dtype(c[4]).name}"
)
def test_rope_matches_reference(impl, case, run_fast):
    b, t, (h, kv), d, dtype, scaling, attn_scale, bs = case
    ks = jax.random.split(_key("rope", impl, case[:5]), 5)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, kv, d), jnp.float32).astype(dtype)
    pos = _packed_positions(ks[2], b, t)
    dq = jax.random.normal(ks[3], q.shape, jnp.float32).astype(dtype)
    dk = jax.random.normal(ks[4], k.shape, jnp.float32).astype(dtype)
    inv_freq = R.rope_inv_freq(d, 10000.0, scaling)

    def fwd_vjp(fn):
        def run(q, k, pos, dq, dk):
            out, vjp = jax.vjp(lambda q, k: fn(q, k, pos), q, k)
            return (*out, *vjp((dq, dk)))

        return run_fast(run, q, k, pos, dq, dk)

    got = fwd_vjp(
        lambda q, k, pos: R.rope(
            q, k, pos, inv_freq, attention_scaling=attn_scale, block_sizes=bs, **_impl_kwargs(impl)
        )
    )
    want = fwd_vjp(
        lambda q, k, pos: R.rope_reference(q, k, pos, inv_freq, attention_scaling=attn_scale)
    )
    for name, g, r in zip(("q", "k", "dq", "dk"), got, want):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert _rel(g, r) < TOL[dtype], (name, _rel(g, r))


@pytest.mark.parametrize(
    "scaling",
    [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3, {"type": "linear", "factor": 2.0}],
    ids=["default", "linear", "llama3", "old-type-key"],
)
def test_inv_freq_and_reference_match_transformers(scaling):
    import torch
    import transformers
    from transformers.models.llama import modeling_llama as hf

    cfg = transformers.LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling=scaling,
        max_position_embeddings=131072,
    )
    emb = hf.LlamaRotaryEmbedding(cfg)
    inv_freq = R.rope_inv_freq(128, 500000.0, scaling)
    assert inv_freq.dtype == np.float32 and inv_freq.shape == (64,)
    # within 2 fp32 ulps: ours is computed in fp64 then rounded once, torch's pow runs in fp32 and its
    # last bit depends on the CPU kernel torch picks (torch 2.13 CPU differs from 2.11 in 13 of 64).
    np.testing.assert_allclose(inv_freq, emb.inv_freq.numpy(), rtol=2.5e-7, atol=0)

    ks = jax.random.split(_key("hf", str(scaling)), 3)
    q = jax.random.normal(ks[0], (1, 11, 2, 128), jnp.float32)
    k = jax.random.normal(ks[1], (1, 11, 1, 128), jnp.float32)
    pos = jax.random.randint(ks[2], (1, 11), 0, 100000)
    tq, tk = (torch.tensor(np.asarray(x)).transpose(1, 2) for x in (q, k))  # HF: [B, H, T, Dh]
    cos, sin = emb(tq, torch.tensor(np.asarray(pos), dtype=torch.long))
    want_q, want_k = hf.apply_rotary_pos_emb(tq, tk, cos, sin)
    # the rotation itself, on HF's own frequencies: at positions ~1e5 one ulp of inv_freq moves the
    # angle by ~1e-2 rad, which would swamp the comparison of the rotation math
    got_q, got_k = R.rope_reference(q, k, pos, emb.inv_freq.numpy())
    assert _rel(got_q, want_q.transpose(1, 2).numpy()) < 1e-5
    assert _rel(got_k, want_k.transpose(1, 2).numpy()) < 1e-5


def test_inv_freq_rejects_unknown_type():
    with pytest.raises(ValueError, match="'yarn'"):
        R.rope_inv_freq(64, 1e4, {"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="'dynamic'"):
        R.rope_inv_freq(64, 1e4, {"type": "dynamic", "factor": 4.0})


def test_pallas_path_really_runs(lower_for_cuda):
    """One Triton kernel for q and k together, forward and backward; the env switch reaches it."""
    q = jax.random.normal(_key("sw", 0), (1, 5, 4, 64))
    k = jax.random.normal(_key("sw", 1), (1, 5, 1, 64))
    pos = jnp.arange(5, dtype=jnp.int32)[None]
    inv_freq = R.rope_inv_freq(64, 1e4)

    def fwd_bwd():  # fresh closure per lowering: jit caches traces per function
        def f(q, k):
            out, vjp = jax.vjp(lambda q, k: R.rope(q, k, pos, inv_freq), q, k)
            return out, vjp(out)

        return f

    assert "pallas_call" in str(jax.make_jaxpr(fwd_bwd())(q, k))
    assert lower_for_cuda(fwd_bwd(), q, k) == 2
    assert lower_for_cuda(fwd_bwd(), q, k, interpret="1") == 0
    rows = R.BlockSizes(block_t=1, num_warps=4, layout="rows", block_rows=8)

    def rows_fwd_bwd(q, k):
        out, vjp = jax.vjp(lambda q, k: R.rope(q, k, pos, inv_freq, block_sizes=rows), q, k)
        return out, vjp(out)

    assert lower_for_cuda(rows_fwd_bwd, q, k) == 2  # the rows layout lowers too (pl.when branches)


def test_interpret_switch_takes_effect(monkeypatch):
    if _common.on_gpu():
        pytest.skip("on a GPU interpret=0 compiles the kernel")
    q = jax.random.normal(_key("env", 0), (1, 5, 2, 64))
    pos = jnp.arange(5, dtype=jnp.int32)[None]
    inv_freq = R.rope_inv_freq(64, 1e4)
    monkeypatch.setenv(_common.ENV_INTERPRET, "0")  # compiled Triton cannot run on a CPU
    with pytest.raises(Exception, match="interpret"):
        jax.block_until_ready(R.rope(q, q, pos, inv_freq))
    monkeypatch.setenv(_common.ENV_INTERPRET, "1")
    got = R.rope(q, q, pos, inv_freq)[0]
    assert _rel(got, R.rope_reference(q, q, pos, inv_freq)[0]) < 1e-5


def test_validation_and_picker():
    q, k = jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 1, 8))
    pos, inv_freq = jnp.zeros((1, 4), jnp.int32), R.rope_inv_freq(8, 1e4)
    with pytest.raises(ValueError, match="impl"):
        R.rope(q, k, pos, inv_freq, impl="cuda")
    with pytest.raises(ValueError, match="positions"):
        R.rope(q, k, pos[:, :3], inv_freq)
    with pytest.raises(ValueError, match="inv_freq"):
        R.rope(q, k, pos, inv_freq[:3])
    with pytest.raises(ValueError, match="head_dim"):
        R.rope(q, jnp.ones((1, 4, 1, 6)), pos, inv_freq)
    for n, h, kv, d in [(16384, 32, 8, 128), (123, 28, 4, 128), (1, 9, 3, 64), (7, 16, 8, 256)]:
        bs = R.pick_block_sizes(n, h, kv, d)
        assert bs.block_t >= 1 and bs.block_t & (bs.block_t - 1) == 0
