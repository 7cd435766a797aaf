"""One fused step of blockwise 8-bit Adam: dequantize both moments, update them, requantize, as one kernel.

Math, per element, in fp32 (``g`` the gradient, ``m``/``v`` the moments, ``bc1 = 1 - b1**t``,
``bc2 = 1 - b2**t``, ``bc1_next = 1 - b1**(t + 1)``)::

    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    m_hat = m / bc1                                     (Nesterov: b1 * m / bc1_next + (1 - b1) * g / bc1)
    u = m_hat / (sqrt(v / bc2 + eps_root) + eps)        (the Adam direction, before lr and weight decay)

Storage (``fastjax.optim``): a tensor's moment is its flattened values, zero-padded to ``nb`` blocks of 256,
as uint8 codes ``[nb, 256]`` and an fp32 absmax ``[nb]`` per block; a value is ``map[code] * absmax``, with
bitsandbytes' dynamic map (signed for ``m``, unsigned for ``v``; 256 sorted fp32 entries). Requantizing
takes the block's new absmax and snaps ``value * (1 / absmax)`` to the nearest map entry by a binary search
over the entries' midpoints (ties to the lower index, NaN to index 0), step for step as
``fastjax.quant.quantize_to_code``: on the same fp32 values the codes are the same.

Why a kernel: XLA runs this step as several passes (the block absmax reductions and the 8-step search do
not fuse with the elementwise update), 38 ms against optax.adamw's 9 ms on a 1.24B-parameter tree
(H200, ``benchmarks/results/nf4_h200.md``). The step must move, per element, the gradient (4 bytes in fp32),
two codes in and out (4) and the update out (4): 12 bytes, against fp32 AdamW's 24. The kernel reads each
of them once: one program takes ``block_rows`` whole blocks (rows), so the absmax of a block is a row
reduction in registers; the map lookups and the search's midpoint gathers read two 1 KiB tables that stay
in L1.

Layouts: ``g [nb, 256]`` any float dtype; codes uint8 ``[nb, 256]``; absmax fp32 ``[nb]``; ``scalars``
fp32 ``[3]`` = ``(bc1, bc2, bc1_next)`` (traced: they depend on the step count). Outputs: ``u [nb, 256]``
in ``g``'s dtype and the four new moment arrays, written over their inputs (``input_output_aliases``), so
a donated optimizer state is updated in place. No backward: an optimizer step is not differentiated.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from fastjax.pallas_kernels._common import cdiv, masked_load, pallas_call_kwargs
from fastjax.quant import (
    DYNAMIC_MAP_SIGNED,
    DYNAMIC_MAP_UNSIGNED,
    blockwise_dequantize_8bit,
    blockwise_quantize_8bit,
    code_midpoints,
)
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

__all__ = [
    "BLOCK",
    "AdamHyper",
    "BlockSizes",
    "adam8bit_update",
    "adam8bit_update_reference",
    "adam_direction",
]

BLOCK = 256  # values per quantization block (bitsandbytes' 8-bit optimizers)


@dataclasses.dataclass(frozen=True)
class AdamHyper:
    """The static hyperparameters of the step."""

    b1: float
    b2: float
    eps: float
    eps_root: float
    nesterov: bool


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------
def adam_direction(g32, m, v, bc1, bc2, bc1_next, hp: AdamHyper):
    """New fp32 moments and the Adam direction: the reference's, the kernel body's and
    ``fastjax.optim``'s math for the moments it keeps in fp32."""
    m = hp.b1 * m + (1.0 - hp.b1) * g32
    v = hp.b2 * v + (1.0 - hp.b2) * (g32 * g32)
    if hp.nesterov:
        m_hat = hp.b1 * m / bc1_next + (1.0 - hp.b1) * g32 / bc1
    else:
        m_hat = m / bc1
    return m, v, m_hat / (jnp.sqrt(v / bc2 + hp.eps_root) + hp.eps)


