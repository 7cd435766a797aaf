"""The scoring side of ``fastjax.rl`` (array math, no model): user reward functions, called safely
-> group-normalised advantages -> the clipped policy objective with its KL penalty. Plus GSM8K
rewards. The formulas are in ``fastjax.rl``'s module docstring.

A reward function scores a batch of completions::

    def my_reward(prompts, completions, **columns) -> list[float | None]

``prompts``: each row's ``prompt`` (a string or a list of chat messages), one per completion;
``completions``: the decoded completion texts (token-id lists when the trainer has no tokenizer);
``columns``: every other column of the dataset rows (``answer=[...]``), one entry per completion,
plus ``completion_ids`` (lists of token ids). Only the keywords a function accepts are passed (all
when it takes ``**kwargs``), so ``def correct(prompts, completions, answer)`` works. ``None`` means
"does not apply": it counts as 0 in the weighted total and is left out of that function's logged
mean/std. Any other value must be a finite number.

Errors are never swallowed: an exception, a wrong-length result or a non-finite / non-numeric value
raises ``RewardFunctionError`` naming the function, the prompt (dataset row index and position in
the batch) and the offending completion text. When the batch call raises, the function is re-run
on one completion at a time to find the first completion that triggers it.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastjax.arith_data import gsm8k_answer

RewardFunc = Callable[..., Sequence[float | None]]
LOSS_TYPES = ("dapo", "grpo")
LEVELS = ("token", "sequence")

_PREVIEW = 2000  # characters of a completion quoted in an error


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something unusable; the message names the completion."""


def reward_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def reward_names(funcs: Sequence[Callable]) -> list[str]:
    """Unique names for logging (``correct``, ``correct_2`` when two functions share a name)."""
    names: list[str] = []
    for fn in funcs:
        base, name, k = reward_name(fn), reward_name(fn), 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def _accepted(fn: Callable, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins / some callables: pass everything
        return dict(kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(kwargs)
    names = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {k: v for k, v in kwargs.items() if k in names}


def _preview(completion: Any) -> str:
    text = completion if isinstance(completion, str) else repr(completion)
    if len(text) <= _PREVIEW:
        return text
    return text[:_PREVIEW] + f"... [{len(text) - _PREVIEW} more chars]"


def _where(i: int, prompt_index: Sequence[int] | None, completion: Any) -> str:
    row = f"dataset row {prompt_index[i]}, " if prompt_index is not None else ""
    return f"prompt {row}batch position {i}; completion:\n{_preview(completion)}"


def _as_value(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)) or (
        isinstance(value, np.ndarray) and value.ndim == 0
    ):
        out = float(value)
        if math.isfinite(out):
            return out
    raise ValueError(f"{value!r} is not a finite number (or None)")


def call_reward_func(
    fn: Callable,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Sequence[Any]],
    *,
    prompt_index: Sequence[int] | None = None,
) -> np.ndarray:
    """Scores ``[B]`` float64 (NaN where the function returned None) of one reward function.

    ``prompt_index[i]``: the dataset row completion i came from (named in errors).
    """
    name = reward_name(fn)
    n = len(completions)
    kwargs = _accepted(fn, columns)
    try:
        out = fn(list(prompts), list(completions), **{k: list(v) for k, v in kwargs.items()})
    except Exception as e:  # re-raised below, with the completion that caused it
        for i in range(n):
            try:
                fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in kwargs.items()})
            except Exception as single:  # noqa: BLE001 (any failure is reported)
                raise RewardFunctionError(
                    f"reward function {name!r} raised {type(single).__name__}: {single} on "
                    f"{_where(i, prompt_index, completions[i])}"
                ) from e
        raise RewardFunctionError(
            f"reward function {name!r} raised {type(e).__name__}: {e} on a batch of {n} "
            f"completions, but on none of them alone; first completion "
            f"({_where(0, prompt_index, completions[0])})"
        ) from e
    try:
        values = list(out)
    except TypeError as e:
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(out).__name__}, expected a list of {n} floats"
        ) from e
    if len(values) != n:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(values)} values for "
            f"{n} completions (one per completion expected)"
        )
    scores = np.empty(n, np.float64)
    for i, v in enumerate(values):
        try:
            value = _as_value(v)
        except ValueError as e:
            raise RewardFunctionError(
                f"reward function {name!r} returned {e} for "
                f"{_where(i, prompt_index, completions[i])}"
            ) from None
        scores[i] = np.nan if value is None else value
    return scores


def score_completions(
    funcs: Sequence[Callable],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Sequence[Any]],
    *,
    prompt_index: Sequence[int] | None = None,
) -> np.ndarray:
    """Scores ``[B, K]`` of the K reward functions (NaN = the function returned None)."""
    return np.stack(
        [
            call_reward_func(fn, prompts, completions, columns, prompt_index=prompt_index)
            for fn in funcs
        ],
        axis=1,
    )


