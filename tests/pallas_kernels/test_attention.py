"""Flash attention: reference vs a naive dense formula, Pallas (interpret mode) vs reference, fwd + vjp.

Every case draws fresh random inputs and a random cotangent. Errors are relative L2 norms
``|got - want| / |want|`` against ``attention_reference`` run on the same (low-precision) inputs.
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastjax.pallas_kernels import _common
from fastjax.pallas_kernels import attention as A

TOL = {
    jnp.float32: 1e-5,
    jnp.float16: 5e-3,
    jnp.bfloat16: 2e-2,
}  # relative L2 error, per input dtype
FAST_XLA = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SMALL16 = A.BlockSizes(16, 16, 4, 2, 16, 16, 4, 2, 16, 16, 4, 2)
SMALL32 = A.BlockSizes(32, 16, 4, 2, 16, 32, 4, 2, 32, 16, 4, 2)


def _rng(*tag) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(tag).encode()))


def _inputs(tag, b, t, h, kv, d, dtype):
    """Fresh random q, k, v and cotangent per case (numpy: no XLA compile per shape)."""
    rng = _rng(*tag)
    shapes = [(b, t, h, d), (b, t, kv, d), (b, t, kv, d), (b, t, h, d)]
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32)).astype(dtype) for s in shapes)


def _segments(tag, b, t, n_max, *, pad: bool = True) -> jax.Array:
    """Per row 1..n_max segments with random boundaries and increasing ids, then a padding tail (0)."""
    rng = _rng(*tag)
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        real = t - (int(rng.integers(0, max(1, t // 6) + 1)) if pad else 0)
        n = int(rng.integers(1, n_max + 1))
        cuts = np.sort(
            rng.choice(np.arange(1, max(2, real)), size=min(n - 1, max(0, real - 1)), replace=False)
        )
        ids = np.cumsum(rng.integers(1, 3, size=len(cuts) + 1))
        seg[r, :real] = ids[np.searchsorted(cuts, np.arange(real), side="right")]
    return jnp.asarray(seg)


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _fwd_vjp(fn, q, k, v, do):
    def run(q, k, v, do):
        o, vjp = jax.vjp(fn, q, k, v)
        return (o, *vjp(do))

    return jax.jit(run).lower(q, k, v, do).compile(compiler_options=FAST_XLA)(q, k, v, do)


# ----------------------------------------------------------------------------------------------------
# The reference against a naive formula built differently (float64 numpy, repeated K/V, dense mask)
# ----------------------------------------------------------------------------------------------------


def _naive_np(q, k, v, seg, causal, window, softcap, sm_scale):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, _ = q.shape
    s_len, g = k.shape[1], h // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    out = np.zeros_like(q)
    for bi in range(b):
        for i in range(t):
            allowed = []
            for j in range(s_len):
                ok = (not causal or j <= i) and (window is None or i - j < window)
                if seg is not None:
                    ok = ok and seg[bi, i] != 0 and seg[bi, i] == seg[bi, j]
                allowed.append(ok)
            idx = np.nonzero(allowed)[0]
            if idx.size == 0:
                continue
            for hi in range(h):
                s = sm_scale * k[bi, idx, hi] @ q[bi, i, hi]
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                p = np.exp(s - s.max())
                out[bi, i, hi] = (p / p.sum()) @ v[bi, idx, hi]
    return out


def _naive_jnp(q, k, v, seg, causal, window, softcap, sm_scale):
    """Dense-mask softmax on repeated K/V, in jnp so its gradient can be taken."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bihd,bjhd->bhij", q, k, precision="highest") * sm_scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    i, j = np.arange(q.shape[1])[:, None], np.arange(k.shape[1])[None, :]
    mask = np.ones((q.shape[1], k.shape[1]), bool)
    mask &= (j <= i) if causal else True
    mask &= (i - j < window) if window is not None else True
    mask = jnp.asarray(mask)[None, None]
    if seg is not None:
        mask = mask & ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0))[:, None]
    p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1) * mask
    o = jnp.einsum("bhij,bjhd->bihd", p, v, precision="highest")
    return o * jnp.any(mask, axis=-1).transpose(0, 2, 1)[..., None]


