"""GRPO benchmark: peak memory, generation and training tokens/s of QLoRA GRPO steps.

Default (GPU): Llama-3-8B shapes, NF4 base (``common.random_params(..., quantize=True)``), LoRA r=16
on all 7 projections, one prompt of ``--prompt-len`` random tokens, G = 8 completions of 1024
tokens (no EOS: random weights, so every row generates the full length), beta = 0.04 (a reference
pass with the adapters off), one update per generation batch, full remat, the fused CE kernel.
The measured step is ``fastjax.rl.GRPOTrainer``'s own (rollout with the KV-cache generator, reward,
reference log-probs, update): ``--steps`` + 1 steps run and the first (compilation) is dropped.

Memory cap: each configuration runs in its own process with ``XLA_PYTHON_CLIENT_MEM_FRACTION`` =
``--cap-gib`` / the GPU's memory (``nvidia-smi``), so "fits" means it ran inside that budget. The
configurations are tried largest first (all rows per micro-batch, then fewer, then shorter
completions) until one fits; every attempt is a row.

    python3 benchmarks/bench_grpo.py --out benchmarks/results/bench_grpo.jsonl      # GPU, 24 GiB
    python3 benchmarks/bench_grpo.py --tiny                                          # CPU smoke run

Row fields: gen_tokens_per_s (generated tokens / generation wall time), train_tokens_per_s (real
prompt + completion tokens / update-phase wall time, reference pass included), step_s,
peak_gib (``peak_bytes_in_use``), fits, cap_gib.
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

TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "model_type": "llama",
}


def run_one(
    shape: str,
    G: int,
    new: int,
    prompt_len: int,
    micro: int,
    steps: int,
    cap: float | None,
    remat: str,
) -> dict:
    """One configuration in this process: ``steps + 1`` GRPO steps, the first one dropped."""
    import jax
    import numpy as np
    from fastjax.models import registry

    from benchmarks import common
    from fastjax import lora as lora_lib
    from fastjax.rl import GRPOConfig, GRPOTrainer

    if shape == "tiny":
        cfg = registry.config_from_hf(TINY)
    else:
        from benchmarks.shapes import get

        cfg = registry.config_from_hf(get(shape).hf_config())
    t0 = time.perf_counter()
    params, note = _nf4_params(cfg)
    lora, lora_config = lora_lib.get_peft_model(
        params, cfg, r=16, lora_alpha=16, target_modules="all-linear"
    )
    jax.block_until_ready((params, lora))
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    rows = [{"prompt_ids": rng.integers(0, cfg.vocab_size, prompt_len).tolist()}]

    def toy_reward(prompts, completions, completion_ids):  # any spread of rewards will do
        return [float(np.mean(np.asarray(ids) % 7 == 0)) for ids in completion_ids]

    config = GRPOConfig(
        num_generations=G,
        prompts_per_step=1,
        max_new_tokens=new,
        max_prompt_length=None,
        temperature=1.0,
        beta=0.04,
        learning_rate=1e-5,
        max_steps=steps + 1,
        micro_batch_size=micro,
        remat_policy=remat,
        output_dir=os.environ.get("TMPDIR", "/tmp") + "/bench_grpo",
        progress_bar=False,
        plot=False,
        save_final=False,
    )
    trainer = GRPOTrainer(
        params, cfg, rows, [toy_reward], config, lora=lora, lora_config=lora_config
    )
    result = trainer.train()
    timed = result.history[1:]
    gen_tokens = sum(h["gen_tokens"] for h in timed)
    gen_s = sum(h["gen_s"] for h in timed)
    train_s = sum(h["train_s"] for h in timed)
    train_tokens = sum(h["train_tokens_per_s"] * h["train_s"] for h in timed)
    return common.record(
        system="fastjax-qlora-grpo",
        shape=shape,
        num_generations=G,
        completion_len=new,
        prompt_len=prompt_len,
        micro_batch_size=micro,
        remat=remat,
        steps_timed=len(timed),
        gen_tokens_per_s=round(gen_tokens / gen_s, 1),
        train_tokens_per_s=round(train_tokens / train_s, 1),
        step_s=round((gen_s + train_s) / len(timed), 3),
        gen_s=round(gen_s / len(timed), 3),
        train_s=round(train_s / len(timed), 3),
        completion_length=timed[-1]["completion_length"],
        reward=timed[-1]["reward"],
        kl=timed[-1]["kl"],
        peak_gib=round(common.peak_gib(), 2),
        cap_gib=cap,
        fits=True,
        load_s=round(load_s, 1),
        note=note,
        first_step_s=round(result.history[0]["gen_s"] + result.history[0]["train_s"], 1),
    )


def _nf4_params(cfg):
    """``common.random_params(quantize=True)`` (never holds the 16-bit model). If its layer stacking
    did not keep NF4Tensor leaves, quantize after a 16-bit load instead and say so in the row."""
    import jax

    from benchmarks import common
    from fastjax import quant

    params = common.random_params(cfg, jax.random.key(0), quantize=True)
    weight = params["model"]["layers"]["self_attn"]["q_proj"]["weight"]
    if isinstance(weight, quant.NF4Tensor):
        return params, None
    del params
    dense = common.random_params(cfg, jax.random.key(0), quantize=False)
    note = (
        f"random_params(quantize=True) gave {type(weight).__name__} layer weights; quantized "
        "after a bf16 load (peak_gib includes the bf16 model)"
    )
    return quant.quantize_params(dense, donate=True), note


def _gpu_total_gib() -> float | None:
    try:
        query = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True)
        return float(out.stdout.split()[0]) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def attempts(args) -> list[tuple[int, int]]:
    """(completion_len, micro_batch_size) pairs, largest first."""
    rows = args.num_generations
    micros = [m for m in (rows, rows // 2, rows // 4, 1) if m >= 1 and rows % m == 0]
    out = [(args.completion_len, m) for m in dict.fromkeys(micros)]
    out += [(n, 1) for n in (args.completion_len // 2, args.completion_len // 4) if n >= 16]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model (CPU smoke run)")
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--completion-len", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1, help="timed steps (after one warm-up step)")
    ap.add_argument("--remat", default=None, help="remat preset (default: full; none with --tiny)")
    ap.add_argument("--cap-gib", type=float, default=24.0, help="memory cap; 0 = none")
    ap.add_argument("--all", action="store_true", help="run every attempt, not only until one fits")
    ap.add_argument("--timeout", type=int, default=540, help="seconds per configuration")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: "new:micro"
    args = ap.parse_args()
    from benchmarks import common

    args.remat = args.remat if args.tiny else args.remat or "full"
    if args.tiny:  # in-process, small enough for CPU CI
        args.shape, args.remat = "tiny", args.remat or "none"
        G, new = min(args.num_generations, 4), min(args.completion_len, 16)
        row = run_one("tiny", G, new, min(args.prompt_len, 8), G // 2, args.steps, None, args.remat)
        common.emit(row, args.out)
        print(
            f"tiny: gen {row['gen_tokens_per_s']:,.0f} tok/s, train "
            f"{row['train_tokens_per_s']:,.0f} tok/s, peak {row['peak_gib']} GiB"
        )
        return
    if args.one:
        new, micro = (int(x) for x in args.one.split(":"))
        cap = args.cap_gib or None
        print(
            json.dumps(
                run_one(
                    args.shape,
                    args.num_generations,
                    new,
                    args.prompt_len,
                    micro,
                    args.steps,
                    cap,
                    args.remat,
                )
            ),
            flush=True,
        )
        return

    env = {}
    total = _gpu_total_gib()
    if args.cap_gib and total:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(args.cap_gib / total, 0.95):.4f}"
    elif args.cap_gib:
        print(f"no nvidia-smi: running without the {args.cap_gib} GiB cap", file=sys.stderr)
    table = []
    for new, micro in attempts(args):
        cmd = [
            str(Path(__file__).resolve()),
            "--shape",
            args.shape,
            "--num-generations",
            str(args.num_generations),
            "--prompt-len",
            str(args.prompt_len),
            "--steps",
            str(args.steps),
            "--remat",
            args.remat,
            "--cap-gib",
            str(args.cap_gib),
            "--one",
            f"{new}:{micro}",
        ]
        rows = common.run_subprocess(cmd, env=env, timeout=args.timeout)
        for r in rows:
            r = dict(r, completion_len=new, micro_batch_size=micro, cap_gib=args.cap_gib or None)
            if "error" in r:
                oom = "RESOURCE_EXHAUSTED" in r["error"] or "out of memory" in r["error"].lower()
                r = dict(r, fits=False, oom=oom, gpu_total_gib=total)
            common.emit(r, args.out)
            table.append(r)
        if any(r.get("fits") for r in rows) and not args.all:
            break
    print(
        f"\n{'len':>5} {'micro':>5} {'fits':>5} {'peak GiB':>9} {'gen tok/s':>10} "
        f"{'train tok/s':>12} {'step s':>7}"
    )
    for r in table:
        print(
            f"{r['completion_len']:>5} {r['micro_batch_size']:>5} {r.get('fits')!s:>5} "
            f"{r.get('peak_gib', '-')!s:>9} {r.get('gen_tokens_per_s', '-')!s:>10} "
            f"{r.get('train_tokens_per_s', '-')!s:>12} {r.get('step_s', '-')!s:>7}"
        )


if __name__ == "__main__":
    main()
