"""Where one training step's device time goes: a fastjax configuration traced, kernels attributed to ops.

``train_step.py`` says how fast a configuration is; this says which op costs the time (issue 9: "where a
target is missed, say which op costs it"). It builds the same program (``fastjax_systems.build_fastjax``),
warms it up, traces ``--steps`` steps with ``jax.profiler`` (a Perfetto JSON trace), and attributes each
device kernel to a model op through the compiled HLO: the trace names each kernel's HLO instruction
(``hlo_op``), the HLO metadata names the JAX scope it came from (``models.ops`` runs every op under
``jax.named_scope``: ``attention``, ``glu``, ``rms_norm``, ``rope``, ``cross_entropy``, ``lora``; the
decoder names each projection, ``q_proj`` ... ``down_proj``, and ``embed``; the train step
``grad_accum`` and ``optimizer``), and an op under ``transpose(...)`` is backward work. Kernels are also classed by kind (GEMM, cuDNN, Triton/Pallas, XLA fusion, copies).

Usage (GPU machine, repo root)::

    python3 benchmarks/profile_step.py --shape llama-3-8b --batch 4 --seq 2048 --system fastjax-lora \\
        --remat full --out $OUT/profile

Writes ``<out>/profile.json`` (every table, the run's versions and command) and ``<out>/trace/`` (the
raw trace, for Perfetto), and prints the tables last. On a CPU backend the same code reads XLA:CPU's
thunk events (what the tests run); device time there means host time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from fastjax._io import atomic_write_json  # noqa: E402

# Innermost scope wins: a LoRA matmul inside q_proj is "lora", the rest of q_proj is "q_proj".
OP_SCOPES = (
    "lora",
    "attention",
    "rope",
    "rms_norm_residual",
    "rms_norm",
    "glu",
    "cross_entropy",
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
    "embed",
    "grad_accum",
    "optimizer",
)
_KIND_PATTERNS = (  # (kind, regex over the kernel name), first match wins
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("cudnn", re.compile(r"cudnn|fmha|flash_(fprop|bprop)|sdpa", re.I)),
    ("gemm", re.compile(r"gemm|xmma|cutlass|nvjet|cublas|wgmma|_mma_|ampere_|sm\d\d_", re.I)),
    ("pallas", re.compile(r"^fastjax_")),
    ("nccl", re.compile(r"nccl", re.I)),
)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\([^)]*\)\s*->.*)?\{\s*$")


# ------------------------------------------------------------------------------- attribution (pure)
def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """``instruction name -> op_name`` from optimized HLO text. An instruction without metadata (a
    fusion, say) takes the op_name of the first instruction in the computation it calls that has one
    (fusions inherit their root's scope)."""
    own: dict[str, str] = {}
    calls: dict[str, str] = {}
    first_in: dict[str, str] = {}
    comp = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and "=" not in line.split("{")[0]:
            comp = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.groups()
        op = _OP_NAME.search(rest)
        if op:
            own[name] = op.group(1)
            if comp is not None:
                first_in.setdefault(comp, op.group(1))
        c = _CALLS.search(rest)
        if c:
            calls[name] = c.group(1)
    out = dict(own)
    for name, comp_name in calls.items():
        if name not in out and comp_name in first_in:
            out[name] = first_in[comp_name]
    return out


def scope_of(op_name: str) -> str:
    """The model op an HLO op belongs to: the innermost known scope on its path, else ``other``."""
    parts = re.split(r"[/()]", op_name)
    best, best_pos = "other", -1
    for i, part in enumerate(parts):
        if part in OP_SCOPES and i >= best_pos:
            best, best_pos = part, i
    return best


def pass_of(op_name: str) -> str:
    """``bwd`` for transposed (backward) ops, ``fwd`` otherwise (remat recomputation included)."""
    return "bwd" if "transpose(" in op_name else "fwd"


def kind_of(kernel: str, hlo_op: str = "") -> str:
    """Kernel kind from its name; a kernel launched by a ``pallas_call`` HLO instruction is ``pallas``
    whatever the kernel is called (only attention's kernels carry the ``fastjax_`` prefix)."""
    if hlo_op.startswith("pallas_call"):
        return "pallas"
    for kind, pat in _KIND_PATTERNS:
        if pat.search(kernel):
            return kind
    return "xla_fusion"


def device_events(trace: dict) -> tuple[list[dict], str]:
    """Complete events of the accelerator processes (``/device:GPU:*``; only their stream lines when
    the trace names them), else (CPU backend) every leaf event that names an HLO op. Returns
    ``(events, where)``."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    gpu = {pid for pid, n in names.items() if "GPU" in n or "gpu" in n}
    xs = [e for e in events if e.get("ph") == "X" and e.get("dur") is not None]
    if gpu:
        # Kernels live on the stream lines; lines derived from them ("XLA Ops", "XLA Modules",
        # "Steps") would count the same time again.
        threads = {
            (e["pid"], e.get("tid")): e.get("args", {}).get("name", "")
            for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in gpu
        }
        streams = {k for k, n in threads.items() if "stream" in n.lower()}
        keep = (lambda e: (e["pid"], e.get("tid")) in streams) if streams else None
        return [e for e in xs if e["pid"] in gpu and (keep is None or keep(e))], "gpu"
    return _leaves([e for e in xs if (e.get("args") or {}).get("hlo_op")]), "host"


def _leaves(events: list[dict]) -> list[dict]:
    """Drop events that enclose another event of their thread: XLA:CPU traces a ``while`` thunk
    around the thunks of its body, which would count the body twice."""
    out = []
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e.get("tid"))].append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack: list[list] = []  # [event, end, has_child]
        for e in evs:
            start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
            while stack and stack[-1][1] <= start:
                top = stack.pop()
                if not top[2]:
                    out.append(top[0])
            if stack and end <= stack[-1][1]:
                stack[-1][2] = True
            stack.append([e, end, False])
        out += [top[0] for top in stack if not top[2]]
    return out


def busy_us(events: list[dict]) -> float:
    """Time with at least one kernel running (the union of the events' intervals), microseconds."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events)
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def attribute(events: list[dict], op_names: dict[str, str], steps: int) -> dict:
    """Per-step milliseconds by op, by (op, pass), by kernel kind, and the top kernels."""
    by_op: collections.Counter = collections.Counter()
    by_op_pass: collections.Counter = collections.Counter()
    by_kind: collections.Counter = collections.Counter()
    kernels: dict[tuple, list] = {}
    unmatched = 0.0
    for e in events:
        ms = float(e["dur"]) / 1e3 / steps
        args = e.get("args") or {}
        hlo = args.get("hlo_op") or e["name"]
        op_name = op_names.get(hlo)
        if op_name is None:
            unmatched += ms
        op = scope_of(op_name or "")
        ps = pass_of(op_name or "")
        kind = kind_of(e["name"], hlo)
        by_op[op] += ms
        by_op_pass[f"{op} {ps}"] += ms
        by_kind[kind] += ms
        k = kernels.setdefault((e["name"], hlo, op, ps, kind), [0.0, 0])
        k[0] += ms
        k[1] += 1
    total = sum(by_op.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:30]
    return {
        "kernel_ms_per_step": round(total, 3),
        "busy_ms_per_step": round(busy_us(events) / 1e3 / steps, 3),
        "unattributed_ms_per_step": round(unmatched, 3),
        "by_op": {k: round(v, 3) for k, v in by_op.most_common()},
        "by_op_pass": {k: round(v, 3) for k, v in by_op_pass.most_common()},
        "by_kind": {k: round(v, 3) for k, v in by_kind.most_common()},
        "top_kernels": [
            dict(
                kernel=n[:120],
                hlo_op=h,
                op=o,
                pass_=p,
                kind=kd,
                ms=round(v[0], 3),
                calls=v[1] / steps,
            )
            for (n, h, o, p, kd), v in top
        ],
    }


def read_trace(trace_dir: str) -> dict:
    paths = sorted(Path(trace_dir).rglob("*perfetto_trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        return json.load(f)


def tables(res: dict) -> str:
    """The short tables printed last (the device tool returns only the tail)."""
    step = res["step_ms"]
    lines = [
        f"step {step:.1f} ms wall, kernels busy {res['busy_ms_per_step']:.1f} ms "
        f"({res['busy_ms_per_step'] / step:.0%}), unattributed {res['unattributed_ms_per_step']:.1f} ms",
        "| op | ms/step | share of busy |",
        "|---|---:|---:|",
    ]
    busy = max(res["busy_ms_per_step"], 1e-9)
    for op, ms in res["by_op"].items():
        lines.append(f"| {op} | {ms:.2f} | {ms / busy:.1%} |")
    lines += ["", "| op, pass | ms/step |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in res["by_op_pass"].items()]
    lines += ["", "| kernel kind | ms/step |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in res["by_kind"].items()]
    lines += [
        "",
        "| top kernel | op | pass | kind | ms/step | calls/step |",
        "|---|---|---|---|---:|---:|",
    ]
    for k in res["top_kernels"][:15]:
        lines.append(
            f"| {k['kernel'][:60]} | {k['op']} | {k['pass_']} | {k['kind']} | {k['ms']:.2f} | "
            f"{k['calls']:g} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- the run
def profile(args) -> dict:
    import jax

    from benchmarks.fastjax_systems import build_fastjax

    built = build_fastjax(
        args.system,
        args.shape,
        args.batch,
        args.seq,
        remat=args.remat,
        micro_rows=args.micro_rows or None,
        mlp_chunk_size=args.mlp_chunk_size,
        scan_layers=not args.unroll_layers,
        embed_on_host=args.embed_on_host,
    )
    # Compile once and run that executable: the HLO read here is the program the trace records.
    built.step = built.step.lower(
        built.lora, built.opt_state, built.params, built.micro, jax.numpy.int32(0), built.key
    ).compile()
    op_names = hlo_op_names(built.step.as_text())
    for i in range(args.warmup):
        jax.block_until_ready(built.run(i)["loss"])
    trace_dir = os.path.join(args.out, "trace")
    opts = None
    if hasattr(jax.profiler, "ProfileOptions"):  # no Python-call tracing: it slows the steps down
        opts = jax.profiler.ProfileOptions()
        opts.python_tracer_level = 0
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=opts):
        t0 = time.perf_counter()
        for i in range(args.steps):
            metrics = built.run(args.warmup + i)
        jax.block_until_ready(metrics["loss"])
        step_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    events, where = device_events(read_trace(trace_dir))
    if not events:
        raise RuntimeError(f"the trace under {trace_dir} holds no kernel events")
    res = attribute(events, op_names, args.steps)
    return harness.record(
        kind="profile",
        **built.base,
        steps=args.steps,
        step_ms=round(step_ms, 2),
        events_from=where,
        command_buffers="off"
        if NO_COMMAND_BUFFERS in os.environ.get("XLA_FLAGS", "")
        else "default",
        tokens_per_s_traced=round(args.batch * args.seq / step_ms * 1e3),
        **res,
    )


NO_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer="


def no_command_buffers() -> bool:
    """Turn XLA:GPU's command buffers (CUDA graphs) off for this process, before jax starts: kernels
    a graph launches may come without the ``hlo_op`` annotation this attribution reads. The traced
    steps then launch kernel by kernel (a little slower; ``step_ms`` says by how much against
    ``train_step.py``). A command-buffer flag already in XLA_FLAGS is left as it is."""
    return harness.add_xla_flag(NO_COMMAND_BUFFERS, present="xla_gpu_enable_command_buffer")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--system", default="fastjax-lora", help="a train_step.py fastjax system")
    p.add_argument("--remat", default="full")
    p.add_argument("--micro-rows", type=int, default=0, help="rows per micro-batch (0: one)")
    p.add_argument("--mlp-chunk-size", type=int, default=None)
    p.add_argument("--unroll-layers", action="store_true", help="layers as a Python loop")
    p.add_argument(
        "--embed-on-host",
        action="store_true",
        help="the embedding table in host memory, its rows gathered and sent each step",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True, help="folder for profile.json and trace/")
    p.add_argument(
        "--keep-command-buffers",
        action="store_true",
        help="leave XLA:GPU's CUDA graphs on (kernels inside them may lose their hlo_op)",
    )
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit(f"--steps {args.steps}: at least one traced step")
    os.makedirs(args.out, exist_ok=True)
    if not args.keep_command_buffers:
        no_command_buffers()
    res = profile(args)
    atomic_write_json(os.path.join(args.out, "profile.json"), res)
    print(tables(res), flush=True)
    return res


if __name__ == "__main__":
    main()
