"""Supervised fine-tuning: LoRA / QLoRA / full fine-tuning in one jitted step.

Usage::

    params, cfg, tok = fastjax.from_pretrained("model.gguf")
    lora, lora_config = fastjax.get_peft_model(params, cfg, r=16, lora_alpha=16,
                                               target_modules="all-linear")
    result = fastjax.train(params, cfg, rows_or_examples_or_loader,
                           SFTConfig(max_steps=200, batch_size=8, output_dir="out"),
                           lora=lora, lora_config=lora_config, tokenizer=tok)
    result.trainable   # the trained adapter tree (or the params with full_finetune=True)

``SFTTrainer(...).train()`` is the same thing as an object (``train`` builds one). Training data is
a ``fastjax.data.DataLoader`` (one loader batch = one micro-batch), a list of tokenized examples
(``{"input_ids", "loss_mask"}``), or raw rows / a JSONL path (then ``tokenizer`` is needed and
``fastjax.data`` tokenizes them, training on responses only for prompt/completion and chat rows).

The step (``make_train_step``): ``batch`` arrays are ``[A, B, T]`` (A = ``grad_accum_steps``
micro-batches of B rows). A ``lax.scan`` over the A micro-batches sums the token cross-entropy and
its gradient; both are then divided by the TOTAL number of label tokens in the step (sum-loss /
total-count), so accumulating over A micro-batches is exactly one big batch. The loss is
``ops.cross_entropy`` on ``forward(..., return_hidden=True)`` and ``lm_head`` (the CE kernel never
materialises ``[T, V]`` logits). Only the trainable tree (adapters, or all params with
``full_finetune``) is differentiated; the frozen params are a non-donated jit argument, so they are
neither copied nor baked in as constants. Trainable tree and optimizer state are donated.

The host loop keeps one step in flight: it dispatches step s, then reads step s-1's scalars (the
only host sync), so data assembly and logging overlap device work. A non-finite loss or gradient
norm stops training with ``NonFiniteLossError`` naming the step; checkpoints are written only after
the losses up to them were checked, so the newest checkpoint on disk is always a good one.

Outputs in ``output_dir``: ``metrics.jsonl`` (one line per step), ``tensorboard/`` (if tensorboardX
is importable), ``checkpoints/<step>/`` (orbax, every ``save_steps``), ``loss_curve.png``,
``train_summary.json``, and ``adapter/`` (PEFT format) or ``model/`` (HF, with ``full_finetune``).
``resume=True`` restores the newest checkpoint and continues; the loss sequence equals an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastjax import lora as lora_lib
from fastjax import remat
from fastjax.checkpoint import Checkpointer
from fastjax.logging_utils import MetricsLogger, device_memory_gib, read_metrics, write_loss_curve
from fastjax.models import ops as O
from fastjax.models import registry

log = logging.getLogger("fastjax")

IGNORE_INDEX = -100
SCHEDULERS = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient norm."""


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Training hyper-parameters (HF TrainingArguments names where one exists).

    ``batch_size`` rows of ``max_seq_length`` tokens per micro-batch, ``grad_accum_steps``
    micro-batches per optimizer step. ``max_steps=None`` trains ``num_epochs`` epochs.
    ``weight_decay`` skips norms, biases and 1-D params. ``optimizer``: ``"adamw"``,
    ``"adamw_8bit"`` or any ``optax.GradientTransformation`` (then ``learning_rate`` and
    ``lr_scheduler`` only feed the logged lr; gradient clipping is still applied). ``save_steps=0``
    writes no intermediate checkpoints (only the final adapter). With ``full_finetune`` the params
    passed in are donated to the train step (their buffers are reused; use ``result.trainable``).
    ``truncation=False`` turns sequences longer than ``max_seq_length`` into an error instead of a
    truncation warning.
    """

    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    max_steps: int | None = None
    num_epochs: int = 1
    batch_size: int = 8
    grad_accum_steps: int = 1
    max_seq_length: int = 1024
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    optimizer: Any = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    seed: int = 0
    remat_policy: str = "full"
    packing: bool = True
    truncation: bool = True
    logging_steps: int = 1
    save_steps: int = 0
    save_total_limit: int | None = 2
    output_dir: str = "outputs"
    resume: bool = False
    ops: O.Ops | None = None
    full_finetune: bool = False
    tensorboard: bool = True
    progress_bar: bool = True
    plot: bool = True
    save_final: bool = True
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"SFTConfig.{name}={getattr(self, name)!r}: expected {expected}")

        if not self.learning_rate >= 0:
            bad("learning_rate", ">= 0")
        if self.lr_scheduler not in SCHEDULERS:
            bad("lr_scheduler", f"one of {SCHEDULERS}")
        for name in ("batch_size", "grad_accum_steps", "num_epochs", "logging_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        for name in ("warmup_steps", "save_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "an integer >= 0")
        if self.max_steps is not None and not (isinstance(self.max_steps, int)
                                               and self.max_steps >= 1):
            bad("max_steps", "None or an integer >= 1")
        if self.max_seq_length < 2:
            bad("max_seq_length", ">= 2")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            bad("max_grad_norm", "None or > 0")
        if self.weight_decay < 0:
            bad("weight_decay", ">= 0")
        if isinstance(self.optimizer, str) and self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"one of {OPTIMIZERS} or an optax.GradientTransformation")
        if self.remat_policy not in remat.PRESETS:
            bad("remat_policy", f"one of {remat.PRESETS}")


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns. ``history``: one dict per step of the whole run (resumed runs
    included)."""

    trainable: Any
    opt_state: Any
    history: list[dict]
    steps: int
    tokens_per_s: float | None
    output_dir: Path
    saved_to: Path | None

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


