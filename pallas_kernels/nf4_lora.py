"""Fused NF4 linear + LoRA (QLoRA's matmul): ``y = x @ dequant(W).T + s * (x @ A.T) @ B.T (+ bias)``.

Layouts: ``x [..., in]``; ``W`` an ``NF4Tensor`` of logical shape ``[out, in]`` (``fastjax.quant``: packed
``[out/2, in]`` uint8 where byte (i, k) holds rows i (high nibble) and i + out/2 (low nibble), absmax per
64-block along ``in``, double-quantized); ``A [r, in]``, ``B [out, r]`` (PEFT names), ``bias [out]``.

Forward (one Pallas Triton kernel, grid ``(M / bm, (out/2) / bn, split_k)``): each program loads a packed
tile ``[bn, 64]`` per k-step, dequantizes it in registers into TWO weight tiles (rows ``n0..n0+bn`` and
``out/2 + n0..``; ``NF4_CODE[code] * absmax`` in fp32, cast to ``x.dtype``) and accumulates two ``[bm, bn]``
fp32 tiles ``x_tile @ W_tile.T``. The epilogue adds ``(s * x @ A.T) @ B_tile.T`` (``x @ A.T`` is one small
XLA matmul before the kernel, ``[M, r]``) and the bias, and stores in ``x.dtype``. Small ``M`` (decode) splits
``in`` across programs (``split_k``) and sums fp32 partials in XLA, which then adds LoRA and bias.

The absmax is double-quantized in HBM; one small XLA op turns it into fp32 ``[in/64, out]`` (transposed, so
a k-step's scales for ``bn`` rows are contiguous) before each kernel: 1/16 of the bytes of a bf16 W.

Backward (W is frozen: only dx, dA, dB, dbias): ``dx = dy @ W + s * (dy @ B) @ A`` in one kernel that
re-dequantizes W tiles the same way (grid ``(M / bm, in / bk)``, loop over ``out/2``), so no bf16 W is ever
written to HBM. ``dA = s * (dy @ B).T @ x`` and ``dB = s * dy.T @ (x @ A.T)`` are LoRA-sized XLA matmuls.
Saved for backward: x, W (the frozen NF4 leaves, no copy), A, B and ``x @ A.T`` (``[M, r]``).

Dtype policy: matmul operands in ``x.dtype`` (A, B cast to it), fp32 accumulation, one cast on store.
fp32 inputs use IEEE fp32 dots. Constraints (clear errors otherwise): ``in % 64 == 0``, ``out % 32 == 0``,
``block_size == 64``, ``r <= 128``, W without batch dims (slice stacked layers first).

Dequantization in registers, ``BlockSizes.lookup``: ``"gather"`` reads ``NF4_CODE[hi]`` / ``NF4_CODE[lo]``
from two 256-entry tables indexed by the whole byte (one L1-resident gather per value, no bit ops);
``"select"`` evaluates a 4-level select tree on the code bits (15 selects, pure ALU; 2.3x faster than
``"gather"`` on H200, the default).

Performance (H200, jax 0.11.2, benchmarks/results/nf4_h200.md): correct, but SLOWER than XLA's
dequantize-then-matmul at T >= 2048 (0.41-0.81x) and than the bf16 matmul (0.39-0.78x): the per-value
dequantization is ALU work repeated for every row block, which a wgmma-bound GEMM does not pay; taller row
blocks (bm=256) are the best amortization found. The kernels never write a bf16 W to HBM (memory win).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from fastjax.pallas_kernels import _common
from jax.experimental import pallas as pl

from fastjax.pallas_kernels.nf4_lora_xla import (
    frozen_cotangents,
    nf4_lora_linear_xla,
    nf4_xla_backward,
)
from fastjax.quant import NF4_CODE, NF4Tensor, dequantize_absmax, dequantize_nf4

QBLOCK = 64  # NF4 block size the kernels support (bitsandbytes' default)


# ---------------------------------------------------------------------------------------------------------
# Reference


def nf4_lora_linear_reference(
    x: jax.Array,
    w: NF4Tensor,
    lora_a: jax.Array | None = None,
    lora_b: jax.Array | None = None,
    *,
    lora_scale: Any = 1.0,
    bias: jax.Array | None = None,
) -> jax.Array:
    """Dequantize W to ``x.dtype``, then matmuls with fp32 accumulation (same rounding points as the kernel:
    W values cast once, ``s * x @ A.T`` cast to ``x.dtype`` before ``@ B.T``)."""
    dt = x.dtype
    wd = dequantize_nf4(w, dt)
    prec = jax.lax.Precision.HIGHEST if dt == jnp.float32 else None
    y = jnp.einsum("...i,oi->...o", x, wd, preferred_element_type=jnp.float32, precision=prec)
    if lora_a is not None:
        xa = jnp.einsum(
            "...i,ri->...r",
            x,
            lora_a.astype(dt),
            preferred_element_type=jnp.float32,
            precision=prec,
        )
        xa = (xa * lora_scale).astype(dt)
        y = y + jnp.einsum(
            "...r,or->...o",
            xa,
            lora_b.astype(dt),
            preferred_element_type=jnp.float32,
            precision=prec,
        )
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dt)


# ---------------------------------------------------------------------------------------------------------
# Kernels

_TABLE_HI = NF4_CODE[np.arange(256) >> 4].astype(np.float32)  # value of the high nibble of a byte
_TABLE_LO = NF4_CODE[np.arange(256) & 0xF].astype(np.float32)  # value of the low nibble


def _select_nf4(c: jax.Array) -> jax.Array:
    """NF4_CODE[c] for int32 codes 0..15 as a select tree on the code bits (no memory access)."""
    level = [float(v) for v in NF4_CODE]
    bit = 1
    while len(level) > 1:
        b = (c & bit) != 0
        level = [jnp.where(b, level[2 * k + 1], level[2 * k]) for k in range(len(level) // 2)]
        bit <<= 1
    return level[0]


def _dequant_pair(p, thi_ref, tlo_ref, s_hi, s_lo, dtype, lookup):
    """Packed tile ``[bn, 64]`` uint8 + scales ``[bn]`` -> weight tiles (rows n0.., rows out/2 + n0..)."""
    pi = p.astype(jnp.int32)
    if lookup == "gather":
        v_hi, v_lo = thi_ref[pi], tlo_ref[pi]
    else:
        v_hi, v_lo = _select_nf4(pi >> 4), _select_nf4(pi & 0xF)
    return (v_hi * s_hi[:, None]).astype(dtype), (v_lo * s_lo[:, None]).astype(dtype)


def _dot(a, b, *, trans_b=False):
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=prec)


def _dot_tn(a, b):
    """``a.T @ b.T`` (contract a's dim 0 with b's dim 1), fp32 accumulation."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(
        a, b, (((0,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=prec
    )


def _nf4_lora_fwd_kernel(
    x_ref,
    p_ref,
    s_ref,
    thi_ref,
    tlo_ref,
    *rest,
    bm,
    bn,
    k_split,
    nh,
    has_lora,
    has_bias,
    partial,
    lookup,
    w_lhs,
):
    rest = list(rest)
    xa_ref = b_ref = bias_ref = None
    if has_lora:
        xa_ref, b_ref = rest.pop(0), rest.pop(0)
    if has_bias:
        bias_ref = rest.pop(0)
    (y_ref,) = rest
    i, j, ks = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pl.ds(pl.multiple_of(i * bm, bm), bm)
    n_hi = pl.ds(pl.multiple_of(j * bn, bn), bn)
    n_lo = pl.ds(pl.multiple_of(nh + j * bn, bn), bn)
    k_base = ks * k_split

    def body(kk, carry):
        acc_hi, acc_lo = carry
        k0 = pl.multiple_of(k_base + kk * QBLOCK, QBLOCK)
        xt = x_ref[rows, pl.ds(k0, QBLOCK)]
        p = p_ref[n_hi, pl.ds(k0, QBLOCK)]
        kb = k0 // QBLOCK
        w_hi, w_lo = _dequant_pair(
            p, thi_ref, tlo_ref, s_ref[kb, n_hi], s_ref[kb, n_lo], xt.dtype, lookup
        )
        if w_lhs:  # [bn, bm] accumulators: the dequantized tile is the dot's register operand
            return acc_hi + _dot(w_hi, xt, trans_b=True), acc_lo + _dot(w_lo, xt, trans_b=True)
        return acc_hi + _dot(xt, w_hi, trans_b=True), acc_lo + _dot(xt, w_lo, trans_b=True)

    zeros = jnp.zeros((bn, bm) if w_lhs else (bm, bn), jnp.float32)
    acc_hi, acc_lo = jax.lax.fori_loop(0, k_split // QBLOCK, body, (zeros, zeros))
    if w_lhs:
        acc_hi, acc_lo = acc_hi.T, acc_lo.T
    if partial:
        y_ref[ks, rows, n_hi] = acc_hi
        y_ref[ks, rows, n_lo] = acc_lo
        return
    if has_lora:
        xa = xa_ref[rows, :]
        acc_hi += _dot(xa, b_ref[n_hi, :], trans_b=True)
        acc_lo += _dot(xa, b_ref[n_lo, :], trans_b=True)
    if has_bias:
        acc_hi += bias_ref[n_hi][None, :]
        acc_lo += bias_ref[n_lo][None, :]
    y_ref[rows, n_hi] = acc_hi.astype(y_ref.dtype)
    y_ref[rows, n_lo] = acc_lo.astype(y_ref.dtype)


def _nf4_lora_bwd_kernel(
    dy_ref, p_ref, s_ref, thi_ref, tlo_ref, *rest, bm, bn, bk, nh, has_lora, lookup, w_lhs
):
    if has_lora:
        dyb_ref, a_ref, dx_ref = rest
    else:
        (dx_ref,) = rest
    i, kt = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(pl.multiple_of(i * bm, bm), bm)
    n_sub = bk // QBLOCK

    def body(jj, accs):
        n0 = pl.multiple_of(jj * bn, bn)
        dy_hi = dy_ref[rows, pl.ds(n0, bn)]
        dy_lo = dy_ref[rows, pl.ds(pl.multiple_of(nh + n0, bn), bn)]
        new = []
        for sub in range(n_sub):
            k0 = pl.multiple_of(kt * bk + sub * QBLOCK, QBLOCK)
            kb = k0 // QBLOCK
            p = p_ref[pl.ds(n0, bn), pl.ds(k0, QBLOCK)]
            w_hi, w_lo = _dequant_pair(
                p,
                thi_ref,
                tlo_ref,
                s_ref[kb, pl.ds(n0, bn)],
                s_ref[kb, pl.ds(pl.multiple_of(nh + n0, bn), bn)],
                dy_hi.dtype,
                lookup,
            )
            # w_lhs: dx.T tiles [64, bm] = W.T @ dy.T, the dequantized tile is the register operand.
            if w_lhs:
                new.append(accs[sub] + _dot_tn(w_hi, dy_hi) + _dot_tn(w_lo, dy_lo))
            else:
                new.append(accs[sub] + _dot(dy_hi, w_hi) + _dot(dy_lo, w_lo))
        return tuple(new)

    shape = (QBLOCK, bm) if w_lhs else (bm, QBLOCK)
    zeros = tuple(jnp.zeros(shape, jnp.float32) for _ in range(n_sub))
    accs = jax.lax.fori_loop(0, nh // bn, body, zeros)
    for sub in range(n_sub):
        cols = pl.ds(pl.multiple_of(kt * bk + sub * QBLOCK, QBLOCK), QBLOCK)
        acc = accs[sub].T if w_lhs else accs[sub]
        if has_lora:
            acc += _dot(dyb_ref[rows, :], a_ref[:, cols])
        dx_ref[rows, cols] = acc.astype(dx_ref.dtype)


# ---------------------------------------------------------------------------------------------------------
# Block sizes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of both kernels. ``bn`` counts packed rows: a forward program writes ``2 * bn`` outputs.

    ``split_k`` splits ``in`` across programs in the forward (decode shapes); ``bwd_bk`` is the dx tile
    width (a multiple of 64). ``lookup`` picks the in-register dequantization (module docstring);
    ``w_lhs`` / ``bwd_w_lhs`` make the dequantized tile the dot's left (register) operand and accumulate
    transposed tiles, transposed once before the store. ``xla_backward``: the fused forward with
    ``nf4_lora_xla``'s backward (``impl="pallas_fwd"``: decode sizes, where only the forward wins).

    Measured on H200 (bench_nf4, gate/up 4096->14336, T=2048, bf16): forward ``select`` 1.66 ms vs
    ``gather`` 3.87 ms at bm=128, bn=64, 8 warps; at bm=256 ``select`` 1.08 ms, ``gather`` 2.10 ms.
    """

    bm: int = 128
    bn: int = 64
    split_k: int = 1
    num_warps: int = 8
    num_stages: int = 3
    bwd_bm: int = 128
    bwd_bn: int = 64
    bwd_bk: int = 128
    bwd_num_warps: int = 8
    bwd_num_stages: int = 3
    lookup: str = "select"
    w_lhs: bool = False
    bwd_w_lhs: bool = False
    xla_backward: bool = False

    def __post_init__(self):
        for f in ("bm", "bn", "bwd_bm", "bwd_bn"):
            v = getattr(self, f)
            if v < 16 or v & (v - 1):
                raise ValueError(f"BlockSizes.{f}={v}: expected a power of two >= 16")
        if self.bwd_bk % QBLOCK:
            raise ValueError(f"BlockSizes.bwd_bk={self.bwd_bk}: expected a multiple of {QBLOCK}")
        if self.lookup not in ("gather", "select"):
            raise ValueError(f"BlockSizes.lookup={self.lookup!r}: expected 'gather' or 'select'")


def _largest_divisor(n: int, candidates: tuple[int, ...]) -> int | None:
    return next((c for c in candidates if n % c == 0), None)


def pick_block_sizes(m: int, out: int, n_in: int, dtype=jnp.bfloat16) -> BlockSizes:
    """Tiles for ``x [m, n_in] @ W[out, n_in].T``. Large m: 256 x (2 x 64) output tiles, dx tiles 256 x 64
    (H200, gate/up T=2048: forward 1.08 ms vs 1.64 ms at bm=128 — the in-register dequantization is paid
    once per W tile per row block, so taller row blocks amortize it; fwd+bwd 2.26 ms vs 2.93 ms with
    128 x 128 dx tiles; ``w_lhs`` was slower: 2.65 ms / 4.51 ms). Small m (decode):
    the smallest row tile, narrow column tiles and ``split_k`` so that ~8 programs per H200 SM (132) are
    in flight streaming W (one program per SM left the decode kernel latency-bound: 0.21 ms for gate/up
    at T=1, under 0.2 TB/s, in the first H200 run). 4-byte inputs take at most 128-row tiles and
    QBLOCK-deep dx steps, so the pipelined x / dy tiles hold no more bytes than the bf16 128-row pick."""
    nh = out // 2
    bn = _largest_divisor(nh, (64, 32, 16))
    if m <= 64:
        bm = max(16, int(pl.next_power_of_2(m)))
        bn = _largest_divisor(nh, (32, 16))
        n_tiles = nh // bn
        k_steps = n_in // QBLOCK
        split = max(
            s
            for s in range(1, k_steps + 1)
            if k_steps % s == 0 and n_tiles * s <= 1100 and (s == 1 or k_steps // s >= 2)
        )
        return BlockSizes(
            bm=bm,
            bn=bn,
            split_k=split,
            num_warps=4,
            num_stages=3,
            bwd_bm=bm,
            bwd_bn=bn,
            bwd_bk=QBLOCK,
            bwd_num_warps=4,
        )
    bm = 256 if m >= 1024 else (128 if m >= 128 else 64)
    if jnp.dtype(dtype).itemsize >= 4:
        return BlockSizes(bm=min(bm, 128), bn=bn, bwd_bm=min(bm, 128), bwd_bn=bn, bwd_bk=QBLOCK)
    return BlockSizes(bm=bm, bn=bn, bwd_bm=bm, bwd_bn=bn, bwd_bk=QBLOCK if bm == 256 else 128)


def _check(x, w, lora_a, lora_b, bias, bs: BlockSizes | None):
    if not isinstance(w, NF4Tensor):
        raise TypeError(f"nf4_lora_linear: w must be an NF4Tensor, got {type(w).__name__}")
    if w.batch_shape:
        raise ValueError(
            f"nf4_lora_linear: w has batch dims {w.batch_shape}; pass one layer's slice"
        )
    out, n_in = w.shape
    if x.shape[-1] != n_in:
        raise ValueError(
            f"nf4_lora_linear: {x.shape=} does not end in W's in={n_in} (W shape {w.shape})"
        )
    if (lora_a is None) != (lora_b is None):
        raise ValueError("nf4_lora_linear: give both lora_a and lora_b, or neither")
    if lora_a is not None:
        r = lora_a.shape[0]
        if lora_a.shape != (r, n_in) or lora_b.shape != (out, r):
            raise ValueError(
                f"nf4_lora_linear: {lora_a.shape=} / {lora_b.shape=} do not match "
                f"A [r, {n_in}], B [{out}, r]"
            )
    if bias is not None and bias.shape != (out,):
        raise ValueError(f"nf4_lora_linear: {bias.shape=}, expected ({out},)")


def _check_pallas_shapes(w: NF4Tensor, lora_a):
    out, n_in = w.shape
    if w.block_size != QBLOCK:
        raise ValueError(
            f"nf4_lora_linear(impl='pallas'): W block_size={w.block_size}; the kernel needs "
            f"{QBLOCK} (use impl='xla')"
        )
    if n_in % QBLOCK or out % 32:
        raise ValueError(
            f"nf4_lora_linear(impl='pallas'): W shape {w.shape} needs in % 64 == 0 and "
            "out % 32 == 0 (use impl='xla')"
        )
    if lora_a is not None and lora_a.shape[0] > 128:
        raise ValueError(f"nf4_lora_linear(impl='pallas'): LoRA rank {lora_a.shape[0]} > 128")


def supports_pallas(w: NF4Tensor, lora_a: jax.Array | None = None) -> bool:
    """Whether ``impl="pallas"`` accepts this weight / adapter (else use ``impl="xla"``)."""
    try:
        _check_pallas_shapes(w, lora_a)
    except ValueError:
        return False
    return not w.batch_shape


def _check_block_sizes(w: NF4Tensor, bs: BlockSizes):
    out, n_in = w.shape
    nh = out // 2
    if nh % bs.bn or nh % bs.bwd_bn:
        raise ValueError(
            f"nf4_lora_linear: out/2={nh} is not a multiple of bn={bs.bn} / bwd_bn={bs.bwd_bn}"
        )
    if n_in % (bs.split_k * QBLOCK) or n_in % bs.bwd_bk:
        raise ValueError(
            f"nf4_lora_linear: in={n_in} is not a multiple of split_k*64="
            f"{bs.split_k * QBLOCK} / bwd_bk={bs.bwd_bk}"
        )


# ---------------------------------------------------------------------------------------------------------
# pallas_call wrappers (2-D x) and custom_vjp


def _pad_rows(a: jax.Array, mult: int) -> jax.Array:
    pad = -a.shape[0] % mult
    return a if pad == 0 else jnp.pad(a, ((0, pad), (0, 0)))


def _pad_rank(r: int) -> int:
    return max(16, int(pl.next_power_of_2(r)))


def _tables():
    return jnp.asarray(_TABLE_HI), jnp.asarray(_TABLE_LO)


def _scales(w: NF4Tensor) -> jax.Array:
    return dequantize_absmax(w).T  # [in/64, out] fp32


def _fwd_call(x, w, xa_s, b, bias, bs: BlockSizes, interpret):
    m, n_in = x.shape
    out = w.shape[0]
    nh = out // 2
    xp = _pad_rows(x, bs.bm)
    mp = xp.shape[0]
    has_lora, has_bias = xa_s is not None, bias is not None
    partial = bs.split_k > 1
    args = [xp, w.packed, _scales(w), *_tables()]
    if has_lora and not partial:
        args += [_pad_rows(xa_s, bs.bm), b]
    if has_bias and not partial:
        args.append(bias.astype(jnp.float32))
    kernel = functools.partial(
        _nf4_lora_fwd_kernel,
        bm=bs.bm,
        bn=bs.bn,
        k_split=n_in // bs.split_k,
        nh=nh,
        has_lora=has_lora and not partial,
        has_bias=has_bias and not partial,
        partial=partial,
        lookup=bs.lookup,
        w_lhs=bs.w_lhs,
    )
    out_shape = (
        jax.ShapeDtypeStruct((bs.split_k, mp, out), jnp.float32)
        if partial
        else jax.ShapeDtypeStruct((mp, out), x.dtype)
    )
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(mp // bs.bm, nh // bs.bn, bs.split_k),
        **_common.pallas_call_kwargs(interpret, bs.num_warps, bs.num_stages),
    )(*args)
    if not partial:
        return y[:m]
    y = jnp.sum(y[:, :m], axis=0)
    if has_lora:
        y = y + _dot(xa_s, b, trans_b=True)
    if has_bias:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def _bwd_call(dy, w, dyb_s, a, bs: BlockSizes, interpret):
    m, out = dy.shape
    n_in = w.shape[1]
    nh = out // 2
    dyp = _pad_rows(dy, bs.bwd_bm)
    mp = dyp.shape[0]
    has_lora = dyb_s is not None
    args = [dyp, w.packed, _scales(w), *_tables()]
    if has_lora:
        args += [_pad_rows(dyb_s, bs.bwd_bm), a]
    kernel = functools.partial(
        _nf4_lora_bwd_kernel,
        bm=bs.bwd_bm,
        bn=bs.bwd_bn,
        bk=bs.bwd_bk,
        nh=nh,
        has_lora=has_lora,
        lookup=bs.lookup,
        w_lhs=bs.bwd_w_lhs,
    )
    dx = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, n_in), dy.dtype),
        grid=(mp // bs.bwd_bm, n_in // bs.bwd_bk),
        **_common.pallas_call_kwargs(interpret, bs.bwd_num_warps, bs.bwd_num_stages),
    )(*args)
    return dx[:m]


def _lora_inputs(x, lora_a, lora_b, scale):
    """(x @ A.T) fp32 [m, r], the kernel's ``s * x @ A.T`` in x.dtype padded to rank rp, B padded."""
    dt = x.dtype
    r = lora_a.shape[0]
    rp = _pad_rank(r)
    a = lora_a.astype(dt)
    xa = _dot(x, a, trans_b=True)
    xa_s = jnp.pad((xa * scale).astype(dt), ((0, 0), (0, rp - r)))
    b = jnp.pad(lora_b.astype(dt), ((0, 0), (0, rp - r)))
    return xa, xa_s, b


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _nf4_lora_2d(x, w, lora_a, lora_b, bias, scale, bs, interpret):
    return _nf4_lora_2d_fwd(x, w, lora_a, lora_b, bias, scale, bs, interpret)[0]


def _nf4_lora_2d_fwd(x, w, lora_a, lora_b, bias, scale, bs, interpret):
    xa = xa_s = b = None
    if lora_a is not None:
        xa, xa_s, b = _lora_inputs(x, lora_a, lora_b, scale)
    y = _fwd_call(x, w, xa_s, b, bias, bs, interpret)
    return y, (x, w, lora_a, lora_b, bias, scale, xa)


def _nf4_lora_2d_bwd(bs, interpret, res, dy):
    x, w, lora_a, lora_b, bias, scale, xa = res
    dt = x.dtype
    if bs.xla_backward:  # the same residuals, with x @ A.T in x.dtype as the XLA forward saves it
        return nf4_xla_backward((*res[:-1], None if xa is None else xa.astype(dt)), dy)
    dy = dy.astype(dt)
    da = db = dyb_s = a = None
    if lora_a is not None:
        r = lora_a.shape[0]
        rp = _pad_rank(r)
        dyb = _dot(dy, lora_b.astype(dt))  # [m, r] fp32
        dyb_s = jnp.pad((dyb * scale).astype(dt), ((0, 0), (0, rp - r)))
        a = jnp.pad(lora_a.astype(dt), ((0, rp - r), (0, 0)))
        da = (scale * _dot(dyb.T.astype(dt), x)).astype(lora_a.dtype)
        db = (scale * _dot(dy.T, xa.astype(dt))).astype(lora_b.dtype)
    dx = _bwd_call(dy, w, dyb_s, a, bs, interpret)
    dw, dbias, dscale = frozen_cotangents(dy, w, bias, scale)
    return dx, dw, da, db, dbias, dscale


_nf4_lora_2d.defvjp(_nf4_lora_2d_fwd, _nf4_lora_2d_bwd)


# ---------------------------------------------------------------------------------------------------------
# Public op


def nf4_lora_linear(
    x: jax.Array,
    w: NF4Tensor,
    lora_a: jax.Array | None = None,
    lora_b: jax.Array | None = None,
    *,
    lora_scale: Any = 1.0,
    bias: jax.Array | None = None,
    impl: str = "pallas",
    interpret: bool | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """``x @ dequant(w).T + lora_scale * (x @ lora_a.T) @ lora_b.T (+ bias)``, output in ``x.dtype``.

    ``x [..., in]``, ``w`` NF4Tensor ``[out, in]`` (no batch dims), ``lora_a [r, in]``, ``lora_b [out, r]``,
    ``bias [out]``. Differentiable in x, lora_a, lora_b, bias (W is frozen: zero cotangent).
    ``impl="pallas"`` runs the fused kernels (interpret mode per ``interpret`` /
    ``FASTJAX_PALLAS_INTERPRET``, default on without a GPU); ``"xla"`` dequantize-then-matmul in XLA with
    ``x.dtype`` results and a backward that re-dequantizes (``nf4_lora_xla``, what training uses on GPU);
    ``"reference"`` the plain-autodiff oracle ``nf4_lora_linear_reference``; ``"pallas_fwd"`` the fused
    forward with the XLA backward (``BlockSizes.xla_backward``).
    """
    _check(x, w, lora_a, lora_b, bias, block_sizes)
    if impl == "xla":
        return nf4_lora_linear_xla(x, w, lora_a, lora_b, lora_scale=lora_scale, bias=bias)
    if impl == "reference":
        return nf4_lora_linear_reference(x, w, lora_a, lora_b, lora_scale=lora_scale, bias=bias)
    if impl not in ("pallas", "pallas_fwd"):
        raise ValueError(
            f"nf4_lora_linear: impl={impl!r}, expected 'pallas', 'pallas_fwd', 'xla' or 'reference'"
        )
    out, n_in = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in)
    _check_pallas_shapes(w, lora_a)
    bs = block_sizes or pick_block_sizes(x2.shape[0], out, n_in, x2.dtype)
    _check_block_sizes(w, bs)
    if impl == "pallas_fwd":
        bs = dataclasses.replace(bs, xla_backward=True)
    scale = jnp.asarray(lora_scale, jnp.float32)
    y = _nf4_lora_2d(x2, w, lora_a, lora_b, bias, scale, bs, _common.resolve_interpret(interpret))
    return y.reshape(*lead, out)
