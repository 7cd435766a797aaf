"""GRPO and GSPO: reinforcement learning from reward functions, for LoRA and QLoRA policies.

Here: ``GRPOConfig``, ``GRPOTrainer`` (data, rollout, the loop, logging, checkpoints),
``GRPOResult``, ``train_grpo``. Batches, log-probs and the jitted update are ``fastjax.rl_step``,
the reward math ``fastjax.rl_rewards``; their public names are re-exported here.

Usage::

    params, cfg, tok = fastjax.from_pretrained("model.gguf")
    lora, lora_config = fastjax.get_peft_model(params, cfg, r=16, target_modules="all-linear")
    rows = [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in ...]
    result = train_grpo(params, cfg, rows, [correct, well_formatted],
                        GRPOConfig(num_generations=8, max_new_tokens=256, max_steps=200),
                        lora=lora, lora_config=lora_config, tokenizer=tok)

One step (``GRPOTrainer.train``):
  1. ``prompts_per_step`` rows are drawn (a pure function of ``(seed, step)``: epoch ``e`` is
     ``np.random.default_rng([seed, e]).permutation``) and each is repeated G = ``num_generations``
     times: B = prompts_per_step * G rows, grouped contiguously (row ``p * G + g``).
  2. The current policy (base params + adapters) samples completions with the KV-cache generator
     (``fastjax.generation.generate_arrays``: temperature, top-p, ``max_new_tokens``, stop at EOS).
  3. Reward functions score them (``fastjax.rl_rewards``); the total is ``r = sum_k w_k r_k``.
  4. Group-normalised advantages ``A = (r - mean_group r) / (std_group r + eps)`` (unbiased std, as
     TRL); ``scale_rewards=False`` drops the division (Dr. GRPO).
  5. ``num_iterations`` (mu) optimizer updates on this batch minimise the objective below.

Objective, per completion token t of row i (mask m, ``old`` = the sampling policy's log-probs)::

    token level (GRPO):     rho_it = exp(logp_it - old_it)
    sequence level (GSPO):  rho_i  = exp(sum_t m_it (logp_it - old_it) / |y_i|)  (every t of row i)
    l_it  = -min(rho A_i, clip(rho, 1 - epsilon, 1 + epsilon_high) A_i) + beta * k3_it
    k3_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1        (>= 0; 0 when policy == reference)

With mu = 1 the ratio is exactly 1 (old = stop_gradient(logp)) but its gradient is ``A grad logp``;
with mu > 1 the old log-probs come from one no-grad forward before the updates. The reference
policy is the SAME base params with the adapters off (``forward(..., lora=None)``): one more
forward pass, no second model in memory. Generation and training read the same on-device params.

Loss normalisation (``loss_type``):
  ``"dapo"`` (default): ``L = sum_{i,t} m l / sum_{i,t} m``: every completion token of the
      generation batch weighs the same (DAPO's token-level loss, TRL's default); long completions
      are not down-weighted, which avoids the length bias of the per-sequence mean.
  ``"grpo"``: ``L = (1/B) sum_i (1/|y_i|) sum_t m l``: the original GRPO per-sequence mean (the
      GSPO paper uses it with ``importance_sampling_level="sequence"``).
Micro-batching (``micro_batch_size``) divides by the whole batch's denominator, so it is exact.

Log-probs: ``logp_t = -ops.cross_entropy(hidden_t / temperature, lm_head, y_t, reduction="none")``
on ``forward(..., return_hidden=True)``: the fused CE kernel, no ``[T, V]`` logits in training.
Dividing by the sampling temperature makes ``old`` the distribution sampled from (top-p truncation
is not modelled, as in TRL). Adapters run without dropout so sampled/old/new log-probs agree.

Logged per step (``metrics.jsonl``, tqdm bar): loss, grad_norm, lr, reward mean/std, per reward
function ``rewards/<name>/mean|std``, kl (token mean of k3; 0 when beta = 0, as there is no
reference pass), clip_ratio, completion_length mean/min/max, frac_terminated (rows that emitted
EOS), gen_tokens_per_s (generated tokens / generation time), train_tokens_per_s (real prompt +
completion tokens x mu / time of the update phase, reference and old log-prob passes included),
memory; the first step's rates include compilation. Checkpoints (``fastjax.checkpoint``):
adapters, optimizer state, RNG key, step; ``resume=True`` continues from the newest one and redoes
exactly the steps an uninterrupted run would do.
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

from fastjax import lora as lora_lib
from fastjax import rl_rewards as R
from fastjax.checkpoint import Checkpointer
from fastjax.generation import generate_arrays
from fastjax.logging_utils import MetricsLogger, device_memory_gib, write_loss_curve
from fastjax.models import ops as O
from fastjax.rl_config import GRPOConfig, GRPOResult  # re-exported
from fastjax.rl_rewards import RewardFunctionError, group_advantages, grpo_loss  # re-exported
from fastjax.rl_step import (  # all re-exported; ``X as X``: unused here
    IGNORE_INDEX as IGNORE_INDEX,
    batched_logprobs as batched_logprobs,
    build_optimizer,
    build_rollout_batch,
    completion_logprobs,
    grpo_step as grpo_step,
    grpo_updates,
    micro_batches,
    pad_prompts,
    step_key as step_key,
)
from fastjax.trainer import NonFiniteLossError

__all__ = [
    "GRPOConfig",
    "GRPOResult",
    "GRPOTrainer",
    "RewardFunctionError",
    "build_rollout_batch",
    "completion_logprobs",
    "group_advantages",
    "grpo_loss",
    "pad_prompts",
    "train_grpo",
]

log = logging.getLogger("fastjax")


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------


class GRPOTrainer:
    """Model, adapters, optimizer, data and rewards; ``train()`` runs the loop.

    ``dataset``: rows (dicts) or a JSONL path. A row has ``"prompt"`` (a string, encoded as is, or
    a list of chat messages, rendered with the tokenizer's chat template and a generation prompt)
    or ``"prompt_ids"`` (token ids; required without a tokenizer); its other columns go to the
    reward functions. ``reward_funcs``: see ``fastjax.rl_rewards``; ``config.reward_weights``
    defaults to all 1. ``callbacks``: ``fn(step, record)`` after each step (1-based).
    """

    def __init__(
        self,
        params: Mapping,
        cfg: Any,
        dataset: Any,
        reward_funcs: Sequence[Callable] | Callable,
        config: GRPOConfig | None = None,
        *,
        lora: Mapping | None = None,
        lora_config: lora_lib.LoraConfig | None = None,
        tokenizer: Any = None,
        callbacks: Sequence[Callable[[int, dict], None]] = (),
    ):
        from fastjax.data import load_rows
        from fastjax.host_embed import host_table

        self.config = c = config or GRPOConfig()
        if host_table(params) is not None:
            raise ValueError(
                "GRPO generates with the embedding on the device: load without embed_on_host"
            )
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.rows = load_rows(dataset)
        self.reward_funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
        if not self.reward_funcs:
            raise ValueError("train_grpo needs at least one reward function")
        self.reward_names = R.reward_names(self.reward_funcs)
        self.reward_weights = c.reward_weights or (1.0,) * len(self.reward_funcs)
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"GRPOConfig.reward_weights has {len(self.reward_weights)} entries "
                f"for {len(self.reward_funcs)} reward functions"
            )
        if lora is None:
            lora, lora_config = lora_lib.get_peft_model(
                params, cfg, config=lora_config or lora_lib.LoraConfig()
            )
        elif lora_config is None:
            raise ValueError("pass the LoraConfig returned by get_peft_model with its adapters")
        if lora_config.lora_dropout:
            log.warning(
                "GRPO runs adapters without dropout (lora_dropout=%s ignored) so that "
                "sampled, old and new log-probs agree",
                lora_config.lora_dropout,
            )
        self.lora, self.lora_config = lora, lora_config
        self.lora_scale = lora_lib.lora_scale(lora_config)
        self.layer_masks = lora_lib.layer_masks(lora, lora_config)
        self.optimizer, self.schedule = build_optimizer(c, lora, self.layer_masks)
        self.ops = c.ops or O.Ops()
        if self.ops.max_segments is None:
            # a rollout row is one contiguous run (left-padded prompt, completion up to its first
            # EOS: build_rollout_batch), so 1 bounds its segments: cuDNN attention on a GPU
            self.ops = dataclasses.replace(self.ops, max_segments=1)
        eos = c.eos_token_id if c.eos_token_id is not None else tuple(cfg.eos_token_ids)
        eos = (eos,) if isinstance(eos, int) else tuple(eos)
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = tuple(dict.fromkeys((*eos, *(() if tok_eos is None else (tok_eos,)))))
        self.key = jax.random.key(c.seed)
        self.output_dir = Path(c.output_dir)
        self.callbacks = list(callbacks)
        self._prompt_cache: dict[int, list[int]] = {}
        self._perms: dict[int, np.ndarray] = {}

    # ---- data ------------------------------------------------------------------------------------
    def row_indices(self, step: int) -> list[int]:
        """Dataset rows of step ``step`` (0-based): a pure function of (seed, step)."""
        n, P = len(self.rows), self.config.prompts_per_step
        out = []
        for j in range(step * P, (step + 1) * P):
            epoch, k = divmod(j, n)
            if epoch not in self._perms:
                self._perms[epoch] = np.random.default_rng([self.config.seed, epoch]).permutation(n)
            out.append(int(self._perms[epoch][k]))
        return out

    def prompt_ids(self, index: int) -> list[int]:
        if index in self._prompt_cache:
            return self._prompt_cache[index]
        row = self.rows[index]
        if "prompt_ids" in row:
            ids = [int(t) for t in row["prompt_ids"]]
        elif "prompt" not in row:
            raise ValueError(
                f"dataset row {index} has neither 'prompt' nor 'prompt_ids' (keys: {sorted(row)})"
            )
        elif self.tokenizer is None:
            raise ValueError(
                f"dataset row {index} has a 'prompt' but no tokenizer was given; "
                "pass tokenizer=... or give rows 'prompt_ids'"
            )
        elif isinstance(row["prompt"], str):
            ids = self.tokenizer.encode(row["prompt"])
        else:
            ids = self.tokenizer.apply_chat_template(
                row["prompt"], add_generation_prompt=True, tokenize=True
            )
        limit = self.config.max_prompt_length
        ids = ids[-limit:] if limit is not None else ids
        if not ids:
            raise ValueError(f"dataset row {index}: the prompt has no tokens")
        self._prompt_cache[index] = ids
        return ids

    # ---- one step --------------------------------------------------------------------------------
    def rollout(self, step: int, lora: Mapping) -> dict[str, Any]:
        """Sample and score the completions of step ``step``: host arrays, texts, rewards."""
        c, G = self.config, self.config.num_generations
        index = [i for i in self.row_indices(step) for _ in range(G)]
        tokens, pmask = pad_prompts([self.prompt_ids(i) for i in index])
        limit = getattr(self.cfg, "max_position_embeddings", None)
        if limit is not None and tokens.shape[1] + c.max_new_tokens > limit:
            raise ValueError(
                f"prompts ({tokens.shape[1]} tokens, padded) + max_new_tokens="
                f"{c.max_new_tokens} exceed max_position_embeddings={limit}"
            )
        t0 = time.perf_counter()
        completion, cmask = generate_arrays(
            self.params,
            self.cfg,
            jnp.asarray(tokens),
            jnp.asarray(pmask),
            key=jax.random.fold_in(self.key, step),
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            eos_token_id=self.eos_ids,
            lora=lora,
            lora_scale=self.lora_scale,
            ops=self.ops,
        )
        completion, cmask = np.asarray(completion), np.asarray(cmask)  # waits for the device
        gen_s = time.perf_counter() - t0
        lengths = cmask.sum(axis=1)
        ids = [completion[i, : lengths[i]].tolist() for i in range(len(index))]
        texts = (
            ids
            if self.tokenizer is None
            else self.tokenizer.decode_batch(ids, skip_special_tokens=True)
        )
        rows = [self.rows[i] for i in index]
        columns = {
            k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "prompt_ids")
        }
        columns["completion_ids"] = ids
        prompts = [r.get("prompt", r.get("prompt_ids")) for r in rows]
        scores = R.score_completions(self.reward_funcs, prompts, texts, columns, prompt_index=index)
        last = completion[np.arange(len(index)), np.maximum(lengths - 1, 0)]
        return {
            "tokens": tokens,
            "prompt_mask": pmask,
            "completion": completion,
            "completion_mask": cmask,
            "lengths": lengths,
            "texts": texts,
            "scores": scores,
            "rewards": R.combine_rewards(scores, self.reward_weights),
            "gen_s": gen_s,
            "terminated": np.isin(last, self.eos_ids),
            "index": index,
        }

    def update(self, lora, opt_state, ro: Mapping[str, Any]):
        """The ``num_iterations`` updates on one rollout; returns (lora, opt_state, metrics)."""
        c = self.config
        t0 = time.perf_counter()
        lora, opt_state, metrics = grpo_updates(
            lora,
            opt_state,
            self.params,
            micro_batches(ro, c),
            self.layer_masks,
            cfg=self.cfg,
            config=c,
            lora_scale=self.lora_scale,
            ops=self.ops,
        )
        host = jax.device_get(metrics)  # waits for the device
        train_s = time.perf_counter() - t0
        out = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        real = int(ro["prompt_mask"].sum() + ro["completion_mask"].sum())
        out.update(train_s=train_s, train_tokens_per_s=real * c.num_iterations / train_s)
        return lora, opt_state, out

    def _record(self, step: int, ro: Mapping[str, Any], m: Mapping[str, float]) -> dict:
        c = self.config
        rewards, lengths = ro["rewards"], ro["lengths"]
        record: dict[str, Any] = {
            "step": step + 1,
            "loss": m["loss"],
            "grad_norm": m["grad_norm"],
            "lr": float(self.schedule(step * c.num_iterations)),
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()),
        }
        for k, name in enumerate(self.reward_names):
            col = ro["scores"][:, k]
            col = col[~np.isnan(col)]
            record[f"rewards/{name}/mean"] = float(col.mean()) if col.size else None
            record[f"rewards/{name}/std"] = float(col.std()) if col.size else None
        generated = int(lengths.sum())
        record.update(
            kl=m["kl"],
            clip_ratio=m["clip_ratio"],
            completion_length=float(lengths.mean()),
            completion_length_min=int(lengths.min()),
            completion_length_max=int(lengths.max()),
            frac_terminated=float(ro["terminated"].mean()),
            gen_tokens=generated,
            gen_s=ro["gen_s"],
            gen_tokens_per_s=generated / ro["gen_s"],
            train_s=m["train_s"],
            train_tokens_per_s=m["train_tokens_per_s"],
        )
        mem = device_memory_gib()
        if mem is not None:
            record["memory_gib"], record["peak_memory_gib"] = mem
        if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
            raise NonFiniteLossError(
                f"non-finite loss at GRPO step {step + 1} (loss="
                f"{record['loss']}, grad_norm={record['grad_norm']}); "
                "lower the learning rate"
            )
        return record

    # ---- checkpoints -----------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        c = self.config
        return {
            "num_generations": c.num_generations,
            "prompts_per_step": c.prompts_per_step,
            "max_steps": c.max_steps,
            "seed": c.seed,
            "num_iterations": c.num_iterations,
            "rows": len(self.rows),
        }

    def _state(self, lora, opt_state) -> dict:
        return {"trainable": lora, "opt_state": opt_state, "rng": jax.random.key_data(self.key)}

    def _restore(self, ckpt: Checkpointer, lora, opt_state):
        step = ckpt.latest_step()
        if step is None:
            log.info("resume=True but %s holds no checkpoint: starting at step 0", ckpt.directory)
            return lora, opt_state, 0
        state, meta = ckpt.restore(step, self._state(lora, opt_state))
        if meta.get("fingerprint") != self._fingerprint():
            raise ValueError(
                f"checkpoint {ckpt.directory / str(step)} was written with "
                f"{meta.get('fingerprint')}, this run has {self._fingerprint()}"
            )
        self.key = jax.random.wrap_key_data(jnp.asarray(state["rng"]))
        log.info("resumed GRPO from %s (step %d)", ckpt.directory / str(step), step)
        return state["trainable"], state["opt_state"], int(meta["step"])

    # ---- the loop --------------------------------------------------------------------------------
    def train(self) -> GRPOResult:
        c = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # the update donates its adapter buffers: train on a copy, the caller's arrays stay valid
        lora = jax.tree.map(jnp.copy, self.lora)
        opt_state = self.optimizer.init(lora)
        ckpt = None
        if c.save_steps or c.resume:
            ckpt = Checkpointer(self.output_dir / "checkpoints", max_to_keep=c.save_total_limit)
        start = 0
        if c.resume and ckpt is not None:
            lora, opt_state, start = self._restore(ckpt, lora, opt_state)
        logger = MetricsLogger(self.output_dir, tensorboard=c.tensorboard)
        history = logger.truncate_after(start)
        bar = None
        if c.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.max_steps, initial=start, desc="grpo", dynamic_ncols=True)
        try:
            for step in range(start, c.max_steps):
                ro = self.rollout(step, lora)
                lora, opt_state, m = self.update(lora, opt_state, ro)
                record = self._record(step, ro, m)
                history.append(record)
                if record["step"] % c.logging_steps == 0 or record["step"] == c.max_steps:
                    logger.log(record)
                if bar is not None:
                    bar.set_postfix(
                        {
                            "reward": f"{record['reward']:.3f}",
                            "kl": f"{record['kl']:.4f}",
                            "len": f"{record['completion_length']:.0f}",
                            "gen tok/s": f"{record['gen_tokens_per_s']:,.0f}",
                        },
                        refresh=False,
                    )
                    bar.update(1)
                for fn in self.callbacks:
                    fn(record["step"], record)
                done = step + 1
                if (
                    ckpt is not None
                    and c.save_steps
                    and (done % c.save_steps == 0 or done == c.max_steps)
                ):
                    ckpt.save(
                        done,
                        self._state(lora, opt_state),
                        {"step": done, "seed": c.seed, "fingerprint": self._fingerprint()},
                    )
        finally:
            logger.close()
            if bar is not None:
                bar.close()
            if ckpt is not None:
                ckpt.close()
        self.lora = lora
        saved_to = None
        if c.save_final:
            from fastjax.export import save_adapter

            saved_to = save_adapter(
                lora,
                self.lora_config,
                self.cfg,
                self.output_dir / "adapter",
                base_model_name_or_path=c.base_model_name_or_path or "",
            )
        if c.plot and history:
            write_loss_curve(
                self.output_dir / "reward_curve.png",
                [h["step"] for h in history],
                [h["reward"] for h in history],
                title="GRPO mean reward (y: reward)",
            )
        summary = {
            "steps": c.max_steps,
            "resumed_from": start,
            "final_reward": history[-1]["reward"] if history else None,
            "saved_to": str(saved_to) if saved_to else None,
        }
        (self.output_dir / "grpo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return GRPOResult(lora, opt_state, history, c.max_steps, self.output_dir, saved_to)


def train_grpo(
    params: Mapping,
    cfg: Any,
    dataset: Any,
    reward_funcs: Sequence[Callable] | Callable,
    config: GRPOConfig | None = None,
    *,
    lora: Mapping | None = None,
    lora_config: lora_lib.LoraConfig | None = None,
    tokenizer: Any = None,
    callbacks: Sequence[Callable[[int, dict], None]] = (),
) -> GRPOResult:
    """``GRPOTrainer(params, cfg, dataset, reward_funcs, config, ...).train()`` (module docs)."""
    return GRPOTrainer(
        params,
        cfg,
        dataset,
        reward_funcs,
        config,
        lora=lora,
        lora_config=lora_config,
        tokenizer=tokenizer,
        callbacks=callbacks,
    ).train()