# --------------------------------------------------------------------------------------------------
# Optimizer, schedule, loss
# --------------------------------------------------------------------------------------------------

def make_schedule(config: SFTConfig, total_steps: int) -> optax.Schedule:
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


def make_optimizer(config: SFTConfig, trainable: Any, schedule: optax.Schedule,
                   layer_masks: Any = None) -> optax.GradientTransformation:
    """Clipping -> AdamW (or 8-bit AdamW, or the given transform) -> zero updates of unselected
    layers."""
    parts = []
    if config.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    mask = decay_mask(trainable)
    kw = {"b1": config.adam_beta1, "b2": config.adam_beta2, "eps": config.adam_epsilon,
          "weight_decay": config.weight_decay, "mask": mask}
    if config.optimizer == "adamw":
        parts.append(optax.adamw(schedule, **kw))
    elif config.optimizer == "adamw_8bit":
        from fastjax.optim import adamw_8bit

        parts.append(adamw_8bit(schedule, **kw))
    elif isinstance(config.optimizer, optax.GradientTransformation):
        parts.append(config.optimizer)
    else:
        raise ValueError(f"SFTConfig.optimizer={config.optimizer!r}: expected {OPTIMIZERS} or an "
                         "optax GradientTransformation")
    parts.append(lora_lib.mask_unselected_layers(layer_masks))
    return optax.chain(*parts)


def cross_entropy_sum(hidden: jax.Array, head: jax.Array, labels: jax.Array, *, ops: O.Ops,
                      softcap: float | None = None, head_trainable: bool = True) -> jax.Array:
    """Sum of token cross-entropies over labels != -100. hidden ``[N, D]``, head ``[V, D]``,
    labels ``[N]``.

    With ``head_trainable=False`` (LoRA: the head is frozen) the kernel skips the ``[V, D]`` head
    gradient, a matmul as large as the logits themselves. ``ops.cross_entropy`` does not take that
    flag yet, so the kernel module is called directly here with the implementation ``ops`` picks.
    """
    head = head.astype(hidden.dtype)
    if head_trainable:
        return O.cross_entropy(hidden, head, labels, softcap=softcap, reduction="sum", ops=ops)
    from fastjax.pallas_kernels import cross_entropy as ce

    return ce.cross_entropy(hidden, head, labels, softcap=softcap, reduction="sum",
                            head_trainable=False, impl=ops.resolve("cross_entropy"),
                            interpret=ops.interpret)


def default_ops() -> O.Ops:
    """``Ops()``, except that where cross-entropy would fall back to the full-logits reference (no
    GPU, no explicit ``FASTJAX_KERNELS``) it uses ``"xla_chunked"``: the step never holds ``[T, V]``
    logits."""
    ops = O.Ops()
    if ops.resolve("cross_entropy") == "xla" and not os.environ.get(O.ENV_KERNELS):
        ops = dataclasses.replace(ops, cross_entropy="xla_chunked")
    return ops


