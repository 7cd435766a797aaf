"""``GRPOConfig`` (the GRPO / GSPO hyper-parameters, validated) and ``GRPOResult``, re-exported by
``fastjax.rl``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fastjax import remat
from fastjax import rl_rewards as R
from fastjax.models import ops as O


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO / GSPO hyper-parameters (TRL's ``GRPOConfig`` names where one exists).

    Optimisation fields share ``SFTConfig``'s names and meaning (``fastjax.trainer.make_optimizer``
    builds the optimizer; the schedule spans ``max_steps * num_iterations`` updates).
    ``max_prompt_length`` keeps the LAST tokens of longer prompts. ``micro_batch_size``: rows per
    forward/backward (default all B = prompts_per_step * num_generations). GSPO:
    ``importance_sampling_level="sequence"`` with a small ``epsilon`` (the paper uses 3e-4 / 4e-4).
    """

    num_generations: int = 8
    prompts_per_step: int = 4
    max_new_tokens: int = 256
    max_prompt_length: int | None = 512
    temperature: float = 1.0
    top_p: float = 1.0
    eos_token_id: int | tuple[int, ...] | None = None
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None
    num_iterations: int = 1
    importance_sampling_level: str = "token"
    loss_type: str = "dapo"
    scale_rewards: bool = True
    advantage_eps: float = 1e-4
    reward_weights: tuple[float, ...] | None = None
    learning_rate: float = 5e-6
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_steps: int = 100
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    optimizer: Any = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_epsilon: float = 1e-8
    micro_batch_size: int | None = None
    remat_policy: str = "full"
    ops: O.Ops | None = None
    seed: int = 0
    output_dir: str = "grpo_outputs"
    logging_steps: int = 1
    save_steps: int = 0
    save_total_limit: int | None = 2
    resume: bool = False
    tensorboard: bool = False
    progress_bar: bool = True
    plot: bool = True
    save_final: bool = True
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r}: expected {expected}")

        for name in (
            "num_generations",
            "prompts_per_step",
            "max_new_tokens",
            "num_iterations",
            "max_steps",
            "logging_steps",
        ):
            low = 2 if name == "num_generations" else 1  # advantages compare G >= 2 completions
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                bad(name, f"an integer >= {low}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            bad("max_prompt_length", "None or >= 1")
        if not self.temperature > 0:
            bad("temperature", "> 0 (greedy completions of one prompt would all be equal)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        for name in ("beta", "epsilon", "epsilon_high"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                bad(name, ">= 0")
        if self.importance_sampling_level not in R.LEVELS:
            bad("importance_sampling_level", f"one of {R.LEVELS}")
        if self.loss_type not in R.LOSS_TYPES:
            bad("loss_type", f"one of {R.LOSS_TYPES}")
        if self.micro_batch_size is not None and (
            self.micro_batch_size < 1 or self.batch_rows % self.micro_batch_size
        ):
            bad("micro_batch_size", f"a divisor of the {self.batch_rows} rows per step")
        if self.remat_policy not in remat.PRESETS:
            bad("remat_policy", f"one of {remat.PRESETS}")
        if self.reward_weights is not None:
            object.__setattr__(self, "reward_weights", tuple(float(w) for w in self.reward_weights))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def batch_rows(self) -> int:
        return self.prompts_per_step * self.num_generations


@dataclasses.dataclass
class GRPOResult:
    """What ``train_grpo`` returns. ``history``: one record per step (resumed runs included)."""

    lora: Any
    opt_state: Any
    history: list[dict]
    steps: int
    output_dir: Path
    saved_to: Path | None

    @property
    def rewards(self) -> list[float]:
        return [h["reward"] for h in self.history]
