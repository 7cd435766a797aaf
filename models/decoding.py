"""KV-cache decoding (generation) for every family: ``init_cache`` and ``forward_cached``.

The same layers as ``models/decoder.py``'s training forward (its ``_layer`` and ``_scan_layers``), with
attention over a cache ``[L, B, S, KV, hd]`` instead of the packed rows. Cache slots are absolute indices
shared by every row (left padding); a slot's position is its rank among the row's valid slots.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from fastjax.models import ops as O
from fastjax.models.decoder import _context, _embed, _layer, _layer_lora, _logits, _scan_layers


def _longrope_threshold(arch) -> int | None:
    """``original_max_position_embeddings`` when a layer kind uses longrope (its cache keeps token ids)."""
    for kind in arch.kinds:
        if kind.rope.rope_type == "longrope":
            return kind.rope.original_max_position_embeddings
    return None


def init_cache(cfg, batch: int, max_len: int, dtype) -> dict:
    """``{"k", "v": [L, B, S, KV, hd]}``; longrope models also keep the token ids (``"tokens" [B, S]``)
    to re-encode the sequence when it outgrows the short RoPE table (see ``forward_cached``)."""
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    if _longrope_threshold(cfg.arch()) is not None:
        cache["tokens"] = jnp.zeros((batch, max_len), jnp.int32)
    return cache


def cached_attention_reference(
    q,
    k_cache,
    v_cache,
    q_slots,
    kv_valid,
    *,
    sm_scale,
    softcap=None,
    window=None,
    q_positions=None,
    kv_positions=None,
):
    """Attention of new queries ``[B, T, H, D]`` over a cache ``[B, S, KV, D]``.

    Query t (at cache slot ``q_slots[t]``) sees slot j when ``j <= q_slots[t]`` and ``kv_valid[b, j]``;
    with ``window``, also ``q_positions - kv_positions < window``. fp32 math.
    """
    B, T, H, D = q.shape
    S, KV = k_cache.shape[1], k_cache.shape[2]
    G = H // KV
    qg = q.astype(jnp.float32).reshape(B, T, KV, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache.astype(jnp.float32)) * sm_scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    mask = (jnp.arange(S)[None, :] <= q_slots[:, None])[None] & kv_valid[:, None, :]  # [B, T, S]
    if window is not None:
        mask &= (q_positions[:, :, None] - kv_positions[:, None, :]) < window
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[:, None, None], p, 0.0)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v_cache.astype(jnp.float32))
    return o.reshape(B, T, H, D).astype(q.dtype)


def forward_cached(
    params: Mapping,
    input_ids: jax.Array,
    cache: dict,
    *,
    cfg,
    positions: jax.Array,
    cache_index: jax.Array,
    kv_valid: jax.Array,
    lora: Mapping | None = None,
    lora_scale: float = 1.0,
    ops: O.Ops | None = None,
):
    """Run ``input_ids [B, T]`` whose k/v go to cache slots ``cache_index .. cache_index+T-1``.

    Returns (logits of the last position ``[B, V]`` fp32, updated cache). ``kv_valid [B, S]`` marks slots
    holding real tokens (including the new ones); valid slots of a row are contiguous (left padding), so a
    slot's position is its rank among the row's valid slots (used by sliding-window layers).

    Longrope (Phi-3 128k): when a row that has a cache grows past ``original_max_position_embeddings``, its
    cached keys were rotated with the short table; transformers' Phi-3 ``prepare_inputs_for_generation``
    then drops the cache and re-encodes the whole sequence with the long table. So does this step (for the
    whole batch, once per crossing row), from the token ids the cache keeps.
    """
    ops = ops or O.Ops()
    arch = cfg.arch()
    T = input_ids.shape[1]
    kv_positions = jnp.cumsum(kv_valid.astype(jnp.int32), axis=1) - 1
    kind_ids = jnp.asarray(arch.layer_kind, jnp.int32)

    def run(tokens, q_positions, start, k_cache_all, v_cache_all):
        """The layers over ``tokens`` at cache slots ``start..``; returns (last hidden, new k, new v)."""
        x = _embed(params, tokens, arch)
        q_slots = start + jnp.arange(tokens.shape[1])
        ctx = _context(cfg, arch, q_positions, jnp.ones_like(q_positions), ops, lora_scale, 0.0)

        def layer(x, h, xs):
            p, lp, k_cache, v_cache, kind_idx = xs

            def core(kind, q, k, v):
                kc = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, 1)
                vc = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, 1)
                out = cached_attention_reference(
                    q,
                    kc,
                    vc,
                    q_slots,
                    kv_valid,
                    sm_scale=arch.sm_scale,
                    softcap=arch.attn_softcap,
                    window=kind.window,
                    q_positions=q_positions,
                    kv_positions=kv_positions,
                )
                return out, (kc, vc)

            return _layer(x, h, p, lp, kind_idx, cfg, ctx, core)

        xs = (params["model"]["layers"], _layer_lora(lora), k_cache_all, v_cache_all, kind_ids)
        h, (k_new, v_new) = _scan_layers(layer, x, xs, params, cfg, ctx)
        return jax.lax.dynamic_slice_in_dim(h, cache_index + T - 1 - start, 1, axis=1), k_new, v_new

    new_cache = dict(cache)
    threshold = _longrope_threshold(arch)
    if threshold is None:
        x, new_cache["k"], new_cache["v"] = run(
            input_ids, positions, cache_index, cache["k"], cache["v"]
        )
    else:
        tokens = jax.lax.dynamic_update_slice_in_dim(
            cache["tokens"], input_ids.astype(jnp.int32), cache_index, 1
        )
        before = jnp.min(positions, axis=1)  # tokens each row had before this call (0 on prefill)
        after = jnp.max(positions, axis=1) + 1
        crossing = jnp.any((before >= 1) & (before <= threshold) & (after > threshold))
        x, new_cache["k"], new_cache["v"] = jax.lax.cond(
            crossing,
            lambda: run(tokens, jnp.maximum(kv_positions, 0), jnp.int32(0), cache["k"], cache["v"]),
            lambda: run(input_ids, positions, cache_index, cache["k"], cache["v"]),
        )
        new_cache["tokens"] = tokens
    return _logits(x, params, cfg, arch)[:, 0], new_cache
