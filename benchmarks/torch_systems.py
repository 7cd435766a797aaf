"""transformers + PEFT as a benchmark system (LoRA, bitsandbytes QLoRA): one step per process.

torch, transformers, peft and bitsandbytes are benchmark oracles, never fastjax dependencies: each
is imported here, in the child, and a missing one (or a missing GPU) yields one ``skipped`` row
saying which. Prints one JSON line. Usage::

    python3 benchmarks/torch_systems.py --shape llama-3-8b --batch 4 --seq 2048 \
        [--qlora] [--cap-gib 24]
    python3 benchmarks/torch_systems.py --make-checkpoint --shape llama-3-8b  # random bf16 on disk

Setup mirrors what a user of the standard stack runs: random bf16 weights built on the GPU, sdpa
attention, non-reentrant gradient checkpointing, LoRA r=16 alpha=16 on all seven projections, fused
AdamW, labels=ids (transformers' own full-logits cross-entropy), ``--warmup`` + ``--steps`` timed
steps, the same token ids as every other system (``harness.token_batch``). ``--qlora``: the
documented bitsandbytes recipe: NF4 with double quantization and bf16 compute, loaded from a saved
random checkpoint (bitsandbytes quantizes at load), ``prepare_model_for_kbit_training`` (which keeps
norms, embeddings and head in fp32), bf16 autocast as ``Trainer(bf16=True)`` does. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (weights included; reset after loading).

The random checkpoint (``--make-checkpoint``; also what the Unsloth runner loads) is
``save_pretrained`` of a random model plus a word-level ``tokenizers`` tokenizer with the model's
vocabulary size; ``READY`` is written last, so a half-written checkpoint is never used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from benchmarks.shapes import ModelShape, get  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKPOINT_ROOT = os.environ.get("FASTJAX_BENCH_CHECKPOINTS", "/tmp/fastjax-bench/checkpoints")


# ------------------------------------------------------------------------ random checkpoint on disk
def special_ids(vocab_size: int) -> dict:
    """Token ids of the stand-in tokenizer's specials: the last ``min(256, V // 2)`` ids, laid out
    as Llama-3's (bos = first special, eos = second, pad = fifth: 128000 / 128001 / 128004 at V =
    128256)."""
    n_plain = vocab_size - min(256, vocab_size // 2)
    return {"bos_token_id": n_plain, "eos_token_id": n_plain + 1, "pad_token_id": n_plain + 4}


def hf_config(shape: ModelShape, **overrides):
    """A transformers config for ``shape`` (its HF ``config.json`` fields, sdpa attention)."""
    import transformers

    fields = shape.hf_config()
    model_type = fields.pop("model_type")
    fields.update(special_ids(shape.vocab_size), **overrides)
    return transformers.AutoConfig.for_model(model_type, attn_implementation="sdpa", **fields)


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly ``vocab_size`` ids (``t0`` ... plain, specials at the
    end).

    Loaders that insist on a tokenizer (Unsloth's ``from_pretrained`` always loads one) find ids
    that match the model, so nothing is resized.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = special_ids(vocab_size)
    n_plain = ids["bos_token_id"]
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
    ]
    names += [f"<|reserved_special_token_{i}|>" for i in range(2, vocab_size - n_plain - 3)]
    vocab = {f"t{i}": i for i in range(n_plain)} | {s: n_plain + j for j, s in enumerate(names)}
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(names)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=names[0],
        eos_token=names[1],
        pad_token=names[4],
        model_max_length=1 << 20,
    )


def checkpoint_dir(shape_name: str, root: str | os.PathLike = CHECKPOINT_ROOT) -> Path:
    return Path(root) / shape_name


def random_model(shape: ModelShape, device: str):
    """``AutoModelForCausalLM`` for ``shape`` with random bf16 weights (seed 0), built on
    ``device``.

    Initialised in bf16 directly: an fp32 init of an 8B model would take 32 GB, more than a 24 GiB
    cap.
    """
    import torch
    import transformers

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return transformers.AutoModelForCausalLM.from_config(hf_config(shape, dtype="bfloat16"))
    finally:
        torch.set_default_dtype(prev)


def make_checkpoint(shape: ModelShape, path: str | os.PathLike, *, device: str = "cuda") -> Path:
    """Random bf16 weights for ``shape`` (seed 0), saved with a tokenizer; ``READY`` written
    last."""
    path = Path(path)
    if (path / "READY").exists():
        return path
    model = random_model(shape, device)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer(shape.vocab_size).save_pretrained(path)
    (path / "READY").write_text("ok\n")
    return path


def ensure_checkpoint(
    shape_name: str, root: str | os.PathLike = CHECKPOINT_ROOT, *, timeout: float = 900
) -> Path:
    """The random checkpoint for ``shape_name``, built in a child process when missing (so the
    caller's process keeps its GPU memory and import order)."""
    path = checkpoint_dir(shape_name, root)
    if not (path / "READY").exists():
        subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--make-checkpoint",
                "--shape",
                shape_name,
                "--checkpoint-root",
                str(root),
            ],
            check=True,
            timeout=timeout,
        )
    return path


