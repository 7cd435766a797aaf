"""The update side of ``fastjax.rl`` (model forward + array math; no loop, logging or I/O):
rollout batches, completion log-probs, and the jitted GRPO / GSPO optimizer step.

``pad_prompts`` / ``build_rollout_batch`` lay sampled rows out as model inputs (left-padded prompt,
then completion; padding is segment 0); ``micro_batches`` adds the group advantages and splits a
rollout ``[B, ...] -> [M, mb, ...]``. ``completion_logprobs`` is ``log p(y_t | prefix)`` from the
fused cross-entropy on the final hidden states (no ``[T, V]`` logits); ``batched_logprobs`` maps
it over micro-batches without gradient (reference and old policies). ``grpo_step`` is one
optimizer update (``build_optimizer``) on the gradients summed over micro-batches, with the
per-token objective and normalisation of ``fastjax.rl_rewards``; ``grpo_updates`` runs the
``num_iterations`` of them on one rollout; ``step_key`` strips the config fields the jitted step
does not read, so runs share compilations. The formulas are in ``fastjax.rl``'s module
docstring; ``fastjax.rl.GRPOTrainer`` drives these functions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastjax import rl_rewards as R
from fastjax.generation import BUCKET
from fastjax.models import ops as O
from fastjax.models import registry
from fastjax.trainer import make_optimizer, make_schedule

if TYPE_CHECKING:  # annotations only: fastjax.rl imports this module
    from fastjax.rl_config import GRPOConfig

__all__ = [
    "batched_logprobs",
    "build_optimizer",
    "build_rollout_batch",
    "completion_logprobs",
    "grpo_step",
    "grpo_updates",
    "micro_batches",
    "pad_prompts",
    "step_key",
]

IGNORE_INDEX = -100


def pad_prompts(
    prompt_ids: Sequence[Sequence[int]], *, bucket: int = BUCKET
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts into int32 ``(tokens [B, P], mask [B, P])``, P rounded up to ``bucket``."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    P = -(-max(len(p) for p in prompt_ids) // bucket) * bucket
    tokens = np.zeros((len(prompt_ids), P), np.int32)
    mask = np.zeros((len(prompt_ids), P), np.int32)
    for row, p in enumerate(prompt_ids):
        tokens[row, P - len(p) :] = p
        mask[row, P - len(p) :] = 1
    return tokens, mask


def build_rollout_batch(
    prompt_tokens, prompt_mask, completion, completion_mask
) -> dict[str, np.ndarray]:
    """Model inputs of prompt + completion rows: ``input_ids, positions, segment_ids [B, P + N]``
    and ``completion_mask [B, N]``. Padding (left of the prompt, after the completion's end) is
    segment 0; positions count real tokens only, as in generation."""
    ids = np.concatenate([prompt_tokens, completion], axis=1).astype(np.int32)
    mask = np.concatenate([prompt_mask, completion_mask], axis=1).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return {
        "input_ids": ids,
        "positions": positions,
        "segment_ids": mask,
        "completion_mask": np.asarray(completion_mask, np.int32),
    }


def micro_batches(rollout: Mapping[str, Any], config: GRPOConfig) -> dict[str, jax.Array]:
    """The device batch of one rollout (``GRPOTrainer.rollout``'s host arrays): model inputs and
    group-normalised ``advantages``, leaves reshaped ``[B, ...] -> [M, mb, ...]`` (``mb`` =
    ``micro_batch_size``, default all B rows), as ``grpo_step`` takes them."""
    ro, c = rollout, config
    # trim the completion columns no row reached (bucketed, so compilations are reused)
    n = min(c.max_new_tokens, -(-int(ro["lengths"].max()) // BUCKET) * BUCKET)
    batch = build_rollout_batch(
        ro["tokens"], ro["prompt_mask"], ro["completion"][:, :n], ro["completion_mask"][:, :n]
    )
    batch["advantages"] = np.asarray(
        R.group_advantages(
            ro["rewards"], c.num_generations, scale=c.scale_rewards, eps=c.advantage_eps
        ),
        np.float32,
    )
    mb = c.micro_batch_size or c.batch_rows
    return {
        k: jnp.asarray(v.reshape(c.batch_rows // mb, mb, *v.shape[1:])) for k, v in batch.items()
    }


def completion_logprobs(
    params: Mapping,
    cfg: Any,
    batch: Mapping[str, jax.Array],
    *,
    lora: Mapping | None = None,
    lora_scale: float = 1.0,
    temperature: float = 1.0,
    remat_policy: str = "none",
    ops: O.Ops | None = None,
) -> jax.Array:
    """``log p(y_t | prefix)`` ``[B, N]`` fp32 of the completion tokens (0 where the mask is 0).

    ``batch`` as from ``build_rollout_batch``; the completion is the last N columns of
    ``input_ids``. ``ops.cross_entropy(reduction="none")`` on the final hidden states: no
    ``[T, V]`` logits.
    """
    ops = ops or O.Ops()
    fam = registry.family_of(cfg)
    mask = batch["completion_mask"]
    T, N = batch["input_ids"].shape[-1], mask.shape[-1]
    hidden = fam.forward(
        params,
        batch["input_ids"],
        cfg=cfg,
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        lora=lora,
        lora_scale=lora_scale,
        remat_policy=remat_policy,
        ops=ops,
        return_hidden=True,
    )
    h = hidden[:, T - N - 1 : T - 1]  # the state before completion token t predicts it
    softcap = fam.final_logit_softcap(cfg) if hasattr(fam, "final_logit_softcap") else None
    if temperature != 1.0:  # softcap_c(z) / T == softcap_{c/T}(z / T): exact with a final softcap
        h = (h.astype(jnp.float32) / temperature).astype(h.dtype)
        softcap = None if softcap is None else softcap / temperature
    labels = jnp.where(mask > 0, batch["input_ids"][:, T - N :], IGNORE_INDEX)
    head = fam.lm_head(params, cfg).astype(h.dtype)
    ce = O.cross_entropy(h, head, labels, softcap=softcap, reduction="none", ops=ops)
    return jnp.where(mask > 0, -ce, 0.0).astype(jnp.float32)


def step_key(config: GRPOConfig) -> GRPOConfig:
    """``config`` with the fields the jitted update does not read reset, so runs differing only in
    I/O settings (output_dir, resume, logging, seed, sampling) share one compilation."""
    return dataclasses.replace(
        config,
        output_dir="",
        logging_steps=1,
        save_steps=0,
        save_total_limit=None,
        resume=False,
        tensorboard=False,
        progress_bar=False,
        plot=False,
        save_final=False,
        base_model_name_or_path=None,
        seed=0,
        reward_weights=None,
        eos_token_id=None,
        max_prompt_length=None,
        top_p=1.0,
        scale_rewards=True,
        advantage_eps=1e-4,
        max_new_tokens=1,
    )


def build_optimizer(
    config: GRPOConfig, lora: Any, layer_masks: Any = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``fastjax.trainer.make_optimizer`` with a schedule over ``max_steps * num_iterations``."""
    schedule = make_schedule(config, config.max_steps * config.num_iterations)
    return make_optimizer(config, lora, schedule, layer_masks), schedule


@functools.partial(jax.jit, static_argnames=("cfg", "temperature", "lora_scale", "ops"))
def batched_logprobs(
    params: Mapping,
    lora: Mapping | None,
    batch: Mapping[str, jax.Array],
    *,
    cfg: Any,
    temperature: float,
    lora_scale: float,
    ops: O.Ops,
) -> jax.Array:
    """``completion_logprobs`` over micro-batches, ``[M, mb, ...] -> [M, mb, N]``, no gradient.
    ``lora=None`` is the reference policy."""
    inputs = {k: batch[k] for k in ("input_ids", "positions", "segment_ids", "completion_mask")}

    def one(mb):
        return completion_logprobs(
            params, cfg, mb, lora=lora, lora_scale=lora_scale, temperature=temperature, ops=ops
        )

    return jax.lax.map(one, inputs)


@functools.partial(
    jax.jit, static_argnames=("cfg", "config", "lora_scale", "ops"), donate_argnums=(0, 1)
)
def grpo_step(
    lora: Any,
    opt_state: Any,
    params: Mapping,
    batch: Mapping[str, jax.Array],
    layer_masks: Any = None,
    *,
    cfg: Any,
    config: GRPOConfig,
    lora_scale: float,
    ops: O.Ops,
):
    """One optimizer update on the summed gradients of the M micro-batches of ``batch`` (leaves
    ``[M, mb, ...]``: a rollout batch, ``advantages``, optional ``ref_logp`` / ``old_logp``).
    Returns ``(lora, opt_state, metrics)``; lora and opt_state are donated. Pass
    ``config=step_key(config)`` to share compilations."""
    optimizer, _ = build_optimizer(config, lora, layer_masks)

    def micro_loss(lora, mb, denom):
        logp = completion_logprobs(
            params,
            cfg,
            mb,
            lora=lora,
            lora_scale=lora_scale,
            temperature=config.temperature,
            remat_policy=config.remat_policy,
            ops=ops,
        )
        old = mb["old_logp"] if "old_logp" in mb else jax.lax.stop_gradient(logp)
        m = mb["completion_mask"].astype(jnp.float32)
        loss, kl, clipped = R.per_token_objective(
            logp,
            old,
            mb.get("ref_logp"),
            mb["advantages"],
            m,
            epsilon=config.epsilon,
            epsilon_high=config.epsilon_high,
            beta=config.beta,
            level=config.importance_sampling_level,
        )
        aux = {"kl_sum": jnp.sum(kl * m), "clipped": jnp.sum(clipped * m)}
        return R.loss_numerator(loss, m, config.loss_type) / denom, aux

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    denom = R.loss_denominator(batch["completion_mask"], config.loss_type)

    def body(carry, mb):
        grads, total, aux = carry
        (value, a), g = grad_fn(lora, mb, denom)
        grads = jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), grads, g)
        return (grads, total + value, jax.tree.map(jnp.add, aux, a)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), lora)
    aux0 = {"kl_sum": jnp.float32(0), "clipped": jnp.float32(0)}
    (grads, loss, aux), _ = jax.lax.scan(body, (zeros, jnp.float32(0), aux0), batch)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, lora)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    lora = optax.apply_updates(lora, updates)
    tokens = jnp.maximum(jnp.sum(batch["completion_mask"]), 1)
    grad_norm = jnp.sqrt(
        sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "kl": aux["kl_sum"] / tokens,
        "clip_ratio": aux["clipped"] / tokens,
    }
    return lora, opt_state, metrics


