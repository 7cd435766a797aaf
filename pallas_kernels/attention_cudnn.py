"""The cuDNN side of ``attention.attention``: what cuDNN (through jax) can serve, and how to call it.

``_cudnn_unsupported`` says why a case cannot go to cuDNN (or None); ``_cudnn_attention`` runs it, dense
rows through ``jax.nn.dot_product_attention`` and packed rows (segment ids) through cuDNN's THD layout
(per-row sequence lengths and offsets from ``segment_offsets``), which jax exposes only in a private
module. The masking rule is ``attention.py``'s (module docstring); the choice between cuDNN and the
Pallas kernel is ``attention.AUTO_TABLE``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from fastjax.pallas_kernels import _common
from jax import lax


def _cudnn_unsupported(q, segment_ids, softcap, max_segments) -> str | None:
    """Why cuDNN (through jax) cannot serve this case, or None."""
    if not _common.on_gpu():
        return "cuDNN needs a GPU"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention takes bf16/fp16, not {q.dtype}"
    if softcap is not None:
        return "cuDNN through jax has no logit softcap"
    if segment_ids is not None and max_segments is None:
        return (
            "segment ids need cuDNN's packed layout, which needs a static bound: pass "
            "max_segments (jax.nn.dot_product_attention itself has no segment ids)"
        )
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"cuDNN needs head_dim % 8 == 0 and <= 256, got {q.shape[-1]}"
    return None


def segment_offsets(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """Contiguous runs of equal non-zero ids -> cuDNN's ``(seqlens [B, M], offsets [B, M + 1])``.

    Missing entries are -1. Rows with more than ``max_segments`` runs lose the extra ones (their outputs
    stay 0): the bound must hold. A segment id must form one contiguous run (what packing produces).
    """
    seg = segment_ids.astype(jnp.int32)
    prev = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)))
    nxt = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)))
    first = jax.vmap(lambda m: jnp.nonzero(m, size=max_segments, fill_value=-1)[0])
    starts = first((seg != 0) & (seg != prev))
    ends = first((seg != 0) & (seg != nxt))
    valid = starts >= 0
    lens = jnp.where(valid, ends - starts + 1, -1).astype(jnp.int32)
    offs = jnp.concatenate([jnp.where(valid, starts, -1), jnp.full((seg.shape[0], 1), -1)], axis=1)
    return lens, offs.astype(jnp.int32)


def _cudnn_attention(q, k, v, segment_ids, *, causal, window, sm_scale, max_segments):
    # cuDNN's sliding_window_length W keeps (i - W, i]; jax maps local_window_size=(W - 1, 0) to it.
    if segment_ids is None:
        lws = None if window is None else (int(window) - 1, 0)
        return jax.nn.dot_product_attention(
            q, k, v, scale=sm_scale, is_causal=causal, local_window_size=lws, implementation="cudnn"
        )
    # Packed rows: jax exposes cuDNN's THD layout only in a private module (jax 0.10 and 0.11 alike).
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa

    lens, offs = segment_offsets(segment_ids, max_segments)
    mask = cudnn_fa.MaskType.PADDING_CAUSAL if causal else cudnn_fa.MaskType.PADDING
    real = (segment_ids != 0)[:, :, None, None]
    # cuDNN leaves rows outside every segment unspecified: select them away, values and gradients.
    q, k, v = (jnp.where(real, x, lax.stop_gradient(x)) for x in (q, k, v))
    out = cudnn_fa.dot_product_attention(
        q,
        k,
        v,
        q_seqlen=lens,
        kv_seqlen=lens,
        q_offsets=offs,
        kv_offsets=offs,
        scale=sm_scale,
        mask_type=mask,
        sliding_window_length=window,
    )
    return jnp.where(real, out, 0).astype(q.dtype)
