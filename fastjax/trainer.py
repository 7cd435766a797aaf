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

This module holds ``SFTTrainer`` (setup, device placement, the host loop, checkpoint/resume, the
final save), ``train``, ``TrainResult``, ``NonFiniteLossError`` and ``load_history``. The other
pieces live in their own modules and are re-exported here: ``SFTConfig`` in ``fastjax.sft_config``;
``build_loader`` (data to ``DataLoader``) and ``packing_report`` in ``fastjax.sft_data``; schedule,
optimizer, loss and the jitted step in ``fastjax.train_step``.

The step (``make_train_step`` in ``fastjax.train_step``): ``batch`` arrays are ``[A, B, T]`` (A =
``grad_accum_steps`` micro-batches of B rows). A ``lax.scan`` over the A micro-batches sums the
token cross-entropy and its gradient; both are then divided by the TOTAL number of label tokens in
the step (sum-loss / total-count), so accumulating over A micro-batches is exactly one big batch.
The loss is
``ops.cross_entropy`` on ``forward(..., return_hidden=True)`` and ``lm_head`` (the CE kernel never
materialises ``[T, V]`` logits). Only the trainable tree (adapters, or all params with
``full_finetune``) is differentiated; the frozen params are a non-donated jit argument, so they are
neither copied nor baked in as constants. Trainable tree and optimizer state are donated.

Several devices: ``SFTConfig(num_devices=N)`` (or ``mesh_data``/``mesh_fsdp``, or
``SFTTrainer(mesh=...)``) and nothing else changes: frozen weights (bf16 or NF4) FSDP-sharded,
adapters and their optimizer state replicated, rows of every batch split over all devices, the step
jitted with those in/out shardings (rules in ``fastjax.sharding``). Checkpoints are written sharded
and resume on any device count.

The data layout is reported once per run: a WARNING-level log line (``packed 1234 sequences into 56
rows of 2048 tokens, padding 3.1%, 2 truncated, 0 dropped``), a ``data`` field on the first line the
run writes to ``metrics.jsonl``, and ``data`` / ``data_report`` in ``train_summary.json`` and
``TrainResult.data_stats``.

The host loop keeps one step in flight: it dispatches step s, then reads step s-1's scalars (the
only host sync), so data assembly and logging overlap device work. A non-finite loss or gradient
norm stops training with ``NonFiniteLossError`` naming the step; checkpoints are written only after
the losses up to them were checked, so the newest checkpoint on disk is always a good one.

Outputs in ``output_dir``: ``metrics.jsonl`` (one line per step), ``tensorboard/`` (the same scalars
as events), ``checkpoints/<step>/`` (orbax, every ``save_steps``), ``loss_curve.png``,
``train_summary.json``, and ``adapter/`` (PEFT format) or ``model/`` (HF, with ``full_finetune``).
``resume=True`` restores the newest checkpoint and continues; the loss sequence equals an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fastjax import host_embed
from fastjax import lora as lora_lib
from fastjax import remat
from fastjax import sharding as sharding_lib
from fastjax.checkpoint import Checkpointer
from fastjax.logging_utils import MetricsLogger, device_memory_gib, read_metrics, write_loss_curve
from fastjax.sft_config import SCHEDULERS, SFTConfig  # noqa: F401  (re-exported)
from fastjax.sft_data import build_loader, packing_report
from fastjax.train_step import (  # noqa: F401  (re-exported: the step's pieces)
    IGNORE_INDEX,
    OPTIMIZERS,
    cross_entropy_sum,
    decay_mask,
    default_ops,
    global_norm,
    make_loss_fn,
    make_optimizer,
    make_schedule,
    make_train_step,
)