# --------------------------------------------------------------------------------------- one system
def _peft_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=16,
            lora_dropout=0.0,
            bias="none",
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        ),
    )


def _build_bf16(shape: ModelShape, device: str):
    model = _peft_lora(random_model(shape, device))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def _build_qlora(shape_name: str, ckpt_root: str):
    import torch
    import transformers
    from peft import prepare_model_for_kbit_training

    path = ensure_checkpoint(shape_name, ckpt_root)
    bnb = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=bnb,
        dtype=torch.bfloat16,
        device_map={"": 0},
        attn_implementation="sdpa",
    )
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return _peft_lora(model)


def bench(
    shape_name: str | ModelShape,
    batch: int,
    seq: int,
    *,
    steps: int = 6,
    warmup: int = 2,
    qlora: bool = False,
    cap_gib: float | None = None,
    device: str = "cuda",
    ckpt_root: str = CHECKPOINT_ROOT,
) -> dict:
    """One HF+PEFT configuration in this process; returns its row (``oom`` rows when it did not
    fit)."""
    import contextlib

    import torch

    if steps < 1:
        raise ValueError(f"{steps=}: at least one timed step")
    shape = shape_name if isinstance(shape_name, ModelShape) else get(shape_name)
    system = "hf+peft-qlora" if qlora else "hf+peft"
    cuda = device.startswith("cuda")
    base = dict(system=system, shape=shape.name, batch=batch, seq=seq, cap_gib=cap_gib)
    if cap_gib and cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if qlora and cuda else contextlib.nullcontext()
    )
    ids = torch.from_numpy(harness.token_batch(shape.vocab_size, batch, seq)).long().to(device)
    try:
        t0 = time.perf_counter()
        model = _build_qlora(shape.name, ckpt_root) if qlora else _build_bf16(shape, device)
        load_s = time.perf_counter() - t0
        params = [p for p in model.parameters() if p.requires_grad]
        dt, loss = harness.time_torch_steps(
            model, ids, warmup=warmup, steps=steps, autocast=autocast
        )
    except torch.OutOfMemoryError as e:
        return harness.record(
            packages=harness.TORCH_PACKAGES,
            **base,
            ok=False,
            oom=True,
            error=f"OutOfMemoryError: {str(e)[:300]}",
        )
    return harness.record(
        packages=harness.TORCH_PACKAGES,
        **base,
        ok=True,
        tokens_per_s=round(batch * seq / dt),
        step_s=round(dt, 4),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        loss=loss,
        load_s=round(load_s, 1),
        warmup=warmup,
        steps=steps,
        model_flops=harness.train_flops(shape, batch, seq),
        attention="sdpa",
        grad_ckpt="non-reentrant",
        autocast="bf16" if qlora else None,
        quant="nf4+double-quant (bitsandbytes)" if qlora else None,
        kbit_prep=qlora or None,
        n_trainable=sum(p.numel() for p in params),
    )


def why_not(qlora: bool, device: str) -> str | None:
    """Why this process cannot run the system (a missing package or GPU), or ``None``."""
    # transformers' bitsandbytes loader also requires accelerate
    for name in ("torch", "transformers", "peft") + (
        ("bitsandbytes", "accelerate") if qlora else ()
    ):
        try:
            __import__(name)
        except Exception as e:  # ImportError, or a package that fails while importing (CUDA libs)
            return f"{name} not importable: {type(e).__name__}: {str(e)[:200]}"
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--qlora", action="store_true", help="bitsandbytes NF4 base (needs bitsandbytes)"
    )
    ap.add_argument("--cap-gib", type=float, default=None, help="torch per-process memory cap, GiB")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: tests only
    ap.add_argument("--checkpoint-root", default=CHECKPOINT_ROOT)
    ap.add_argument(
        "--make-checkpoint", action="store_true", help="write the random checkpoint, exit"
    )
    args = ap.parse_args()

    if args.make_checkpoint:
        path = make_checkpoint(
            get(args.shape), checkpoint_dir(args.shape, args.checkpoint_root), device=args.device
        )
        print(json.dumps({"checkpoint": str(path)}), flush=True)
        return
    system = "hf+peft-qlora" if args.qlora else "hf+peft"
    cell = dict(shape=args.shape, batch=args.batch, seq=args.seq, cap_gib=args.cap_gib)
    why = why_not(args.qlora, args.device)
    if why:
        row = harness.skipped(system, why, packages=harness.TORCH_PACKAGES, **cell)
    else:
        row = bench(
            args.shape,
            args.batch,
            args.seq,
            steps=args.steps,
            warmup=args.warmup,
            qlora=args.qlora,
            cap_gib=args.cap_gib,
            device=args.device,
            ckpt_root=args.checkpoint_root,
        )
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