def grpo_updates(
    lora: Any,
    opt_state: Any,
    params: Mapping,
    batch: Mapping[str, jax.Array],
    layer_masks: Any = None,
    *,
    cfg: Any,
    config: GRPOConfig,
    lora_scale: float,
    ops: O.Ops,
) -> tuple[Any, Any, list[dict[str, jax.Array]]]:
    """The ``num_iterations`` (mu) ``grpo_step`` updates on one rollout's ``micro_batches``.

    First the no-grad passes the objective needs: ``ref_logp`` (adapters off) when ``beta > 0``,
    ``old_logp`` (the sampling policy) when mu > 1. Returns ``(lora, opt_state, metrics)``, one
    metrics dict of device scalars per update; lora and opt_state are donated.
    """
    batch = dict(batch)
    inputs = {k: batch[k] for k in ("input_ids", "positions", "segment_ids", "completion_mask")}
    static = {"cfg": cfg, "lora_scale": lora_scale, "ops": ops}
    if config.beta > 0:
        batch["ref_logp"] = batched_logprobs(
            params, None, inputs, temperature=config.temperature, **static
        )
    if config.num_iterations > 1:
        batch["old_logp"] = batched_logprobs(
            params, lora, inputs, temperature=config.temperature, **static
        )
    metrics = []
    for _ in range(config.num_iterations):
        lora, opt_state, m = grpo_step(
            lora, opt_state, params, batch, layer_masks, config=step_key(config), **static
        )
        metrics.append(m)
    return lora, opt_state, metrics
