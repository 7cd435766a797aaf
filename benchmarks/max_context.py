"""Longest batch-1 sequence that trains (one full step) under a memory cap: double, then bisect.

Every probe is one training step (no warm-up, compilation included) in a fresh process, so an
out-of-memory failure leaves nothing behind and each probe sees the cap alone. The parent never
creates a device client: the cap is a fraction of the GPU's *total* memory as ``nvidia-smi`` reports
it (``harness.gpu_info``; not a JAX allocator pool, which is already a fraction of it), and

- JAX children get ``XLA_PYTHON_CLIENT_MEM_FRACTION = cap / total`` (preallocated, so the pool is
  the cap; each row records the pool's ``bytes_limit_gib`` to prove it),
- torch children (HF+PEFT, Unsloth) call ``torch.cuda.set_per_process_memory_fraction(cap / total)``
  before loading the model (``--cap-gib``).

The search (:func:`search_max_context`, a pure function of a ``fits(n)`` oracle) doubles from
``--start`` until a probe fails, then bisects on multiples of ``--granularity``. Probes already in
``--out`` for the same system, shape, cap and remat are reused, so re-running the same command
resumes a search that a time limit cut short (``--budget-s``). Systems: fastjax-qlora (and any
fastjax system of ``train_step.py``), unsloth-qlora (needs ``--unsloth-dir``), hf+peft-qlora,
hf+peft; Llama-3-8B shapes by default.

Usage (GPU machine, repo root)::

    python3 benchmarks/max_context.py --cap-gib 24,80 \\
        --systems fastjax-qlora,unsloth-qlora,hf+peft-qlora \\
        --unsloth-dir .whl-b --budget-s 560 --out benchmarks/results/max_context_h200.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness, train_step  # noqa: E402

DEFAULT_SYSTEMS = "fastjax-qlora,unsloth-qlora,hf+peft-qlora"


# --------------------------------------------------------------------------------------- the search
@dataclasses.dataclass(frozen=True)
class SearchResult:
    max_fit: int  # longest probe that fit (0: none did)
    min_fail: int | None  # shortest probe that did not fit (None: none failed)
    trials: tuple[
        tuple[int, bool], ...
    ]  # (seq, fits) of every probe, reused ones included, in order
    stopped: str  # "converged" | "max_seq" | "max_trials" | "inconclusive at N"


def _next_probe(
    lo: int, hi: int | None, *, start: int, granularity: int, max_seq: int | None
) -> int | None:
    """The next sequence length to try given the longest fit ``lo`` and shortest failure ``hi``."""
    if hi is None:  # doubling phase
        n = start if lo == 0 else 2 * lo
        if max_seq is not None and n > max_seq:
            n = max_seq if lo < max_seq else None
        return n
    if hi - lo <= granularity:
        return None
    mid = (lo + hi) // 2 // granularity * granularity
    mid = max(mid, lo + granularity)
    return mid if mid < hi else None


def search_max_context(
    fits: Callable[[int], bool | None],
    *,
    start: int,
    granularity: int,
    max_trials: int = 12,
    max_seq: int | None = None,
    known: Mapping[int, bool] | None = None,
) -> SearchResult:
    """Longest ``n`` with ``fits(n)``, assuming fitting is monotone in ``n``: double ``start`` until
    a probe fails, then bisect between the longest fit and the shortest failure down to
    ``granularity``.

    ``fits(n)`` returns True / False, or None when the probe was inconclusive (a crash that is not
    an out-of-memory, a timeout, no time left): the search stops there. ``known`` holds earlier
    probes (resuming); they are not asked again and do not count against ``max_trials`` (new probes
    only). ``max_seq`` caps the doubling (``stopped="max_seq"`` when even it fits).
    """
    if start < 1 or granularity < 1:
        raise ValueError(f"{start=} and {granularity=} must be positive")
    known = dict(known or {})
    trials: list[tuple[int, bool]] = []
    lo = max((n for n, ok in known.items() if ok), default=0)
    fails = [n for n, ok in known.items() if not ok and n > lo]
    hi = min(fails, default=None)
    calls = 0
    while True:
        n = _next_probe(lo, hi, start=start, granularity=granularity, max_seq=max_seq)
        if n is None:
            stopped = "max_seq" if hi is None else "converged"
            break
        if n in known:
            ok = known[n]
        else:
            if calls >= max_trials:
                stopped = "max_trials"
                break
            calls += 1
            ok = fits(n)
            if ok is None:
                stopped = f"inconclusive at {n}"
                break
            known[n] = ok
        trials.append((n, bool(ok)))
        if ok:
            lo = max(lo, n)
        else:
            hi = n if hi is None else min(hi, n)
    return SearchResult(max_fit=lo, min_fail=hi, trials=tuple(trials), stopped=stopped)


# ------------------------------------------------------------------------------------------- probes
def probe_job(
    system: str,
    shape: str,
    seq: int,
    *,
    cap_gib: float,
    total_bytes: int,
    remat: str,
    site_env: dict | None = None,
    checkpoint_root: str | None = None,
    mlp_chunk_size: int | None = None,
    embed_on_host: bool = False,
    command_buffers: str = "env",
) -> tuple[list[str], dict]:
    """``(argv, env)`` of the child that runs one capped step of ``system`` at ``[1, seq]``."""
    if system.startswith(("hf+peft", "unsloth")):
        argv = train_step.torch_argv(
            system,
            shape,
            1,
            seq,
            steps=1,
            warmup=0,
            checkpoint_root=checkpoint_root,
            cap_gib=cap_gib,
        )
        return list(argv), dict(site_env or {}) if system != "hf+peft" else {}
    argv = list(
        train_step.fastjax_argv(
            system,
            shape,
            1,
            seq,
            steps=1,
            warmup=0,
            remat=remat,
            mlp_chunk_size=mlp_chunk_size,
            embed_on_host=embed_on_host,
            command_buffers=command_buffers,
        )
    )
    frac = cap_gib * 2**30 / total_bytes
    if frac >= 1.0:
        raise ValueError(f"cap {cap_gib} GiB is not below the GPU's {total_bytes / 2**30:.1f} GiB")
    return argv, {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{frac:.4f}",
        "XLA_PYTHON_CLIENT_PREALLOCATE": None,
    }


def probe_outcome(row: dict) -> bool | None:
    """True: the step ran; False: it ran out of device memory; None: anything else (crash, timeout,
    skip)."""
    if row.get("ok") is True and "step_s" in row:
        return True
    if row.get("oom") or (row.get("error") and harness.is_oom(row["error"])):
        return False
    return None


# Fields a configuration carries only when set: a search without one must not reuse probes with it.
OPTIONAL_KEYS = ("embed_on_host", "command_buffers")


def _known_probes(path: str | None, key: dict) -> dict[int, bool]:
    known = {}
    for r in harness.read_rows([path] if path else []):
        same = all(r.get(k) == v for k, v in key.items())
        same = same and all(r.get(k) == key.get(k) for k in OPTIONAL_KEYS)
        if r.get("kind") == "max_context_trial" and same:
            if r.get("fits") is not None:
                known[int(r["seq"])] = bool(r["fits"])
    return known


def run_search(
    system: str,
    args,
    *,
    cap_gib: float,
    total_bytes: int,
    budget: harness.Budget,
    site_env: dict | None,
) -> dict:
    chunk = args.mlp_chunk_size if system.startswith("fastjax") else None
    key = dict(
        system=system,
        shape=args.shape,
        cap_gib=cap_gib,
        remat=args.remat,
        mlp_chunk_size=chunk or None,
        **({"embed_on_host": True} if args.embed_on_host and system.startswith("fastjax") else {}),
        **(
            {"command_buffers": args.command_buffers}
            if args.command_buffers != "env" and system.startswith("fastjax")
            else {}
        ),
    )
    known = {} if args.fresh else _known_probes(args.out, key)
    last_error = {}

    def fits(seq: int) -> bool | None:
        timeout = budget.timeout(args.proc_timeout)
        if timeout is None:
            last_error["why"] = f"--budget-s {args.budget_s:.0f} spent"
            return None
        argv, env = probe_job(
            system,
            args.shape,
            seq,
            cap_gib=cap_gib,
            total_bytes=total_bytes,
            remat=args.remat,
            site_env=site_env,
            checkpoint_root=args.checkpoint_root,
            mlp_chunk_size=chunk or None,
            embed_on_host=bool(key.get("embed_on_host")),
            command_buffers=key.get("command_buffers", "env"),
        )
        rows = harness.run_subprocess(argv, env=env, timeout=timeout, system=system)
        # a step that finished counts even if the child died afterwards (teardown)
        row = next((r for r in rows if r.get("ok") is True), rows[-1])
        ok = probe_outcome(row)
        if ok is None:
            last_error["why"] = row.get("skipped") or row.get("error") or "no result"
        harness.emit(
            harness.record(
                **{**row, "kind": "max_context_trial", **key, "seq": seq, "batch": 1, "fits": ok}
            ),
            args.out,
        )
        return ok

    res = search_max_context(
        fits,
        start=args.start,
        granularity=args.granularity,
        max_trials=args.max_trials,
        max_seq=args.max_seq,
        known=known,
    )
    row = harness.record(
        kind="max_context",
        **key,
        max_fit=res.max_fit,
        min_fail=res.min_fail,
        stopped=res.stopped,
        trials=[list(t) for t in res.trials],
        granularity=args.granularity,
        gpu_total_gib=round(total_bytes / 2**30, 1),
    )
    if res.stopped.startswith("inconclusive"):
        row["why"] = str(last_error.get("why", ""))[-600:]
    harness.emit(row, args.out)
    return row


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--cap-gib", default="24,80", help="comma-separated caps, GiB")
    ap.add_argument("--systems", default=DEFAULT_SYSTEMS)
    ap.add_argument("--start", type=int, default=16384)
    ap.add_argument("--granularity", type=int, default=8192)
    ap.add_argument("--max-trials", type=int, default=12, help="new probes per search")
    ap.add_argument("--max-seq", type=int, default=524288, help="longest sequence probed")
    ap.add_argument("--remat", default="offload_layer_input", help="fastjax remat preset")
    ap.add_argument(
        "--embed-on-host",
        action="store_true",
        help="fastjax: the input embedding in host memory (fastjax.host_embed)",
    )
    ap.add_argument(
        "--command-buffers",
        choices=train_step.COMMAND_BUFFERS,
        default="env",
        help="fastjax under host offload: as train_step.py --command-buffers",
    )
    ap.add_argument(
        "--mlp-chunk-size",
        type=int,
        default=8192,
        help="fastjax: tokens per MLP slice (0: whole sequence at once)",
    )
    ap.add_argument("--proc-timeout", type=float, default=540, help="seconds per probe")
    ap.add_argument("--budget-s", type=float, default=0, help="wall-clock budget (0: none)")
    ap.add_argument(
        "--total-gib", type=float, default=None, help="GPU memory (default: nvidia-smi)"
    )
    ap.add_argument("--unsloth-dir", default=os.environ.get("FASTJAX_UNSLOTH_DIR"))
    ap.add_argument("--unsloth-site", default=None)
    ap.add_argument("--checkpoint-root", default=None)
    ap.add_argument("--fresh", action="store_true", help="ignore earlier probes in --out")
    ap.add_argument("--out", default=None, help="append JSON lines here (and resume from them)")
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    harness.run_id(), harness.command()
    total = int(args.total_gib * 2**30) if args.total_gib else harness.gpu_info()["total_bytes"]
    systems = args.systems.split(",")
    if not total:
        why = "no GPU found (nvidia-smi and torch see none): nothing to cap"
        rows = [harness.skipped(s, why, kind="max_context", shape=args.shape) for s in systems]
        for r in rows:
            harness.emit(r, args.out)
        return rows
    from benchmarks import unsloth_runner

    site_env, site_why = None, None
    if any(s.startswith("unsloth") or s == "hf+peft-qlora" for s in systems):
        site, site_why = unsloth_runner.prepare_site(
            args.unsloth_dir, args.unsloth_site or unsloth_runner.DEFAULT_SITE
        )
        site_env = unsloth_runner.child_env(site) if site else None
    budget = harness.Budget(args.budget_s)
    rows = []
    for cap in (float(c) for c in args.cap_gib.split(",")):
        for system in systems:
            if system.startswith("unsloth") and site_env is None:
                row = harness.skipped(
                    system, site_why, kind="max_context", shape=args.shape, cap_gib=cap
                )
                harness.emit(row, args.out)
            else:
                row = run_search(
                    system, args, cap_gib=cap, total_bytes=total, budget=budget, site_env=site_env
                )
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
