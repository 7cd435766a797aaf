"""What the forward (``attention.py``) and backward (``attention_bwd.py``) flash-attention kernels share.

In-kernel pieces, traced inside every kernel body: ``dot_f32`` (matmuls accumulated in fp32),
``log2_scores`` (scores in the log2 domain, with the softcap's ``tanh`` kept for the backward),
``kernel_mask`` (causal / window / segment / key-padding mask of a tile) and ``masked_loops`` (a kv- or
q-block loop split into masked edges and a mask-free middle).

XLA-side preparation, run before each ``pallas_call``: ``kernel_segments`` (segment ids padded to T_pad,
in query and key form) and ``_block_ranges``, the block-skipping table. From causal/window bounds and
per-block segment ranges (min/max of the non-padding ids) it marks each (q block, kv block) pair *live*
(some pair inside may be allowed) and *full* (every pair allowed: no mask needed), and reduces each
block row to ``[lo, flo, fhi, hi]``: a kernel program loops over ``[lo, hi)``, mask-free on ``[flo, fhi)``.

This module imports neither kernel module, so ``attention.py`` can import ``attention_bwd.py``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LOG2E = math.log2(math.e)


# --- Kernel pieces shared by the forward and backward kernels --------------------------------------


def dot_f32(
    a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False
) -> jax.Array:
    """``a @ b`` (optionally transposed) accumulated in fp32 (Triton would accumulate fp16 in fp16).

    fp32 operands ask for HIGHEST: Pallas-Triton lowers DEFAULT to tf32 (3e-4 rel. error measured on
    the H200 against the fp32 reference), HIGHEST to IEEE fp32.
    """
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 and b.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def log2_scores(s: jax.Array, *, sm_scale: float, softcap: float | None):
    """Raw ``q.k`` -> scores in the log2 domain, and ``tanh`` (for the softcap backward) or None."""
    if softcap is None:
        return s * (sm_scale * LOG2E), None
    t = jnp.tanh(s * (sm_scale / softcap))
    return t * (softcap * LOG2E), t


def kernel_mask(qpos, kpos, qseg, kseg, *, causal: bool, window: int | None, kv_len: int | None):
    """Allowed-pairs mask from broadcastable position / segment vectors (either orientation).

    ``qseg`` uses -1 for padding queries and ``kseg`` 0 for padding keys, so equality alone excludes padding.
    ``kv_len`` (static) masks the keys added by padding S up to the block size.
    """
    mask = None

    def _and(m, x):
        return x if m is None else m & x

    if kv_len is not None:
        mask = _and(mask, kpos < kv_len)
    if causal:
        mask = _and(mask, kpos <= qpos)
    if window is not None:
        mask = _and(mask, kpos > qpos - window)
    if qseg is not None:
        mask = _and(mask, qseg == kseg)
    return mask


def masked_loops(body, ranges, carry, needs_mask: bool):
    """Run ``body(j, carry, masked)`` over ``[lo, hi)``: masked edges, a mask-free middle ``[flo, fhi)``."""
    lo, flo, fhi, hi = ranges
    if not needs_mask:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(lo, flo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(flo, fhi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(fhi, hi, functools.partial(body, masked=True), carry)


# --- Segment ids and block-skipping tables (XLA, O(B * T/bq * S/bk) int work) ----------------------


def _pad_to(x, axis, size, value=0):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def kernel_segments(segment_ids, t_pad):
    """``(seg_pad, qseg, kseg)``: padded ids (0 = padding), query form (-1 = padding), key form."""
    if segment_ids is None:
        return None, None, None
    seg = _pad_to(segment_ids.astype(jnp.int32), 1, t_pad)
    return seg, jnp.where(seg == 0, -1, seg), seg


def _seg_block_stats(seg, block):
    """Per block of ``seg`` [B, N*block] (0 = padding): min/max non-padding id and "all real"."""
    b, n = seg.shape
    sb = seg.reshape(b, n // block, block)
    real = sb > 0
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.min(jnp.where(real, sb, big), axis=-1)
    hi = jnp.max(jnp.where(real, sb, 0), axis=-1)
    return lo, hi, jnp.all(real, axis=-1)


def _ranges(live, full):
    """Along the last axis: ``[lo, flo, fhi, hi]`` with [flo, fhi) mask-free and live blocks in [lo, hi)."""
    n = live.shape[-1]
    idx = jnp.arange(n)
    lo = jnp.min(jnp.where(live, idx, n), axis=-1)
    hi = jnp.max(jnp.where(live, idx + 1, 0), axis=-1)
    lo = jnp.minimum(lo, hi)  # nothing live: an empty [hi, hi)
    any_full = jnp.any(full, axis=-1)
    flo = jnp.min(jnp.where(full, idx, n), axis=-1)
    brk = jnp.min(jnp.where((idx >= flo[..., None]) & ~full, idx, n), axis=-1)
    fhi = jnp.minimum(brk, hi)
    flo = jnp.where(any_full, flo, hi)
    fhi = jnp.where(any_full, fhi, hi)
    return jnp.stack([lo, flo, fhi, hi], axis=-1).astype(jnp.int32)


def _block_ranges(
    t_pad: int,
    s_pad: int,
    block_q: int,
    block_k: int,
    *,
    causal: bool,
    window: int | None,
    kv_len: int,
    seg_pad: jax.Array | None,
    by: str,
) -> jax.Array:
    """Loop ranges per block: ``by="q"`` -> ``[Bt, nq, 4]`` kv-block ranges; ``by="k"`` -> ``[Bt, nk, 4]``.

    A (q block, kv block) pair is *live* when some pair inside may be allowed and *full* when every pair
    is allowed (no mask needed). ``seg_pad`` is ``[B, T_pad]`` with 0 for padding (or None).
    """
    nq, nk = t_pad // block_q, s_pad // block_k
    q0 = np.arange(nq)[:, None] * block_q
    q1 = q0 + block_q - 1
    k0 = np.arange(nk)[None, :] * block_k
    k1 = k0 + block_k - 1
    live = np.broadcast_to(k0 < kv_len, (nq, nk))
    full = np.broadcast_to(k1 < kv_len, (nq, nk))
    if causal:
        live, full = live & (k0 <= q1), full & (k1 <= q0)
    if window is not None:
        live, full = live & (k1 > q0 - window), full & (k0 > q1 - window)
    live, full = jnp.asarray(live)[None], jnp.asarray(full)[None]
    if seg_pad is not None:
        qmin, qmax, qreal = _seg_block_stats(seg_pad, block_q)
        kmin, kmax, kreal = _seg_block_stats(seg_pad[:, :s_pad], block_k)
        live = (
            live & (kmax[:, None, :] >= qmin[:, :, None]) & (kmin[:, None, :] <= qmax[:, :, None])
        )
        one = (qmin == qmax) & qreal
        same = (qmin[:, :, None] == kmin[:, None, :]) & (kmin == kmax)[:, None, :]
        full = full & one[:, :, None] & same & kreal[:, None, :]
    full = full & live
    if by == "k":
        live, full = jnp.swapaxes(live, 1, 2), jnp.swapaxes(full, 1, 2)
    return _ranges(live, full)