def combine_rewards(scores: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The total reward ``[B]``: ``sum_k w_k * score_k`` with None (NaN) scores counted as 0."""
    w = np.asarray(weights, np.float64)
    if scores.ndim != 2 or scores.shape[1] != w.shape[0]:
        raise ValueError(f"{scores.shape=} does not match {len(w)} reward weights")
    return np.nansum(scores * w[None, :], axis=1)


def group_advantages(
    rewards: Any, num_generations: int, *, scale: bool = True, eps: float = 1e-4
) -> jax.Array:
    """``(r - mean_group r) / (std_group r + eps)`` for rewards ``[B]`` grouped as ``[B / G, G]``
    (consecutive rows; unbiased std, ddof=1, as TRL). ``scale=False``: ``r - mean_group r``."""
    r = jnp.asarray(rewards, jnp.float32).reshape(-1, num_generations)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale:
        centred = centred / (jnp.std(r, axis=1, ddof=1, keepdims=True) + eps)
    return centred.reshape(-1)


# ------------------------------------------------------------------------------------------------
# The clipped policy objective with its KL penalty, and its normalisation (see fastjax.rl)
# ------------------------------------------------------------------------------------------------


def per_token_objective(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    epsilon: float,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    level: str = "token",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(l, k3, clipped)``, each ``[B, N]`` and unmasked, of the module docstring's objective."""
    m = mask.astype(jnp.float32)
    log_ratio = logp - old_logp
    if level == "sequence":
        seq = (log_ratio * m).sum(-1, keepdims=True) / jnp.maximum(m.sum(-1, keepdims=True), 1.0)
        log_ratio = jnp.broadcast_to(seq, logp.shape)
    ratio = jnp.exp(log_ratio)
    lo, hi = 1.0 - epsilon, 1.0 + (epsilon if epsilon_high is None else epsilon_high)
    adv = advantages[:, None].astype(jnp.float32)
    loss = -jnp.minimum(ratio * adv, jnp.clip(ratio, lo, hi) * adv)
    clipped = ((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))
    kl = jnp.zeros_like(loss)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = jnp.exp(d) - d - 1.0
        loss = loss + beta * kl
    return loss, kl, clipped


def loss_numerator(values: jax.Array, mask: jax.Array, loss_type: str) -> jax.Array:
    """``sum m v`` ("dapo") or ``sum_i (sum_t m v) / |y_i|`` ("grpo")."""
    m = mask.astype(jnp.float32)
    if loss_type == "dapo":
        return jnp.sum(values * m)
    return jnp.sum((values * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0))


def loss_denominator(mask: jax.Array, loss_type: str) -> jax.Array:
    """Completion tokens ("dapo") or sequences ("grpo") of the WHOLE batch ``mask [..., N]``."""
    if loss_type == "dapo":
        return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    return jnp.float32(np.prod(mask.shape[:-1]))


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    loss_type: str = "dapo",
    level: str = "token",
) -> tuple[jax.Array, dict]:
    """The normalised loss of one batch ``[B, N]`` and ``{"kl", "clip_ratio"}`` (token means)."""
    loss, kl, clipped = per_token_objective(
        logp,
        old_logp,
        ref_logp,
        advantages,
        mask,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        beta=beta,
        level=level,
    )
    m = mask.astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    value = loss_numerator(loss, m, loss_type) / loss_denominator(m, loss_type)
    return value, {"kl": jnp.sum(kl * m) / tokens, "clip_ratio": jnp.sum(clipped * m) / tokens}


# ------------------------------------------------------------------------------------------------
# GSM8K rewards (used by examples/grpo_gsm8k.py)
# ------------------------------------------------------------------------------------------------

_NUM = r"-?\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
FINAL_LINE = re.compile(rf"^\s*####\s*{_NUM}\s*\.?\s*$", re.MULTILINE)
STATED = re.compile(rf"(?:\\boxed\{{\s*{_NUM}\s*\}}|answer is\s*:?\s*{_NUM})", re.IGNORECASE)


def _text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content", ""))  # [{"role": "assistant", "content": ...}]
    raise TypeError(f"expected a completion string, got {type(completion).__name__}")


def gsm8k_correctness_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str], **_: Any
) -> list[float]:
    """1.0 when the completion's final number (``gsm8k_answer``: the number after ``####``, else
    the last number in the text) equals the reference solution's ``#### <number>``; else 0.0."""
    out = []
    for completion, ref in zip(completions, answer, strict=True):
        expected = gsm8k_answer(ref)
        got = gsm8k_answer(_text(completion))
        out.append(1.0 if expected is not None and got == expected else 0.0)
    return out


def gsm8k_format_reward(
    prompts: Sequence[Any], completions: Sequence[Any], **_: Any
) -> list[float]:
    """1.0 for a line that is exactly ``#### <number>`` (GSM8K's final-answer line), 0.5 for an
    answer stated otherwise (``\\boxed{<number>}`` or ``answer is <number>``), 0.0 for neither."""
    out = []
    for completion in completions:
        text = _text(completion)
        out.append(1.0 if FINAL_LINE.search(text) else 0.5 if STATED.search(text) else 0.0)
    return out
