"""Fused linear + cross-entropy: the loss from final hidden states without a ``[T, V]`` logits array.

Math, per token t with label y_t (``ignore_index`` tokens count for nothing)::

    z_tv   = hidden_t . head_v                       (fp32 accumulation)
    z_tv   = softcap * tanh(z_tv / softcap)           (optional, Gemma 2 final-logit softcapping)
    lse_t  = logsumexp_v z_tv                        (online: running max m and sum l over vocab tiles)
    loss_t = lse_t - z_{t, y_t} + z_loss * lse_t^2    (0 for ignored tokens)
    weighted: loss_t *= weights_t;  "sum": sum_t loss_t;  "mean": sum / #counted tokens;  "none": loss_t

``count`` is the number of tokens whose label is not ``ignore_index`` (weights do not change it, so signed
RL weights are fine); ``cross_entropy_sum_and_count`` returns ``(sum, count)`` for exact gradient
accumulation over micro-batches (divide the summed sums by the summed counts).

Backward, for a per-token cotangent g_t (the reductions above are plain JAX around one custom_vjp)::

    p_tv   = exp(z_tv - lse_t)
    dz_tv  = g_t * (p_tv * (1 + 2 z_loss lse_t) - [v == y_t]) * (1 - tanh^2)   (last factor with softcap only)
    d_hidden = dz @ head;   d_head = dz^T @ hidden

Layouts: hidden ``[T, D]`` (or ``[..., D]``), head ``[V, D]`` (HF ``lm_head.weight`` / tied embedding),
labels ``[T]`` int32, weights ``[T]`` fp32. hidden and head share one dtype (the compute dtype).
Dtype policy: matmul operands in the input dtype with fp32 accumulation, all softmax math in fp32; ``dz``
is rounded to the compute dtype before the two gradient matmuls (as torch autograd does with bf16 logits);
d_hidden is accumulated in fp32 and cast on store.
Saved for backward: hidden, head, labels and ``lse [T]`` fp32; logits are recomputed tile by tile
(``xla_fused_grad``: labels and d_hidden per unit cotangent, fp32 ``[T, D]``).

Implementations (``impl``):
* ``"pallas"``: forward = one Pallas Triton kernel, a tiled GEMM whose epilogue keeps an online
  logsumexp; programs own (token block, vocab split) pairs and emit ``[splits, T]`` partial (max, sum)
  combined by XLA. The target logit is a row gather of head and a fp32 dot (O(T*D)). Backward = a loop over
  vocab chunks of width C: a Pallas kernel recomputes the logits tile by tile and writes ``dz`` for the
  chunk (``[T, C]``, compute dtype), then two XLA (cuBLAS) matmuls add the chunk's share to d_hidden (fp32
  carry) and write its rows of d_head. Extra memory: O(T*C + T*D + V*D), independent of V beyond the output.
* ``"xla_chunked"``: ``lax.map`` over token chunks of width c with the same custom_vjp; extra memory
  O(c*V) logits plus an fp32 ``[V, D]`` d_head accumulator. Runs anywhere (CPU too).
* ``"xla_fused_grad"``: for a frozen head (``head_trainable=False``), the forward computes both the lse
  and d_hidden for a unit cotangent from one chunk of logits, and the backward only scales it by ``g``:
  two ``T x V x D`` matmuls instead of three, for an fp32 ``[T, D]`` residual. A trained head runs as
  ``xla_chunked``. Both XLA paths are in ``cross_entropy_xla.py``.
* ``"xla"``: :func:`cross_entropy_reference`, full ``[T, V]`` fp32 logits, autodiff backward.

d_head: computed unless ``head_trainable=False`` (a static flag): then the backward returns a symbolic
zero for head and skips both the matmul and the ``[V, D]`` buffer (frozen head under LoRA).
Numerics: every logsumexp subtracts the running max, so a single huge logit does not overflow; with all
tokens ignored the loss and every gradient are exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from fastjax.pallas_kernels import cross_entropy_xla as CX
from fastjax.pallas_kernels._common import (
    cdiv,
    masked_load,
    on_gpu,
    pallas_call_kwargs,
    resolve_interpret,
)
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

__all__ = [
    "IMPLS",
    "BlockSizes",
    "cross_entropy",
    "cross_entropy_reference",
    "cross_entropy_sum_and_count",
]

IMPLS = ("pallas", "xla_chunked", "xla_fused_grad", "xla")
REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------
def _precision(dtype):
    """Full fp32 matmuls for fp32 operands (TF32 would lose 13 mantissa bits); default otherwise."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _reduce(loss_t, labels, weights, reduction: str, ignore_index: int):
    if weights is not None:
        loss_t = loss_t * weights.astype(jnp.float32)
    if reduction == "none":
        return loss_t
    total = jnp.sum(loss_t)
    if reduction == "sum":
        return total
    count = jnp.sum(labels != ignore_index)
    return total / jnp.maximum(count, 1).astype(jnp.float32)


