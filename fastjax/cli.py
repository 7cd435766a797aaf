"""The ``fastjax`` command line.

    fastjax train --model default --data arith --steps 60 --output-dir out     # LoRA SFT
    fastjax generate --model default --adapter out/adapter --chat --prompt "What is 7 * 8?"
    fastjax export --model default --adapter out/adapter --format merged --out merged   # export.py

``--model``: an HF checkpoint directory, a hub repo id, a ``.gguf`` file, or ``default`` (the
embedded SmolLM2-135M-Instruct GGUF). ``--data``: a JSONL file (chat ``messages``,
``prompt``/``completion``, ``text``, or GSM8K ``question``/``answer`` rows, which are chat-formatted
with the model's template and trained on the answers only), an HF dataset name (needs the
``datasets`` package), or ``arith`` (the built-in generated arithmetic word problems).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DTYPES = ("bf16", "fp32", "fp16")
DEFAULT_MODEL = "default"
MATH_SYSTEM_PROMPT = "Solve the math word problem step by step. End with a line '#### <answer>'."


def _jnp_dtype(name: str):
    import jax.numpy as jnp

    return {"bf16": jnp.bfloat16, "fp32": jnp.float32, "fp16": jnp.float16}[name]


def resolve_model_path(model: str) -> str:
    """``default`` -> the embedded SmolLM2-135M-Instruct GGUF; anything else unchanged."""
    if model == DEFAULT_MODEL:
        from fastjax.gguf_io import smollm2_gguf_path

        return str(smollm2_gguf_path())
    return model


def load_model(
    model: str,
    *,
    dtype: str = "bf16",
    load_in_4bit: bool = False,
    max_seq_length: int | None = None,
    embed_on_host: bool = False,
):
    from fastjax.loading import from_pretrained

    path = resolve_model_path(model)
    params, cfg, tokenizer = from_pretrained(
        path,
        dtype=_jnp_dtype(dtype),
        load_in_4bit=load_in_4bit,
        max_seq_length=max_seq_length,
        embed_on_host=embed_on_host,
    )
    if tokenizer is None:
        raise SystemExit(
            f"fastjax: {path} has no tokenizer files; training and generation need one"
        )
    return params, cfg, tokenizer, path


def qa_to_chat(rows: Sequence[dict], system_prompt: str | None = MATH_SYSTEM_PROMPT) -> list[dict]:
    """GSM8K-style ``{"question", "answer"}`` rows -> chat rows (system?, user question, assistant
    answer)."""
    out = []
    for row in rows:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages += [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["answer"]},
        ]
        out.append({"messages": messages})
    return out


def load_training_rows(
    data: str,
    *,
    split: str = "train",
    num_arith: int = 2000,
    seed: int = 0,
    system_prompt: str | None = MATH_SYSTEM_PROMPT,
) -> list[dict]:
    """``arith`` | JSONL path | HF dataset name -> rows; question/answer rows become chat rows."""
    from fastjax import data as data_lib

    if data == "arith":
        from fastjax.arith_data import generate_arith_problems

        rows = generate_arith_problems(num_arith, seed=seed)
    elif Path(data).exists():
        rows = data_lib.load_rows(data)
    else:
        try:
            import datasets
        except ImportError as e:
            raise SystemExit(
                f"fastjax: --data {data!r} is not a file and the `datasets` package "
                "(needed for HF dataset names) is not installed"
            ) from e
        name, _, config = data.partition(":")
        rows = [dict(r) for r in datasets.load_dataset(name, config or None, split=split)]
    if not rows:
        raise SystemExit(f"fastjax: dataset {data!r} is empty")
    if {"question", "answer"} <= set(rows[0]) and not (
        {"messages", "prompt", "text"} & set(rows[0])
    ):
        rows = qa_to_chat(rows, system_prompt)
    return rows


# --------------------------------------------------------------------------------------------------
# fastjax train
# --------------------------------------------------------------------------------------------------


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    from fastjax import remat

    p = subparsers.add_parser(
        "train",
        help="supervised fine-tuning (LoRA, QLoRA or full)",
        description="Supervised fine-tuning with LoRA (default), QLoRA "
        "(--load-in-4bit) or all parameters (--full-finetune).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="HF checkpoint dir, hub id, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)",
    )
    m.add_argument(
        "--dtype", choices=DTYPES, default="bf16", help="dtype of the frozen weights/activations"
    )
    m.add_argument(
        "--load-in-4bit", action="store_true", help="QLoRA: store decoder linears as NF4"
    )
    m.add_argument(
        "--embed-on-host",
        action="store_true",
        help="keep the (untied) input embedding in host memory: ~1 GiB of device memory back on "
        "7-24B models (LoRA/QLoRA)",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        default="arith",
        help="JSONL file, HF dataset name ('name' or 'name:config'), or 'arith' (built-in)",
    )
    d.add_argument("--split", default="train", help="split of an HF dataset")
    d.add_argument(
        "--num-arith", type=int, default=2000, help="examples generated for --data arith"
    )
    d.add_argument(
        "--system-prompt",
        default=MATH_SYSTEM_PROMPT,
        help="system message for question/answer rows ('' for none)",
    )
    d.add_argument("--max-seq-length", type=int, default=512, help="tokens per row")
    d.add_argument(
        "--no-packing",
        dest="packing",
        action="store_false",
        help="one example per padded row instead of packing several per row",
    )
    d.add_argument(
        "--no-truncation",
        dest="truncation",
        action="store_false",
        help="error on examples longer than --max-seq-length instead of truncating them",
    )
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora-r", type=int, default=16, help="adapter rank")
    lo.add_argument("--lora-alpha", type=float, default=16, help="adapter alpha (scale alpha/r)")
    lo.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input")
    lo.add_argument(
        "--target-modules",
        default="all-linear",
        help="comma-separated module names, 'all-linear', or a regex over full module names",
    )
    lo.add_argument(
        "--use-rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r"
    )
    lo.add_argument(
        "--full-finetune", action="store_true", help="train all parameters, no adapters"
    )
    t = p.add_argument_group("training")
    t.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default: --epochs epochs)"
    )
    t.add_argument("--epochs", type=int, default=1, help="epochs when --steps is not given")
    t.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    t.add_argument(
        "--lr-scheduler",
        choices=("linear", "cosine", "constant"),
        default="linear",
        help="decay after warm-up",
    )
    t.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    t.add_argument(
        "--weight-decay", type=float, default=0.0, help="AdamW decay (not on norms/biases)"
    )
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="global-norm clip; 0 disables")
    t.add_argument(
        "--optimizer",
        choices=("adamw", "adamw_8bit"),
        default="adamw",
        help="adamw_8bit keeps Adam moments in 8 bits",
    )
    t.add_argument(
        "--remat", choices=remat.PRESETS, default="full", help="rematerialization preset"
    )
    t.add_argument(
        "--mlp-chunk-size",
        type=int,
        default=None,
        help="run each MLP over slices of this many tokens per row (long-context memory)",
    )
    t.add_argument(
        "--unroll-layers",
        action="store_true",
        help="layers as a Python loop, not one lax.scan (no stacked activations; slower compile); only with --remat none",
    )
    t.add_argument(
        "--kernels",
        choices=("auto", "xla", "pallas"),
        default=None,
        help="implementation of every op (default: env FASTJAX_KERNELS, else auto)",
    )
    t.add_argument("--seed", type=int, default=0, help="data order, adapter init, dropout")
    t.add_argument(
        "--num-devices",
        type=int,
        default=None,
        help="train on this many devices (frozen weights FSDP-sharded, rows of each "
        "batch split over all; --batch-size stays global); default: one device",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--output-dir", default="outputs", help="checkpoints, metrics, adapter, loss curve"
    )
    o.add_argument(
        "--save-steps", type=int, default=0, help="checkpoint every N steps (0: only at the end)"
    )
    o.add_argument(
        "--logging-steps", type=int, default=1, help="metrics.jsonl/tensorboard every N steps"
    )
    o.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --output-dir"
    )
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=train_command)
    return p


def train_command(args: argparse.Namespace) -> int:
    from fastjax import lora as lora_lib
    from fastjax import remat

    # before the first array starts jax's backend: XLA reads XLA_FLAGS only then
    if remat.command_buffers_off_in_env(args.remat):
        logging.getLogger(__name__).info("XLA command buffers off for host offload")
    from fastjax.models.ops import Ops
    from fastjax.trainer import SFTConfig, train

    params, cfg, tokenizer, path = load_model(
        args.model,
        dtype=args.dtype,
        load_in_4bit=args.load_in_4bit,
        max_seq_length=args.max_seq_length,
        embed_on_host=args.embed_on_host,
    )
    rows = load_training_rows(
        args.data,
        split=args.split,
        num_arith=args.num_arith,
        seed=args.seed,
        system_prompt=args.system_prompt or None,
    )
    config = SFTConfig(
        learning_rate=args.lr,
        lr_scheduler=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        max_steps=args.steps,
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum_steps=args.grad_accum,
        max_seq_length=args.max_seq_length,
        max_grad_norm=args.max_grad_norm or None,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        seed=args.seed,
        remat_policy=args.remat,
        packing=args.packing,
        truncation=args.truncation,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        output_dir=args.output_dir,
        resume=args.resume,
        ops=Ops.all(args.kernels) if args.kernels else None,
        full_finetune=args.full_finetune,
        progress_bar=args.progress,
        base_model_name_or_path=path,
        num_devices=args.num_devices,
        mlp_chunk_size=args.mlp_chunk_size,
        scan_layers=not args.unroll_layers,
    )
    lora = lora_config = None
    if not args.full_finetune:
        lora, lora_config = lora_lib.get_peft_model(
            params,
            cfg,
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            target_modules=args.target_modules,
            lora_dropout=args.lora_dropout,
            use_rslora=args.use_rslora,
            seed=args.seed,
        )
    result = train(
        params, cfg, rows, config, lora=lora, lora_config=lora_config, tokenizer=tokenizer
    )
    summary = {
        "steps": result.steps,
        "final_loss": result.losses[-1] if result.losses else None,
        "tokens_per_s": result.tokens_per_s,
        "saved_to": str(result.saved_to),
        "data": result.data_stats,
    }
    print(json.dumps(summary))
    return 0


# --------------------------------------------------------------------------------------------------
# fastjax generate / chat
# --------------------------------------------------------------------------------------------------


def add_generate_parser(subparsers, name: str = "generate") -> argparse.ArgumentParser:
    chat = name == "chat"
    what = "one-shot generation" + (" with the chat template" if chat else "")
    p = subparsers.add_parser(
        name, help=what, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF dir, hub id, .gguf, or 'default'")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory to apply")
    p.add_argument(
        "--prompt", action="append", required=True, help="prompt text (repeat for a batch)"
    )
    p.add_argument(
        "--chat", action="store_true", default=chat, help="wrap prompts in the chat template"
    )
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (temperature > 0)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of the weights")
    p.add_argument("--load-in-4bit", action="store_true", help="NF4 decoder weights")
    p.set_defaults(func=generate_command)
    return p


def generate_command(args: argparse.Namespace) -> int:
    from fastjax import lora as lora_lib
    from fastjax.generation import generate

    params, cfg, tokenizer, _ = load_model(
        args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit
    )
    lora, scale = None, 1.0
    if args.adapter:
        try:
            from fastjax.export import load_adapter
        except ImportError:
            load_adapter = lora_lib.load_peft_adapter
        lora, lora_config = load_adapter(args.adapter, cfg)
        scale = lora_lib.lora_scale(lora_config)
    prompts = []
    for text in args.prompt:
        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            messages.append({"role": "user", "content": text})
            prompts.append(
                tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            )
        else:
            prompts.append(tokenizer.encode(text))
    outs = generate(
        params,
        cfg,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        lora=lora,
        lora_scale=scale,
    )
    for out in outs:
        print(tokenizer.decode(out, skip_special_tokens=True))
    return 0


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastjax", description="Fine-tune LLMs in JAX (LoRA/QLoRA/full)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(sub)
    add_generate_parser(sub, "generate")
    add_generate_parser(sub, "chat")
    # ---- fastjax export: owned by fastjax/export.py (add_export_parser registers it when present)
    try:
        from fastjax.export import add_export_parser
    except ImportError:
        add_export_parser = None
    if add_export_parser is not None:
        add_export_parser(sub)
    # ---- end of export ----
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result: Any = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