REF_CASES = [  # (B, T, H, KV, causal, segments, window, softcap)
    (2, 1, 4, 4, True, 0, None, None),
    (2, 23, 8, 2, True, 3, None, None),
    (1, 30, 4, 2, True, 2, 5, 3.0),
    (1, 19, 6, 3, False, 3, None, 2.0),
]


@pytest.mark.parametrize("case", REF_CASES, ids=str)
def test_reference_matches_naive(case):
    b, t, h, kv, causal, nseg, window, softcap = case
    q, k, v, do = _inputs(("ref",) + case, b, t, h, kv, 16, jnp.float32)
    seg = _segments(("ref",) + case, b, t, nseg) if nseg else None
    sm = 0.3
    kw = {
        "segment_ids": seg,
        "causal": causal,
        "window": window,
        "softcap": softcap,
        "sm_scale": sm,
    }
    got, *grads = _fwd_vjp(lambda q, k, v: A.attention_reference(q, k, v, **kw), q, k, v, do)
    want = _naive_np(q, k, v, None if seg is None else np.asarray(seg), causal, window, softcap, sm)
    assert _rel(got, want) < 1e-5
    naive = lambda q, k, v: _naive_jnp(q, k, v, seg, causal, window, softcap, sm)
    _, *want_grads = _fwd_vjp(naive, q, k, v, do)
    for g_, w_ in zip(grads, want_grads):
        assert np.isfinite(np.asarray(g_)).all()
        assert _rel(g_, w_) < 1e-5


def test_reference_sliding_window_matches_transformers():
    """HF's sliding-window causal mask (masking_utils) is exactly ``allowed_mask``'s window."""
    import torch
    import transformers.masking_utils as mu

    t, w = 12, 4
    fn = mu.sliding_window_causal_mask_function(w)
    zero = torch.tensor(0)
    hf = fn(zero, zero, torch.arange(t)[:, None], torch.arange(t)[None, :]).numpy()
    ours = np.asarray(A.allowed_mask(t, t, None, causal=True, window=w)[0])
    np.testing.assert_array_equal(ours, hf)


# ----------------------------------------------------------------------------------------------------
# Pallas kernels (interpret mode on CPU) against the reference
# ----------------------------------------------------------------------------------------------------

PALLAS_CASES = [  # (B, T, H, KV, D, dtype, causal, segments, window, softcap, blocks)
    (1, 1, 4, 4, 64, jnp.float32, True, 0, None, 5.0, None),
    (1, 17, 8, 2, 128, jnp.bfloat16, False, 0, None, None, None),
    (2, 128, 8, 1, 64, jnp.float32, True, 4, None, None, SMALL16),
    (1, 300, 4, 1, 72, jnp.float32, True, 0, 37, None, SMALL32),  # head_dim 72: zero-padded to 128
    (1, 128, 4, 2, 256, jnp.bfloat16, True, 3, 50, 20.0, SMALL32),
    (2, 33, 2, 2, 64, jnp.float16, False, 2, None, None, SMALL16),
    (1, 300, 8, 8, 128, jnp.bfloat16, True, 1, None, 30.0, None),
]


def _case_id(c):
    b, t, h, kv, d, dt, causal, nseg, w, cap, bs = c
    return (
        f"B{b}T{t}H{h}KV{kv}D{d}-{jnp.dtype(dt).name}-{'causal' if causal else 'full'}"
        f"-seg{nseg}-w{w}-cap{cap}-{'small' if bs else 'auto'}"
    )


