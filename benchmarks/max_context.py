"""Longest batch-1 sequence that trains (one full step) under a device-memory cap: doubling, then bisection.

Each trial is a fresh process (an out-of-memory failure leaves nothing behind). JAX is capped with
``XLA_PYTHON_CLIENT_MEM_FRACTION`` (cap / total device memory), torch with ``set_per_process_memory_fraction``.

Usage (GPU machine)::

    python3 benchmarks/max_context.py --cap-gib 24 --systems fastjax-qlora,hf+peft --start 16384
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

HERE = Path(__file__).resolve().parent


def _total_gib() -> float:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit", 0) / 2**30 or 139.0


def trial(system: str, shape: str, seq: int, cap_gib: float, total_gib: float, remat: str) -> dict:
    frac = f"{cap_gib / total_gib:.4f}"
    if system == "hf+peft":
        rows = common.run_subprocess([str(HERE / "torch_systems.py"), "--shape", shape, "--batch", "1",
                                      "--seq", str(seq), "--steps", "1", "--mem-fraction", frac])
    else:
        rows = common.run_subprocess(
            [str(HERE / "train_step.py"), "--steps", "1", "--ceiling", "1000",
             "--one", f"{system}:{shape}:1:{seq}:{remat}"],
            env={"XLA_PYTHON_CLIENT_MEM_FRACTION": frac, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    row = rows[-1]
    return dict(system=system, seq=seq, cap_gib=cap_gib, ok="tokens_per_s" in row,
                peak_gib=row.get("peak_gib"), tokens_per_s=row.get("tokens_per_s"),
                error=(row.get("error") or "")[-300:] or None)


def search(system: str, shape: str, cap_gib: float, start: int, granularity: int, max_trials: int,
           remat: str, out: str | None) -> dict:
    total = _total_gib()
    lo, hi = 0, None
    seq = start
    trials = 0
    while trials < max_trials:
        r = trial(system, shape, seq, cap_gib, total, remat)
        trials += 1
        common.emit(common.record(kind="max_context_trial", shape=shape, remat=remat, **r), out)
        if r["ok"]:
            lo = seq
        else:
            hi = seq
        if hi is None:
            seq *= 2
        elif hi - lo <= granularity:
            break
        else:
            seq = max(granularity, (lo + hi) // 2 // granularity * granularity)
            if seq in (lo, hi):
                break
    result = common.record(kind="max_context", system=system, shape=shape, cap_gib=cap_gib, remat=remat,
                           max_fit=lo, min_fail=hi, trials=trials)
    common.emit(result, out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--cap-gib", default="24", help="comma-separated caps, GiB")
    ap.add_argument("--systems", default="fastjax-qlora,hf+peft")
    ap.add_argument("--start", type=int, default=16384)
    ap.add_argument("--granularity", type=int, default=8192)
    ap.add_argument("--max-trials", type=int, default=6)
    ap.add_argument("--remat", default="offload_layer_input")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for cap in args.cap_gib.split(","):
        for system in args.systems.split(","):
            search(system, args.shape, float(cap), args.start, args.granularity, args.max_trials,
                   args.remat, args.out)


if __name__ == "__main__":
    main()
