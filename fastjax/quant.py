"""NF4 weight quantization (QLoRA), bitsandbytes-compatible, plus the 8-bit dynamic map it shares with
``fastjax.optim``.

NF4 (Dettmers et al., QLoRA): each block of ``block_size=64`` consecutive weights along ``in`` is scaled by
its absolute maximum into [-1, 1] and every value is replaced by the index (0..15) of the nearest entry of
the 16-value NormalFloat table ``NF4_CODE`` (ties go to the lower index, as bitsandbytes' decision tree does:
``x > midpoint`` moves up). Double quantization stores the per-block absmax itself in 8 bits: subtract the
per-matrix mean (``offset``), then blockwise (256 absmax values per block) quantize with bitsandbytes'
signed dynamic map (``create_dynamic_map(signed=True)``), keeping one fp32 ``absmax2`` per 256-block.

Memory per weight: 0.5 byte of codes + 1/64 byte of absmax code + 4/16384 byte of absmax2 ~= 0.516 byte.

Layout of ``NF4Tensor`` (leading dims ``...`` are stacked layers, e.g. ``[L]``; every array field carries
them, so ``jax.tree.map(lambda a: a[i], t)`` and ``lax.scan`` slicing give the per-layer tensor):

    packed   uint8   [..., out // 2, in]   byte (i, k) = code(W[i, k]) << 4 | code(W[i + out // 2, k])
    absmax   uint8   [..., out, in // 64]  8-bit code of (absmax - offset)   (fp32 absmax if no double quant)
    absmax2  float32 [..., ceil(out * in / 64 / 256)]   per 256-block scale of the centered absmax
    offset   float32 [...]                 mean of the matrix's fp32 absmax

The nibble pairing is along ``out`` (row ``i`` in the high nibble with row ``i + out/2`` in the low one), not
along ``in`` as in bitsandbytes' flat buffer: a kernel tile ``packed[n0:n0+bn, k0:k0+bk]`` then yields two
contiguous ``[bn, bk]`` weight tiles (rows ``n0..`` and ``out/2 + n0..``) with no nibble interleaving in
registers, and the absmax blocks stay bitsandbytes' (64 consecutive ``in`` values of one row, row-major).
``to_bnb_state`` / ``from_bnb_state`` convert to and from bitsandbytes' ``Params4bit`` quant state:

    bnb weight  uint8 [out*in/2, 1]  flat row-major codes, element 2j in the high nibble, 2j+1 in the low
    bnb absmax                     = absmax.reshape(-1)     (uint8, or fp32 without double quant)
    bnb offset / nested_offset     = offset                 (scalar)
    bnb state2.absmax / nested_absmax = absmax2             (fp32)
    bnb state2.code / nested_quant_map = DYNAMIC_MAP_SIGNED; state2.blocksize = 256
    bnb code / quant_map           = NF4_CODE; blocksize = 64; quant_type = "nf4"; shape = (out, in)

Constraints: ``in % block_size == 0`` and ``out`` even. Quantization runs in jnp (jit-able, on device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The NF4 table as bitsandbytes ships it (float32 values; index 7 is exactly 0, index 15 exactly 1).
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

DOUBLE_QUANT_BLOCK = 256  # absmax values per 8-bit block (bitsandbytes' nested blocksize)


def create_dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> np.ndarray:
    """bitsandbytes' dynamic (tree) quantization map: 256 sorted float32 values in [-1, 1] (or [0, 1]).

    Dettmers, "8-Bit Approximations for Parallelism in Deep Learning": for exponent ``e = 0..6`` the values
    ``10**(e - 6) * m`` where ``m`` are the midpoints of ``linspace(0.1, 1, n_e + 1)``, ``n_e = 2**e`` per sign
    when signed (``2**(e + 1)`` unsigned), plus 0 and 1. Linspace and midpoints are taken in float32 as
    bitsandbytes does; entries agree with its table to float32 rounding.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        n = (
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        bounds = np.linspace(0.1, 1.0, n, dtype=np.float32)
        means = ((bounds[:-1] + bounds[1:]) / np.float32(2)).astype(np.float64)
        scale = 10.0 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    if additional_items > 0:  # not reached for the default 8-bit map; kept for other bit widths
        bounds = np.linspace(0.1, 1.0, additional_items + 1, dtype=np.float32)
        means = ((bounds[:-1] + bounds[1:]) / np.float32(2)).astype(np.float64)
        scale = 10.0 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(
            f"{signed=}, {max_exponent_bits=}, {total_bits=} give {len(data)} values, "
            f"expected {2**total_bits}"
        )
    data += [0.0] * (256 - len(data))
    return np.array(sorted(data), dtype=np.float32)


DYNAMIC_MAP_SIGNED = create_dynamic_map(signed=True)
DYNAMIC_MAP_UNSIGNED = create_dynamic_map(signed=False)


def code_midpoints(code: np.ndarray) -> np.ndarray:
    """The ``len(code) - 1`` fp32 midpoints between consecutive entries of a sorted code table."""
    c = code.astype(np.float64)
    return ((c[:-1] + c[1:]) / 2).astype(np.float32)


def quantize_to_code(x: jax.Array, code: np.ndarray) -> jax.Array:
    """Index (uint8) of the nearest entry of the sorted ``code`` for each value of ``x`` (ties: lower index).

    A branchless binary search over the midpoints, unrolled (log2(len(code)) steps of compare-and-gather on a
    tiny constant table), so XLA fuses it into the surrounding elementwise work. NaN maps to index 0.
    """
    mids = code_midpoints(np.asarray(code, np.float32))
    size = len(code)
    if size & (size - 1):
        raise ValueError(f"code must have a power-of-two length, got {size}")
    mids_j = jnp.asarray(mids)
    # First step against a scalar: a gather at a constant index would be constant-folded by XLA into a
    # tensor of x's size (seen: 64 MB constants and seconds of compile time for 16M-element moments).
    half = size // 2
    idx = jnp.where(x > mids[half - 1], half, 0).astype(jnp.int32)
    step = half // 2
    while step >= 1:
        cand = idx + step
        idx = jnp.where(mids_j[cand - 1] < x, cand, idx)
        step //= 2
    return idx.astype(jnp.uint8)


def blockwise_quantize_8bit(
    x: jax.Array, code: np.ndarray, block_size: int
) -> tuple[jax.Array, jax.Array]:
    """Blockwise absmax 8-bit quantization of the last axis of ``x`` (its size a multiple of ``block_size``).

    Returns ``(codes uint8 [..., n], absmax float32 [..., n // block_size])``; values are ``x / absmax``
    snapped to the nearest ``code`` entry (bitsandbytes' ``quantize_blockwise``; it multiplies by the
    reciprocal, as here). All-zero blocks get absmax 0 and code index of 0.0.
    """
    *lead, n = x.shape
    blocks = x.astype(jnp.float32).reshape(*lead, n // block_size, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    codes = quantize_to_code(blocks * inv[..., None], code)
    return codes.reshape(*lead, n), absmax


def blockwise_dequantize_8bit(codes: jax.Array, absmax: jax.Array, code: np.ndarray) -> jax.Array:
    """Inverse of ``blockwise_quantize_8bit``: float32 ``code[codes] * absmax`` per block."""
    *lead, n = codes.shape
    nb = absmax.shape[-1]
    vals = jnp.asarray(code)[codes.astype(jnp.int32)].reshape(*lead, nb, n // nb)
    return (vals * absmax[..., None]).reshape(*lead, n)


@dataclasses.dataclass(frozen=True)
class NF4Tensor:
    """A blockwise-NF4 quantized weight of logical shape ``[..., out, in]`` (see the module docstring).

    A pytree: ``packed``, ``absmax``, ``absmax2``, ``offset`` are its leaves (``absmax2``/``offset`` are
    ``None`` without double quantization); ``block_size`` and ``dtype`` (the original weight's dtype, the
    default dequantization dtype) are static. ``shape`` is derived from ``packed``, so it stays right after
    slicing the leading dims.
    """

    packed: jax.Array
    absmax: jax.Array
    absmax2: jax.Array | None
    offset: jax.Array | None
    block_size: int = 64
    dtype: Any = jnp.bfloat16

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, half, n_in = self.packed.shape
        return (*lead, 2 * half, n_in)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.packed.shape[:-2])

    @property
    def ndim(self) -> int:
        return self.packed.ndim

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def nbytes(self) -> int:
        return sum(
            int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
            for a in (self.packed, self.absmax, self.absmax2, self.offset)
            if a is not None
        )

    def absmax_f32(self) -> jax.Array:
        """The fp32 per-block absmax ``[..., out, in // block_size]`` (undoes the double quantization)."""
        return dequantize_absmax(self)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        return dequantize_nf4(self, dtype)


jax.tree_util.register_dataclass(
    NF4Tensor,
    data_fields=["packed", "absmax", "absmax2", "offset"],
    meta_fields=["block_size", "dtype"],
)


def _check_shape(shape: tuple[int, ...], block_size: int) -> None:
    if len(shape) < 2:
        raise ValueError(f"NF4 needs a weight [..., out, in], got shape {shape}")
    out, n_in = shape[-2:]
    if n_in % block_size:
        raise ValueError(
            f"NF4: in={n_in} (shape {shape}) must be a multiple of block_size={block_size}"
        )
    if out % 2:
        raise ValueError(
            f"NF4: out={out} (shape {shape}) must be even (rows i and i + out/2 share a byte)"
        )


def _double_quant(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """fp32 absmax [..., out, nb] -> (uint8 codes [..., out, nb], absmax2 [..., nblk2], offset [...])."""
    *lead, out, nb = absmax.shape
    flat = absmax.reshape(*lead, out * nb)
    offset = jnp.mean(flat, axis=-1)
    centered = flat - offset[..., None]
    n = out * nb
    pad = -n % DOUBLE_QUANT_BLOCK
    if pad:
        centered = jnp.pad(centered, [(0, 0)] * len(lead) + [(0, pad)])
    codes, absmax2 = blockwise_quantize_8bit(centered, DYNAMIC_MAP_SIGNED, DOUBLE_QUANT_BLOCK)
    return codes[..., :n].reshape(*lead, out, nb), absmax2, offset


def quantize_nf4(w: jax.Array, *, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize ``w [..., out, in]`` to NF4 (bitsandbytes' algorithm, this module's layout). Jit-able."""
    w = jnp.asarray(w)
    _check_shape(w.shape, block_size)
    *_lead, out, _n_in = w.shape
    dtype = w.dtype
    codes, absmax = _nf4_codes(w, block_size)
    packed = (codes[..., : out // 2, :] << 4) | codes[..., out // 2 :, :]
    if double_quant:
        absmax_q, absmax2, offset = _double_quant(absmax)
        return NF4Tensor(packed, absmax_q, absmax2, offset, block_size, dtype)
    return NF4Tensor(packed, absmax, None, None, block_size, dtype)


def _nf4_codes(w: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """NF4 codes (uint8 0..15, ``[..., out, in]``) and fp32 absmax ``[..., out, in // block_size]``."""
    *lead, out, n_in = w.shape
    codes, absmax = blockwise_quantize_8bit(w.reshape(*lead, out * n_in), NF4_CODE, block_size)
    return codes.reshape(*lead, out, n_in), absmax.reshape(*lead, out, n_in // block_size)


def dequantize_absmax(t: NF4Tensor) -> jax.Array:
    """fp32 absmax ``[..., out, in // block_size]`` of ``t``."""
    if not t.double_quant:
        return t.absmax.astype(jnp.float32)
    *lead, out, nb = t.absmax.shape
    n = out * nb
    codes = t.absmax.reshape(*lead, n)
    pad = t.absmax2.shape[-1] * DOUBLE_QUANT_BLOCK - n
    if pad:
        codes = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, pad)])
    vals = blockwise_dequantize_8bit(codes, t.absmax2, DYNAMIC_MAP_SIGNED)[..., :n]
    return (vals + t.offset[..., None]).reshape(*lead, out, nb)


def unpack_codes(packed: jax.Array) -> jax.Array:
    """``packed [..., out/2, in]`` -> NF4 codes ``[..., out, in]`` (uint8 0..15)."""
    return jnp.concatenate([packed >> 4, packed & 0xF], axis=-2)


def dequantize_nf4(t: NF4Tensor, dtype: Any = None) -> jax.Array:
    """``t`` as a dense ``[..., out, in]`` array of ``dtype`` (default: the original weight's dtype).

    ``NF4_CODE[code] * absmax`` in fp32, then one cast, as bitsandbytes' dequantize kernel does.
    """
    dtype = t.dtype if dtype is None else jnp.dtype(dtype)
    codes = unpack_codes(t.packed).astype(jnp.int32)
    *lead, out, n_in = codes.shape
    absmax = dequantize_absmax(t)
    vals = jnp.asarray(NF4_CODE)[codes].reshape(*lead, out, n_in // t.block_size, t.block_size)
    return (vals * absmax[..., None]).reshape(*lead, out, n_in).astype(dtype)


# ---------------------------------------------------------------------------------------------------------
# bitsandbytes interop (host side, numpy)


def to_bnb_state(t: NF4Tensor) -> dict[str, Any]:
    """One ``[out, in]`` NF4Tensor -> bitsandbytes ``Params4bit`` data + ``QuantState.as_dict()`` fields.

    Keys: ``weight`` (uint8 ``[out*in/2, 1]``), ``absmax``, ``quant_map``, ``quant_type``, ``blocksize``,
    ``dtype``, ``shape`` and, with double quantization, ``nested_absmax``, ``nested_blocksize``,
    ``nested_quant_map``, ``nested_dtype``, ``nested_offset``. Arrays are numpy.
    """
    if t.batch_shape:
        raise ValueError(
            f"to_bnb_state takes one matrix; got batch dims {t.batch_shape} (slice them first)"
        )
    out, n_in = t.shape
    codes = np.asarray(unpack_codes(jnp.asarray(t.packed))).reshape(-1)
    flat = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)
    state: dict[str, Any] = {
        "weight": flat.reshape(-1, 1),
        "absmax": np.asarray(t.absmax).reshape(-1),
        "quant_map": NF4_CODE.copy(),
        "quant_type": "nf4",
        "blocksize": t.block_size,
        "dtype": t.dtype.name,
        "shape": (out, n_in),
    }
    if t.double_quant:
        state.update(
            nested_absmax=np.asarray(t.absmax2, np.float32),
            nested_blocksize=DOUBLE_QUANT_BLOCK,
            nested_quant_map=DYNAMIC_MAP_SIGNED.copy(),
            nested_dtype="float32",
            nested_offset=float(np.asarray(t.offset)),
        )
    return state


def from_bnb_state(state: Mapping[str, Any]) -> NF4Tensor:
    """The inverse of ``to_bnb_state``: bitsandbytes weight bytes + quant-state fields -> NF4Tensor.

    Accepts numpy arrays or CPU torch tensors. The code tables must be NF4's and the signed dynamic map
    (checked to 1e-6); other quant types raise.
    """

    def arr(key, dtype=None):
        v = state[key]
        v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        return v if dtype is None else v.astype(dtype)

    if state.get("quant_type", "nf4") != "nf4":
        raise ValueError(
            f"from_bnb_state: quant_type={state['quant_type']!r}; only 'nf4' is supported"
        )
    if "quant_map" in state and not np.allclose(arr("quant_map", np.float32), NF4_CODE, atol=1e-6):
        raise ValueError("from_bnb_state: quant_map is not the NF4 table")
    block_size = int(state.get("blocksize", 64))
    out, n_in = (int(s) for s in state["shape"])
    _check_shape((out, n_in), block_size)
    flat = (
        arr("weight").reshape(-1).view(np.uint8)
        if arr("weight").dtype == np.uint8
        else arr("weight").reshape(-1).astype(np.uint8)
    )
    if flat.size != out * n_in // 2:
        raise ValueError(
            f"from_bnb_state: weight has {flat.size} bytes, expected {out * n_in // 2} "
            f"for shape {(out, n_in)}"
        )
    codes = np.empty(out * n_in, np.uint8)
    codes[0::2], codes[1::2] = flat >> 4, flat & 0xF
    codes = codes.reshape(out, n_in)
    packed = (codes[: out // 2] << 4) | codes[out // 2 :]
    nb = out * n_in // block_size
    dtype = state.get("dtype", "bfloat16")
    dtype = str(dtype).replace("torch.", "")
    if "nested_absmax" in state:
        if int(state.get("nested_blocksize", DOUBLE_QUANT_BLOCK)) != DOUBLE_QUANT_BLOCK:
            raise ValueError(
                f"from_bnb_state: nested_blocksize={state['nested_blocksize']}, expected 256"
            )
        if "nested_quant_map" in state and not np.allclose(
            arr("nested_quant_map", np.float32), DYNAMIC_MAP_SIGNED, atol=1e-6
        ):
            raise ValueError("from_bnb_state: nested_quant_map is not the signed dynamic map")
        absmax = arr("absmax", np.uint8).reshape(out, nb // out)
        absmax2 = arr("nested_absmax", np.float32).reshape(-1)
        offset = np.float32(float(np.asarray(state["nested_offset"])))
        return NF4Tensor(
            jnp.asarray(packed),
            jnp.asarray(absmax),
            jnp.asarray(absmax2),
            jnp.asarray(offset),
            block_size,
            dtype,
        )
    absmax = arr("absmax", np.float32).reshape(out, nb // out)
    return NF4Tensor(jnp.asarray(packed), jnp.asarray(absmax), None, None, block_size, dtype)


# ---------------------------------------------------------------------------------------------------------
# Whole-model quantization


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Which weights become NF4 and how (``load_in_4bit``).

    Quantized: every ``weight`` leaf of a decoder layer (a path through ``layers``) with at least 3 dims
    (``[L, out, in]``: the stacked linears); 2-dim layer leaves are norms. Kept in ``compute_dtype``:
    embeddings, ``lm_head``, norms, biases, and any path with a component in ``skip_modules``.
    """

    skip_modules: tuple[str, ...] = ("lm_head", "embed_tokens")
    compute_dtype: str = "bfloat16"
    block_size: int = 64
    double_quant: bool = True
    quant_type: str = "nf4"

    def __post_init__(self):
        if self.quant_type != "nf4":
            raise ValueError(f"QuantConfig.quant_type={self.quant_type!r}: only 'nf4' is supported")
        if self.block_size not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(
                f"QuantConfig.block_size={self.block_size}: expected a power of two in "
                "[64, 4096] (the fused kernel needs 64)"
            )
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        jnp.dtype(self.compute_dtype)  # raises on an unknown dtype name


_quantize_jit = jax.jit(quantize_nf4, static_argnames=("block_size", "double_quant"))


def is_quantizable(path: tuple[str, ...], leaf: Any, cfg: QuantConfig) -> bool:
    """Whether ``quantize_params`` turns this leaf (key path ``path``) into an NF4Tensor."""
    if not path or path[-1] != "weight" or "layers" not in path:
        return False
    if any(p in cfg.skip_modules for p in path) or isinstance(leaf, NF4Tensor):
        return False
    shape = tuple(getattr(leaf, "shape", ()))
    return len(shape) >= 3 and shape[-1] % cfg.block_size == 0 and shape[-2] % 2 == 0


def quantize_params(
    params: Mapping[str, Any], cfg: QuantConfig | None = None, *, donate: bool = False
) -> dict[str, Any]:
    """A copy of the nested-dict ``params`` with each decoder linear ``weight [L, out, in]`` as NF4Tensor.

    Each stacked leaf is quantized one layer slice at a time (one jit-compiled call per slice) and the
    quantized slices are stacked, so the extra memory at any moment is one bf16 slice plus the quantized
    leaf. With ``donate=True`` each quantized source ``jax.Array`` is deleted right away, so a caller that
    drops its own reference never holds the 16-bit and 4-bit models at once. Other leaves are returned
    as they are (not copied, not cast).
    """
    cfg = cfg or QuantConfig()

    def walk(node, path):
        if isinstance(node, Mapping):
            return {k: walk(v, (*path, str(k))) for k, v in node.items()}
        if not is_quantizable(path, node, cfg):
            return node
        slices = [
            _quantize_jit(node[i], block_size=cfg.block_size, double_quant=cfg.double_quant)
            for i in range(node.shape[0])
        ]
        q = jax.tree.map(lambda *xs: jnp.stack(xs), *slices)
        if donate and isinstance(node, jax.Array):
            node.delete()
        return q

    return walk(params, ())
