"""GRPO on grade-school math word problems with SmolLM2-135M-Instruct: rewards for a correct final
answer and for GSM8K's answer format, exact-match accuracy (greedy) on held-out problems before and
after.

    python examples/grpo_gsm8k.py           # CPU-sized default: built-in arithmetic, a few minutes
    python examples/grpo_gsm8k.py --full --data ../shared/data/gsm8k/train.jsonl   # a GPU run

Rewards (``fastjax.rl_rewards``):
  correctness (weight 1.0): the completion's final number (``gsm8k_answer``: the number after
      ``####``, else the last number in the text) equals the reference ``#### <number>``;
  format (weight 0.5): 1.0 for a line that is exactly ``#### <number>``, 0.5 for an answer stated
      as ``\\boxed{<number>}`` or ``answer is <number>``, else 0.
Prompts are chat-formatted: a system prompt asking for brief reasoning and a final ``#### <answer>``
line, then the question. Held-out problems: ``--eval-data``; else, for a GSM8K ``train.jsonl``, the
``test.jsonl`` beside it; else the built-in generator's test split (disjoint from its train split).

Outputs in ``--output-dir``: ``adapter/`` (PEFT), ``metrics.jsonl``, ``reward_curve.png``,
``checkpoints/`` (with ``--save-steps``), ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import jax

from fastjax import lora as lora_lib
from fastjax.arith_data import arith_splits, gsm8k_answer, load_gsm8k
from fastjax.cli import MATH_SYSTEM_PROMPT, load_model
from fastjax.generation import generate
from fastjax.rl import GRPOConfig, train_grpo
from fastjax.rl_rewards import FINAL_LINE, gsm8k_correctness_reward, gsm8k_format_reward

ON_GPU = jax.default_backend() == "gpu"

# --full: a GPU-sized run. Measured on one H200 (2026-12-01, 30 of these steps): 25 s for the first step
# (compilation), then about 2.3 s a step, so 250 steps take about 10 minutes plus two evaluations.
FULL = {
    "steps": 250,
    "prompts_per_step": 16,
    "num_generations": 8,
    "max_new_tokens": 256,
    "eval_size": 512,
    "train_size": 100000,
    "lr": 2e-5,
    "dtype": "bf16",
    "remat": "full",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model",
        default="default",
        help="'default' (embedded SmolLM2-135M-Instruct), an HF dir or a .gguf",
    )
    p.add_argument("--data", default=None, help="GSM8K JSONL (question/answer); default: built-in")
    p.add_argument("--eval-data", default=None, help="held-out JSONL (default: test.jsonl beside)")
    p.add_argument("--full", action="store_true", help=f"GPU-sized settings: {FULL}")
    p.add_argument("--train-size", type=int, default=256)
    p.add_argument("--eval-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48, help="per sampled completion")
    p.add_argument(
        "--eval-max-new-tokens",
        type=int,
        default=None,
        help="default: --max-new-tokens (then eval reuses the sampler's compilation)",
    )
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="default: the rows of one GRPO step (prompts-per-step x num-generations)",
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (k3 vs LoRA off)")
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--num-iterations", type=int, default=1, help="updates per generation batch")
    p.add_argument(
        "--gspo",
        action="store_true",
        help="GSPO: sequence-level ratio, epsilon 3e-4/4e-4, per-sequence loss",
    )
    p.add_argument("--loss-type", choices=("dapo", "grpo"), default="dapo")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16" if ON_GPU else "fp32")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 frozen decoder weights")
    p.add_argument("--remat", default="full" if ON_GPU else "none")
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--output-dir", default="outputs/grpo_gsm8k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.full:  # --full sets what the command line left at its default
        for key, value in FULL.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    args.eval_max_new_tokens = args.eval_max_new_tokens or args.max_new_tokens
    args.eval_batch_size = args.eval_batch_size or args.prompts_per_step * args.num_generations
    return args


def load_problems(args) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out rows, description) of ``{"question", "answer"}`` problems."""
    if args.data is None:
        train, held_out = arith_splits(
            args.train_size, args.eval_size, train_seed=args.seed, test_seed=args.seed + 1
        )
        return train, held_out, "built-in arithmetic word problems"
    train = load_gsm8k(args.data)[: args.train_size]
    eval_path = Path(args.eval_data) if args.eval_data else Path(args.data).with_name("test.jsonl")
    if eval_path.exists() and eval_path.resolve() != Path(args.data).resolve():
        held_out = load_gsm8k(eval_path)[: args.eval_size]
    else:  # hold out the tail of the training file
        if len(train) <= args.eval_size:
            raise SystemExit(f"{args.data}: {len(train)} rows cannot spare {args.eval_size}")
        train, held_out = train[: -args.eval_size], train[-args.eval_size :]
    return train, held_out, f"{args.data} ({len(train)} train rows)"


def chat_prompt(question: str) -> list[dict]:
    return [
        {"role": "system", "content": MATH_SYSTEM_PROMPT},
        {"role": "user", "content": question},
    ]


