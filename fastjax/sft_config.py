"""``SFTConfig``: the hyper-parameters of a supervised fine-tuning run, validated on construction.

Field names follow HF ``TrainingArguments`` where one exists. ``__post_init__`` checks every field
it can without a model or data (types, ranges, the names of the schedule, optimizer and remat
preset) and raises ``ValueError`` naming the field and its value. What needs the model or the data
(batch size divisible by the mesh, loader matching the config, enough batches for ``max_steps``)
is checked by ``fastjax.trainer.SFTTrainer``. ``fastjax.trainer`` re-exports ``SFTConfig``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastjax import remat
from fastjax.models import ops as O
from fastjax.train_step import OPTIMIZERS

SCHEDULERS = ("linear", "cosine", "constant")


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
    truncation warning. ``mlp_chunk_size`` (tokens per row) runs each MLP over slices of that many
    tokens, so its ``[tokens, intermediate]`` activations exist for one slice at a time (long
    context; with ``remat_policy="offload_layer_input"`` the layer inputs leave the device too).
    Under ``offload_layer_input`` XLA's command buffers cost the step (8B QLoRA on the H200: 3% of
    its speed and 0.22 GiB): call ``fastjax.remat.command_buffers_off_in_env`` before jax starts, as
    ``fastjax train`` does; the trainer's per-step compiler options are the fallback.
    ``scan_layers=False`` runs the layers as a Python loop instead of one ``lax.scan``: no stacked
    activation buffers (what a scan costs without remat), a compile about L times longer; only with
    ``remat_policy="none"`` (the fastest step when memory allows: Llama-3-8B LoRA 4x2048 on the H200,
    16,054 tokens/s at 59 GiB against 14,641 scanned).

    Multi-device (``fastjax.sharding`` states the placement rules): ``num_devices`` builds a
    ``(data, fsdp)`` mesh over that many devices, by default all on fsdp; ``mesh_data`` /
    ``mesh_fsdp`` pick the split (give one, the other is derived). ``SFTTrainer(mesh=...)`` takes a
    ready ``jax.sharding.Mesh`` instead. ``batch_size`` stays the GLOBAL rows per micro-batch (split
    over all devices, so it must be divisible by their number): the same config trains the same
    model on 1 or N devices. None of them set: single device, nothing is placed.
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
    mlp_chunk_size: int | None = None
    scan_layers: bool = True
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
    num_devices: int | None = None
    mesh_data: int | None = None
    mesh_fsdp: int | None = None

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
        for name in ("num_devices", "mesh_data", "mesh_fsdp"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                bad(name, "None or an integer >= 1")
        for name in ("warmup_steps", "save_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "an integer >= 0")
        if self.max_steps is not None and not (
            isinstance(self.max_steps, int) and self.max_steps >= 1
        ):
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
        if self.mlp_chunk_size is not None and self.mlp_chunk_size < 1:
            bad("mlp_chunk_size", "None or a positive number of tokens")
        if not isinstance(self.scan_layers, bool):
            bad("scan_layers", "True or False")
        if not self.scan_layers and self.remat_policy != "none":
            # Outside a scan XLA:GPU schedules each layer's recomputation early, next to the forward,
            # so the checkpoint saves nothing: Llama-3-8B QLoRA 4x2048 under "full" peaked at 23.48
            # GiB unrolled against 10.06 scanned, at the same speed (H200, train_step_h200.md).
            bad(
                "scan_layers",
                f"True with remat_policy={self.remat_policy!r} (unrolled layers only with 'none')",
            )
