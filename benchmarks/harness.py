"""Benchmark plumbing that never touches the GPU: run context, rows, child processes, FLOPs.

The parent processes (``train_step.py``, ``max_context.py``) import only this module, so they never
create a JAX or torch client on the GPU: every measurement runs in a child process with the whole
device to itself, and memory caps computed here use the device's *total* memory as ``nvidia-smi``
(or torch, in a child) reports it, not an allocator pool.

Every result row carries the run context: ``run_id`` (one per top-level invocation, shared by its
children through ``FASTJAX_BENCH_RUN_ID``), ``command`` (the top-level command line,
``FASTJAX_BENCH_COMMAND``), ``gpu``, ``date``, ``time`` (UTC), ``python`` and the versions of the
packages the row's system used. A system that could not run yields a row with ``skipped: <why>``
instead of numbers; one that failed yields ``error: <tail of its stderr>``.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
ENV_RUN_ID = "FASTJAX_BENCH_RUN_ID"
ENV_COMMAND = "FASTJAX_BENCH_COMMAND"
ENV_GPU = "FASTJAX_BENCH_GPU"  # JSON of gpu_info(), handed to children so they do not query again
JAX_PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin")
TORCH_PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")
UNSLOTH_PACKAGES = TORCH_PACKAGES + ("unsloth", "unsloth_zoo", "trl")
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemoryError", "Out of memory")


# -------------------------------------------------------------------------------------- run context
def run_id() -> str:
    """This invocation's id: inherited from the parent, else a new ``YYYYmmddTHHMMSS-xxxx``."""
    rid = os.environ.get(ENV_RUN_ID)
    if not rid:
        rid = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:4]
        os.environ[ENV_RUN_ID] = rid  # children inherit it
    return rid


def command() -> str:
    """The top-level command line (what a reader re-runs), inherited by children."""
    cmd = os.environ.get(ENV_COMMAND)
    if not cmd:
        argv = [sys.argv[0]]
        try:
            argv[0] = str(Path(sys.argv[0]).resolve().relative_to(REPO))
        except ValueError:
            pass
        cmd = shlex.join(["python3", *argv, *sys.argv[1:]])
        os.environ[ENV_COMMAND] = cmd
    return cmd


def _first_visible_gpu() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


@functools.lru_cache(maxsize=1)
def gpu_info() -> dict:
    """``{"name", "total_bytes"}`` of the first visible GPU without creating a device client here.

    ``nvidia-smi`` first; else torch in a child process (a CUDA context in this process would take
    device memory from the children). ``{"name": "cpu", "total_bytes": None}`` when neither finds a
    GPU. A parent hands its answer to its children (``FASTJAX_BENCH_GPU``).
    """
    if os.environ.get(ENV_GPU):
        return json.loads(os.environ[ENV_GPU])
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "-i",
                _first_visible_gpu(),
                "--query-gpu=name,memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        name, mib = (s.strip() for s in out.stdout.strip().splitlines()[0].rsplit(",", 1))
        return {"name": name, "total_bytes": int(float(mib) * 2**20)}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    probe = (
        "import json, torch; p = torch.cuda.get_device_properties(0); "
        "print(json.dumps({'name': p.name, 'total_bytes': p.total_memory}))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
        )
        if out.returncode == 0:
            return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    return {"name": "cpu", "total_bytes": None}


def versions(packages: Iterable[str] = JAX_PACKAGES) -> dict:
    """Installed versions of ``packages`` (metadata only: nothing is imported), plus Python's."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def record(*, packages: Iterable[str] = JAX_PACKAGES, **fields) -> dict:
    """A result row: ``fields`` plus the run context (fields win over context keys)."""
    now = datetime.datetime.now(datetime.UTC)
    ctx = dict(
        run_id=run_id(),
        command=command(),
        gpu=gpu_info()["name"],
        date=now.date().isoformat(),
        time=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        **versions(packages),
    )
    if os.environ.get("XLA_FLAGS"):  # a flag set around the command changes what was measured
        ctx["xla_flags"] = os.environ["XLA_FLAGS"]
    return dict(ctx, **fields)


def skipped(system: str, why: str, **fields) -> dict:
    return record(system=system, skipped=why, **fields)


def emit(row: dict, path: str | os.PathLike | None = None) -> None:
    """Print ``row`` as one JSON line; append it to ``path`` too when given."""
    line = json.dumps(row, sort_keys=True)
    print(line, flush=True)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")


def read_rows(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """All JSON rows of the given JSONL files, in file order (unparsable lines are dropped)."""
    rows = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            continue
        for line in p.read_text().splitlines():
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def add_xla_flag(flag: str, *, present: str | None = None) -> bool:
    """Append ``flag`` to ``XLA_FLAGS`` unless ``present`` (default: the flag's name, the part before
    ``=``) is in it already. Returns whether XLA will read it: XLA reads the variable when jax creates
    its first backend, so a flag added after that has no effect (one already there was read then)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if (present or flag.split("=")[0]) in flags:
        return True
    os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()
    if "jax" not in sys.modules:
        return True
    from jax._src import xla_bridge  # private, jax 0.10 and 0.11: the backends created so far

    return not getattr(xla_bridge, "_backends", None)