def adam8bit_update_reference(
    g: jax.Array,
    m_codes: jax.Array,
    m_absmax: jax.Array,
    v_codes: jax.Array,
    v_absmax: jax.Array,
    scalars: jax.Array,
    *,
    b1: float,
    b2: float,
    eps: float,
    eps_root: float = 0.0,
    nesterov: bool = False,
):
    """Pure jnp: ``(u, m_codes, m_absmax, v_codes, v_absmax)`` for blocked ``[nb, 256]`` inputs."""
    hp = AdamHyper(b1, b2, eps, eps_root, nesterov)
    m = blockwise_dequantize_8bit(m_codes.reshape(-1), m_absmax, DYNAMIC_MAP_SIGNED)
    v = blockwise_dequantize_8bit(v_codes.reshape(-1), v_absmax, DYNAMIC_MAP_UNSIGNED)
    bc1, bc2, bc1_next = scalars[0], scalars[1], scalars[2]
    g32 = g.astype(jnp.float32).reshape(-1)
    m, v, u = adam_direction(g32, m, v, bc1, bc2, bc1_next, hp)
    mc, ma = blockwise_quantize_8bit(m, DYNAMIC_MAP_SIGNED, BLOCK)
    vc, va = blockwise_quantize_8bit(v, DYNAMIC_MAP_UNSIGNED, BLOCK)
    return u.astype(g.dtype).reshape(g.shape), mc.reshape(g.shape), ma, vc.reshape(g.shape), va


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------


def _snap(x, mids_ref):
    """Nearest-entry index of each value of ``x`` (already divided by its absmax), as int32.

    The same branchless search as ``fastjax.quant.quantize_to_code``: the first step against the middle
    midpoint, then 7 compare-and-gather steps (``mids_ref`` holds the 255 midpoints, padded to 256)."""
    half = BLOCK // 2
    idx = jnp.where(x > mids_ref[half - 1], half, 0).astype(jnp.int32)
    step = half // 2
    while step >= 1:
        cand = idx + step
        idx = jnp.where(masked_load(mids_ref.at[cand - 1], None) < x, cand, idx)
        step //= 2
    return idx


def _requantize(x, mids_ref):
    """Blockwise absmax quantization of the rows of ``x`` [R, 256]: (int32 codes, fp32 absmax [R])."""
    absmax = jnp.max(jnp.abs(x), axis=1)
    pos = absmax > 0
    inv = jnp.where(pos, 1.0 / jnp.where(pos, absmax, 1.0), 0.0)
    return _snap(x * inv[:, None], mids_ref), absmax


def _adam8bit_kernel(
    g_ref,
    mc_ref,
    ma_ref,
    vc_ref,
    va_ref,
    scal_ref,
    smap_ref,
    umap_ref,
    smid_ref,
    umid_ref,
    u_ref,
    mc_out,
    ma_out,
    vc_out,
    va_out,
    *,
    n_blocks: int,
    block_rows: int,
    hp: AdamHyper,
):
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    cols = jnp.arange(BLOCK)
    rmask = rows < n_blocks if n_blocks % block_rows else None
    mask = None if rmask is None else rmask[:, None]
    at = (rows[:, None], cols[None, :])
    g = masked_load(g_ref.at[at], mask, 0).astype(jnp.float32)
    mc = masked_load(mc_ref.at[at], mask, 0).astype(jnp.int32)
    vc = masked_load(vc_ref.at[at], mask, 0).astype(jnp.int32)
    ma = masked_load(ma_ref.at[rows], rmask, 0.0)
    va = masked_load(va_ref.at[rows], rmask, 0.0)
    m = masked_load(smap_ref.at[mc], None) * ma[:, None]
    v = masked_load(umap_ref.at[vc], None) * va[:, None]
    bc1, bc2, bc1_next = scal_ref[0], scal_ref[1], scal_ref[2]
    m, v, u = adam_direction(g, m, v, bc1, bc2, bc1_next, hp)
    plt.store(u_ref.at[at], u.astype(u_ref.dtype), mask=mask)
    mc, ma = _requantize(m, smid_ref)
    vc, va = _requantize(v, umid_ref)
    plt.store(mc_out.at[at], mc.astype(jnp.uint8), mask=mask)
    plt.store(vc_out.at[at], vc.astype(jnp.uint8), mask=mask)
    plt.store(ma_out.at[rows], ma, mask=rmask)
    plt.store(va_out.at[rows], va, mask=rmask)


# ----------------------------------------------------------------------------------------------------------
# Block sizes
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """``block_rows`` quantization blocks (of 256 values) per program; ``num_warps`` Triton warps.

    Measured on one H200 (``benchmarks/bench_adam8bit.py``, one 1.24B-value moment, copy probe 3,868
    GB/s, 2026-12-02): 4 rows x 2 warps 9.83 ms, 4 x 4 10.06, 8 x 4 9.92, 16 x 4 (the old default) 11.29,
    16 x 2 13.52, 32 x 4 14.70, 32 x 2 185 (spills); the XLA step 35.29. Small tiles win: more programs
    in flight hide the table lookups' latency. Every tile's codes matched the reference exactly."""

    block_rows: int = 4
    num_warps: int = 2

    def __post_init__(self):
        if self.block_rows < 1 or self.block_rows & (self.block_rows - 1):
            raise ValueError(f"block_rows={self.block_rows} must be a power of 2 (Triton)")


