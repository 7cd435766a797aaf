"""Multi-GPU scaling: one fastjax configuration's tokens/s on 1, 2, 4 and 8 devices of one host.

Each device count runs in its own process (``train_step.run_fastjax(num_devices=N)``: the trainer's
layout from ``fastjax.sharding``: frozen weights FSDP-sharded, adapters and optimizer state
replicated, rows split over the mesh, kernels per shard), one after the other, with the same random
weights, token ids and step counts. Weak scaling by default: ``--rows-per-device`` rows each, so N
devices train N times the tokens per step; ``--global-rows`` fixes the global batch instead (strong
scaling: every device count then computes the same loss). ``--layout dp`` replicates the frozen
weights instead (plain data parallel: no per-layer all-gathers, a whole model per device). Every row gets
``scaling_efficiency = tokens/s(N) / (N * tokens/s(1))`` from the 1-device row of the same invocation.

NVLink multicast stays off in every child (``NCCL_NVLS_ENABLE=0`` and the rest of the device README's
list), whatever the environment says.

Usage (GPU machine, repo root)::

    python3 benchmarks/scaling.py --devices 1,2,4,8 --out benchmarks/results/scaling_h200.jsonl
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scaling.py --allow-cpu ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness, shapes  # noqa: E402

HERE = Path(__file__).resolve().parent
NO_MULTICAST = {  # the device README: multicast can take a shared host's GPUs out of service
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def _child(args) -> None:
    import jax

    from benchmarks import train_step

    n = args.one
    cell = dict(system=args.system, shape=args.shape, seq=args.seq, num_devices=n)
    if jax.default_backend() != "gpu" and not args.allow_cpu:
        row = harness.skipped(
            args.system, f"no GPU: jax backend is {jax.default_backend()!r}", **cell
        )
    elif jax.device_count() < n:
        row = harness.skipped(
            args.system, f"{n} devices asked, {jax.device_count()} visible", **cell
        )
    else:
        rows = args.global_rows or args.rows_per_device * n
        shape = shapes.get(args.shape)
        if args.layers:
            shape = dataclasses.replace(shape, num_hidden_layers=args.layers)
        row = train_step.run_fastjax(
            args.system,
            shape,
            rows,
            args.seq,
            steps=args.steps,
            warmup=args.warmup,
            remat=args.remat,
            num_devices=n,
            mesh_data=n if args.layout == "dp" else 1,
        )
        row = dict(
            row,
            num_devices=n,
            num_hidden_layers=shape.num_hidden_layers,  # fewer than the named shape's with --layers
            device_kind=str(jax.devices()[0].device_kind),
            nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"),  # provenance: multicast off
        )
    print(json.dumps(row), flush=True)


def with_efficiency(rows: list[dict]) -> list[dict]:
    """``scaling_efficiency`` and ``tokens_per_s_per_device`` on every timed row, against the
    1-device row (None without one)."""
    one = next((r for r in rows if r.get("num_devices") == 1 and r.get("tokens_per_s")), None)
    out = []
    for r in rows:
        r = dict(r)
        tps, n = r.get("tokens_per_s"), r.get("num_devices")
        if tps and n:
            r["tokens_per_s_per_device"] = round(tps / n)
            r["scaling_efficiency"] = round(tps / (n * one["tokens_per_s"]), 3) if one else None
        out.append(r)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="1,2,4,8", help="device counts, comma-separated")
    p.add_argument("--system", default="fastjax-packed", help="a train_step.py fastjax system")
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--layers", type=int, default=0, help="keep only this many layers (0: all)")
    p.add_argument("--rows-per-device", type=int, default=4, help="weak scaling (the default)")
    p.add_argument("--global-rows", type=int, default=0, help="strong scaling: fixed global rows")
    p.add_argument("--remat", default="full")
    p.add_argument(
        "--layout",
        default="fsdp",
        choices=("fsdp", "dp"),
        help="fsdp: frozen weights sharded over every device (the trainer's default); dp: replicated",
    )
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--proc-timeout", type=float, default=600)
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU devices (tests)")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.one is not None:
        _child(args)
        return []
    counts = [int(x) for x in args.devices.split(",")]
    if 1 not in counts:
        counts = [1, *counts]  # efficiency needs the 1-device row of the same invocation
    harness.run_id(), harness.command()
    forwarded = [
        "--system", args.system, "--shape", args.shape, "--seq", str(args.seq),
        "--layers", str(args.layers),
        "--rows-per-device", str(args.rows_per_device), "--global-rows", str(args.global_rows),
        "--remat", args.remat, "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--layout", args.layout,
    ]  # fmt: skip
    if args.allow_cpu:
        forwarded.append("--allow-cpu")
    rows = []
    for n in counts:
        got = harness.run_subprocess(
            [str(HERE / "scaling.py"), *forwarded, "--one", str(n)],
            env=NO_MULTICAST,
            timeout=args.proc_timeout,
            system=args.system,
        )
        rows += [dict(r, num_devices=r.get("num_devices", n)) for r in got]
    rows = with_efficiency(rows)
    for r in rows:
        harness.emit(harness.record(**r), args.out)
    print("\n| devices | tokens/s | per device | efficiency | step s | peak GiB (device 0) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.get("tokens_per_s"):
            print(
                f"| {r['num_devices']} | {r['tokens_per_s']:,} | {r['tokens_per_s_per_device']:,} | "
                f"{r['scaling_efficiency']} | {r['step_s']} | {r['peak_gib']} |"
            )
        else:
            why = r.get("skipped") or str(r.get("error", ""))[:100]
            print(f"| {r.get('num_devices')} | - | - | - | - | {why} |")
    return rows


if __name__ == "__main__":
    main()