# ---------------------------------------------------------------------------------- child processes
def is_oom(text: str | None) -> bool:
    return bool(text) and any(m in text for m in OOM_MARKERS)


def run_subprocess(
    args: list[str], *, env: dict | None = None, timeout: float = 900, system: str | None = None
) -> list[dict]:
    """Run ``python args...`` in its own process group (fresh device memory); return its JSON rows.

    Values of ``env`` replace the inherited environment's; a value of ``None`` removes the variable.
    A child that fails (non-zero exit, killed after ``timeout`` seconds, or no JSON row at all) adds
    one ``error`` row after whatever rows it printed, with ``oom`` set when its output says it ran
    out of device memory and ``timeout`` when it was killed.
    """
    full_env = dict(os.environ)
    run_id(), command()  # make sure children inherit this invocation's context
    full_env.update(
        {
            ENV_RUN_ID: os.environ[ENV_RUN_ID],
            ENV_COMMAND: os.environ[ENV_COMMAND],
            ENV_GPU: json.dumps(gpu_info()),
        }
    )
    for k, v in (env or {}).items():
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = str(v)
    timed_out = False
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started (its own group)
        out, err = proc.communicate()
    wall = round(time.perf_counter() - t0, 1)
    rows = []
    for line in (out or "").splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if timed_out or proc.returncode != 0 or not rows:
        # rows printed before a crash or a kill (e.g. Unsloth's checkpoint row) are kept, and the
        # failure still gets its own row, so a half-finished system never reads as a result
        tail = "\n".join((err or "").strip().splitlines()[-20:])[-2000:]
        why = f"timeout after {timeout:.0f}s" if timed_out else f"rc={proc.returncode}"
        rows.append(
            {
                "system": system or (args[-1] if args else "?"),
                "error": f"{why}: {tail}",
                "oom": is_oom(err) or is_oom(out),
                "timeout": timed_out,
            }
        )
    for r in rows:
        r.setdefault("wall_s", wall)
    return rows


# ---------------------------------------------------------------------------------------- workloads
def token_batch(vocab_size: int, batch: int, seq: int, seed: int = 0):
    """The random token ids every system trains on: numpy ``int32 [batch, seq]``, the same for
    all."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab_size, (batch, seq), dtype=np.int32)


def packed_segments(batch: int, seq: int, seed: int = 0):
    """Rows of 4-8 packed segments: ``(segment_ids, positions)``, numpy ``int32 [batch, seq]``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, seq), np.int32)
    pos = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        n = int(rng.integers(4, 9))
        cuts = np.sort(rng.choice(np.arange(1, seq), n - 1, replace=False))
        bounds = [0, *cuts.tolist(), seq]
        for i in range(n):
            seg[b, bounds[i] : bounds[i + 1]] = i + 1
            pos[b, bounds[i] : bounds[i + 1]] = np.arange(bounds[i + 1] - bounds[i])
    return seg, pos


def train_flops(shape, batch: int, seq: int, segment_lengths: Iterable[int] | None = None) -> float:
    """FLOPs of one LoRA training step: ``4·N·tokens`` (forward + input-gradient backward, no weight
    gradients) plus causal attention, forward and backward (3x forward): ``6·L·Dq·Σ len²``.

    Recomputation (remat) is not counted: MFU measures useful work. ``segment_lengths`` (packed
    rows) replaces the ``batch`` rows of ``seq`` tokens in the attention term.
    """
    sq = sum(n * n for n in segment_lengths) if segment_lengths is not None else batch * seq * seq
    return 4.0 * shape.n_params() * batch * seq + 6.0 * shape.num_hidden_layers * shape.q_dim * sq


def mfu(flops: float | None, step_s: float | None, ceiling_tflops: float | None) -> float | None:
    if not (flops and step_s and ceiling_tflops):
        return None
    return round(flops / step_s / (ceiling_tflops * 1e12), 3)


class Budget:
    """Wall-clock budget of one invocation (``seconds <= 0``: unlimited)."""

    def __init__(self, seconds: float, *, reserve: float = 15.0):
        self.seconds, self.reserve, self.t0 = seconds, reserve, time.monotonic()

    def left(self) -> float:
        if self.seconds <= 0:
            return float("inf")
        return self.seconds - (time.monotonic() - self.t0) - self.reserve

    def timeout(self, per_process: float) -> float | None:
        """The timeout for the next child, or ``None`` when too little time is left to start one."""
        t = min(per_process, self.left())
        return t if t >= 30 else None


def time_torch_steps(model, ids, *, warmup: int, steps: int, autocast) -> tuple[float, float]:
    """AdamW (lr 2e-4) on ``model``'s trainable parameters, ``warmup`` untimed then ``steps`` timed
    steps of causal-LM loss on ``ids``; returns (seconds per timed step, last loss). Peak memory
    counts from the first step (``reset_peak_memory_stats``). The torch systems' one timing loop."""
    import torch

    cuda = ids.is_cuda
    # Training mode, as HF's Trainer sets it: ``from_pretrained`` returns the model in eval mode, and
    # transformers' decoder layers checkpoint only ``if self.gradient_checkpointing and self.training``
    # (before this line the QLoRA rows of 2026-12-02 ran without checkpointing: 97 GiB at 8B 4x2048).
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step():
        with autocast:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, float(loss.detach())
