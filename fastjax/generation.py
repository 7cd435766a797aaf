"""Batched autoregressive generation with a KV cache.

Prompts of different lengths are left-padded into one ``[B, P]`` batch (positions count real tokens only, so
padding changes nothing), prefilled in one forward pass, then decoded one token per step inside a single
``lax.while_loop`` that stops early once every row has produced an end-of-sequence token. Shapes are bucketed
(prompt length and cache length rounded up to multiples of ``BUCKET``), so one compilation serves many calls.
Sampling: greedy at ``temperature == 0``, otherwise temperature + nucleus (top-p) sampling.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastjax.models import registry
from fastjax.models.ops import Ops

BUCKET = 64


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def sample_logits(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Next tokens ``[B]`` from logits ``[B, V]``: argmax when temperature is 0, else top-p sampling."""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(cum_before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_ids", "ops"))
def _generate(
    params,
    lora,
    lora_scale,
    tokens,
    mask,
    key,
    temperature,
    top_p,
    *,
    cfg,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    ops: Ops,
):
    fam = registry.family_of(cfg)
    B, P = tokens.shape
    S = _round_up(P + max_new_tokens, BUCKET)
    dtype = params["model"]["embed_tokens"]["weight"].dtype
    cache = fam.init_cache(cfg, B, S, dtype)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    kv_valid = jnp.zeros((B, S), bool).at[:, :P].set(mask.astype(bool))
    logits, cache = fam.forward_cached(
        params,
        tokens,
        cache,
        cfg=cfg,
        positions=positions,
        cache_index=jnp.int32(0),
        kv_valid=kv_valid,
        lora=lora,
        lora_scale=lora_scale,
        ops=ops,
    )
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    out = jnp.full((B, max_new_tokens), -1, jnp.int32)
    state = (
        jnp.int32(0),
        logits,
        cache,
        kv_valid,
        positions[:, -1] + 1,
        jnp.zeros((B,), bool),
        out,
        key,
    )

    def cond(state):
        i, *_, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, logits, cache, kv_valid, pos, done, out, key = state
        key, sub = jax.random.split(key)
        tok = sample_logits(logits, sub, temperature, top_p)
        out = out.at[:, i].set(jnp.where(done, -1, tok))
        done = done | jnp.isin(tok, eos)
        slot = P + i
        kv_valid = kv_valid.at[:, slot].set(True)
        logits, cache = fam.forward_cached(
            params,
            tok[:, None],
            cache,
            cfg=cfg,
            positions=pos[:, None],
            cache_index=slot,
            kv_valid=kv_valid,
            lora=lora,
            lora_scale=lora_scale,
            ops=ops,
        )
        return i + 1, logits, cache, kv_valid, pos + 1, done, out, key

    return jax.lax.while_loop(cond, body, state)[6]


def generate(
    params: Mapping,
    cfg,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    lora: Mapping | None = None,
    lora_scale: float = 1.0,
    max_seq_length: int | None = None,
    ops: Ops | None = None,
) -> list[list[int]]:
    """Generate continuations for a batch of token-id prompts; returns the new tokens of each row, up to and
    including the first end-of-sequence token (``eos_token_id``, default the config's)."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"generate: {max_new_tokens=} must be >= 1")
    limit = max_seq_length or cfg.max_position_embeddings
    longest = max(len(p) for p in prompt_ids)
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"generate: prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
            f"max_seq_length={limit}"
        )
    if eos_token_id is None:
        eos_ids = tuple(cfg.eos_token_ids)
    elif isinstance(eos_token_id, int):
        eos_ids = (eos_token_id,)
    else:
        eos_ids = tuple(int(e) for e in eos_token_id)
    P = _round_up(longest, BUCKET)
    B = len(prompt_ids)
    tokens = np.zeros((B, P), np.int32)
    mask = np.zeros((B, P), np.int32)
    for row, p in enumerate(prompt_ids):
        tokens[row, P - len(p) :] = p
        mask[row, P - len(p) :] = 1
    out = _generate(
        params,
        lora,
        jnp.float32(lora_scale),
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jax.random.key(seed),
        jnp.float32(temperature),
        jnp.float32(top_p),
        cfg=cfg,
        max_new_tokens=int(max_new_tokens),
        eos_ids=eos_ids,
        ops=ops or Ops(),
    )
    result = []
    for row in np.asarray(out):
        toks = [int(t) for t in row if t >= 0]
        for j, t in enumerate(toks):
            if t in eos_ids:
                toks = toks[: j + 1]
                break
        result.append(toks)
    return result


def generate_arrays(
    params: Mapping,
    cfg,
    tokens: jax.Array,
    mask: jax.Array,
    *,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    lora: Mapping | None = None,
    lora_scale: float = 1.0,
    ops: Ops | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``generate`` for prompts already left-padded on the device, returning device arrays (for RL).

    ``tokens``/``mask`` ``[B, P]`` int32 (mask 1 = real prompt token; rows left-padded); ``key`` a
    ``jax.random.key``. Returns ``(completion, completion_mask)``, both ``[B, max_new_tokens]`` int32:
    the sampled tokens (0 after a row's end) and 1 for every generated token up to and including the
    row's first end-of-sequence token. Nothing leaves the device, so no host round trip per call.
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate_arrays: {max_new_tokens=} must be >= 1")
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(
            f"generate_arrays: {tokens.shape=} and {mask.shape=} must be one [B, P] shape"
        )
    if eos_token_id is None:
        eos_ids = tuple(cfg.eos_token_ids)
    elif isinstance(eos_token_id, (int, np.integer)):
        eos_ids = (int(eos_token_id),)
    else:
        eos_ids = tuple(int(e) for e in eos_token_id)
    out = _generate(
        params,
        lora,
        jnp.float32(lora_scale),
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(mask, jnp.int32),
        key,
        jnp.float32(temperature),
        jnp.float32(top_p),
        cfg=cfg,
        max_new_tokens=int(max_new_tokens),
        eos_ids=eos_ids,
        ops=ops or Ops(),
    )
    completion_mask = (out >= 0).astype(jnp.int32)
    return jnp.maximum(out, 0), completion_mask