def cross_entropy_reference(
    hidden: jax.Array,
    head: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> jax.Array:
    """Pure-jnp loss with full fp32 logits ``[..., V]``: the definition of correct (module docstring)."""
    z = jnp.einsum(
        "...d,vd->...v",
        hidden,
        head,
        preferred_element_type=jnp.float32,
        precision=_precision(hidden.dtype),
    )
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    lse = jax.nn.logsumexp(z, axis=-1)
    valid = labels != ignore_index
    target = jnp.take_along_axis(z, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    loss_t = jnp.where(valid, lse - target + z_loss * lse * lse, 0.0)
    return _reduce(loss_t, labels, weights, reduction, ignore_index)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


def _logits_tile(h_ref, w_ref, rows, cols, *, dim: int, block_k: int):
    """fp32 ``[len(rows), len(cols)]`` tile of ``hidden @ head.T``; rows/cols are in-range (clamped)."""

    def body(kk, acc):
        ks = kk * block_k + jnp.arange(block_k)
        kmask = (ks < dim)[None, :] if dim % block_k else None
        a = masked_load(h_ref.at[rows[:, None], ks[None, :]], kmask, 0.0)
        b = masked_load(w_ref.at[cols[:, None], ks[None, :]], kmask, 0.0)
        return acc + lax.dot_general(
            a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )

    acc = jnp.zeros((rows.shape[0], cols.shape[0]), jnp.float32)
    return lax.fori_loop(0, cdiv(dim, block_k), body, acc)


def _ce_lse_kernel(
    h_ref,
    w_ref,
    m_ref,
    l_ref,
    *,
    n_tok: int,
    vocab: int,
    dim: int,
    block_t: int,
    block_v: int,
    block_k: int,
    tiles_per_split: int,
    softcap: float | None,
):
    pid_s, pid_t = (
        pl.program_id(0),
        pl.program_id(1),
    )  # splits vary fastest: concurrent programs share
    raw_rows = pid_t * block_t + jnp.arange(block_t)  # hidden blocks in L2
    rows = jnp.minimum(raw_rows, n_tok - 1)
    first = pid_s * tiles_per_split
    # Splits are sized so that each starts inside the vocabulary: m is finite after its first tile.
    n_here = jnp.minimum(tiles_per_split, cdiv(vocab, block_v) - first)

    def body(j, carry):
        m, l = carry
        raw_cols = (first + j) * block_v + jnp.arange(block_v)
        z = _logits_tile(
            h_ref, w_ref, rows, jnp.minimum(raw_cols, vocab - 1), dim=dim, block_k=block_k
        )
        if softcap is not None:
            z = softcap * jnp.tanh(z / softcap)
        if vocab % block_v:
            z = jnp.where((raw_cols < vocab)[None, :], z, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        return m_new, l

    init = (jnp.full((block_t,), -jnp.inf, jnp.float32), jnp.zeros((block_t,), jnp.float32))
    m, l = lax.fori_loop(0, n_here, body, init)
    rmask = raw_rows < n_tok if n_tok % block_t else None
    plt.store(m_ref.at[pid_s, raw_rows], m, mask=rmask)
    plt.store(l_ref.at[pid_s, raw_rows], l, mask=rmask)


def _ce_dlogits_kernel(
    off_ref,
    h_ref,
    w_ref,
    lse_ref,
    g_ref,
    lab_ref,
    dz_ref,
    *,
    n_tok: int,
    vocab: int,
    chunk: int,
    dim: int,
    block_t: int,
    block_v: int,
    block_k: int,
    softcap: float | None,
    z_loss: float,
):
    pid_v, pid_t = pl.program_id(0), pl.program_id(1)
    raw_rows = pid_t * block_t + jnp.arange(block_t)
    rows = jnp.minimum(raw_rows, n_tok - 1)
    local = pid_v * block_v + jnp.arange(block_v)
    cols = off_ref[0] + local  # [chunk offset, +chunk) lies inside the vocabulary
    z = _logits_tile(h_ref, w_ref, rows, jnp.minimum(cols, vocab - 1), dim=dim, block_k=block_k)
    if softcap is not None:
        t = jnp.tanh(z / softcap)
        z = softcap * t
    lse = plt.load(lse_ref.at[rows])
    g = plt.load(g_ref.at[rows])  # 0 for ignored tokens
    lab = plt.load(lab_ref.at[rows])
    p = jnp.exp(z - lse[:, None])
    if z_loss:
        p = p * (1.0 + 2.0 * z_loss * lse)[:, None]
    dz = g[:, None] * (p - (cols[None, :] == lab[:, None]).astype(jnp.float32))
    if softcap is not None:
        dz = dz * (1.0 - t * t)
    mask = None
    if n_tok % block_t:
        mask = (raw_rows < n_tok)[:, None]
    if chunk % block_v:
        cmask = (local < chunk)[None, :]
        mask = cmask if mask is None else mask & cmask
    plt.store(dz_ref.at[raw_rows[:, None], local[None, :]], dz.astype(dz_ref.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Block sizes
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the Pallas GEMMs (powers of 2: block_t tokens x block_v vocab, block_k deep), Triton warps
    and pipeline stages; vocab_splits: vocab ranges per token block in the forward; bwd_vocab_chunk: vocab
    width C of one backward ``dz [T, C]`` chunk; token_chunk: tokens per ``lax.map`` step of xla_chunked."""

    block_t: int = 128
    block_v: int = 256
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    vocab_splits: int = 16
    bwd_vocab_chunk: int = 8192
    token_chunk: int = 512

    def __post_init__(self):
        for name in ("block_t", "block_v", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of 2 >= 16 (Triton dot)")
        for name in ("vocab_splits", "bwd_vocab_chunk", "token_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


# The pipelined operand tiles of the bf16 pick (3 stages of 128 + 256 rows x 64 deep), which compile on
# the H200; fp32 inputs at the same tiles asked for 262,144 bytes of shared memory against 232,448
# ("RESOURCE_EXHAUSTED: Shared memory size limit exceeded", bench_ce_frozen, 2026-12-02).
SMEM_BUDGET = 3 * (128 + 256) * 64 * 2


def operand_smem_bytes(block_t: int, block_v: int, block_k: int, stages: int, itemsize: int) -> int:
    """Shared memory the software pipeline holds for the hidden and head tiles of one logits GEMM."""
    return stages * (block_t + block_v) * block_k * itemsize


def _num_sms() -> int:
    if on_gpu():
        return int(getattr(jax.devices()[0], "core_count", 0) or 132)
    return 132


def pick_block_sizes(n_tok: int, vocab: int, dim: int, dtype) -> BlockSizes:
    """128x256x64 tiles, 8 warps, 3 stages; ~8 forward programs per SM; backward ``dz`` chunk and
    xla_chunked logits chunk of ~256 MiB each. H200, Llama-3-8B T=16384 V=128256 bf16 (bench_kernels):
    block_v=256 ran fwd 31.0 ms / fwd+bwd 116.5 ms against 39.4 / 130.5 ms for 128x128 and
    64.6 / 173.6 ms for 64x128 (4 warps, 4 stages)."""
    block_t = max(16, min(128, pl.next_power_of_2(n_tok)))
    block_v = 256 if vocab >= 256 else 128
    block_k = max(16, min(64, pl.next_power_of_2(dim)))
    itemsize, stages = jnp.dtype(dtype).itemsize, 3
    while (
        block_k > 16
        and operand_smem_bytes(block_t, block_v, block_k, stages, itemsize) > SMEM_BUDGET
    ):
        block_k //= 2  # fp32: 128x256x32
    n_tblocks = cdiv(n_tok, block_t)
    splits = max(1, min(cdiv(vocab, block_v), cdiv(8 * _num_sms(), n_tblocks)))
    chunk = 1 << max(10, min(14, ((2**28) // max(1, n_tok * itemsize)).bit_length() - 1))
    token_chunk = 1 << max(4, min(12, ((2**28) // (4 * vocab)).bit_length() - 1))
    return BlockSizes(
        block_t=block_t,
        block_v=block_v,
        block_k=block_k,
        num_warps=8,
        num_stages=stages,
        vocab_splits=splits,
        bwd_vocab_chunk=chunk,
        token_chunk=token_chunk,
    )


# ----------------------------------------------------------------------------------------------------------
# Forward / backward building blocks
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Config:
    impl: str
    softcap: float | None
    z_loss: float
    ignore_index: int
    head_trainable: bool
    block_sizes: BlockSizes
    interpret: bool


def _target_logits(h, w, labels, cfg: _Config):
    """z_{t, y_t} from a row gather of head: O(T*D), exact bf16 products, fp32 sum."""
    rows = jnp.take(w, jnp.clip(labels, 0, w.shape[0] - 1), axis=0)
    z = jnp.sum(h.astype(jnp.float32) * rows.astype(jnp.float32), axis=-1)
    return CX.softcap_logits(z, cfg.softcap)


def _lse_pallas(h, w, cfg: _Config):
    (n_tok, dim), vocab = h.shape, w.shape[0]
    bs = cfg.block_sizes
    n_vtiles = cdiv(vocab, bs.block_v)
    per_split = cdiv(n_vtiles, min(bs.vocab_splits, n_vtiles))
    splits = cdiv(n_vtiles, per_split)  # every split starts inside the vocabulary
    kernel = functools.partial(
        _ce_lse_kernel,
        n_tok=n_tok,
        vocab=vocab,
        dim=dim,
        block_t=bs.block_t,
        block_v=bs.block_v,
        block_k=bs.block_k,
        tiles_per_split=per_split,
        softcap=cfg.softcap,
    )
    part = jax.ShapeDtypeStruct((splits, n_tok), jnp.float32)
    m, l = pl.pallas_call(
        kernel,
        out_shape=[part, part],
        grid=(splits, cdiv(n_tok, bs.block_t)),
        name="cross_entropy_lse",
        **pallas_call_kwargs(cfg.interpret, bs.num_warps, bs.num_stages),
    )(h, w)
    m_max = jnp.max(m, axis=0)
    return m_max + jnp.log(jnp.sum(l * jnp.exp(m - m_max[None, :]), axis=0))


def _dlogits_pallas(offset, width: int, h, w, lse, g, labels, cfg: _Config):
    (n_tok, dim), vocab = h.shape, w.shape[0]
    bs = cfg.block_sizes
    kernel = functools.partial(
        _ce_dlogits_kernel,
        n_tok=n_tok,
        vocab=vocab,
        chunk=width,
        dim=dim,
        block_t=bs.block_t,
        block_v=bs.block_v,
        block_k=bs.block_k,
        softcap=cfg.softcap,
        z_loss=cfg.z_loss,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n_tok, width), h.dtype),
        grid=(cdiv(width, bs.block_v), cdiv(n_tok, bs.block_t)),
        name="cross_entropy_dlogits",
        **pallas_call_kwargs(cfg.interpret, bs.num_warps, bs.num_stages),
    )(jnp.reshape(offset, (1,)).astype(jnp.int32), h, w, lse, g, labels)


def _grads_pallas(h, w, labels, lse, g, cfg: _Config):
    vocab, prec = w.shape[0], _precision(h.dtype)
    width = min(cfg.block_sizes.bwd_vocab_chunk, vocab)
    n_full, rem = divmod(vocab, width)

    def chunk(offset, width, carry):
        dh, dw = carry
        dz = _dlogits_pallas(offset, width, h, w, lse, g, labels, cfg)  # [T, width]
        w_c = lax.dynamic_slice_in_dim(w, offset, width, axis=0)
        dh = dh + jnp.dot(dz, w_c, preferred_element_type=jnp.float32, precision=prec)
        if dw is not None:
            dw_c = lax.dot_general(
                dz, h, (((0,), (0,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
            )
            dw = lax.dynamic_update_slice_in_dim(dw, dw_c.astype(w.dtype), offset, axis=0)
        return dh, dw

    carry = (jnp.zeros(h.shape, jnp.float32), jnp.zeros_like(w) if cfg.head_trainable else None)
    carry = lax.fori_loop(0, n_full, lambda i, c: chunk(i * width, width, c), carry)
    if rem:
        carry = chunk(n_full * width, rem, carry)
    return carry


# ----------------------------------------------------------------------------------------------------------
# custom_vjp wiring: per-token loss; reductions and weights are plain JAX around it
# ----------------------------------------------------------------------------------------------------------
def _xla_kw(cfg: _Config, dtype) -> dict:
    return dict(
        softcap=cfg.softcap, token_chunk=cfg.block_sizes.token_chunk, precision=_precision(dtype)
    )


def _fused_grad(cfg: _Config) -> bool:
    """``xla_fused_grad`` computes d_hidden in the forward; a trained head needs the usual backward."""
    return cfg.impl == "xla_fused_grad" and not cfg.head_trainable


def _lse(h, w, cfg: _Config):
    if cfg.impl == "pallas":
        return _lse_pallas(h, w, cfg)
    return CX.lse_chunked(h, w, **_xla_kw(cfg, h.dtype))


def _loss(h, w, labels, lse, cfg: _Config):
    target = _target_logits(h, w, labels, cfg)
    return jnp.where(labels != cfg.ignore_index, lse - target + cfg.z_loss * lse * lse, 0.0)


def _per_token_fwd(h, w, labels, cfg: _Config):
    # xla_fused_grad: d_hidden = g * u, so hidden and head are not kept (an empty array keeps the dtype)
    if _fused_grad(cfg):
        lse, u = CX.lse_and_unit_grad(
            h, w, labels, z_loss=cfg.z_loss, ignore_index=cfg.ignore_index, **_xla_kw(cfg, h.dtype)
        )
        return _loss(h, w, labels, lse, cfg), (jnp.zeros((0,), h.dtype), None, labels, None, u)
    lse = _lse(h, w, cfg)
    return _loss(h, w, labels, lse, cfg), (h, w, labels, lse, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _per_token(h, w, labels, cfg: _Config):
    # Not differentiated (eval, GRPO's reference log-probs): the lse alone, even for xla_fused_grad.
    return _loss(h, w, labels, _lse(h, w, cfg), cfg)


def _per_token_bwd(cfg: _Config, res, g):
    h, w, labels, lse, u = res
    g = jnp.where(labels != cfg.ignore_index, g, 0.0).astype(jnp.float32)
    if u is not None:
        return (g[:, None] * u).astype(h.dtype), None, None
    if cfg.impl == "pallas":
        dh, dw = _grads_pallas(h, w, labels, lse, g, cfg)
    else:
        dh, dw = CX.grads_chunked(
            h,
            w,
            labels,
            lse,
            g,
            z_loss=cfg.z_loss,
            head_trainable=cfg.head_trainable,
            **_xla_kw(cfg, h.dtype),
        )
    return dh.astype(h.dtype), dw, None


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    head_trainable: bool = True,
    impl: str = "pallas",
    interpret: bool | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Cross-entropy of ``hidden @ head.T`` against ``labels`` without materializing the logits.

    hidden ``[..., D]``, head ``[V, D]`` (same dtype), labels ``[...]`` int (``ignore_index`` skipped),
    weights ``[...]`` fp32 per-token multipliers. ``reduction``: "mean" (over counted tokens; 0 when
    none), "sum", or "none" (per-token loss of labels' shape, 0 at ignored tokens; ``-loss`` is the
    token log-prob when ``z_loss == 0``). ``softcap``: Gemma-2 final-logit cap; ``z_loss``: coefficient
    of ``lse^2``. ``head_trainable=False`` skips d_head (returns zero cotangent for head).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}")
    if head.ndim != 2 or hidden.shape[-1] != head.shape[1]:
        raise ValueError(f"{hidden.shape=} and {head.shape=}: expected [..., D] and [V, D]")
    if hidden.dtype != head.dtype:
        raise ValueError(f"{hidden.dtype=} and {head.dtype=} must match (cast one first)")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{labels.shape=} must be hidden's leading shape {hidden.shape[:-1]}")
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"{weights.shape=} must equal {labels.shape=}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap={softcap} must be positive (or None)")
    shape = labels.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).astype(jnp.int32)
    weights = None if weights is None else weights.reshape(-1)
    if impl == "xla" or h.shape[0] == 0:
        out = cross_entropy_reference(
            h,
            head,
            labels,
            weights=weights,
            softcap=softcap,
            z_loss=z_loss,
            reduction=reduction,
            ignore_index=ignore_index,
        )
    else:
        bs = block_sizes or pick_block_sizes(h.shape[0], head.shape[0], h.shape[1], h.dtype)
        cfg = _Config(
            impl=impl,
            softcap=None if softcap is None else float(softcap),
            z_loss=float(z_loss),
            ignore_index=int(ignore_index),
            head_trainable=bool(head_trainable),
            block_sizes=bs,
            interpret=resolve_interpret(interpret),
        )  # resolved now: caches key on it
        out = _reduce(_per_token(h, head, labels, cfg), labels, weights, reduction, ignore_index)
    return out.reshape(shape) if reduction == "none" else out


def cross_entropy_sum_and_count(
    hidden: jax.Array, head: jax.Array, labels: jax.Array, **kwargs
) -> tuple[jax.Array, jax.Array]:
    """``(sum of (weighted) per-token losses, number of counted tokens int32)`` for gradient accumulation:
    the mean over micro-batches is ``sum(sums) / sum(counts)``. kwargs as :func:`cross_entropy`."""
    if "reduction" in kwargs:
        raise TypeError("cross_entropy_sum_and_count always uses reduction='sum'")
    total = cross_entropy(hidden, head, labels, reduction="sum", **kwargs)
    count = jnp.sum(labels != kwargs.get("ignore_index", -100)).astype(jnp.int32)
    return total, count