def pick_block_sizes(n_blocks: int) -> BlockSizes:
    """The one heuristic: the default tile, shrunk for tensors of fewer blocks than one tile."""
    bs = BlockSizes()
    return dataclasses.replace(bs, block_rows=min(bs.block_rows, pl.next_power_of_2(n_blocks)))


@functools.cache
def _tables() -> tuple[np.ndarray, ...]:
    def padded(x):
        return np.concatenate([x, np.zeros(BLOCK - len(x), np.float32)]).astype(np.float32)

    return (
        DYNAMIC_MAP_SIGNED.astype(np.float32),
        DYNAMIC_MAP_UNSIGNED.astype(np.float32),
        padded(code_midpoints(DYNAMIC_MAP_SIGNED)),
        padded(code_midpoints(DYNAMIC_MAP_UNSIGNED)),
    )


def _pallas_update(g, mc, ma, vc, va, scalars, hp: AdamHyper, interpret, block_sizes):
    n_blocks = g.shape[0]
    bs = block_sizes or pick_block_sizes(n_blocks)
    kernel = functools.partial(_adam8bit_kernel, n_blocks=n_blocks, block_rows=bs.block_rows, hp=hp)
    codes = jax.ShapeDtypeStruct(mc.shape, jnp.uint8)
    absmax = jax.ShapeDtypeStruct(ma.shape, jnp.float32)
    tables = tuple(jnp.asarray(t) for t in _tables())
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(g.shape, g.dtype), codes, absmax, codes, absmax),
        grid=(cdiv(n_blocks, bs.block_rows),),
        input_output_aliases={1: 1, 2: 2, 3: 3, 4: 4},
        name="adam8bit_update",
        **pallas_call_kwargs(interpret, num_warps=bs.num_warps),
    )(g, mc, ma, vc, va, scalars.astype(jnp.float32), *tables)


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------
def adam8bit_update(
    g: jax.Array,
    m_codes: jax.Array,
    m_absmax: jax.Array,
    v_codes: jax.Array,
    v_absmax: jax.Array,
    scalars: jax.Array,
    *,
    b1: float,
    b2: float,
    eps: float,
    eps_root: float = 0.0,
    nesterov: bool = False,
    impl: str = "pallas",
    interpret: bool | None = None,
    block_sizes: BlockSizes | None = None,
):
    """One 8-bit Adam step on blocked moments (module docstring):
    ``(u, m_codes, m_absmax, v_codes, v_absmax)``.

    ``g`` ``[nb, 256]``; codes uint8 ``[nb, 256]``; absmax fp32 ``[nb]``; ``scalars`` ``(bc1, bc2,
    bc1_next)``. ``impl="xla"`` runs ``adam8bit_update_reference``; ``interpret`` as every kernel here
    (``FASTJAX_PALLAS_INTERPRET``, on by default without a GPU)."""
    nb = g.shape[0]
    want = {"g": ((nb, BLOCK), None), "m_codes": ((nb, BLOCK), jnp.uint8)}
    want |= {"v_codes": ((nb, BLOCK), jnp.uint8), "m_absmax": ((nb,), jnp.float32)}
    want |= {"v_absmax": ((nb,), jnp.float32), "scalars": ((3,), None)}
    arrays = dict(g=g, m_codes=m_codes, m_absmax=m_absmax, v_codes=v_codes, v_absmax=v_absmax)
    arrays["scalars"] = scalars
    for name, (shape, dtype) in want.items():
        x = arrays[name]
        if x.shape != shape or (dtype is not None and x.dtype != dtype):
            raise ValueError(
                f"adam8bit_update: {name} is {x.dtype}{list(x.shape)}, expected "
                f"{'' if dtype is None else jnp.dtype(dtype)}{list(shape)} (g is [nb, {BLOCK}])"
            )
    kw = dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov)
    if impl == "xla":
        return adam8bit_update_reference(g, m_codes, m_absmax, v_codes, v_absmax, scalars, **kw)
    if impl != "pallas":
        raise ValueError(f"adam8bit_update: impl={impl!r}, expected 'pallas' or 'xla'")
    return _pallas_update(
        g, m_codes, m_absmax, v_codes, v_absmax, scalars, AdamHyper(**kw), interpret, block_sizes
    )