@pytest.mark.parametrize("case", PALLAS_CASES, ids=_case_id)
def test_pallas_matches_reference(case):
    b, t, h, kv, d, dtype, causal, nseg, window, softcap, bs = case
    q, k, v, do = _inputs(("pallas",) + case[:5] + (nseg, window), b, t, h, kv, d, dtype)
    seg = _segments(("pallas", b, t, nseg), b, t, nseg) if nseg else None
    kw = {"segment_ids": seg, "causal": causal, "window": window, "softcap": softcap}
    got = _fwd_vjp(
        lambda q, k, v: A.attention(q, k, v, impl="pallas", interpret=True, block_sizes=bs, **kw),
        q,
        k,
        v,
        do,
    )
    want = _fwd_vjp(lambda q, k, v: A.attention_reference(q, k, v, **kw), q, k, v, do)
    for name, g_, w_ in zip(("out", "dq", "dk", "dv"), got, want):
        assert g_.dtype == dtype and g_.shape == w_.shape, name
        assert np.isfinite(np.asarray(g_, np.float32)).all(), name
        assert _rel(g_, w_) < TOL[dtype], (name, _rel(g_, w_))
    if seg is not None:  # padding: output 0, no gradient into or out of padding positions
        pad = np.asarray(seg) == 0
        for name, x in zip(("out", "dq", "dk", "dv"), got):
            assert not np.any(np.asarray(x, np.float32)[pad]), name


@pytest.mark.parametrize("sm_scale", [0.3, -0.2])
def test_pallas_custom_sm_scale(sm_scale):
    """A given sm_scale (the forward takes the row max on raw scores when it is positive, and on
    scaled ones otherwise): forward and vjp against the reference."""
    q, k, v, do = _inputs(("scale", sm_scale), 1, 70, 4, 2, 64, jnp.float32)
    kw = {"sm_scale": sm_scale, "causal": True}
    got = _fwd_vjp(
        lambda q, k, v: A.attention(
            q, k, v, impl="pallas", interpret=True, block_sizes=SMALL16, **kw
        ),
        q,
        k,
        v,
        do,
    )
    want = _fwd_vjp(lambda q, k, v: A.attention_reference(q, k, v, **kw), q, k, v, do)
    for name, g_, w_ in zip(("out", "dq", "dk", "dv"), got, want):
        assert _rel(g_, w_) < TOL[jnp.float32], (name, _rel(g_, w_))


FUSED_CASES = [  # (B, T, H, KV, D, dtype, causal, segments, window, softcap, blocks)
    (2, 128, 8, 2, 64, jnp.float32, True, 4, None, None, SMALL16),  # GQA 4, packed rows, padding
    (1, 300, 4, 1, 72, jnp.float32, True, 0, 37, None, SMALL32),  # ragged T, window, D zero-padded
    (1, 128, 4, 2, 256, jnp.bfloat16, True, 3, 50, 20.0, SMALL32),  # softcap, window, segments
    (2, 33, 2, 2, 64, jnp.float16, False, 0, None, None, SMALL16),  # non-causal, T not a block
    (1, 200, 8, 8, 128, jnp.bfloat16, True, 0, None, None, None),  # the head_dim-128 tiles
]


@pytest.mark.parametrize("case", FUSED_CASES, ids=_case_id)
def test_fused_backward_matches_reference(case):
    """``fused_bwd``: one backward kernel, dq through fp32 atomic adds; same vjp as the reference."""
    b, t, h, kv, d, dtype, causal, nseg, window, softcap, bs = case
    q, k, v, do = _inputs(("fused",) + case[:5] + (nseg, window), b, t, h, kv, d, dtype)
    seg = _segments(("fused", b, t, nseg), b, t, nseg) if nseg else None
    bs = dataclasses.replace(bs or A.pick_block_sizes(d), fused_bwd=True)
    kw = {"segment_ids": seg, "causal": causal, "window": window, "softcap": softcap}
    fn = lambda q, k, v: A.attention(q, k, v, impl="pallas", interpret=True, block_sizes=bs, **kw)
    got = _fwd_vjp(fn, q, k, v, do)
    want = _fwd_vjp(lambda q, k, v: A.attention_reference(q, k, v, **kw), q, k, v, do)
    for name, g_, w_ in zip(("out", "dq", "dk", "dv"), got, want):
        assert g_.dtype == dtype and g_.shape == w_.shape, name
        assert _rel(g_, w_) < TOL[dtype], (name, _rel(g_, w_))
    if seg is not None:
        pad = np.asarray(seg) == 0
        assert not np.any(np.asarray(got[1], np.float32)[pad])  # no dq into padding queries
    # The vjp runs one backward pallas_call (the fused kernel), where the split path runs two.
    names = lambda bs_: re.findall(
        r"name=(fastjax_attention_\w+)",
        str(
            jax.make_jaxpr(
                lambda q, k, v, do: jax.vjp(
                    lambda q, k, v: A.attention(
                        q, k, v, impl="pallas", interpret=True, block_sizes=bs_, **kw
                    ),
                    q,
                    k,
                    v,
                )[1](do)
            )(q, k, v, do)
        ),
    )
    assert sorted(set(names(bs))) == ["fastjax_attention_bwd_fused", "fastjax_attention_fwd"]
    split = dataclasses.replace(bs, fused_bwd=False)
    assert sorted(set(names(split))) == [
        "fastjax_attention_dkdv",
        "fastjax_attention_dq",
        "fastjax_attention_fwd",
    ]


