"""Training-step benchmark: fastjax vs transformers+PEFT vs Unsloth vs plain XLA, in one invocation.

Every system runs in its own process, one after the other, on the same GPU, with random weights
built on the device, the same shapes, token ids (``harness.token_batch``, seed 0) and token counts:
``--warmup`` (2) warm-up steps, then ``--steps`` (6) timed steps. The parent never creates a device
client (``harness``): the first child measures the bf16 matmul ceiling, and every row of the
invocation gets MFU = (4·N·tokens + attention FLOPs) / step time / that ceiling
(``harness.train_flops``), plus tokens/s, step time, peak device memory, GPU, versions, date,
``run_id`` and the command.

Systems (``--systems``; default all but ``xla-cudnn``):
  fastjax-lora    bf16 base, fp32 LoRA r=16 alpha=16 on all 7 projections, Pallas kernels
                  (``auto``), fused CE
  fastjax-qlora   NF4 base (double-quantized absmax), same adapters
  fastjax-lean    fastjax-lora with the lean preset: ``--lean-remat`` (offload_layer_input: the
                  scan carry goes to pinned host memory) and micro-batches of ``--lean-rows`` rows
                  (gradient accumulation, the same tokens per step); aims at <= 17.8 GiB on
                  Llama-3-8B (Unsloth 16-bit LoRA's peak)
  fastjax-qlora-lean  fastjax-qlora with the same lean preset; aims at <= 8.2 GiB (Unsloth QLoRA's)
  fastjax-packed  fastjax-lora on rows of 4-8 packed segments (less attention work: MFU counts it),
                  with the rows' segment bound, so attention takes cuDNN's packed layout
  plain-xla       the same model with every op on its XLA reference (``Ops.all("xla")``)
  xla-cudnn       plain XLA except cuDNN attention (the "plain JAX" row of ../shared/ANCHORS.md)
  ablate-OP=IMPL  fastjax-lora with one op forced, e.g. ``ablate-cross_entropy=xla_chunked``
  NAME@OP=IMPL    any fastjax system above with ops forced, e.g. ``fastjax-qlora@glu=pallas``
  hf+peft         ``torch_systems.py``: sdpa, gradient checkpointing, bf16
  hf+peft-qlora   ``torch_systems.py --qlora``: bitsandbytes NF4 (bitsandbytes from the Unsloth
                  site dir when it is not installed)
  unsloth-lora    ``unsloth_runner.py``: Unsloth 16-bit LoRA, from the wheels in ``--unsloth-dir``
  unsloth-qlora   ``unsloth_runner.py --qlora``
A system that cannot run here (no GPU, torch / bitsandbytes / Unsloth absent) yields a ``skipped``
row.

Usage (GPU machine, repo root; ``--budget-s`` stops starting systems in time for a 10-minute call)::

    python3 benchmarks/train_step.py --shapes llama-3-8b --grid 4x2048 --unsloth-dir .whl-b \\
        --budget-s 560 --out benchmarks/results/train_step_h200.jsonl
    python3 benchmarks/train_step.py --dry-run        # print the plan (child command lines) only
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

from benchmarks import harness  # noqa: E402
from benchmarks.fastjax_systems import build_fastjax, config_row, split_system  # noqa: E402
from benchmarks.shapes import ModelShape, get  # noqa: E402

HERE = Path(__file__).resolve().parent
# How a fastjax child treats XLA's command buffers (CUDA graphs) under host offload
# (``fastjax.remat``): ``env`` as the CLI does, ``options`` as the Trainer does once jax has started,
# ``xla`` leaves XLA's default.
COMMAND_BUFFERS = ("env", "options", "xla")
FASTJAX_SYSTEMS = (
    "fastjax-lora",
    "fastjax-qlora",
    "fastjax-lean",
    "fastjax-qlora-lean",
    "fastjax-packed",
    "plain-xla",
    "xla-cudnn",
)
LEAN_SYSTEMS = ("fastjax-lean", "fastjax-qlora-lean")  # run with --lean-remat / --lean-rows
TORCH_SYSTEMS = ("hf+peft", "hf+peft-qlora")
UNSLOTH_SYSTEMS = ("unsloth-lora", "unsloth-qlora")
DEFAULT_SYSTEMS = (
    "fastjax-lora",
    "fastjax-qlora",
    "fastjax-lean",
    "fastjax-qlora-lean",
    "fastjax-packed",
    "plain-xla",
    "hf+peft",
    "hf+peft-qlora",
    "unsloth-lora",
    "unsloth-qlora",
)
ENV_ALLOW_CPU = "FASTJAX_BENCH_ALLOW_CPU"  # tests: let a fastjax child run on the CPU backend


# ---------------------------------------------------------------------------- fastjax, in the child
def run_fastjax(
    system: str,
    shape: str | ModelShape,
    batch: int,
    seq: int,
    *,
    steps: int = 6,
    warmup: int = 2,
    remat: str = "full",
    micro_rows: int | None = None,
    mlp_chunk_size: int | None = None,
    scan_layers: bool = True,
    embed_on_host: bool = False,
    command_buffers: str = "env",
    num_devices: int = 1,
    mesh_data: int = 1,
) -> dict:
    """One fastjax (or plain-XLA) configuration in this process; returns its row.

    ``num_devices``: run the step on that many devices with the trainer's layout
    (``fastjax_systems.build_fastjax``; ``mesh_data`` devices on the data axis, the rest on fsdp);
    ``batch`` is then the global batch.

    ``mlp_chunk_size``: tokens per MLP slice (``models.decoder.forward``; long-context memory).
    ``scan_layers=False``: the layers as a Python loop (``models.decoder.forward``).
    ``embed_on_host``: the input embedding in host memory, its rows gathered every step
    (``fastjax.host_embed``).
    ``command_buffers``: ``COMMAND_BUFFERS``' names; the child applies ``env`` before jax starts,
    this function compiles the step with ``fastjax.remat.compiler_options`` unless ``xla``.

    ``micro_rows``: rows per micro-batch (the step scans over ``batch // micro_rows`` micro-batches
    and accumulates gradients); ``None`` is one micro-batch of all rows. Device out-of-memory errors
    come back as an ``oom`` row.
    """
    import jax

    from benchmarks import common

    if steps < 1:
        raise ValueError(f"{steps=}: at least one timed step")
    shape = shape if isinstance(shape, ModelShape) else get(shape)
    kw = dict(
        remat=remat,
        micro_rows=micro_rows,
        mlp_chunk_size=mlp_chunk_size,
        scan_layers=scan_layers,
        embed_on_host=embed_on_host,
    )
    base = config_row(system, shape, batch, seq, **kw)
    if command_buffers != "env":
        base["command_buffers"] = command_buffers
    if num_devices > 1:
        base.update(
            num_devices=num_devices, mesh={"data": mesh_data, "fsdp": num_devices // mesh_data}
        )
    t_start = time.perf_counter()
    try:
        built = build_fastjax(
            system,
            shape,
            batch,
            seq,
            num_devices=num_devices,
            mesh_data=mesh_data,
            compiler_options=command_buffers != "xla",
            **kw,
        )
        if "compiler_options" in built.base:
            base["compiler_options"] = built.base["compiler_options"]
        first_s = None  # compilation + one step (with warm-up); else the timed steps include it
        for i in range(warmup):
            t0 = time.perf_counter()
            metrics = built.run(i)
            jax.block_until_ready(metrics["loss"])
            first_s = first_s or round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        for i in range(steps):
            metrics = built.run(warmup + i)
        jax.block_until_ready(metrics["loss"])
        dt = (time.perf_counter() - t0) / steps
    except Exception as e:  # XLA reports device OOM as an exception naming RESOURCE_EXHAUSTED
        if harness.is_oom(str(e)):
            return harness.record(
                **base,
                ok=False,
                oom=True,
                bytes_limit_gib=common.bytes_limit_gib(),
                error=f"{type(e).__name__}: {str(e)[:300]}",
            )
        raise
    return harness.record(
        **base,
        ok=True,
        tokens_per_s=round(batch * seq / dt),
        step_s=round(dt, 4),
        peak_gib=round(common.peak_gib(), 2),
        bytes_limit_gib=common.bytes_limit_gib(),
        loss=float(metrics["loss"]),
        first_step_s=first_s,
        timed_includes_compile=not warmup,
        setup_s=round(time.perf_counter() - t_start, 1),
        warmup=warmup,
        steps=steps,
        model_flops=harness.train_flops(shape, batch, seq, built.lengths),
        ops=repr(built.ops),
    )


def _child_ceilings() -> dict:
    from benchmarks import common

    c = common.measure_ceilings()
    return harness.record(system="ceilings", **{k: round(v, 1) for k, v in c.items()})


def _child(args) -> None:
    if args.one != "ceilings" and args.command_buffers == "env":
        from fastjax import remat  # imports jax; its backend starts (and reads XLA_FLAGS) later

        remat.command_buffers_off_in_env(args.remat)
    import jax

    if jax.default_backend() != "gpu" and not os.environ.get(ENV_ALLOW_CPU):
        cell = (
            {} if args.one == "ceilings" else dict(shape=args.shape, batch=args.batch, seq=args.seq)
        )
        row = harness.skipped(args.one, f"no GPU: jax backend is {jax.default_backend()!r}", **cell)
    elif args.one == "ceilings":
        row = _child_ceilings()
    else:
        row = run_fastjax(
            args.one,
            args.shape,
            args.batch,
            args.seq,
            steps=args.steps,
            warmup=args.warmup,
            remat=args.remat,
            micro_rows=args.micro_rows,
            mlp_chunk_size=args.mlp_chunk_size,
            scan_layers=not args.unroll_layers,
            embed_on_host=args.embed_on_host,
            command_buffers=args.command_buffers,
        )
    print(json.dumps(row), flush=True)


# --------------------------------------------------------------------------------------- the parent
@dataclasses.dataclass(frozen=True)
class Job:
    """One child process: ``system`` on one grid cell, run as ``python argv...`` with ``env``."""

    system: str
    shape: str
    batch: int
    seq: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str | None], ...] = ()
    needs_site: bool = (
        False  # the Unsloth site dir goes on PYTHONPATH (Unsloth; bitsandbytes for HF)
    )


def parse_grid(grid: str) -> list[tuple[int, int]]:
    cells = []
    for cell in grid.split(","):
        b, s = cell.lower().strip().split("x")
        cells.append((int(b), int(s)))
    return cells


def fastjax_argv(
    system: str,
    shape: str,
    batch: int,
    seq: int,
    *,
    steps: int,
    warmup: int,
    remat: str,
    micro_rows: int | None = None,
    mlp_chunk_size: int | None = None,
    scan_layers: bool = True,
    embed_on_host: bool = False,
    command_buffers: str = "env",
) -> tuple[str, ...]:
    argv = [
        str(HERE / "train_step.py"),
        "--one",
        system,
        "--shape",
        shape,
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--remat",
        remat,
    ]
    if micro_rows:
        argv += ["--micro-rows", str(micro_rows)]
    if mlp_chunk_size:
        argv += ["--mlp-chunk-size", str(mlp_chunk_size)]
    if not scan_layers:
        argv.append("--unroll-layers")
    if embed_on_host:
        argv.append("--embed-on-host")
    if command_buffers != "env":
        argv += ["--command-buffers", command_buffers]
    return tuple(argv)


def torch_argv(
    system: str,
    shape: str,
    batch: int,
    seq: int,
    *,
    steps: int,
    warmup: int,
    checkpoint_root: str | None = None,
    cap_gib: float | None = None,
) -> tuple[str, ...]:
    """The child command of an HF+PEFT (``torch_systems.py``) or Unsloth (``unsloth_runner.py``)
    system."""
    script = "unsloth_runner.py" if system.startswith("unsloth") else "torch_systems.py"
    argv = [str(HERE / script), "--shape", shape, "--batch", str(batch), "--seq", str(seq)]
    argv += ["--steps", str(steps), "--warmup", str(warmup)]
    if cap_gib:
        argv += ["--cap-gib", str(cap_gib)]
    if system.endswith("qlora"):
        argv.append("--qlora")
    if checkpoint_root:
        argv += ["--checkpoint-root", checkpoint_root]
    return tuple(argv)


def plan(args) -> list[Job]:
    """Every child process of this invocation, in run order (shape, then cell, then system)."""
    jobs = []
    common_steps = dict(
        steps=args.steps,
        warmup=args.warmup,
        mlp_chunk_size=args.mlp_chunk_size,
        scan_layers=not args.unroll_layers,
        embed_on_host=args.embed_on_host,
        command_buffers=args.command_buffers,
    )
    for shape in args.shapes.split(","):
        get(shape)  # unknown names fail here, before any device time is spent
        for b, s in parse_grid(args.grid):
            for system in args.systems.split(","):
                name = split_system(system)[0]
                if name in LEAN_SYSTEMS:
                    rows = min(args.lean_rows, b) if args.lean_rows else None
                    argv = fastjax_argv(
                        system, shape, b, s, remat=args.lean_remat, micro_rows=rows, **common_steps
                    )
                    jobs.append(Job(system, shape, b, s, argv))
                elif name in FASTJAX_SYSTEMS or system.startswith("ablate-"):
                    for remat in args.remat.split(","):
                        argv = fastjax_argv(system, shape, b, s, remat=remat, **common_steps)
                        jobs.append(Job(system, shape, b, s, argv))
                elif system in TORCH_SYSTEMS or system in UNSLOTH_SYSTEMS:
                    argv = torch_argv(
                        system,
                        shape,
                        b,
                        s,
                        steps=args.steps,
                        warmup=args.warmup,
                        checkpoint_root=args.checkpoint_root,
                    )
                    jobs.append(Job(system, shape, b, s, argv, needs_site=system != "hf+peft"))
                else:
                    jobs.append(Job(system, shape, b, s, ()))  # unknown: a skipped row, no process
    return jobs


def run_jobs(jobs: list[Job], args, *, ceiling: float | None) -> list[dict]:
    """Run ``jobs`` one after the other; emit (and return) every row, MFU filled in from
    ``ceiling``."""
    budget = harness.Budget(args.budget_s)
    site, site_why = None, None
    site_tried = False
    out = []

    def put(row: dict) -> None:
        harness.emit(row, args.out)
        out.append(row)

    for job in jobs:
        cell = dict(shape=job.shape, batch=job.batch, seq=job.seq)
        if not job.argv:
            put(
                harness.skipped(
                    job.system,
                    f"unknown system (known: {', '.join(DEFAULT_SYSTEMS)}, "
                    "xla-cudnn, ablate-OP=IMPL)",
                    **cell,
                )
            )
            continue
        env = dict(job.env)
        if job.needs_site:
            if not site_tried:
                site, site_why = unsloth_site(args)
                site_tried = True
            if site is not None:
                from benchmarks import unsloth_runner

                env.update(unsloth_runner.child_env(site))
            elif job.system in UNSLOTH_SYSTEMS:
                put(harness.skipped(job.system, site_why, **cell))
                continue
        timeout = budget.timeout(args.proc_timeout)
        if timeout is None:
            put(
                harness.skipped(
                    job.system,
                    f"--budget-s {args.budget_s:.0f} spent before this system started",
                    **cell,
                )
            )
            continue
        for r in harness.run_subprocess(
            list(job.argv), env=env, timeout=timeout, system=job.system
        ):
            r = harness.record(**{**cell, "system": job.system, **r})  # context for error rows too
            if "step_s" in r:
                r["ceiling_tflops"] = ceiling
                r["mfu"] = harness.mfu(r.get("model_flops"), r["step_s"], ceiling)
            put(r)
    return out


def unsloth_site(args) -> tuple[Path | None, str | None]:
    from benchmarks import unsloth_runner

    return unsloth_runner.prepare_site(args.unsloth_dir, args.unsloth_site)


def measure_ceiling(args) -> float | None:
    """The bf16 matmul ceiling (TFLOP/s) measured by a child now, or ``--ceiling`` when given."""
    if args.ceiling:
        return args.ceiling
    rows = harness.run_subprocess(
        [str(HERE / "train_step.py"), "--one", "ceilings"],
        timeout=min(300, args.proc_timeout),
        system="ceilings",
    )
    row = harness.record(**rows[-1])
    harness.emit(row, args.out)
    return row.get("matmul_tflops")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b")
    ap.add_argument("--grid", default="4x2048,1x8192", help="comma-separated BATCHxSEQ")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS))
    ap.add_argument("--remat", default="full", help="fastjax remat preset(s), comma-separated")
    ap.add_argument(
        "--mlp-chunk-size",
        type=int,
        default=None,
        help="fastjax: tokens per MLP slice (default: the whole micro-batch at once)",
    )
    ap.add_argument(
        "--unroll-layers",
        action="store_true",
        help="fastjax: the layers as a Python loop instead of one lax.scan",
    )
    ap.add_argument(
        "--embed-on-host",
        action="store_true",
        help="fastjax: the input embedding in host memory, rows gathered each step (fastjax.host_embed)",
    )
    ap.add_argument(
        "--command-buffers",
        choices=COMMAND_BUFFERS,
        default="env",
        help="fastjax under host offload: env = XLA_FLAGS switch before jax starts (the CLI's), "
        "options = per-step compiler options (the Trainer's in a started process), xla = XLA's default",
    )
    ap.add_argument(
        "--lean-remat",
        default="offload_layer_input",
        help="remat preset of fastjax-lean and fastjax-qlora-lean",
    )
    ap.add_argument(
        "--lean-rows",
        type=int,
        default=1,
        help="rows per micro-batch of the lean systems (0: one micro-batch)",
    )
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--proc-timeout", type=float, default=600, help="seconds per system process")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="wall-clock budget of the invocation: no system starts after it (0: none)",
    )
    ap.add_argument(
        "--unsloth-dir",
        default=os.environ.get("FASTJAX_UNSLOTH_DIR"),
        help="carried Unsloth wheels (a folder of *.whl, or one holding .whl-b/)",
    )
    ap.add_argument("--unsloth-site", default=None, help="private site dir the wheels go into")
    ap.add_argument(
        "--checkpoint-root",
        default=None,
        help="where HF-QLoRA / Unsloth find (or write) random checkpoints",
    )
    ap.add_argument("--ceiling", type=float, default=None, help="matmul TFLOP/s (skip measuring)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    # internal: one fastjax system (or "ceilings") in this process
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="llama-3-8b", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--micro-rows", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit(f"--steps {args.steps}: at least one timed step")
    if args.unsloth_site is None:
        from benchmarks import unsloth_runner

        args.unsloth_site = str(unsloth_runner.DEFAULT_SITE)
    if args.one:
        _child(args)
        return []
    jobs = plan(args)
    if args.dry_run:
        for job in jobs:
            env = " ".join(f"{k}={v}" for k, v in job.env)
            site = " [+unsloth site]" if job.needs_site else ""
            print(
                f"{job.system:16s} {job.shape} {job.batch}x{job.seq}: {env} python3 "
                f"{' '.join(job.argv) or '(skipped: unknown system)'}{site}"
            )
        return []
    harness.run_id(), harness.command()  # one context for the parent and every child
    return run_jobs(jobs, args, ceiling=measure_ceiling(args))


if __name__ == "__main__":
    main()