def evaluate(params, cfg, tokenizer, rows, args, *, lora=None, scale=1.0) -> dict:
    """Greedy exact-match accuracy and format rate on ``rows``, with a few samples."""
    prompts = [
        tokenizer.apply_chat_template(
            chat_prompt(r["question"]), add_generation_prompt=True, tokenize=True
        )
        for r in rows
    ]
    outputs = []
    for i in range(0, len(prompts), args.eval_batch_size):
        outputs += generate(
            params,
            cfg,
            prompts[i : i + args.eval_batch_size],
            max_new_tokens=args.eval_max_new_tokens,
            lora=lora,
            lora_scale=scale,
        )
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    correct = gsm8k_correctness_reward(None, texts, [r["answer"] for r in rows])
    formatted = [bool(FINAL_LINE.search(t)) for t in texts]
    samples = [
        {
            "question": r["question"],
            "gold": gsm8k_answer(r["answer"]),
            "output": t,
            "pred": gsm8k_answer(t),
        }
        for r, t in zip(rows[:4], texts[:4], strict=True)
    ]
    n = max(len(rows), 1)
    return {"accuracy": sum(correct) / n, "format_rate": sum(formatted) / n, "samples": samples}


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out_dir = Path(args.output_dir)
    t0 = time.perf_counter()
    params, cfg, tokenizer, model_path = load_model(
        args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit
    )
    train_rows, eval_rows, what = load_problems(args)
    print(
        f"model {model_path} ({cfg.num_hidden_layers} layers, d={cfg.hidden_size}), {args.dtype}"
        f"{' NF4' if args.load_in_4bit else ''}, on {jax.default_backend()}; data: {what}; eval "
        f"on {len(eval_rows)} held-out problems (loaded in {time.perf_counter() - t0:.0f}s)"
    )

    lora, lora_config = lora_lib.get_peft_model(
        params,
        cfg,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        target_modules="all-linear",
        seed=args.seed,
    )
    scale = lora_lib.lora_scale(lora_config)
    t = time.perf_counter()
    # fresh adapters (B = 0) leave the model unchanged and share the sampler's compilation
    before = evaluate(params, cfg, tokenizer, eval_rows, args, lora=lora, scale=scale)
    print(
        f"before GRPO: accuracy {before['accuracy']:.1%}, '#### <n>' format "
        f"{before['format_rate']:.1%}  ({time.perf_counter() - t:.0f}s)"
    )
    gspo = (
        {
            "importance_sampling_level": "sequence",
            "epsilon": 3e-4,
            "epsilon_high": 4e-4,
            "loss_type": "grpo",
        }
        if args.gspo
        else {"epsilon": args.epsilon, "loss_type": args.loss_type}
    )
    config = GRPOConfig(
        num_generations=args.num_generations,
        prompts_per_step=args.prompts_per_step,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        beta=args.beta,
        num_iterations=args.num_iterations,
        reward_weights=(1.0, 0.5),
        learning_rate=args.lr,
        max_steps=args.steps,
        micro_batch_size=args.micro_batch_size,
        remat_policy=args.remat,
        seed=args.seed,
        output_dir=str(out_dir),
        save_steps=args.save_steps,
        resume=args.resume,
        progress_bar=args.progress,
        base_model_name_or_path=model_path,
        **gspo,
    )
    rows = [{"prompt": chat_prompt(r["question"]), "answer": r["answer"]} for r in train_rows]
    t = time.perf_counter()
    result = train_grpo(
        params,
        cfg,
        rows,
        [gsm8k_correctness_reward, gsm8k_format_reward],
        config,
        lora=lora,
        lora_config=lora_config,
        tokenizer=tokenizer,
    )
    train_s = time.perf_counter() - t
    h = result.history
    steady = h[1:] or h  # step 1 includes compilation
    gen_tps = sum(r["gen_tokens"] for r in steady) / sum(r["gen_s"] for r in steady)
    train_tps = sum(r["train_tokens_per_s"] * r["train_s"] for r in steady) / sum(
        r["train_s"] for r in steady
    )
    print(
        f"GRPO: {result.steps} steps in {train_s:.0f}s; reward {h[0]['reward']:.3f} -> "
        f"{h[-1]['reward']:.3f}, correctness {h[0]['rewards/gsm8k_correctness_reward/mean']:.3f}"
        f" -> {h[-1]['rewards/gsm8k_correctness_reward/mean']:.3f}, kl {h[-1]['kl']:.4f}; "
        f"generation {gen_tps:,.0f} tokens/s, training {train_tps:,.0f} tokens/s (after step 1)"
    )

    t = time.perf_counter()
    after = evaluate(params, cfg, tokenizer, eval_rows, args, lora=result.lora, scale=scale)
    print(
        f"after GRPO:  accuracy {after['accuracy']:.1%}, '#### <n>' format "
        f"{after['format_rate']:.1%}  ({time.perf_counter() - t:.0f}s)"
    )
    print(
        f"exact-match accuracy on {len(eval_rows)} held-out problems: before "
        f"{before['accuracy']:.1%} -> after {after['accuracy']:.1%}"
    )
    results = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "format_before": before["format_rate"],
        "format_after": after["format_rate"],
        "eval_size": len(eval_rows),
        "steps": result.steps,
        "train_seconds": train_s,
        "gen_tokens_per_s": gen_tps,
        "train_tokens_per_s": train_tps,
        "reward_first": h[0]["reward"],
        "reward_last": h[-1]["reward"],
        "data": what,
        "model": model_path,
        "adapter": str(result.saved_to),
        "args": vars(args),
        "samples_after": after["samples"],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"adapter: {result.saved_to}; results: {out_dir / 'results.json'} "
        f"(total {time.perf_counter() - t0:.0f}s)"
    )
    return results


if __name__ == "__main__":
    main()