def test_packed_row_equals_separate_sequences():
    """Two 13-token sequences packed in one row (+ padding) == the same two as a batch, no segments."""
    n, pad, h, kv, d = 13, 6, 4, 2, 64
    q, k, v, do = _inputs(("packed",), 2, n, h, kv, d, jnp.float32)
    row = lambda x: jnp.concatenate([x[:1], x[1:], jnp.ones_like(x[:1, :pad])], axis=1)
    seg = jnp.asarray(np.repeat([1, 2, 0], (n, n, pad))[None], jnp.int32)
    fn = lambda seg: (
        lambda q, k, v: A.attention(
            q, k, v, segment_ids=seg, impl="pallas", interpret=True, block_sizes=SMALL16
        )
    )
    packed = _fwd_vjp(fn(seg), row(q), row(k), row(v), row(do))
    alone = _fwd_vjp(fn(None), q, k, v, do)
    for p_, a_ in zip(packed, alone):
        assert _rel(p_[0, : 2 * n].reshape(a_.shape), a_) < TOL[jnp.float32]
        assert not np.any(np.asarray(p_[0, 2 * n :]))  # padding: zero output and gradients


# ----------------------------------------------------------------------------------------------------
# Block skipping tables, dispatch, switches
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "causal,window,nseg,bq,bk",
    [
        (True, None, 5, 16, 32),
        (True, 40, 3, 32, 16),
        (False, None, 4, 16, 16),
        (True, 17, 0, 16, 16),
    ],
)
def test_block_ranges_cover_exactly_the_mask(causal, window, nseg, bq, bk):
    t = 160
    seg = _segments(("tab", causal, window, nseg), 2, t, nseg) if nseg else None
    allowed = np.asarray(A.allowed_mask(t, t, seg, causal=causal, window=window))
    allowed = np.broadcast_to(allowed, (2, t, t))
    for by, tab in (
        (
            "q",
            A._block_ranges(
                t, t, bq, bk, causal=causal, window=window, kv_len=t, seg_pad=seg, by="q"
            ),
        ),
        (
            "k",
            A._block_ranges(
                t, t, bq, bk, causal=causal, window=window, kv_len=t, seg_pad=seg, by="k"
            ),
        ),
    ):
        tab = np.broadcast_to(np.asarray(tab), (2,) + tab.shape[1:])
        blocks = allowed.reshape(2, t // bq, bq, t // bk, bk).transpose(0, 1, 3, 2, 4)
        if by == "k":
            blocks = blocks.transpose(0, 2, 1, 4, 3)
        any_ok, all_ok = blocks.any(axis=(3, 4)), blocks.all(axis=(3, 4))
        for r in range(2):
            for i, (lo, flo, fhi, hi) in enumerate(tab[r]):
                assert lo <= flo <= fhi <= hi
                live = np.nonzero(any_ok[r, i])[0]
                assert all(lo <= j < hi for j in live), (by, i, live, (lo, hi))  # nothing dropped
                assert all_ok[r, i, flo:fhi].all(), (by, i)  # the mask-free range needs no mask


def test_block_skipping_skips():
    """Four packed segments + padding: each q block loops only over its own segment's kv blocks."""
    t, bq, bk = 160, 16, 16
    seg = jnp.asarray([[1] * 40 + [2] * 40 + [3] * 32 + [4] * 32 + [0] * 16], jnp.int32)
    tab = np.asarray(
        A._block_ranges(t, t, bq, bk, causal=True, window=None, kv_len=t, seg_pad=seg, by="q")
    )[0]
    np.testing.assert_array_equal(tab[:, 0], [0, 0, 0, 2, 2, 5, 5, 7, 7, 0])  # first kv block
    assert tab[-1, 0] == tab[-1, 3]  # the all-padding q block computes nothing
    assert tab[6, 1:3].tolist() == [5, 6]  # q block 6 (segment 3 only): kv block 5 is mask-free
    causal_only = np.asarray(
        A._block_ranges(t, t, bq, bk, causal=True, window=None, kv_len=t, seg_pad=None, by="q")
    )[0]
    assert np.sum(tab[:, 3] - tab[:, 0]) < np.sum(causal_only[:, 3] - causal_only[:, 0]) / 2


def test_auto_table_on_a_gpu(monkeypatch):
    """The GPU rows of AUTO_TABLE: cuDNN unless it cannot express the case; packed rows take cuDNN's
    packed layout only with a static segment bound (``max_segments``), else the Pallas kernel."""
    monkeypatch.setattr(A._common, "on_gpu", lambda: True)
    q = jnp.zeros((1, 16, 4, 128), jnp.bfloat16)
    seg = jnp.ones((1, 16), jnp.int32)
    assert A.choose_impl(q) == "cudnn"
    assert A.choose_impl(q, seg) == "pallas"
    assert A.choose_impl(q, seg, None, 8) == "cudnn"
    assert A.choose_impl(q, seg, 50.0, 8) == "pallas"  # softcap: cuDNN through jax has none
    assert A.choose_impl(q.astype(jnp.float32), seg, None, 8) == "pallas"
    assert A.choose_impl(jnp.zeros((1, 16, 4, 36), jnp.bfloat16)) == "pallas"  # head_dim % 8 != 0


def test_auto_picks_reference_on_cpu_and_validates():
    q, k, v, _ = _inputs(("auto",), 1, 8, 2, 1, 16, jnp.float32)
    assert A.choose_impl(q) == "xla"
    np.testing.assert_array_equal(jax.jit(A.attention)(q, k, v), A.attention_reference(q, k, v))
    with pytest.raises(ValueError, match="cudnn"):
        A.attention(q, k, v, impl="cudnn")
    with pytest.raises(ValueError, match="window"):
        A.attention(q, k, v, causal=False, window=4)
    with pytest.raises(ValueError, match="segment_ids"):
        A.attention(q, k, v, segment_ids=jnp.ones((1, 7), jnp.int32))
    k3 = _inputs(("k3",), 1, 8, 3, 3, 16, jnp.float32)[1]
    with pytest.raises(ValueError, match="multiple"):
        A.attention(q, k3, k3)
    with pytest.raises(ValueError, match="impl"):
        A.attention(q, k, v, impl="triton")


def test_block_sizes_picker():
    for d in (64, 128, 256):
        bs = A.pick_block_sizes(d)
        assert bs is A.pick_block_sizes(d)
        small = bs.clamp(17, 17)
        assert small.block_q == min(bs.block_q, 32) and small.block_k_dkv == min(bs.block_k_dkv, 32)
    with pytest.raises(ValueError, match="power of two"):
        A.BlockSizes(48, 64, 4, 3, 64, 64, 4, 3, 64, 64, 4, 3)


def test_block_sizes_picker_by_dtype():
    """Tiles are tuned for 2-byte inputs; fp32 takes the entry whose rows hold the same bytes."""
    for d in (64, 128):
        assert A.pick_block_sizes(d, jnp.float32) is A.pick_block_sizes(2 * d)
        assert A.pick_block_sizes(d, jnp.float16) is A.pick_block_sizes(d, jnp.bfloat16)
    base, wide = A.pick_block_sizes(256), A.pick_block_sizes(256, jnp.float32)
    for (
        f
    ) in A.TILE_FIELDS:  # fp32 D=256: every tile of the D=256 entry halved, the same bytes per tile
        assert getattr(wide, f) * 256 * 4 == getattr(base, f) * 256 * 2, f
    assert (wide.num_warps, wide.num_stages) == (base.num_warps, base.num_stages)
    assert A.pick_block_sizes(16, jnp.float32) is A.pick_block_sizes(64)


def test_interpret_switch_takes_effect(monkeypatch):
    if _common.on_gpu():
        pytest.skip("on a GPU interpret=0 compiles the kernel")
    q, k, v, _ = _inputs(("switch",), 1, 16, 2, 2, 16, jnp.float32)
    monkeypatch.setenv(_common.ENV_INTERPRET, "0")  # compiled Triton cannot run on a CPU
    with pytest.raises(ValueError, match="interpret"):
        jax.block_until_ready(A.attention(q, k, v, impl="pallas"))
    monkeypatch.setenv(_common.ENV_INTERPRET, "1")
    got = A.attention(q, k, v, impl="pallas")
    assert _rel(got, A.attention_reference(q, k, v)) < TOL[jnp.float32]


def test_segment_offsets_for_cudnn_packed_layout():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [5, 5, 6, 6, 6, 6, 7]], jnp.int32)
    lens, offs = A.segment_offsets(seg, 4)
    np.testing.assert_array_equal(lens, [[3, 2, -1, -1], [2, 4, 1, -1]])
    np.testing.assert_array_equal(offs, [[0, 3, -1, -1, -1], [0, 2, 6, -1, -1]])


