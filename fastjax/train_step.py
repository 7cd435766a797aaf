"""The SFT train step: optimizer, learning-rate schedule, loss, and one jitted step.

``make_train_step`` builds ``step(trainable, opt_state, frozen, batch [A, B, T], step, rng_key)``.
A ``lax.scan`` over the A micro-batches sums the token cross-entropy and its gradient; both are
then divided by the TOTAL number of label tokens in the step (sum-loss / total-count), so
accumulating over A micro-batches is exactly one big batch, and a batch split over N devices is
exactly the same batch on one (the sums are global). With ``shardings`` (a
``fastjax.sharding.StepShardings``) the step is jitted with those in/out shardings;
``fastjax.trainer.SFTTrainer`` wires it up and runs the loop.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fastjax import lora as lora_lib
from fastjax.models import ops as O
from fastjax.models import registry

IGNORE_INDEX = -100
OPTIMIZERS = ("adamw", "adamw_8bit")


def make_schedule(config: Any, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_steps``, then linear decay to 0 / cosine to 0 /
    constant."""
    lr, warmup = config.learning_rate, config.warmup_steps
    decay_steps = max(total_steps - warmup, 1)
    if config.lr_scheduler == "linear":
        main = optax.linear_schedule(lr, 0.0, decay_steps)
    elif config.lr_scheduler == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps)
    else:
        main = optax.constant_schedule(lr)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(tree: Any) -> Any:
    """True for leaves weight decay applies to: not norms, not biases, not 1-D per layer."""

    def keep(path, leaf) -> bool:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if keys and keys[-1] == "bias" or any("norm" in k for k in keys):
            return False
        per_layer_ndim = len(leaf.shape) - (1 if "layers" in keys else 0)
        return per_layer_ndim >= 2

    return jax.tree_util.tree_map_with_path(keep, tree)


def make_optimizer(
    config: Any, trainable: Any, schedule: optax.Schedule, layer_masks: Any = None
) -> optax.GradientTransformation:
    """Clipping -> AdamW (or 8-bit AdamW, or the given transform) -> zero updates of unselected
    layers."""
    parts = []
    if config.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    mask = decay_mask(trainable)
    kw = {
        "b1": config.adam_beta1,
        "b2": config.adam_beta2,
        "eps": config.adam_epsilon,
        "weight_decay": config.weight_decay,
        "mask": mask,
    }
    if config.optimizer == "adamw":
        parts.append(optax.adamw(schedule, **kw))
    elif config.optimizer == "adamw_8bit":
        from fastjax.optim import adamw_8bit

        parts.append(adamw_8bit(schedule, **kw))
    elif isinstance(config.optimizer, optax.GradientTransformation):
        parts.append(config.optimizer)
    else:
        raise ValueError(
            f"SFTConfig.optimizer={config.optimizer!r}: expected {OPTIMIZERS} or an "
            "optax GradientTransformation"
        )
    parts.append(lora_lib.mask_unselected_layers(layer_masks))
    return optax.chain(*parts)


def cross_entropy_sum(
    hidden: jax.Array,
    head: jax.Array,
    labels: jax.Array,
    *,
    ops: O.Ops,
    softcap: float | None = None,
    head_trainable: bool = True,
) -> jax.Array:
    """Sum of token cross-entropies over labels != -100. hidden ``[N, D]``, head ``[V, D]``,
    labels ``[N]``.

    With ``head_trainable=False`` (LoRA: the head is frozen) the kernel skips the ``[V, D]`` head
    gradient, a matmul as large as the logits themselves.
    """
    head = head.astype(hidden.dtype)
    return O.cross_entropy(
        hidden,
        head,
        labels,
        softcap=softcap,
        reduction="sum",
        head_trainable=head_trainable,
        ops=ops,
    )


def default_ops() -> O.Ops:
    """``Ops()``, except that where cross-entropy would fall back to the full-logits reference (no
    GPU, no explicit ``FASTJAX_KERNELS``) it uses ``"xla_fused_grad"``: the step never holds ``[T, V]``
    logits, and with a frozen head (LoRA, QLoRA) computes the logits once instead of twice: on 2 CPU
    cores, SmolLM2's head at 2,048 tokens, fp32, fwd+bwd 1.82 s against 2.66 s for ``"xla_chunked"``
    (1.46x, same temporaries; ``benchmarks/results/ce_frozen_cpu.jsonl``). A trained head runs exactly
    as ``"xla_chunked"``."""
    ops = O.Ops()
    if ops.resolve("cross_entropy") == "xla" and not os.environ.get(O.ENV_KERNELS):
        ops = dataclasses.replace(ops, cross_entropy="xla_fused_grad")
    return ops


