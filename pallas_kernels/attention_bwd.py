"""Backward kernels of ``attention.py`` (FlashAttention-2 style, probabilities recomputed).

With ``s`` the log2-domain scores, ``lse`` the forward's log2 logsumexp, ``delta = rowsum(out * dout)``::

    p  = exp2(s - lse)                 (0 where masked, and for padding rows whose lse is +inf)
    dv = p^T dout
    ds = p * (dout v^T - delta)        (times 1 - tanh^2 under a softcap)
    dq = sm_scale * ds k               dk = sm_scale * ds^T q

Two ways to run it (``BlockSizes.fused_bwd``):
- Split (default), two kernels, so neither needs atomics:
  - ``_attention_dkdv_kernel``: one program per (kv block, kv head, batch). It keeps k, v and the dk/dv
    accumulators on chip and loops over the group's ``H // KV`` q heads and, per head, over the live q
    blocks: GQA costs no K/V repeat and no per-q-head dk/dv buffer (dk/dv are ``[B, S, KV, D]``).
  - ``_attention_dq_kernel``: one program per (q block, q head, batch), looping over live kv blocks.
  Seven tile matmuls per live block pair: ``q k^T`` and ``dout v^T`` are computed in both kernels.
- Fused (FlashAttention-2's own schedule): the dk/dv kernel also forms each pair's ``ds k`` and adds it
  into an fp32 dq buffer with atomic adds. Five tile matmuls per pair (2.5x the forward's two, the
  count every TFLOP/s figure uses), one launch, at the price of ``[B, T, H, D]`` fp32 atomics and a dq
  whose last bits depend on the order the adds land in (run to run, not only across GPUs).
All skip dead block pairs and run mask-free bodies on full ones, from the same tables as the forward.
The pieces shared with the forward come from ``attention_common.py``; ``attention.py`` imports this
module, so this module does not import it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from fastjax.pallas_kernels import _common
from fastjax.pallas_kernels.attention_common import (
    _block_ranges,
    dot_f32,
    kernel_mask,
    kernel_segments,
    log2_scores,
    masked_loops,
)
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _attention_dkdv_kernel(
    *refs,
    has_seg: bool,
    sm_scale: float,
    softcap: float | None,
    causal: bool,
    window: int | None,
    kv_len: int | None,
    needs_mask: bool,
    groups: int,
    block_q: int,
    block_k: int,
    fused: bool = False,
):
    # refs: [tab, (qseg, kseg), q, k, v, do, lse, delta, (dq_in)] inputs, then dk, dv, (dq) outputs.
    # With ``fused`` the aliased dq buffer comes in and out; only the output ref is written.
    refs = list(refs)
    tab_ref = refs.pop(0)
    qseg_ref, kseg_ref = (refs.pop(0), refs.pop(0)) if has_seg else (None, None)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    if fused:
        _, dk_ref, dv_ref, dq_ref = refs[6:]
    else:
        dk_ref, dv_ref = refs[6:]
        dq_ref = None
    j = pl.program_id(0)
    kvh = pl.program_id(1)
    k = k_ref[...]  # [block_k, D]
    v = v_ref[...]
    kpos = (j * block_k + jnp.arange(block_k))[:, None]
    kseg = None if kseg_ref is None else kseg_ref[...][:, None]
    ranges = tuple(tab_ref[c] for c in range(4))

    def head(g, carry):
        h = kvh * groups + g

        def body(i, carry, masked):
            dk, dv = carry
            rows = pl.ds(i * block_q, block_q)
            q = q_ref[rows, h, :]  # [block_q, D]
            do = do_ref[rows, h, :]
            lse = lse_ref[h, rows]
            delta = delta_ref[h, rows]
            s, t = log2_scores(dot_f32(k, q, trans_b=True), sm_scale=sm_scale, softcap=softcap)
            if masked:  # s is [block_k, block_q]: keys on rows
                qpos = (i * block_q + jnp.arange(block_q))[None, :]
                qseg = None if qseg_ref is None else qseg_ref[rows][None, :]
                mask = kernel_mask(
                    qpos, kpos, qseg, kseg, causal=causal, window=window, kv_len=kv_len
                )
                s = jnp.where(mask, s, -jnp.inf)
            p = jnp.exp2(s - lse[None, :])
            dv = dv + dot_f32(p.astype(do.dtype), do)
            ds = p * (dot_f32(v, do, trans_b=True) - delta[None, :])
            if t is not None:
                ds = ds * (1.0 - t * t)
            ds = ds.astype(q.dtype)
            dk = dk + dot_f32(ds, q)
            if dq_ref is not None:  # ds^T k: this pair's share of dq rows `rows` of head h
                plgpu.atomic_add(
                    dq_ref, (rows, h, slice(None)), dot_f32(ds, k, trans_a=True) * sm_scale
                )
            return dk, dv

        return masked_loops(body, ranges, carry, needs_mask)

    d = k.shape[-1]
    carry = (jnp.zeros((block_k, d), jnp.float32), jnp.zeros((block_k, d), jnp.float32))
    if groups == 1:
        dk, dv = head(0, carry)
    else:
        dk, dv = jax.lax.fori_loop(0, groups, head, carry)
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _attention_dq_kernel(
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
        tab_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    else:
        tab_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        qseg_ref = kseg_ref = None
    i = num_q_blocks - 1 - pl.program_id(0)
    q = q_ref[...]  # [block_q, D]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    qpos = (i * block_q + jnp.arange(block_q))[:, None]
    qseg = None if qseg_ref is None else qseg_ref[...][:, None]

    def body(j, dq, masked):
        cols = pl.ds(j * block_k, block_k)
        k = k_ref[cols, :]
        v = v_ref[cols, :]
        s, t = log2_scores(dot_f32(q, k, trans_b=True), sm_scale=sm_scale, softcap=softcap)
        if masked:
            kpos = (j * block_k + jnp.arange(block_k))[None, :]
            kseg = None if kseg_ref is None else kseg_ref[cols][None, :]
            mask = kernel_mask(qpos, kpos, qseg, kseg, causal=causal, window=window, kv_len=kv_len)
            s = jnp.where(mask, s, -jnp.inf)
        p = jnp.exp2(s - lse)
        ds = p * (dot_f32(do, v, trans_b=True) - delta)
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + dot_f32(ds.astype(k.dtype), k)

    ranges = tuple(tab_ref[c] for c in range(4))
    dq = masked_loops(body, ranges, jnp.zeros(q.shape, jnp.float32), needs_mask)
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _bwd_statics(q, k, segment_ids, st):
    t_pad, s_pad = q.shape[1], k.shape[1]
    kv_len = st.kv_len if st.kv_len != s_pad else None
    seg_pad, qseg, kseg = kernel_segments(segment_ids, t_pad)
    has_seg = seg_pad is not None
    statics = {
        "has_seg": has_seg,
        "sm_scale": st.sm_scale,
        "softcap": st.softcap,
        "causal": st.causal,
        "window": st.window,
        "kv_len": kv_len,
        "needs_mask": st.causal or st.window is not None or has_seg or kv_len is not None,
    }
    ranges = functools.partial(
        _block_ranges,
        t_pad,
        s_pad,
        causal=st.causal,
        window=st.window,
        kv_len=st.kv_len,
        seg_pad=seg_pad,
    )
    return statics, ranges, qseg, kseg


def dkdv_call(q, k, v, segment_ids, do, lse, delta, st, *, fused: bool = False):
    """dk, dv ``[B, Sp, KV, Dp]``: grid (kv block, kv head, batch), all q heads of the group inside.

    ``fused``: also dq ``[B, Tp, H, Dp]`` in fp32, accumulated with atomic adds (returns dk, dv, dq)."""
    b, t_pad, h, d = q.shape
    s_pad, kv = k.shape[1], k.shape[2]
    bs = st.blocks
    statics, ranges, qseg, kseg = _bwd_statics(q, k, segment_ids, st)
    bq, bk = bs.block_q_dkv, bs.block_k_dkv
    tab = ranges(bq, bk, by="k")
    tb = tab.shape[0]
    in_specs = [pl.BlockSpec((None, None, 4), lambda j, g, bb: (bb if tb > 1 else 0, j, 0))]
    args = [tab]
    if statics["has_seg"]:
        in_specs += [
            pl.BlockSpec((None, t_pad), lambda j, g, bb: (bb, 0)),
            pl.BlockSpec((None, bk), lambda j, g, bb: (bb, j)),
        ]
        args += [qseg, kseg]
    full_q = pl.BlockSpec((None, t_pad, h, d), lambda j, g, bb: (bb, 0, 0, 0))
    kv_blk = pl.BlockSpec((None, bk, None, d), lambda j, g, bb: (bb, j, g, 0))
    stat = pl.BlockSpec((None, h, t_pad), lambda j, g, bb: (bb, 0, 0))
    in_specs += [full_q, kv_blk, kv_blk, full_q, stat, stat]
    args += [q, k, v, do, lse, delta]
    out_specs = [kv_blk, kv_blk]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    extra = {}
    if fused:  # every program adds into the whole dq row block of its batch row
        in_specs.append(full_q)
        args.append(jnp.zeros(q.shape, jnp.float32))
        out_specs.append(full_q)
        out_shape.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
        extra["input_output_aliases"] = {len(args) - 1: 2}
    return pl.pallas_call(
        functools.partial(
            _attention_dkdv_kernel, groups=h // kv, block_q=bq, block_k=bk, fused=fused, **statics
        ),
        grid=(s_pad // bk, kv, b),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        name="fastjax_attention_bwd_fused" if fused else "fastjax_attention_dkdv",
        **extra,
        **_common.pallas_call_kwargs(st.interpret, bs.num_warps_dkv, bs.num_stages_dkv),
    )(*args)


def dq_call(q, k, v, segment_ids, do, lse, delta, st):
    """dq ``[B, Tp, H, Dp]``: grid (q block, q head, batch), heaviest causal q blocks first."""
    b, t_pad, h, d = q.shape
    s_pad, kv = k.shape[1], k.shape[2]
    groups = h // kv
    bs = st.blocks
    statics, ranges, qseg, kseg = _bwd_statics(q, k, segment_ids, st)
    bq, bk = bs.block_q_dq, bs.block_k_dq
    nq = t_pad // bq
    tab = ranges(bq, bk, by="q")
    tb = tab.shape[0]
    rev = lambda i: nq - 1 - i
    in_specs = [pl.BlockSpec((None, None, 4), lambda i, hh, bb: (bb if tb > 1 else 0, rev(i), 0))]
    args = [tab]
    if statics["has_seg"]:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, hh, bb: (bb, rev(i))),
            pl.BlockSpec((None, s_pad), lambda i, hh, bb: (bb, 0)),
        ]
        args += [qseg, kseg]
    q_blk = pl.BlockSpec((None, bq, None, d), lambda i, hh, bb: (bb, rev(i), hh, 0))
    full_kv = pl.BlockSpec((None, s_pad, None, d), lambda i, hh, bb: (bb, 0, hh // groups, 0))
    stat = pl.BlockSpec((None, None, bq), lambda i, hh, bb: (bb, hh, rev(i)))
    in_specs += [q_blk, full_kv, full_kv, q_blk, stat, stat]
    args += [q, k, v, do, lse, delta]
    return pl.pallas_call(
        functools.partial(_attention_dq_kernel, num_q_blocks=nq, block_q=bq, block_k=bk, **statics),
        grid=(nq, h, b),
        in_specs=in_specs,
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="fastjax_attention_dq",
        **_common.pallas_call_kwargs(st.interpret, bs.num_warps_dq, bs.num_stages_dq),
    )(*args)


def flash_bwd(q, k, v, segment_ids, out, do, lse, st):
    """Padded q/k/v/out/dout (``[B, Tp, H, Dp]`` / ``[B, Sp, KV, Dp]``), lse ``[B, H, Tp]`` -> dq, dk, dv."""
    # delta = rowsum(out * dout) in fp32, [B, H, Tp]; padding rows have out == 0, hence delta == 0.
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    if st.blocks.fused_bwd:
        dk, dv, dq = dkdv_call(q, k, v, segment_ids, do, lse, delta, st, fused=True)
        return dq.astype(q.dtype), dk, dv
    dk, dv = dkdv_call(q, k, v, segment_ids, do, lse, delta, st)
    dq = dq_call(q, k, v, segment_ids, do, lse, delta, st)
    return dq, dk, dv