@pytest.mark.gpu
@pytest.mark.skipif(not _common.on_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["pallas", "pallas_fused", "cudnn"])
def test_compiled_matches_reference_gpu(impl):
    """Compiled kernels (split and fused backward; and cuDNN, incl. its packed layout) against the
    reference, on a GPU."""
    b, t, h, kv, d = 2, 300, 8, 2, 128
    bs = None
    if impl == "pallas_fused":
        impl, bs = "pallas", dataclasses.replace(A.pick_block_sizes(d), fused_bwd=True)
    q, k, v, do = _inputs(("gpu", impl), b, t, h, kv, d, jnp.bfloat16)
    seg = _segments(("gpu",), b, t, 4)
    for kw in ({}, {"window": 100}, {"segment_ids": seg}, {"segment_ids": seg, "window": 64}):
        extra = {"max_segments": 4} if impl == "cudnn" and "segment_ids" in kw else {}
        if bs is not None:
            extra["block_sizes"] = bs
        got = _fwd_vjp(
            lambda q, k, v, kw=kw, extra=extra: A.attention(q, k, v, impl=impl, **kw, **extra),
            q,
            k,
            v,
            do,
        )
        want = _fwd_vjp(lambda q, k, v, kw=kw: A.attention_reference(q, k, v, **kw), q, k, v, do)
        for name, g_, w_ in zip(("out", "dq", "dk", "dv"), got, want):
            assert _rel(g_, w_) < TOL[jnp.bfloat16], (kw.keys(), name, _rel(g_, w_))
        if "segment_ids" in kw:
            pad = np.asarray(seg) == 0
            assert not any(np.any(np.asarray(x, np.float32)[pad]) for x in got), kw.keys()


@pytest.mark.gpu
@pytest.mark.skipif(not _common.on_gpu(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "dtype", [jnp.float32, jnp.float16, jnp.bfloat16], ids=lambda d: d.__name__
)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_compiled_default_tiles_every_dtype_gpu(d, dtype):
    """The picked tiles compile (fit shared memory) and match the reference for every input dtype
    and head_dim, with packed segments (the Pallas path's main use), forward and vjp."""
    b, t, h, kv = 1, 333, 4, 2
    q, k, v, do = _inputs(("gpu-tiles", d, jnp.dtype(dtype).name), b, t, h, kv, d, dtype)
    seg = _segments(("gpu-tiles", d), b, t, 3)
    got = _fwd_vjp(
        lambda q, k, v: A.attention(q, k, v, segment_ids=seg, impl="pallas"), q, k, v, do
    )
    want = _fwd_vjp(lambda q, k, v: A.attention_reference(q, k, v, segment_ids=seg), q, k, v, do)
    for name, g_, w_ in zip(("out", "dq", "dk", "dv"), got, want):
        assert g_.dtype == dtype, name
        assert _rel(g_, w_) < TOL[dtype], (name, _rel(g_, w_))