def make_loss_fn(cfg: Any, *, full_finetune: bool, lora_scale: float, lora_dropout: float,
                 remat_policy: str, ops: O.Ops) -> Callable:
    """``loss_sum(trainable, frozen, micro_batch, rng) -> (sum of token CE, number of label
    tokens)``."""
    fam = registry.family_of(cfg)
    softcap = getattr(cfg, "final_logit_softcapping", None)

    def loss_sum(trainable, frozen, mb, rng):
        params, adapters = (trainable, None) if full_finetune else (frozen, trainable)
        hidden = fam.forward(params, mb["input_ids"], cfg=cfg, positions=mb["positions"],
                             segment_ids=mb.get("segment_ids"), lora=adapters,
                             lora_scale=lora_scale, lora_dropout=lora_dropout,
                             dropout_rng=rng if lora_dropout > 0 else None,
                             remat_policy=remat_policy, ops=ops, return_hidden=True)
        B, T, D = hidden.shape
        labels = mb["labels"].reshape(B * T)
        total = cross_entropy_sum(hidden.reshape(B * T, D), fam.lm_head(params, cfg), labels,
                                  ops=ops, softcap=softcap, head_trainable=full_finetune)
        return total.astype(jnp.float32)

    return loss_sum


def global_norm(tree: Any) -> jax.Array:
    """fp32 L2 norm over all leaves (optax renamed its helper across versions)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(loss_sum: Callable, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule,
                    *, donate: bool = True) -> Callable:
    """``step(trainable, opt_state, frozen, batch [A, B, T], step, rng_key) -> (trainable,
    opt_state, metrics)``, jitted, trainable and opt_state donated. ``metrics``: loss, grad_norm,
    lr, num_label_tokens."""
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
            grads = jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), grads, g)
            return (grads, total + value), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        xs = (batch, jnp.arange(num_micro))
        (grads, total), _ = jax.lax.scan(micro, (zeros, jnp.float32(0)), xs)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trainable)
        loss = total / denom
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "grad_norm": global_norm(grads),
                   "update_norm": global_norm(updates),
                   "lr": jnp.asarray(schedule(step_idx), jnp.float32), "num_label_tokens": count}
        return trainable, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def _is_tokenized(data: Any) -> bool:
    return (isinstance(data, Sequence) and not isinstance(data, str) and len(data) > 0
            and isinstance(data[0], Mapping) and "input_ids" in data[0] and "loss_mask" in data[0])


def build_loader(data: Any, config: SFTConfig, tokenizer: Any = None):
    """A ``fastjax.data.DataLoader`` from a loader, tokenized examples, rows or a JSONL path."""
    from fastjax import data as data_lib

    if isinstance(data, data_lib.DataLoader):
        if data.batch_size != config.batch_size:
            raise ValueError(f"the DataLoader's batch_size={data.batch_size} differs from "
                             f"SFTConfig.batch_size={config.batch_size} (one loader batch is one "
                             f"micro-batch)")
        if data.max_seq_length != config.max_seq_length:
            raise ValueError(f"the DataLoader's max_seq_length={data.max_seq_length} differs from "
                             f"SFTConfig.max_seq_length={config.max_seq_length}")
        return data
    if isinstance(data, Sequence) and not isinstance(data, str) and len(data) == 0:
        raise ValueError("dataset is empty: 0 training examples")
    if _is_tokenized(data):
        examples = list(data)
    else:
        if tokenizer is None:
            raise ValueError("training on raw rows needs a tokenizer (pass tokenizer=...), or pass "
                             "tokenized examples {'input_ids', 'loss_mask'} or a "
                             "fastjax.data.DataLoader")
        examples = data_lib.tokenize_dataset(data, tokenizer)
    if not config.truncation:
        for i, ex in enumerate(examples):
            n = len(ex["input_ids"])
            if n > config.max_seq_length:
                raise ValueError(f"example {i} has {n} tokens, longer than max_seq_length="
                                 f"{config.max_seq_length} (a row); raise max_seq_length or set "
                                 "truncation=True to cut it")
    pad_id = 0
    if tokenizer is not None:
        ids = (tokenizer.pad_token_id, tokenizer.eos_token_id)
        pad_id = next((i for i in ids if i is not None), 0)
    return data_lib.DataLoader(examples, config.batch_size, config.seed,
                               max_seq_length=config.max_seq_length,
                               packing=config.packing, num_epochs=None, pad_id=pad_id)


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------

class SFTTrainer:
    """Holds the model, the trainable tree, the optimizer and the data; ``train()`` runs the loop.

    ``lora``/``lora_config``: an adapter tree from ``get_peft_model`` (if omitted and not
    ``full_finetune``, adapters are created from ``lora_config`` or the default ``LoraConfig``).
    ``callbacks``: functions
    ``fn(step, record)`` called with each step's host-side metrics record (1-based step).
    """

    def __init__(self, params: Mapping, cfg: Any, train_data: Any, config: SFTConfig | None = None,
                 *,
                 lora: Mapping | None = None, lora_config: lora_lib.LoraConfig | None = None,
                 tokenizer: Any = None, callbacks: Sequence[Callable[[int, dict], None]] = ()):
        self.config = config = config or SFTConfig()
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.callbacks = list(callbacks)
        self.loader = build_loader(train_data, config, tokenizer)
        if config.full_finetune:
            if lora is not None:
                raise ValueError("full_finetune=True trains all params; do not pass lora adapters")
            leaves = jax.tree.leaves(params, is_leaf=_is_quantized)
            quantized = [p for p in leaves if _is_quantized(p)]
            if quantized:
                raise ValueError("full_finetune=True needs 16/32-bit params, not NF4 (load without "
                                 "load_in_4bit)")
            self.lora_config = None
            self.trainable, self.frozen = params, None
            self.lora_scale, self.layer_masks = 1.0, None
        else:
            if lora is None:
                lora_config = lora_config or lora_lib.LoraConfig()
                lora, lora_config = lora_lib.get_peft_model(params, cfg, config=lora_config)
            elif lora_config is None:
                raise ValueError("pass the LoraConfig returned by get_peft_model together with its "
                                 "adapters")
            self.lora_config = lora_config
            self.trainable, self.frozen = lora, params
            self.lora_scale = lora_lib.lora_scale(lora_config)
            self.layer_masks = lora_lib.layer_masks(lora, lora_config)
        A = config.grad_accum_steps
        steps_per_epoch = -(-self.loader.steps_per_epoch // A)
        self.max_steps = config.max_steps or config.num_epochs * steps_per_epoch
        if self.loader.total_steps is not None and self.max_steps * A > self.loader.total_steps:
            raise ValueError(f"the DataLoader has {self.loader.total_steps} batches, fewer than "
                             f"max_steps * grad_accum_steps = {self.max_steps * A}; build it "
                             "with num_epochs=None")
        self.schedule = make_schedule(config, self.max_steps)
        self.optimizer = make_optimizer(config, self.trainable, self.schedule, self.layer_masks)
        self.ops = config.ops or default_ops()
        dropout = 0.0 if self.lora_config is None else self.lora_config.lora_dropout
        loss_sum = make_loss_fn(cfg, full_finetune=config.full_finetune, lora_scale=self.lora_scale,
                                lora_dropout=dropout, remat_policy=config.remat_policy,
                                ops=self.ops)
        self.step_fn = make_train_step(loss_sum, self.optimizer, self.schedule)
        self.output_dir = Path(config.output_dir)
        self.key = jax.random.key(config.seed)

    # ---- pieces of the loop ----------------------------------------------------------------------
    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Host arrays ``[A, B, T]`` of optimizer step ``step`` (0-based): loader batches
        ``step * A`` to ``step * A + A - 1``."""
        A = self.config.grad_accum_steps
        micro = [self.loader.batch_at(step * A + i) for i in range(A)]
        return {k: np.stack([m[k] for m in micro]) for k in micro[0]}

    def _state(self, trainable, opt_state) -> dict:
        return {"trainable": trainable, "opt_state": opt_state,
                "rng": jax.random.key_data(self.key)}

    def _fingerprint(self) -> dict:
        c = self.config
        return {"batch_size": c.batch_size, "grad_accum_steps": c.grad_accum_steps,
                "max_seq_length": c.max_seq_length, "seed": c.seed, "max_steps": self.max_steps,
                "full_finetune": c.full_finetune}

    def _restore(self, ckpt: Checkpointer, opt_state) -> tuple[Any, Any, int]:
        step = ckpt.latest_step()
        if step is None:
            log.info("resume=True but %s holds no checkpoint: starting from step 0", ckpt.directory)
            return self.trainable, opt_state, 0
        state, meta = ckpt.restore(step, self._state(self.trainable, opt_state))
        saved, mine = dict(meta.get("fingerprint", {})), self._fingerprint()
        if saved.pop("max_steps", None) != mine.pop("max_steps"):
            log.warning("resuming with max_steps=%d (the checkpoint's run had another): the learning "
                        "rate schedule changes, so the run will differ from an uninterrupted one",
                        self.max_steps)
        if saved != mine:
            raise ValueError(f"checkpoint {ckpt.directory / str(step)} was written with {saved}, "
                             f"this run has {mine}: resume needs the same data layout and seed")
        self.loader.load_state(meta["data"])
        self.key = jax.random.wrap_key_data(jnp.asarray(state["rng"]))
        log.info("resumed from %s (step %d)", ckpt.directory / str(step), step)
        return state["trainable"], state["opt_state"], int(meta["step"])

    # ---- the loop --------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        c = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # The step donates the trainable tree: copy the caller's adapters (small) so their arrays
        # survive; with full_finetune the params themselves are donated (a copy would double the
        # model's memory).
        trainable = self.trainable if c.full_finetune else jax.tree.map(jnp.copy, self.trainable)
        opt_state = self.optimizer.init(trainable)
        ckpt = Checkpointer(self.output_dir / "checkpoints", max_to_keep=c.save_total_limit) \
            if (c.save_steps or c.resume) else None
        start = 0
        if c.resume and ckpt is not None:
            trainable, opt_state, start = self._restore(ckpt, opt_state)
        logger = MetricsLogger(self.output_dir, tensorboard=c.tensorboard)
        history = logger.truncate_after(start)  # a resumed run redoes the steps after its ckpt
        n_train = (lora_lib.num_trainable_params(trainable, self.lora_config) if self.lora_config
                   else sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable)))
        log.info("training %s trainable params for %d steps (%d x %d rows of %d tokens per step)",
                 f"{n_train:,}", self.max_steps, c.grad_accum_steps, c.batch_size, c.max_seq_length)
        bar = _progress(c.progress_bar, self.max_steps, start)
        timing = {"t_last": None, "tokens": 0, "seconds": 0.0}
        pending: list[tuple[int, dict, int]] = []
        last_saved = start

        def process(item):
            step_idx, metrics, n_tokens = item
            host = jax.device_get(metrics)
            now = time.perf_counter()
            record = {"step": step_idx + 1, "loss": float(host["loss"]),
                      "grad_norm": float(host["grad_norm"]),
                      "update_norm": float(host["update_norm"]), "lr": float(host["lr"]),
                      "num_label_tokens": int(host["num_label_tokens"]), "num_tokens": n_tokens}
            if timing["t_last"] is not None:  # the first step of a process includes compilation
                dt = now - timing["t_last"]
                timing["tokens"] += n_tokens
                timing["seconds"] += dt
                record["tokens_per_s"] = n_tokens / dt if dt > 0 else None
            timing["t_last"] = now
            mem = device_memory_gib()
            if mem is not None:
                record["memory_gib"], record["peak_memory_gib"] = mem
            if not all(math.isfinite(record[k]) for k in ("loss", "grad_norm", "update_norm")):
                good = (f"step {last_saved} in {ckpt.directory}" if ckpt is not None and last_saved
                        else "none")
                raise NonFiniteLossError(
                    f"non-finite loss at step {record['step']} (loss={record['loss']}, grad_norm="
                    f"{record['grad_norm']}, update_norm={record['update_norm']}); training "
                    f"stopped. Last good checkpoint: {good}. Lower the learning rate or check the "
                    "data.")
            history.append(record)
            if record["step"] % c.logging_steps == 0 or record["step"] == self.max_steps:
                logger.log(record)
                if bar is not None:
                    bar.set_postfix(_postfix(record), refresh=False)
            if bar is not None:
                bar.update(1)
            for fn in self.callbacks:
                fn(record["step"], record)

        try:
            for step_idx in range(start, self.max_steps):
                host_batch = self.batch(step_idx)
                n_tokens = int(np.count_nonzero(host_batch["segment_ids"]))
                batch = {k: jnp.asarray(v) for k, v in host_batch.items()}
                trainable, opt_state, metrics = self.step_fn(trainable, opt_state, self.frozen,
                                                             batch, jnp.int32(step_idx), self.key)
                while pending:
                    process(pending.pop(0))
                pending.append((step_idx, metrics, n_tokens))
                done = step_idx + 1
                due = c.save_steps and (done % c.save_steps == 0 or done == self.max_steps)
                if ckpt is not None and due:
                    while pending:
                        process(pending.pop(0))
                    self.loader.step = done * c.grad_accum_steps
                    ckpt.save(done, self._state(trainable, opt_state),
                              {"step": done, "data": self.loader.state(), "seed": c.seed,
                               "fingerprint": self._fingerprint()})
                    last_saved = done
            while pending:
                process(pending.pop(0))
        finally:
            logger.close()
            if bar is not None:
                bar.close()
            if ckpt is not None:
                ckpt.close()
        self.loader.step = self.max_steps * c.grad_accum_steps
        tokens_per_s = timing["tokens"] / timing["seconds"] if timing["seconds"] > 0 else None
        saved_to = self._save_final(trainable) if c.save_final else None
        if c.plot and history:
            write_loss_curve(self.output_dir / "loss_curve.png", [h["step"] for h in history],
                             [h["loss"] for h in history])
        summary = {"steps": self.max_steps, "resumed_from": start, "final_loss": history[-1]["loss"]
                   if history else None, "tokens_per_s": tokens_per_s, "trainable_params": n_train,
                   "saved_to": str(saved_to) if saved_to else None}
        (self.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.trainable = trainable
        return TrainResult(trainable, opt_state, history, self.max_steps, tokens_per_s,
                           self.output_dir, saved_to)

    def _save_final(self, trainable) -> Path:
        base = self.config.base_model_name_or_path or ""
        if self.config.full_finetune:
            from fastjax.loading import save_pretrained

            return save_pretrained(trainable, self.cfg, self.tokenizer, self.output_dir / "model")
        try:
            from fastjax.export import save_adapter
        except ImportError:  # export is optional at this layer: lora.py writes the same files
            return Path(lora_lib.save_peft_adapter(trainable, self.cfg, self.lora_config,
                                                   str(self.output_dir / "adapter"),
                                                   base_model_name_or_path=base))
        return Path(save_adapter(trainable, self.lora_config, self.cfg, self.output_dir / "adapter",
                                 base_model_name_or_path=base))


def train(params: Mapping, cfg: Any, train_data: Any, config: SFTConfig | None = None, *,
          lora: Mapping | None = None, lora_config: lora_lib.LoraConfig | None = None,
          tokenizer: Any = None,
          callbacks: Sequence[Callable[[int, dict], None]] = ()) -> TrainResult:
    """``SFTTrainer(params, cfg, train_data, config, ...).train()``; see the module docstring."""
    return SFTTrainer(params, cfg, train_data, config, lora=lora, lora_config=lora_config,
                      tokenizer=tokenizer, callbacks=callbacks).train()


def load_history(output_dir: str | Path) -> list[dict]:
    """The per-step records of a run (``metrics.jsonl``)."""
    return read_metrics(Path(output_dir) / "metrics.jsonl")


def _is_quantized(x: Any) -> bool:
    return hasattr(x, "dequantize") and not isinstance(x, jax.Array)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)


def _postfix(record: Mapping[str, Any]) -> dict[str, str]:
    out = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
    if record.get("tokens_per_s"):
        out["tok/s"] = f"{record['tokens_per_s']:,.0f}"
    if "memory_gib" in record:
        out["mem"] = f"{record['memory_gib']:.1f}/{record['peak_memory_gib']:.1f}GiB"
    return out
