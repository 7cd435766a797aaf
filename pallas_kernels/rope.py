"""Rotary position embedding (HF Llama "rotate-half" layout) for q and k in one Pallas Triton kernel.

Math, per token t with position p_t (``positions [B, T]`` int32; packed segments restart at 0) and
``j in [0, Dh/2)``::

    theta_tj = p_t * inv_freq_j                          (fp32, as HF: ``inv_freq @ position_ids``)
    c = cos(theta) * attention_scaling,  s = sin(theta) * attention_scaling
    out[..., j]        = x[..., j] * c_j - x[..., j + Dh/2] * s_j
    out[..., j + Dh/2] = x[..., j + Dh/2] * c_j + x[..., j] * s_j

which is HF's ``x * cos + rotate_half(x) * sin`` with ``cos``/``sin`` duplicated over both halves.
The backward is the rotation by ``-theta`` (``s -> -s``) applied to the cotangents: the same kernel.
``positions`` and ``inv_freq`` get no gradient.

Layouts: q ``[B, T, H, Dh]``, k ``[B, T, KV, Dh]`` (viewed as ``[B*T, heads, Dh]``), inv_freq ``[Dh/2]`` fp32.
Dtype policy: cos/sin and the rotation in fp32, cast on store. HF instead casts cos/sin to the activation
dtype and does the two products and the sum in that dtype (three bf16 roundings); we round once, so bf16
outputs differ from HF by at most about one bf16 ulp and are closer to the exact value.
Saved for backward: nothing but positions and inv_freq; cos/sin are recomputed on the fly inside the kernel
from positions and inv_freq (no ``[T, Dh]`` table ever lives in HBM).

Kernel: one program handles ``block_t`` tokens, all heads of q and k (heads and half head-dim padded to
powers of two and masked), computing each token's ``Dh/2`` cos/sin once and sharing them across heads.
Variant ``BlockSizes(layout="rows")``: programs of whole ``[Dh]`` head rows (q's rows, then k's, in one
launch) that read cos/sin from ``[tokens, Dh/2]`` fp32 tables XLA computes per call (2 x 4 bytes a token
and frequency: 8 MiB at 16K tokens, against 320 MiB of q and k moved); a candidate for the GPU sweep.

``rope_inv_freq`` reproduces transformers' default / ``linear`` / ``llama3`` inverse frequencies in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from fastjax.pallas_kernels._common import cdiv, masked_load, pallas_call_kwargs, resolve_interpret
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

__all__ = ["BlockSizes", "rope", "rope_inv_freq", "rope_reference"]


# ----------------------------------------------------------------------------------------------------------
# Inverse frequencies (transformers' modeling_rope_utils, fp32 like torch)
# ----------------------------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None) -> np.ndarray:
    """fp32 ``[head_dim // 2]`` inverse frequencies.

    ``rope_scaling``: None (or ``rope_type`` "default"), ``{"rope_type": "linear", "factor"}`` or
    ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}``; the old key ``"type"`` is accepted for ``"rope_type"``.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotate-half RoPE")
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    if not rope_scaling:
        return inv_freq
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(rope_scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = np.float32(rope_scaling["factor"])
        low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
        old_ctx = rope_scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = np.float32(2 * math.pi) / inv_freq
        out = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = (
            (np.float32(old_ctx) / wavelen - np.float32(low)) / np.float32(high - low)
        ).astype(np.float32)
        smoothed = (np.float32(1) - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, out).astype(np.float32)
    raise ValueError(
        f"rope_scaling rope_type={rope_type!r} is not supported "
        "(supported: None/'default', 'linear', 'llama3')"
    )


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------
def _rotate_reference(x, cos, sin):
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rope_reference(
    q: jax.Array,
    k: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    *,
    attention_scaling: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Pure-jnp fp32 rotate-half RoPE. q ``[B, T, H, Dh]``, k ``[B, T, KV, Dh]``, positions ``[B, T]``."""
    theta = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos = (jnp.cos(theta) * attention_scaling)[:, :, None, :]  # [B, T, 1, Dh/2]
    sin = (jnp.sin(theta) * attention_scaling)[:, :, None, :]
    return _rotate_reference(q, cos, sin), _rotate_reference(k, cos, sin)


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------


def _rope_kernel(
    pos_ref,
    inv_ref,
    q_ref,
    k_ref,
    qo_ref,
    ko_ref,
    *,
    n_tok: int,
    half: int,
    block_t: int,
    block_half: int,
    heads: tuple[int, int],
    block_heads: tuple[int, int],
    sign: float,
    scaling: float,
):
    toks = pl.program_id(0) * block_t + jnp.arange(block_t)
    j = jnp.arange(block_half)
    tmask = toks < n_tok if n_tok % block_t else None
    jmask = j < half if half != block_half else None
    pos = masked_load(pos_ref.at[toks], tmask, 0).astype(jnp.float32)
    inv = masked_load(inv_ref.at[j], jmask, 0.0)
    theta = pos[:, None] * inv[None, :]  # [bt, bh]
    cos = (jnp.cos(theta) * scaling)[:, None, :]
    sin = (jnp.sin(theta) * (scaling * sign))[:, None, :]
    for x_ref, o_ref, n_heads, block_h in (
        (q_ref, qo_ref, heads[0], block_heads[0]),
        (k_ref, ko_ref, heads[1], block_heads[1]),
    ):
        h = jnp.arange(block_h)
        mask = None
        for m, shape in (
            (tmask, (block_t, 1, 1)),
            (h < n_heads if n_heads != block_h else None, (1, block_h, 1)),
            (jmask, (1, 1, block_half)),
        ):
            if m is not None:
                m = m.reshape(shape)
                mask = m if mask is None else mask & m
        t3, h3, j3 = toks[:, None, None], h[None, :, None], j[None, None, :]
        x1 = masked_load(x_ref.at[t3, h3, j3], mask, 0.0).astype(jnp.float32)
        x2 = masked_load(x_ref.at[t3, h3, j3 + half], mask, 0.0).astype(jnp.float32)
        plt.store(o_ref.at[t3, h3, j3], (x1 * cos - x2 * sin).astype(o_ref.dtype), mask=mask)
        plt.store(o_ref.at[t3, h3, j3 + half], (x2 * cos + x1 * sin).astype(o_ref.dtype), mask=mask)


def _rope_rows_kernel(
    cos_ref,
    sin_ref,
    q_ref,
    k_ref,
    qo_ref,
    ko_ref,
    *,
    rows: tuple[int, int],
    heads: tuple[int, int],
    head_dim: int,
    block_rows: int,
    q_programs: int,
    sign: float,
):
    """``layout="rows"``: q and k as ``[tokens * heads, Dh]`` rows, ``block_rows`` whole rows a program
    (programs ``< q_programs`` take q, the rest k). Each row is loaded once as is and once with its
    halves swapped (the same cache lines); cos/sin come from ``[tokens, Dh/2]`` fp32 tables, gathered per
    row (a token's heads hit the same L1 lines), so no value changes layout inside the kernel."""
    pid = pl.program_id(0)
    half = head_dim // 2
    block_d = pl.next_power_of_2(head_dim)
    j = jnp.arange(block_d)
    first = j < half
    partner = jnp.where(first, j + half, j - half)
    jh = jnp.where(first, j, j - half)
    sgn = jnp.where(first, -sign, sign).astype(jnp.float32)
    for which, (x_ref, o_ref) in enumerate(((q_ref, qo_ref), (k_ref, ko_ref))):
        n_rows, n_heads = rows[which], heads[which]
        start = (pid if which == 0 else pid - q_programs) * block_rows

        @pl.when((pid < q_programs) if which == 0 else (pid >= q_programs))
        def _(x_ref=x_ref, o_ref=o_ref, n_rows=n_rows, n_heads=n_heads, start=start):
            r = start + jnp.arange(block_rows)
            mask = None
            if n_rows % block_rows:
                mask = (r < n_rows)[:, None]
            if block_d != head_dim:
                dmask = (j < head_dim)[None, :]
                mask = dmask if mask is None else mask & dmask
            tok = (r // n_heads)[:, None]
            x = masked_load(x_ref.at[r[:, None], j[None, :]], mask, 0.0).astype(jnp.float32)
            xp = masked_load(x_ref.at[r[:, None], partner[None, :]], mask, 0.0).astype(jnp.float32)
            c = masked_load(cos_ref.at[tok, jh[None, :]], mask, 0.0)
            sn = masked_load(sin_ref.at[tok, jh[None, :]], mask, 0.0)
            out = x * c + sgn[None, :] * xp * sn
            plt.store(o_ref.at[r[:, None], j[None, :]], out.astype(o_ref.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Block sizes
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_t: tokens per program (power of 2); num_warps: Triton warps. ``layout="rows"`` runs
    :func:`_rope_rows_kernel` instead: ``block_rows`` (power of 2) head rows a program, cos/sin from
    tables that XLA computes per call (``[tokens, Dh/2]`` fp32 each; block_t unused)."""

    block_t: int
    num_warps: int
    layout: str = "tokens"
    block_rows: int = 64

    def __post_init__(self):
        for name in ("block_t", "block_rows"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of 2 (Triton)")
        if self.layout not in ("tokens", "rows"):
            raise ValueError(f"layout={self.layout!r}: expected 'tokens' or 'rows'")


def pick_block_sizes(n_tok: int, n_heads: int, n_kv_heads: int, head_dim: int) -> BlockSizes:
    """Up to 8K q+k elements a program, rounded down to whole tokens: Llama-3-8B (40 heads x 128) gets
    1 token. H200 T=16384 (bench_kernels): 1 token 0.212 ms fwd+bwd, 2 tokens 0.311 ms, 4 tokens x 8
    warps 0.595 ms (larger blocks spill). Warps (run 4, kernels_h200.md): at 1 token of 5120 (Llama-3-8B)
    or 4608 (Qwen2.5-7B) elements, 2 warps ran 0.095 / 0.183 ms fwd / fwd+bwd against 0.113 / 0.214 with 4
    (Qwen 0.080 / 0.154 vs 0.090 / 0.172; T=4096 0.048 / 0.054 vs 0.057 / 0.077), 8 warps slower still."""
    per_tok = (pl.next_power_of_2(n_heads) + pl.next_power_of_2(n_kv_heads)) * pl.next_power_of_2(
        head_dim
    )
    block_t = max(1, min(pl.next_power_of_2(n_tok), 8192 // per_tok))
    block_t = 1 << (block_t.bit_length() - 1)  # round down to a power of 2
    elems = block_t * per_tok
    num_warps = 8 if elems >= 8192 else (2 if elems <= 5120 else 4)
    return BlockSizes(block_t=block_t, num_warps=num_warps)


# ----------------------------------------------------------------------------------------------------------
# custom_vjp wiring
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Config:
    attention_scaling: float
    block_sizes: BlockSizes
    interpret: bool


def _rope_rows_call(q3, k3, pos, inv_freq, cfg: _Config, sign: float):
    n_tok, n_heads, head_dim = q3.shape
    n_kv = k3.shape[1]
    bs = cfg.block_sizes
    theta = pos.astype(jnp.float32)[:, None] * inv_freq[None, :]
    cos = jnp.cos(theta) * cfg.attention_scaling
    sin = jnp.sin(theta) * cfg.attention_scaling
    q2, k2 = q3.reshape(n_tok * n_heads, head_dim), k3.reshape(n_tok * n_kv, head_dim)
    q_programs = cdiv(q2.shape[0], bs.block_rows)
    kernel = functools.partial(
        _rope_rows_kernel,
        rows=(q2.shape[0], k2.shape[0]),
        heads=(n_heads, n_kv),
        head_dim=head_dim,
        block_rows=bs.block_rows,
        q_programs=q_programs,
        sign=sign,
    )
    qo, ko = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(q2.shape, q2.dtype),
            jax.ShapeDtypeStruct(k2.shape, k2.dtype),
        ],
        grid=(q_programs + cdiv(k2.shape[0], bs.block_rows),),
        name="rope_rows_fwd" if sign > 0 else "rope_rows_bwd",
        **pallas_call_kwargs(cfg.interpret, num_warps=bs.num_warps),
    )(cos, sin, q2, k2)
    return qo.reshape(q3.shape), ko.reshape(k3.shape)


def _rope_call(q3, k3, pos, inv_freq, cfg: _Config, sign: float):
    n_tok, n_heads, head_dim = q3.shape
    n_kv = k3.shape[1]
    half = head_dim // 2
    bs = cfg.block_sizes
    if bs.layout == "rows":
        return _rope_rows_call(q3, k3, pos, inv_freq, cfg, sign)
    kernel = functools.partial(
        _rope_kernel,
        n_tok=n_tok,
        half=half,
        block_t=bs.block_t,
        block_half=pl.next_power_of_2(half),
        heads=(n_heads, n_kv),
        block_heads=(pl.next_power_of_2(n_heads), pl.next_power_of_2(n_kv)),
        sign=sign,
        scaling=cfg.attention_scaling,
    )
    return pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(q3.shape, q3.dtype),
            jax.ShapeDtypeStruct(k3.shape, k3.dtype),
        ],
        grid=(cdiv(n_tok, bs.block_t),),
        name="rope_fwd" if sign > 0 else "rope_bwd",
        **pallas_call_kwargs(cfg.interpret, num_warps=bs.num_warps),
    )(pos, inv_freq, q3, k3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _rope(q3, k3, pos, inv_freq, cfg: _Config):
    return tuple(_rope_call(q3, k3, pos, inv_freq, cfg, 1.0))


def _rope_fwd(q3, k3, pos, inv_freq, cfg):
    return _rope(q3, k3, pos, inv_freq, cfg), (pos, inv_freq)


def _rope_bwd(cfg, res, cts):
    pos, inv_freq = res
    dq, dk = _rope_call(cts[0], cts[1], pos, inv_freq, cfg, -1.0)
    return dq, dk, None, None


_rope.defvjp(_rope_fwd, _rope_bwd)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def rope(
    q: jax.Array,
    k: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array | np.ndarray,
    *,
    attention_scaling: float = 1.0,
    impl: str = "pallas",
    interpret: bool | None = None,
    block_sizes: BlockSizes | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Rotate q ``[B, T, H, Dh]`` and k ``[B, T, KV, Dh]`` by ``positions [B, T]`` -> ``(q_rot, k_rot)``.

    ``inv_freq``: ``[Dh/2]`` from :func:`rope_inv_freq`. ``attention_scaling`` multiplies cos and sin.
    ``impl="xla"`` runs :func:`rope_reference`.
    """
    if impl not in ("pallas", "xla"):
        raise ValueError(f"impl={impl!r}: expected 'pallas' or 'xla'")
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{q.shape=} and {k.shape=}: expected [B, T, H, Dh] and [B, T, KV, Dh] "
            "with one B, T and head_dim"
        )
    if positions.shape != q.shape[:2]:
        raise ValueError(f"{positions.shape=} must be [B, T] = {q.shape[:2]}")
    if q.shape[3] % 2 or inv_freq.shape != (q.shape[3] // 2,):
        raise ValueError(f"{inv_freq.shape=} must be [Dh/2] for head_dim {q.shape[3]} (even)")
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    if impl == "xla":
        return rope_reference(q, k, positions, inv_freq, attention_scaling=attention_scaling)
    b, t, h, d = q.shape
    if b * t == 0:
        return q, k
    bs = block_sizes or pick_block_sizes(b * t, h, k.shape[2], d)
    cfg = _Config(
        attention_scaling=float(attention_scaling),
        block_sizes=bs,
        interpret=resolve_interpret(interpret),
    )  # resolved now: trace caches key on it
    q_rot, k_rot = _rope(
        q.reshape(b * t, h, d),
        k.reshape(b * t, k.shape[2], d),
        positions.reshape(b * t).astype(jnp.int32),
        inv_freq,
        cfg,
    )
    return q_rot.reshape(q.shape), k_rot.reshape(k.shape)
