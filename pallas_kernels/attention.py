"""Flash attention (Pallas-Triton) with segment ids, GQA, sliding window and logit softcap.

Math, per batch row b and query head h (kv head ``h // (H // KV)``)::

    s[i, j] = sm_scale * q[i] . k[j]                       (sm_scale defaults to 1/sqrt(D))
    s[i, j] = softcap * tanh(s[i, j] / softcap)            (Gemma 2 logit softcap, if set, before masking)
    allowed(i, j) = (not causal or j <= i)
                    and (window is None or j > i - window)
                    and (segment_ids is None or seg[i] == seg[j] != 0)
    out[i] = sum_j softmax_j(s[i, j] over allowed j) v[j]   (0 for a row with no allowed key)

``window`` is HF's ``sliding_window``: ``transformers.masking_utils.sliding_window_overlay`` keeps
``kv_idx > q_idx - sliding_window`` on top of ``causal_mask_function`` (``kv_idx <= q_idx``), so a query
attends to itself and the ``window - 1`` keys before it. It is defined for causal attention only. cuDNN's
``sliding_window_length`` ((pos - W, pos]) is the same window. Segment id 0 marks padding: a padding query
attends to nothing, its output is 0 and it sends no gradient anywhere.

Layouts: q ``[B, T, H, D]``, k/v ``[B, S, KV, D]`` (HF / ``jax.nn.dot_product_attention``), segment_ids
``[B, T]`` int32 (non-negative; needs S == T, as do causal and window). K/V are never repeated for GQA:
a q head reads its kv head through the BlockSpec index map (forward, dq) and the dk/dv kernel loops over
the group's q heads inside the kernel, so dk/dv cost ``[B, S, KV, D]`` and nothing per q head.

Dtype policy: bf16 / fp16 / fp32 inputs, matmuls accumulate in fp32, softmax statistics in fp32
(log2 domain), outputs cast to the input dtype on store.

Forward saves (q, k, v, segment_ids, out, lse) with lse ``[B, H, T]`` fp32; the backward recomputes the
probabilities block by block (FlashAttention-2): one kernel for dk/dv (loop over q blocks), one for dq
(loop over kv blocks), plus ``delta = rowsum(out * dout)`` in XLA.

Block skipping: before each kernel, XLA builds a tiny per-(q block, kv block) table from causal/window
bounds and per-block segment ranges (min/max of the non-padding ids). A kv block whose range cannot meet
the q block's is never loaded; block pairs that need no mask at all (strictly inside the causal/window
band, one shared segment, no padding) run a mask-free loop body. See ``attention_common._block_ranges``.

Ragged lengths are padded to the block size in the wrapper (padding keys masked, padding queries sliced
off). head_dim 64/128/256 run as is; other head dims are zero-padded to the next power of two.

The backward kernels live in ``attention_bwd.py``, the pieces both kernels share (fp32 dots, log2 scores,
tile masks, masked loops, segment padding, block-skipping tables) in ``attention_common.py``, and the cuDNN
calls (dense and packed rows) that ``impl="cudnn"`` and ``auto`` use in ``attention_cudnn.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from fastjax.pallas_kernels import _common, attention_bwd
from fastjax.pallas_kernels.attention_cudnn import (
    _cudnn_attention,
    _cudnn_unsupported,
    segment_offsets,  # noqa: F401 - public here (the RL trainer and tests import it from attention)
)
from fastjax.pallas_kernels.attention_common import (
    LOG2E,  # also re-exported (it lived here before attention_common)
    _block_ranges,
    _pad_to,
    dot_f32,
    kernel_mask,
    kernel_segments,
    log2_scores,
    masked_loops,
)
from jax import lax
from jax.experimental import pallas as pl

_M_INIT = -1e30  # finite start for the running max: a fully masked block never gives inf - inf
IMPLS = ("auto", "pallas", "cudnn", "xla")


# --- Reference ---------------------------------------------------------------------------------------


def allowed_mask(
    t: int, s: int, segment_ids: jax.Array | None, *, causal: bool, window: int | None
) -> jax.Array:
    """Boolean mask ``[B or 1, T, S]``: which key each query may attend to (the module docstring's rule)."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(s)[None, :]
    mask = jnp.ones((t, s), bool)
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= j > i - window
    mask = mask[None]
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        mask = mask & (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    return mask


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Pure-jnp fp32 attention; the definition of correct and the CPU path.

    GQA without repeating K/V: q is viewed as ``[B, T, KV, G, D]``. Memory is one fp32 score tensor
    ``[B, KV, G, T, S]``. Rows with no allowed key give 0 (never NaN), and so do their gradients.
    """
    _check_args(q, k, v, segment_ids, causal, window, softcap)
    b, t, h, d = q.shape
    s_len, kv = k.shape[1], k.shape[2]
    g = h // kv
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    hi = lax.Precision.HIGHEST
    qf = q.astype(jnp.float32).reshape(b, t, kv, g, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32), precision=hi) * sm_scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    mask = allowed_mask(t, s_len, segment_ids, causal=causal, window=window)[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    den = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(den == 0.0, 1.0, den)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32), precision=hi)
    return o.reshape(b, t, h, d).astype(q.dtype)


def _check_args(q, k, v, segment_ids, causal, window, softcap) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"expected q [B,T,H,D], k/v [B,S,KV,D]; got {q.shape=} {k.shape=} {v.shape=}"
        )
    if k.shape != v.shape:
        raise ValueError(f"{k.shape=} and {v.shape=} differ")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{q.shape=} and {k.shape=} disagree on batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"dtypes differ: {q.dtype=} {k.dtype=} {v.dtype=}")
    needs_self = causal or window is not None or segment_ids is not None
    if needs_self and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"causal/window/segment_ids need S == T; got T={q.shape[1]}, S={k.shape[1]}"
        )
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"{segment_ids.shape=} must be [B, T] = {q.shape[:2]}")
    if window is not None and (not causal or int(window) < 1):
        raise ValueError(f"window={window} needs causal=True and window >= 1 (HF sliding_window)")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap} must be > 0")


# --- Forward kernel --------------------------------------------------------------------------------


def _attention_fwd_kernel(
    *refs,
    has_seg: bool,
    sm_scale: float,
    softcap: float | None,
    causal: bool,
    window: int | None,
    kv_len: int | None,
    needs_mask: bool,
    num_q_blocks: int,
    block_q: int,
    block_k: int,
):
    if has_seg:
        tab_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    else:
        tab_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        qseg_ref = kseg_ref = None
    i = num_q_blocks - 1 - pl.program_id(0)  # heaviest causal rows first: a shorter tail
    q = q_ref[...]  # [block_q, D]
    qpos = (i * block_q + jnp.arange(block_q))[:, None]
    qseg = None if qseg_ref is None else qseg_ref[...][:, None]
    raw_max = softcap is None and sm_scale > 0

    def body(j, carry, masked):
        acc, m_prev, l_prev = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        raw = dot_f32(q, k, trans_b=True)
        # Without a softcap the scores stay raw: the row max is taken on them and scaled once per row
        # (c > 0, so max(c * s) == c * max(s) exactly), and exp2's argument is one FMA per score,
        # c * s - m, instead of a multiply pass over the tile followed by a subtract. With it and the
        # 128x128 tile the forward ran 423 TFLOP/s at T=8192 and 463 at T=32768 (run 2), against 380
        # and 442 before (128x64, without it); the two changes landed together and are not separated.
        s = raw if raw_max else log2_scores(raw, sm_scale=sm_scale, softcap=softcap)[0]
        if masked:
            kpos = (j * block_k + jnp.arange(block_k))[None, :]
            kseg = None if kseg_ref is None else kseg_ref[pl.ds(j * block_k, block_k)][None, :]
            mask = kernel_mask(qpos, kpos, qseg, kseg, causal=causal, window=window, kv_len=kv_len)
            s = jnp.where(mask, s, -jnp.inf)
        if raw_max:
            c = sm_scale * LOG2E
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1) * c)
            p = jnp.exp2(s * c - m_new[:, None])
        else:
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
            p = jnp.exp2(s - m_new[:, None])
        alpha = jnp.exp2(m_prev - m_new)
        l_new = l_prev * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot_f32(p.astype(v.dtype), v)
        return acc, m_new, l_new

    d = q.shape[-1]
    carry = (
        jnp.zeros((block_q, d), jnp.float32),
        jnp.full((block_q,), _M_INIT, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    ranges = tuple(tab_ref[c] for c in range(4))
    acc, m, l = masked_loops(body, ranges, carry, needs_mask)
    empty = l == 0.0  # no allowed key (padding): output 0, lse +inf so the backward's p is 0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


# --- Block sizes -----------------------------------------------------------------------------------


TILE_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and Triton launch params of the three kernels (forward, dk/dv, dq). Powers of two >= 16.

    ``fused_bwd``: one backward kernel (dk/dv tiles) that also adds dq with fp32 atomics, instead of
    the dk/dv and dq kernels (``attention_bwd`` module docstring)."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    block_q_dkv: int
    block_k_dkv: int
    num_warps_dkv: int
    num_stages_dkv: int
    block_q_dq: int
    block_k_dq: int
    num_warps_dq: int
    num_stages_dq: int
    fused_bwd: bool = False

    def __post_init__(self):
        for f in TILE_FIELDS:
            x = getattr(self, f)
            if x < 16 or x & (x - 1):
                raise ValueError(f"BlockSizes.{f}={x} must be a power of two >= 16")

    def clamp(self, t: int, s: int) -> BlockSizes:
        """Shrink tiles for short sequences (never below 16, Triton's smallest dot)."""
        cq, ck = max(16, pl.next_power_of_2(t)), max(16, pl.next_power_of_2(s))
        return dataclasses.replace(
            self,
            block_q=min(self.block_q, cq),
            block_k=min(self.block_k, ck),
            block_q_dkv=min(self.block_q_dkv, cq),
            block_k_dkv=min(self.block_k_dkv, ck),
            block_q_dq=min(self.block_q_dq, cq),
            block_k_dq=min(self.block_k_dq, ck),
        )


# One entry per head_dim: (fwd bq, bk, warps, stages, dk/dv bq, bk, warps, stages, dq bq, bk, warps,
# stages). Picked by `bench_attention.py --plan sweep:128,sweep:256` (H200, bf16, causal, B4 T4096,
# 2026-12-01, benchmarks/results/attention_h200.md run 2); each kernel timed alone:
#   D=128: fwd 128x128 at 8 warps, 3 stages 329 TFLOP/s (128x64: 322; 4 stages: over shared memory).
#          dk/dv 64x128 (kv tile resident) 414 TFLOP/s against 209 for the 64x64 tile used before; a 128-row
#          q tile spills (116). dq 128x64 (q tile resident) 435 against 184 for 64x64. The backward pair went
#          from 161 to 302 TFLOP/s; fwd+bwd at T=8192 377 (cuDNN 494), at T=32768 415 (cuDNN 549).
#   D=256: fwd 128x64, 2 stages 341 (64x64: 198). dk/dv 64x64 240, dq 64x32 at 4 warps, 3 stages 350; any
#          128-wide tile next to a 256-wide head is over the 227 KiB of shared memory.
#   D=64:  compiled and correct on the H200 (compiled check), not timed.
# The fused backward (`fused_bwd`: dq by fp32 atomics from the dk/dv kernel, 5 tile matmuls per block pair
# instead of 7) measured 118 TFLOP/s at its best D=128 tile (70 at D=256) against the split pair's 302:
# every kv block of a row adds into the same dq rows, and the atomics cost more than the two matmuls they
# save. It stays off.
_BLOCKS_BY_HEAD_DIM: dict[int, BlockSizes] = {
    64: BlockSizes(128, 64, 4, 3, 64, 64, 4, 3, 64, 64, 4, 3),
    128: BlockSizes(128, 128, 8, 3, 64, 128, 8, 3, 128, 64, 8, 3),
    256: BlockSizes(128, 64, 8, 2, 64, 64, 8, 2, 64, 32, 4, 3),
}


def pick_block_sizes(head_dim: int, dtype=jnp.bfloat16) -> BlockSizes:
    """The block sizes for a (padded, power-of-two) head_dim: a table lookup by the bytes of one row.

    The table is tuned for 2-byte inputs; a row of 4-byte inputs holds as many bytes as a 2-byte row of
    twice the head_dim, so fp32 takes that entry (the same shared memory per tile). Past the table's
    widest entry (fp32 at D=256) every tile of the widest entry is halved, which again keeps its bytes."""
    d = max(16, pl.next_power_of_2(head_dim))
    width = d * max(1, jnp.dtype(dtype).itemsize // 2)
    widest = max(_BLOCKS_BY_HEAD_DIM)
    if width in _BLOCKS_BY_HEAD_DIM:
        return _BLOCKS_BY_HEAD_DIM[width]
    if width < min(_BLOCKS_BY_HEAD_DIM):
        return _BLOCKS_BY_HEAD_DIM[min(_BLOCKS_BY_HEAD_DIM)]
    bs, shrink = _BLOCKS_BY_HEAD_DIM[widest], width // widest
    return dataclasses.replace(bs, **{f: max(16, getattr(bs, f) // shrink) for f in TILE_FIELDS})


# --- Forward pallas_call and custom_vjp wiring -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call: masking, scaling, tiles, and the true (unpadded) sizes."""

    causal: bool
    window: int | None
    softcap: float | None
    sm_scale: float
    blocks: BlockSizes
    interpret: bool
    t: int
    kv_len: int
    head_dim: int


def padded_lengths(t: int, s: int, bs: BlockSizes) -> tuple[int, int]:
    """T and S rounded up to every kernel's tiles (kept equal for self-attention)."""
    mq = max(bs.block_q, bs.block_q_dkv, bs.block_q_dq)
    mk = max(bs.block_k, bs.block_k_dkv, bs.block_k_dq)
    if t == s:
        m = max(mq, mk)
        return _common.cdiv(t, m) * m, _common.cdiv(t, m) * m
    return _common.cdiv(t, mq) * mq, _common.cdiv(s, mk) * mk


def _fwd_impl(q, k, v, segment_ids, st: _Static):
    """Padded inputs in, ``(out [B, Tp, H, D], lse [B, H, Tp])`` out."""
    b, t_pad, h, d = q.shape
    s_pad, kv = k.shape[1], k.shape[2]
    groups = h // kv
    bs = st.blocks
    bq, bk = bs.block_q, bs.block_k
    nq = t_pad // bq
    kv_len = st.kv_len
    seg_pad, qseg, kseg = kernel_segments(segment_ids, t_pad)
    tab = _block_ranges(
        t_pad,
        s_pad,
        bq,
        bk,
        causal=st.causal,
        window=st.window,
        kv_len=kv_len,
        seg_pad=seg_pad,
        by="q",
    )
    tb = tab.shape[0]
    needs_mask = st.causal or st.window is not None or seg_pad is not None or kv_len != s_pad
    kernel = functools.partial(
        _attention_fwd_kernel,
        has_seg=seg_pad is not None,
        sm_scale=st.sm_scale,
        softcap=st.softcap,
        causal=st.causal,
        window=st.window,
        kv_len=kv_len if kv_len != s_pad else None,
        needs_mask=needs_mask,
        num_q_blocks=nq,
        block_q=bq,
        block_k=bk,
    )
    rev = lambda i: nq - 1 - i
    in_specs = [pl.BlockSpec((None, None, 4), lambda i, hh, bb: (bb if tb > 1 else 0, rev(i), 0))]
    args = [tab]
    if seg_pad is not None:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, hh, bb: (bb, rev(i))),
            pl.BlockSpec((None, s_pad), lambda i, hh, bb: (bb, 0)),
        ]
        args += [qseg, kseg]
    in_specs += [
        pl.BlockSpec((None, bq, None, d), lambda i, hh, bb: (bb, rev(i), hh, 0)),
        pl.BlockSpec((None, s_pad, None, d), lambda i, hh, bb: (bb, 0, hh // groups, 0)),
        pl.BlockSpec((None, s_pad, None, d), lambda i, hh, bb: (bb, 0, hh // groups, 0)),
    ]
    args += [q, k, v]
    out, lse = pl.pallas_call(
        kernel,
        grid=(nq, h, b),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, d), lambda i, hh, bb: (bb, rev(i), hh, 0)),
            pl.BlockSpec((None, None, bq), lambda i, hh, bb: (bb, hh, rev(i))),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, t_pad), jnp.float32),
        ],
        name="fastjax_attention_fwd",
        **_common.pallas_call_kwargs(st.interpret, bs.num_warps, bs.num_stages),
    )(*args)
    return out, lse


def _pad_inputs(q, k, v, st: _Static):
    t_pad, s_pad = padded_lengths(q.shape[1], k.shape[1], st.blocks)
    dp = max(16, pl.next_power_of_2(st.head_dim))
    q = _pad_to(_pad_to(q, 1, t_pad), 3, dp)
    k = _pad_to(_pad_to(k, 1, s_pad), 3, dp)
    v = _pad_to(_pad_to(v, 1, s_pad), 3, dp)
    return q, k, v


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, st: _Static):
    return _flash_fwd(q, k, v, segment_ids, st)[0]


def _flash_fwd(q, k, v, segment_ids, st: _Static):
    qp, kp, vp = _pad_inputs(q, k, v, st)
    out, lse = _fwd_impl(qp, kp, vp, segment_ids, st)
    out = out[:, : st.t, :, : st.head_dim]
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(st: _Static, res, do):
    q, k, v, segment_ids, out, lse = res
    qp, kp, vp = _pad_inputs(q, k, v, st)
    t_pad = qp.shape[1]
    dp = qp.shape[3]
    op = _pad_to(_pad_to(out, 1, t_pad), 3, dp)
    dop = _pad_to(_pad_to(do.astype(q.dtype), 1, t_pad), 3, dp)
    dq, dk, dv = attention_bwd.flash_bwd(qp, kp, vp, segment_ids, op, dop, lse, st)
    t, s, d = st.t, st.kv_len, st.head_dim
    return dq[:, :t, :, :d], dk[:, :s, :, :d], dv[:, :s, :, :d], None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- Dispatch --------------------------------------------------------------------------------------


# The `auto` decision on a GPU, first matching row wins: (case, impl, evidence). Evidence is
# benchmarks/results/attention_h200.md: bf16, causal, fwd+bwd TFLOP/s of allowed pairs, H200,
# jax 0.11.2, cuDNN 9.19, 32k tokens per step.
AUTO_TABLE: tuple[tuple[str, str, str], ...] = (
    ("no GPU", "xla", "Pallas-Triton and cuDNN only compile for GPUs"),
    (
        "softcap, fp32, or a head_dim cuDNN lacks",
        "pallas",
        "cuDNN (through jax) cannot express them",
    ),
    (
        "segment_ids with max_segments (a static bound; the trainer sets it from its packed rows)",
        "cudnn",
        (
            "cuDNN's packed (THD) layout: 5.36 ms fwd+bwd vs Pallas 6.44 ms on packed rows (T=8192 "
            "D=128, 23 segments; run 2, 2026-12-01), 6.28 vs 8.33 at D=256; matches the reference on the H200, fwd and vjp, with and without a "
            "window (tests/pallas_kernels/test_attention.py::test_compiled_matches_reference_gpu, "
            "2026-12-01)"
        ),
    ),
    (
        "segment_ids without a bound",
        "pallas",
        (
            "jax.nn.dot_product_attention has no segment ids; Pallas on packed rows beats the same "
            "sequences as a padded cuDNN batch (run 2): 6.44 vs 16.84 ms (T=8192 D=128), 3.28 vs 10.90 "
            "(T=2048), 15.51 vs 18.90 (T=32768), 8.33 vs 20.08 (T=8192 D=256)"
        ),
    ),
    (
        "otherwise (bf16/fp16, causal, window, GQA)",
        "cudnn",
        (
            "cuDNN 494 vs Pallas 377 (T=8192 D=128), 549 vs 415 (T=32768), 371 vs 310 (T=2048), "
            "405 vs 268 (T=8192 D=256); run 2, 2026-12-01"
        ),
    ),
)


def choose_impl(
    q: jax.Array,
    segment_ids: jax.Array | None = None,
    softcap: float | None = None,
    max_segments: int | None = None,
) -> str:
    """Apply ``AUTO_TABLE`` to one call's arguments."""
    if not _common.on_gpu():
        return "xla"
    if segment_ids is not None and max_segments is None:
        return "pallas"
    if _cudnn_unsupported(q, segment_ids, softcap, max_segments) is not None:
        return "pallas"
    return "cudnn"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    sm_scale: float | None = None,
    impl: str = "auto",
    interpret: bool | None = None,
    block_sizes: BlockSizes | None = None,
    max_segments: int | None = None,
) -> jax.Array:
    """Attention ``[B, T, H, D] x [B, S, KV, D] -> [B, T, H, D]`` (see the module docstring).

    ``impl``: ``"pallas"`` (this module's kernels; interpret mode without a GPU), ``"cudnn"``
    (``jax.nn.dot_product_attention``; no softcap / fp32), ``"xla"`` (the reference) or ``"auto"``
    (``AUTO_TABLE``). ``block_sizes`` overrides ``pick_block_sizes``.

    ``impl="cudnn"`` with ``segment_ids`` uses cuDNN's packed (THD) layout through a private jax
    module and needs ``max_segments``, a static bound on the contiguous segments per row (more segments
    than that are silently dropped: derive it from the data). 2.2x the Pallas kernel on packed rows on
    the H200, and checked against the reference there (``test_compiled_matches_reference_gpu``).
    ``auto`` takes it whenever ``max_segments`` is given and cuDNN supports the case.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
    _check_args(q, k, v, segment_ids, causal, window, softcap)
    d = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    window = None if window is None else int(window)
    softcap = None if softcap is None else float(softcap)
    if impl == "auto":
        impl = choose_impl(q, segment_ids, softcap, max_segments)
    if impl == "xla":
        return attention_reference(
            q,
            k,
            v,
            segment_ids=segment_ids,
            causal=causal,
            window=window,
            softcap=softcap,
            sm_scale=sm_scale,
        )
    if impl == "cudnn":
        why = _cudnn_unsupported(q, segment_ids, softcap, max_segments)
        if why is not None:
            raise ValueError(f"impl='cudnn': {why}")
        return _cudnn_attention(
            q,
            k,
            v,
            segment_ids,
            causal=causal,
            window=window,
            sm_scale=sm_scale,
            max_segments=max_segments,
        )
    bs = (block_sizes or pick_block_sizes(d, q.dtype)).clamp(q.shape[1], k.shape[1])
    st = _Static(
        causal=causal,
        window=window,
        softcap=softcap,
        sm_scale=sm_scale,
        blocks=bs,
        interpret=_common.resolve_interpret(interpret),
        t=q.shape[1],
        kv_len=k.shape[1],
        head_dim=d,
    )
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    return _flash(q, k, v, segment_ids, st)