def make_loss_fn(
    cfg: Any,
    *,
    full_finetune: bool,
    lora_scale: float,
    lora_dropout: float,
    remat_policy: str,
    ops: O.Ops,
    mlp_chunk_size: int | None = None,
    scan_layers: bool = True,
) -> Callable:
    """``loss_sum(trainable, frozen, micro_batch, rng) -> (sum of token CE, number of label
    tokens)``. A micro-batch with ``inputs_embeds`` (the embedding table on the host) skips the
    lookup of ``input_ids``. ``mlp_chunk_size`` (long-context memory), ``scan_layers``: see
    ``models.decoder.forward``."""
    fam = registry.family_of(cfg)
    softcap = getattr(cfg, "final_logit_softcapping", None)

    def loss_sum(trainable, frozen, mb, rng):
        params, adapters = (trainable, None) if full_finetune else (frozen, trainable)
        embeds = mb.get("inputs_embeds")  # rows gathered on the host (fastjax.host_embed)
        hidden = fam.forward(
            params,
            None if embeds is not None else mb["input_ids"],
            cfg=cfg,
            inputs_embeds=embeds,
            positions=mb["positions"],
            segment_ids=mb.get("segment_ids"),
            lora=adapters,
            lora_scale=lora_scale,
            lora_dropout=lora_dropout,
            dropout_rng=rng if lora_dropout > 0 else None,
            remat_policy=remat_policy,
            ops=ops,
            return_hidden=True,
            mlp_chunk_size=mlp_chunk_size,
            scan_layers=scan_layers,
        )
        B, T, D = hidden.shape
        labels = mb["labels"].reshape(B * T)
        total = cross_entropy_sum(
            hidden.reshape(B * T, D),
            fam.lm_head(params, cfg),
            labels,
            ops=ops,
            softcap=softcap,
            head_trainable=full_finetune,
        )
        return total.astype(jnp.float32)

    return loss_sum


def global_norm(tree: Any) -> jax.Array:
    """fp32 L2 norm over all leaves (optax renamed its helper across versions)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(
    loss_sum: Callable,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    donate: bool = True,
    shardings: Any = None,
    compiler_options: dict[str, str | int] | None = None,
) -> Callable:
    """``step(trainable, opt_state, frozen, batch [A, B, T], step, rng_key) -> (trainable,
    opt_state, metrics)``, jitted, trainable and opt_state donated. ``metrics``: loss, grad_norm,
    lr, num_label_tokens.

    ``shardings``: a ``fastjax.sharding.StepShardings``; the step is then jitted with its in/out
    shardings (arguments must already lie there, metrics come back replicated) and the fp32
    gradient accumulator is kept where the trainable tree is (sharded in full fine-tuning).

    ``compiler_options``: XLA options for this step only (``fastjax.remat.compiler_options`` gives
    the ones a remat preset wants)."""
    grad_fn = jax.value_and_grad(loss_sum)

    def step(trainable, opt_state, frozen, batch, step_idx, key):
        num_micro = batch["labels"].shape[0]
        count = jnp.sum(batch["labels"] != IGNORE_INDEX)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        step_key = jax.random.fold_in(key, step_idx)

        def micro(carry, xs):
            grads, total = carry
            mb, i = xs
            value, g = grad_fn(trainable, frozen, mb, jax.random.fold_in(step_key, i))
            with jax.named_scope("grad_accum"):
                grads = jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), grads, g)
            return (grads, total + value), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        if shardings is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, shardings.trainable)
        xs = (batch, jnp.arange(num_micro))
        (grads, total), _ = jax.lax.scan(micro, (zeros, jnp.float32(0)), xs)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trainable)
        loss = total / denom
        with jax.named_scope("optimizer"):  # the profile's name (benchmarks/profile_step.py)
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
        metrics = {
            "loss": loss,
            "grad_norm": global_norm(grads),
            "update_norm": global_norm(updates),
            "lr": jnp.asarray(schedule(step_idx), jnp.float32),
            "num_label_tokens": count,
        }
        return trainable, opt_state, metrics

    donate_argnums = (0, 1) if donate else ()
    if shardings is None:
        return jax.jit(step, donate_argnums=donate_argnums, compiler_options=compiler_options)
    sh = shardings
    return jax.jit(
        step,
        donate_argnums=donate_argnums,
        compiler_options=compiler_options,
        in_shardings=(sh.trainable, sh.opt_state, sh.frozen, sh.batch, sh.scalar, sh.scalar),
        out_shardings=(sh.trainable, sh.opt_state, sh.scalar),
    )
