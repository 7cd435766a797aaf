"""Training-step benchmark: fastjax vs transformers+PEFT vs Unsloth vs plain XLA, in one invocation.

Every system runs in its own process, one after the other, on the same GPU, with random weights built on the
device, the same shapes, seeds and token counts: 2 warm-up steps and ``--steps`` timed steps. Each row records
tokens/s, step time, peak device memory and MFU = (4·N·tokens + attention FLOPs) / step time / the bf16 matmul
ceiling measured at the start of the same invocation.

Systems:
  fastjax-lora       bf16 base, fp32 LoRA r=16 on all 7 projections, Pallas kernels (auto), fused CE
  fastjax-qlora      NF4 base (fused dequant-LoRA kernel), same adapters
  fastjax-packed     fastjax-lora on rows of 4-8 packed segments (less attention work: reported apart)
  plain-xla          the same fastjax model with every op on its XLA reference (Ops.all("xla"))
  hf+peft            benchmarks/torch_systems.py (sdpa, gradient checkpointing)
  unsloth            ../shared/anchors/unsloth scripts when their wheels are carried (--unsloth-dir)

Usage (on the GPU machine)::

    python3 benchmarks/train_step.py --shapes llama-3-8b --grid 4x2048,1x8192 --out benchmarks/results/train_step.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.shapes import get  # noqa: E402

FASTJAX_SYSTEMS = ("fastjax-lora", "fastjax-qlora", "fastjax-packed", "plain-xla")


def _packed_segments(batch: int, seq: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, seq), np.int32)
    pos = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        n = int(rng.integers(4, 9))
        cuts = np.sort(rng.choice(np.arange(1, seq), n - 1, replace=False))
        bounds = [0, *cuts.tolist(), seq]
        for i in range(n):
            seg[b, bounds[i]:bounds[i + 1]] = i + 1
            pos[b, bounds[i]:bounds[i + 1]] = np.arange(bounds[i + 1] - bounds[i])
    return seg, pos


def run_fastjax(system: str, shape_name: str, batch: int, seq: int, steps: int, remat: str,
                ceiling: float) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from fastjax import lora as lora_mod
    from fastjax.models import registry
    from fastjax.models.ops import Ops
    from fastjax.trainer import make_loss_fn, make_train_step

    shape = get(shape_name)
    cfg = registry.config_from_hf(shape.hf_config())
    if system == "plain-xla":
        ops = Ops.all("xla")
    elif system == "xla-cudnn":  # plain XLA except cuDNN attention (the anchors' "plain JAX")
        ops = dataclasses.replace(Ops.all("xla"), attention="cudnn")
    elif system.startswith("ablate-"):  # fastjax-lora with one op forced: ablate-<op>=<impl>
        op, impl = system[len("ablate-"):].split("=")
        ops = dataclasses.replace(Ops(), **{op: impl})
    else:
        ops = Ops()
    params = common.random_params(cfg, jax.random.key(0), quantize=(system == "fastjax-qlora"))
    system = system.split(":")[0]
    lora, lcfg = lora_mod.get_peft_model(params, cfg, r=16, lora_alpha=16, target_modules="all-linear")
    scale = lora_mod.lora_scale(lcfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
    labels = np.concatenate([ids[:, 1:], np.full((batch, 1), -100, np.int32)], axis=1)
    if system == "fastjax-packed":
        seg, pos = _packed_segments(batch, seq, 0)
        labels = np.where(np.roll(seg, -1, axis=1) == seg, labels, -100)
    else:
        seg = np.ones((batch, seq), np.int32)
        pos = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    arrays = dict(input_ids=ids, labels=labels, positions=pos)
    if system == "fastjax-packed":  # one sequence per row needs no segment ids (cuDNN attention path)
        arrays["segment_ids"] = seg
    batch_arrays = {k: jnp.asarray(v)[None] for k, v in arrays.items()}  # [A=1, B, T]
    loss_sum = make_loss_fn(cfg, full_finetune=False, lora_scale=scale, lora_dropout=0.0,
                            remat_policy=remat, ops=ops)
    schedule = optax.constant_schedule(2e-4)
    opt = optax.adamw(schedule, weight_decay=0.0)
    opt_state = opt.init(lora)
    step = make_train_step(loss_sum, opt, schedule)
    key = jax.random.key(0)
    for i in range(2):
        lora, opt_state, metrics = step(lora, opt_state, params, batch_arrays, jnp.int32(i), key)
    jax.block_until_ready(metrics["loss"])
    t0 = time.perf_counter()
    for i in range(steps):
        lora, opt_state, metrics = step(lora, opt_state, params, batch_arrays, jnp.int32(i), key)
    jax.block_until_ready(metrics["loss"])
    loss = metrics["loss"]
    dt = (time.perf_counter() - t0) / steps
    tokens = batch * seq
    n = shape.n_params()
    attn = 4 * shape.num_hidden_layers * seq * seq * shape.q_dim * batch / 2 * 3
    return common.record(system=system, shape=shape_name, batch=batch, seq=seq, remat=remat,
                         tokens_per_s=round(tokens / dt), step_s=round(dt, 4),
                         peak_gib=round(common.peak_gib(), 2), loss=float(loss),
                         mfu=round((4 * n * tokens + attn) / dt / (ceiling * 1e12), 3), ops=repr(ops))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b")
    ap.add_argument("--grid", default="4x2048,1x8192", help="comma-separated BATCHxSEQ")
    ap.add_argument("--systems", default="fastjax-lora,fastjax-qlora,fastjax-packed,plain-xla,hf+peft")
    ap.add_argument("--remat", default="full", help="fastjax remat preset(s), comma-separated")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--proc-timeout", type=int, default=600, help="seconds per system process")
    ap.add_argument("--unsloth-dir", default=None, help="anchors dir with unsloth/ scripts (+ wheels)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one system
    ap.add_argument("--ceiling", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        shape, b, s, remat = args.one.split(":")[1:]
        row = run_fastjax(args.one.split(":")[0], shape, int(b), int(s), args.steps, remat, args.ceiling)
        print(json.dumps(row), flush=True)
        return

    ceilings = common.measure_ceilings()
    common.emit(common.record(system="ceilings", **{k: round(v, 1) for k, v in ceilings.items()}), args.out)
    here = str(Path(__file__).resolve())
    for shape in args.shapes.split(","):
        for cell in args.grid.split(","):
            b, s = (int(x) for x in cell.lower().split("x"))
            for system in args.systems.split(","):
                if system in FASTJAX_SYSTEMS or system.startswith(("ablate-", "xla-cudnn")):
                    for remat in args.remat.split(","):
                        rows = common.run_subprocess(
                            [here, "--steps", str(args.steps), "--ceiling", str(ceilings["matmul_tflops"]),
                             "--one", f"{system}:{shape}:{b}:{s}:{remat}"], timeout=args.proc_timeout)
                        for r in rows:
                            common.emit(dict(r, shape=shape, batch=b, seq=s), args.out)
                elif system == "hf+peft":
                    torch_script = str(Path(here).with_name("torch_systems.py"))
                    for r in common.run_subprocess([torch_script, "--shape", shape, "--batch", str(b),
                                                    "--seq", str(s), "--steps", str(args.steps)],
                                                   timeout=args.proc_timeout):
                        common.emit(common.record(**dict(r, system="hf+peft", shape=shape, batch=b,
                                                         seq=s)), args.out)
                else:
                    common.emit({"system": system, "skipped": "unknown system"}, args.out)


if __name__ == "__main__":
    main()
