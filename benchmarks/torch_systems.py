"""The torch side of ``train_step.py``: one transformers+PEFT LoRA training step benchmark per process.

Run only on the GPU machine (torch, transformers and peft are test/benchmark oracles, never fastjax
dependencies). Prints one JSON line. Usage::

    python3 benchmarks/torch_systems.py --shape llama-3-8b --batch 4 --seq 2048 [--qlora]

Setup mirrors what a user of the standard stack runs: random bf16 weights built on the GPU, sdpa attention,
non-reentrant gradient checkpointing, LoRA r=16 alpha=16 on all seven projections, fused AdamW, labels=ids
(transformers' own full-logits cross-entropy), 2 warm-up + N timed steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.shapes import get  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--qlora", action="store_true", help="bitsandbytes NF4 base (needs bitsandbytes)")
    ap.add_argument("--mem-fraction", type=float, default=None, help="torch per-process memory cap")
    args = ap.parse_args()

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    shape = get(args.shape)
    if args.mem_fraction:
        torch.cuda.set_per_process_memory_fraction(args.mem_fraction)
    hf = shape.hf_config()
    hf.pop("model_type")
    cfg = transformers.LlamaConfig(**hf, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    if args.qlora:
        import bitsandbytes  # noqa: F401  (fails clearly when absent)
        raise SystemExit("qlora for the HF side needs a saved checkpoint round trip; not run")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda", generator=gen)
    torch.cuda.reset_peak_memory_stats()

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tokens = args.batch * args.seq
    print(json.dumps(dict(system="hf+peft", shape=args.shape, batch=args.batch, seq=args.seq,
                          tokens_per_s=round(tokens / dt), step_s=round(dt, 4),
                          peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                          params=n_params, loss=float(loss), torch=torch.__version__,
                          transformers=transformers.__version__)), flush=True)


if __name__ == "__main__":
    main()
