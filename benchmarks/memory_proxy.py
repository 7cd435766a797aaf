"""Rank training-step memory configurations on a CPU: compile the real-size step, read its buffer sizes.

A GPU run measures peak memory; this needs no GPU. It builds the same program as ``train_step.py``
(``fastjax_systems.build_fastjax``) with abstract weights (nothing allocated), compiles it for the CPU
and reports ``compiled.memory_analysis()``: arguments (weights, adapters, optimizer state, batch),
temporaries and their sum. Two things make the CPU's numbers usable:

- ``--xla_disable_hlo_passes=while-loop-invariant-code-motion``: without it XLA:CPU hoists an fp32
  copy of every stacked bf16 weight out of the layer scan (the CPU has no bf16 dot), +30 GiB for an
  8B model, which no GPU program does.
- kernels in Pallas interpret mode (``--ops pallas``, the default; NF4 linears on the XLA path a GPU
  takes), so attention and cross-entropy keep their blockwise memory instead of the references'
  full score / logit tensors.

Calibration (Llama-3-8B, 4 x 2048, bf16 LoRA, full remat; H200 peaks from train_step_h200.jsonl): the
CPU's temporaries were 1.50-1.56x the H200's (peak minus arguments) at 1, 2 and 4 micro-batches, as
the CPU computes in fp32. So it ranks candidates (and estimates a GPU peak as arguments + temporaries /
``--gpu-ratio``); the GPU row decides. NF4 (QLoRA) steps ran 1.69x at one micro-batch: each layer's
dequantized weight is an fp32 temporary on the CPU, a bf16 one on the GPU. Batch 1 x 8192 (same
tokens) predicts 19.94 / 10.07 GiB against 19.95 / 10.06 measured.

Checked against later GPU rows (H200, session 16, predicted before the run):
- bf16, 2 micro-batches, MLP in 1024 / 512-token slices: predicted 17.84 / 17.63, measured 17.84 / 17.65.
- NF4 at ratio 1.69: 2 micro-batches with 512-token slices predicted 7.84, measured 8.19 (ratio 1.44 there);
  4 micro-batches predicted 7.28, measured 7.34 (1.62).
So NF4 estimates can run a few tenths of a GiB low. The ratio does not carry over to
other remat policies: with ``remat="none"`` it predicts 41.8 GiB (bf16) and 33.3 (NF4) against 53.87
and 44.12 measured, so compare candidates within one policy only.

Usage::

    python benchmarks/memory_proxy.py --shape llama-3-8b --batch 4 --seq 2048 --micro-rows 0,2 \\
        --mlp-chunk-size 0,1024,512     # every combination: one JSON line each
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402

NO_HOIST = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
GPU_RATIO = 1.53  # CPU temporaries / H200 temporaries, measured (module docstring)


def _ensure_flags() -> None:
    """Put ``NO_HOIST`` in XLA_FLAGS; XLA reads it when jax creates its CPU client, so it must come
    first."""
    if not harness.add_xla_flag(NO_HOIST, present=NO_HOIST):
        raise RuntimeError(f"jax already started: run with XLA_FLAGS={NO_HOIST!r}")


def proxy(
    system: str,
    shape,
    batch: int,
    seq: int,
    *,
    remat: str = "full",
    micro_rows: int | None = None,
    mlp_chunk_size: int | None = None,
    ops: str = "pallas",
    gpu_ratio: float = GPU_RATIO,
    embed_on_host: bool = False,
) -> dict:
    """Compile one configuration abstractly; return its buffer sizes in GiB."""
    import jax
    from fastjax.models.ops import Ops

    from benchmarks import fastjax_systems

    if ops == "pallas":
        # Every kernel interpreted, NF4 linears as on a GPU (models.ops.Ops.resolve). The GLU stays the
        # Pallas kernel, which the calibration rows ran; on the H200 the peak was the same with
        # glu=xla_recompute (19.95 GiB both, train_step_h200.md session 16).
        ops_obj = dataclasses.replace(Ops.all("pallas", interpret=True), linear="auto")
        # a system's forced ops (``NAME@OP=IMPL``) on top, e.g. ``@cross_entropy=xla_fused_grad``
        ops_obj = dataclasses.replace(ops_obj, **fastjax_systems.split_system(system)[1])
    elif ops == "system":
        ops_obj = None
    else:
        raise ValueError(f"ops={ops!r}: 'pallas' or 'system'")
    t0 = time.perf_counter()
    built = fastjax_systems.build_fastjax(
        system,
        shape,
        batch,
        seq,
        remat=remat,
        micro_rows=micro_rows,
        mlp_chunk_size=mlp_chunk_size,
        embed_on_host=embed_on_host,
        abstract=True,
        ops=ops_obj,
    )
    step_i = jax.ShapeDtypeStruct((), jax.numpy.int32)
    compiled = built.step.lower(
        built.lora, built.opt_state, built.params, built.micro, step_i, built.key
    ).compile()
    m = compiled.memory_analysis()
    gib = lambda n: round(n / 2**30, 3)
    args_b = m.argument_size_in_bytes
    live_out = m.output_size_in_bytes - m.alias_size_in_bytes  # outputs not donated into arguments
    temp = m.temp_size_in_bytes
    return dict(
        kind="memory_proxy",
        **built.base,
        ops=ops,
        backend=jax.default_backend(),
        arguments_gib=gib(args_b),
        temporaries_gib=gib(temp),
        live_outputs_gib=gib(live_out),
        total_gib=gib(args_b + live_out + temp),
        gpu_peak_estimate_gib=gib(args_b + live_out + temp / gpu_ratio),
        gpu_ratio=gpu_ratio,
        compile_s=round(time.perf_counter() - t0, 1),
    )


def _ints(text: str) -> list[int | None]:
    return [None if x in ("0", "none", "") else int(x) for x in text.split(",")]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", default="fastjax-lora", help="a train_step.py fastjax system")
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--remat", default="full")
    p.add_argument("--micro-rows", default="0", help="comma list; rows per micro-batch (0: one)")
    p.add_argument(
        "--mlp-chunk-size", default="0", help="comma list; tokens per MLP slice (0: none)"
    )
    p.add_argument("--ops", default="pallas", choices=("pallas", "system"))
    p.add_argument("--gpu-ratio", type=float, default=GPU_RATIO)
    p.add_argument(
        "--embed-on-host", action="store_true", help="the input embedding in host memory"
    )
    a = p.parse_args(argv)
    _ensure_flags()
    rows = []
    for micro in _ints(a.micro_rows):
        for chunk in _ints(a.mlp_chunk_size):
            row = proxy(
                a.system,
                a.shape,
                a.batch,
                a.seq,
                remat=a.remat,
                micro_rows=micro,
                mlp_chunk_size=chunk,
                ops=a.ops,
                gpu_ratio=a.gpu_ratio,
                embed_on_host=a.embed_on_host,
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