log = logging.getLogger("fastjax")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient norm."""


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
    data_stats: dict | None = None  # how the data was laid out in rows (``data_summary``)

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


class SFTTrainer:
    """Holds the model, the trainable tree, the optimizer and the data; ``train()`` runs the loop.

    ``lora``/``lora_config``: an adapter tree from ``get_peft_model`` (if omitted and not
    ``full_finetune``, adapters are created from ``lora_config`` or the default ``LoraConfig``).
    ``callbacks``: functions
    ``fn(step, record)`` called with each step's host-side metrics record (1-based step).
    ``mesh``: a ``(data, fsdp)`` ``jax.sharding.Mesh`` (``fastjax.sharding.make_mesh``) to train
    on several devices, instead of ``SFTConfig.num_devices``; the frozen params are then placed
    FSDP-sharded (``self.frozen``; params already placed that way are not copied).
    """

    def __init__(
        self,
        params: Mapping,
        cfg: Any,
        train_data: Any,
        config: SFTConfig | None = None,
        *,
        lora: Mapping | None = None,
        lora_config: lora_lib.LoraConfig | None = None,
        tokenizer: Any = None,
        callbacks: Sequence[Callable[[int, dict], None]] = (),
        mesh: Mesh | None = None,
    ):
        self.config = config = config or SFTConfig()
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.callbacks = list(callbacks)
        self.mesh = sharding_lib.resolve_mesh(
            mesh, config.num_devices, data=config.mesh_data, fsdp=config.mesh_fsdp
        )
        if self.mesh is not None and config.batch_size % self.mesh.size:
            raise ValueError(
                f"SFTConfig.batch_size={config.batch_size} (global rows per "
                f"micro-batch) must be divisible by the {self.mesh.size} devices of "
                f"the mesh {dict(self.mesh.shape)}: the rows are split over all of "
                "them"
            )
        self.loader = build_loader(train_data, config, tokenizer)
        if config.full_finetune:
            if lora is not None:
                raise ValueError("full_finetune=True trains all params; do not pass lora adapters")
            leaves = jax.tree.leaves(params, is_leaf=_is_quantized)
            quantized = [p for p in leaves if _is_quantized(p)]
            if quantized:
                raise ValueError(
                    "full_finetune=True needs 16/32-bit params, not NF4 (load without load_in_4bit)"
                )
            self.lora_config = None
            self.trainable, self.frozen = params, None
            self.lora_scale, self.layer_masks = 1.0, None
        else:
            if lora is None:
                lora_config = lora_config or lora_lib.LoraConfig()
                lora, lora_config = lora_lib.get_peft_model(params, cfg, config=lora_config)
            elif lora_config is None:
                raise ValueError(
                    "pass the LoraConfig returned by get_peft_model together with its adapters"
                )
            self.lora_config = lora_config
            self.trainable, self.frozen = lora, params
            self.lora_scale = lora_lib.lora_scale(lora_config)
            self.layer_masks = lora_lib.layer_masks(lora, lora_config)
        # the input embedding in host memory (fastjax.host_embed): the step takes the batch's rows
        self.host_table = host_embed.check_trainable(
            params, cfg, full_finetune=config.full_finetune
        )
        if self.host_table is not None:
            self.frozen = host_embed.without_table(self.frozen)
            log.info("input embedding on the host: %s", host_embed.describe(self.host_table))
        A = config.grad_accum_steps
        steps_per_epoch = -(-self.loader.steps_per_epoch // A)
        self.max_steps = config.max_steps or config.num_epochs * steps_per_epoch
        if self.loader.total_steps is not None and self.max_steps * A > self.loader.total_steps:
            raise ValueError(
                f"the DataLoader has {self.loader.total_steps} batches, fewer than "
                f"max_steps * grad_accum_steps = {self.max_steps * A}; build it "
                "with num_epochs=None"
            )
        self.schedule = make_schedule(config, self.max_steps)
        self.optimizer = make_optimizer(config, self.trainable, self.schedule, self.layer_masks)
        self.ops = sharding_lib.partitionable_ops(config.ops or default_ops(), self.mesh)
        if self.ops.max_segments is None:
            # every row comes from this loader, so its bound holds: packed rows can take cuDNN's
            # packed attention on a GPU (pallas_kernels/attention.py AUTO_TABLE)
            self.ops = dataclasses.replace(self.ops, max_segments=self.loader.max_segments)
        self.shardings = None
        if self.mesh is not None:
            abstract_state = jax.eval_shape(self.optimizer.init, self.trainable)
            self.shardings = sharding_lib.step_shardings(
                self.mesh,
                self.trainable,
                self.frozen,
                abstract_state,
                full_finetune=config.full_finetune,
            )
            # place the params once, here; the trainer keeps only the placed copy alive
            if self.frozen is not None:
                self.frozen = self.params = jax.device_put(self.frozen, self.shardings.frozen)
            else:
                self.trainable = self.params = jax.device_put(
                    self.trainable, self.shardings.trainable
                )
        dropout = 0.0 if self.lora_config is None else self.lora_config.lora_dropout
        loss_sum = make_loss_fn(
            cfg,
            full_finetune=config.full_finetune,
            lora_scale=self.lora_scale,
            lora_dropout=dropout,
            remat_policy=config.remat_policy,
            ops=self.ops,
            mlp_chunk_size=config.mlp_chunk_size,
            scan_layers=config.scan_layers,
        )
        self.step_fn = make_train_step(
            loss_sum,
            self.optimizer,
            self.schedule,
            shardings=self.shardings,
            compiler_options=remat.compiler_options(config.remat_policy),
        )
        self.output_dir = Path(config.output_dir)
        self.key = jax.random.key(config.seed)

    # ---- pieces of the loop ----------------------------------------------------------------------
    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Host arrays ``[A, B, T]`` of optimizer step ``step`` (0-based): loader batches
        ``step * A`` to ``step * A + A - 1``."""
        A = self.config.grad_accum_steps
        micro = [self.loader.batch_at(step * A + i) for i in range(A)]
        out = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
        if self.host_table is not None:
            out["inputs_embeds"] = host_embed.gather(self.host_table, out["input_ids"])
        return out

    def _initial_state(self) -> tuple[Any, Any]:
        """Trainable tree and fresh optimizer state, placed on the mesh when there is one. The step
        donates the trainable tree: the caller's adapters (small) are copied so their arrays
        survive; with full_finetune the params themselves are donated (a copy would double the
        model's memory)."""
        trainable = (
            self.trainable if self.config.full_finetune else jax.tree.map(jnp.copy, self.trainable)
        )
        if self.shardings is None:
            return trainable, self.optimizer.init(trainable)
        # (a replicated device_put may keep the source buffer as one of its shards: copy first)
        trainable = jax.device_put(trainable, self.shardings.trainable)
        init = jax.jit(self.optimizer.init, out_shardings=self.shardings.opt_state)
        return trainable, init(trainable)

    def place_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host ``[A, B, T]`` arrays on the device(s), rows split over the mesh if there is one."""
        if self.shardings is None:
            return {k: jnp.asarray(v) for k, v in host_batch.items()}
        return jax.device_put(dict(host_batch), self.shardings.batch)

    def data_summary(self) -> dict:
        """How the data was laid out in rows (``fastjax.packing.PackingStats`` + the mode)."""
        return {"packing": bool(self.loader.packing), **dataclasses.asdict(self.loader.stats)}

    def _state(self, trainable, opt_state) -> dict:
        return {
            "trainable": trainable,
            "opt_state": opt_state,
            "rng": jax.random.key_data(self.key),
        }

    def _fingerprint(self) -> dict:
        c = self.config
        return {
            "batch_size": c.batch_size,
            "grad_accum_steps": c.grad_accum_steps,
            "max_seq_length": c.max_seq_length,
            "seed": c.seed,
            "max_steps": self.max_steps,
            "full_finetune": c.full_finetune,
        }

    def _restore(self, ckpt: Checkpointer, trainable, opt_state) -> tuple[Any, Any, int]:
        """The newest checkpoint, restored into the shardings of ``trainable``/``opt_state`` (so
        a run saved on N devices resumes on this run's devices, whatever their number)."""
        step = ckpt.latest_step()
        if step is None:
            log.info("resume=True but %s holds no checkpoint: starting from step 0", ckpt.directory)
            return trainable, opt_state, 0
        state, meta = ckpt.restore(step, self._state(trainable, opt_state))
        saved, mine = dict(meta.get("fingerprint", {})), self._fingerprint()
        if saved.pop("max_steps", None) != mine.pop("max_steps"):
            log.warning(
                "resuming with max_steps=%d (the checkpoint's run had another): the learning "
                "rate schedule changes, so the run will differ from an uninterrupted one",
                self.max_steps,
            )
        if saved != mine:
            raise ValueError(
                f"checkpoint {ckpt.directory / str(step)} was written with {saved}, "
                f"this run has {mine}: resume needs the same data layout and seed"
            )
        self.loader.load_state(meta["data"])
        self.key = jax.random.wrap_key_data(np.asarray(state["rng"]))  # uncommitted: any mesh
        log.info("resumed from %s (step %d)", ckpt.directory / str(step), step)
        return state["trainable"], state["opt_state"], int(meta["step"])

    # ---- the loop --------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        c = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        trainable, opt_state = self._initial_state()
        ckpt = (
            Checkpointer(self.output_dir / "checkpoints", max_to_keep=c.save_total_limit)
            if (c.save_steps or c.resume)
            else None
        )
        start = 0
        if c.resume and ckpt is not None:
            trainable, opt_state, start = self._restore(ckpt, trainable, opt_state)
        data_stats = self.data_summary()
        log.warning("%s", packing_report(data_stats))
        logger = MetricsLogger(self.output_dir, tensorboard=c.tensorboard)
        history = logger.truncate_after(start)  # a resumed run redoes the steps after its ckpt
        n_train = (
            lora_lib.num_trainable_params(trainable, self.lora_config)
            if self.lora_config
            else sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
        )
        log.info(
            "training %s trainable params for %d steps (%d x %d rows of %d tokens per step)",
            f"{n_train:,}",
            self.max_steps,
            c.grad_accum_steps,
            c.batch_size,
            c.max_seq_length,
        )
        bar = _progress(c.progress_bar, self.max_steps, start)
        timing = {"t_last": None, "tokens": 0, "seconds": 0.0}
        pending: list[tuple[int, dict, int]] = []
        last_saved = start
        data_logged = False  # the first line this run writes to metrics.jsonl carries data_stats

        def process(item):
            nonlocal data_logged
            step_idx, metrics, n_tokens = item
            host = jax.device_get(metrics)
            now = time.perf_counter()
            record = {
                "step": step_idx + 1,
                "loss": float(host["loss"]),
                "grad_norm": float(host["grad_norm"]),
                "update_norm": float(host["update_norm"]),
                "lr": float(host["lr"]),
                "num_label_tokens": int(host["num_label_tokens"]),
                "num_tokens": n_tokens,
            }
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
                good = (
                    f"step {last_saved} in {ckpt.directory}"
                    if ckpt is not None and last_saved
                    else "none"
                )
                raise NonFiniteLossError(
                    f"non-finite loss at step {record['step']} (loss={record['loss']}, grad_norm="
                    f"{record['grad_norm']}, update_norm={record['update_norm']}); training "
                    f"stopped. Last good checkpoint: {good}. Lower the learning rate or check the "
                    "data."
                )
            history.append(record)
            if record["step"] % c.logging_steps == 0 or record["step"] == self.max_steps:
                logger.log(record if data_logged else {**record, "data": data_stats})
                data_logged = True
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
                batch = self.place_batch(host_batch)
                trainable, opt_state, metrics = self.step_fn(
                    trainable, opt_state, self.frozen, batch, jnp.int32(step_idx), self.key
                )
                while pending:
                    process(pending.pop(0))
                pending.append((step_idx, metrics, n_tokens))
                done = step_idx + 1
                due = c.save_steps and (done % c.save_steps == 0 or done == self.max_steps)
                if ckpt is not None and due:
                    while pending:
                        process(pending.pop(0))
                    self.loader.step = done * c.grad_accum_steps
                    ckpt.save(
                        done,
                        self._state(trainable, opt_state),
                        {
                            "step": done,
                            "data": self.loader.state(),
                            "seed": c.seed,
                            "fingerprint": self._fingerprint(),
                            "mesh": self._mesh_shape(),
                        },
                    )
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
            write_loss_curve(
                self.output_dir / "loss_curve.png",
                [h["step"] for h in history],
                [h["loss"] for h in history],
            )
        summary = {
            "steps": self.max_steps,
            "resumed_from": start,
            "final_loss": history[-1]["loss"] if history else None,
            "tokens_per_s": tokens_per_s,
            "trainable_params": n_train,
            "saved_to": str(saved_to) if saved_to else None,
            "mesh": self._mesh_shape(),
            "data": data_stats,
            "data_report": packing_report(data_stats),
        }
        (self.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.trainable = trainable
        return TrainResult(
            trainable,
            opt_state,
            history,
            self.max_steps,
            tokens_per_s,
            self.output_dir,
            saved_to,
            data_stats,
        )

    def _mesh_shape(self) -> dict[str, int] | None:
        return None if self.mesh is None else {k: int(v) for k, v in self.mesh.shape.items()}

    def _save_final(self, trainable) -> Path:
        base = self.config.base_model_name_or_path or ""
        if self.config.full_finetune:
            from fastjax.loading import save_pretrained

            return save_pretrained(trainable, self.cfg, self.tokenizer, self.output_dir / "model")
        try:
            from fastjax.export import save_adapter
        except ImportError:  # export is optional at this layer: lora.py writes the same files
            return Path(
                lora_lib.save_peft_adapter(
                    trainable,
                    self.cfg,
                    self.lora_config,
                    str(self.output_dir / "adapter"),
                    base_model_name_or_path=base,
                )
            )
        return Path(
            save_adapter(
                trainable,
                self.lora_config,
                self.cfg,
                self.output_dir / "adapter",
                base_model_name_or_path=base,
            )
        )


def train(
    params: Mapping,
    cfg: Any,
    train_data: Any,
    config: SFTConfig | None = None,
    *,
    lora: Mapping | None = None,
    lora_config: lora_lib.LoraConfig | None = None,
    tokenizer: Any = None,
    callbacks: Sequence[Callable[[int, dict], None]] = (),
    mesh: Mesh | None = None,
) -> TrainResult:
    """``SFTTrainer(params, cfg, train_data, config, ...).train()``; see the module docstring."""
    return SFTTrainer(
        params,
        cfg,
        train_data,
        config,
        lora=lora,
        lora_config=lora_config,
        tokenizer=tokenizer,
        callbacks=callbacks,
        mesh=mesh,
    ).train()


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
