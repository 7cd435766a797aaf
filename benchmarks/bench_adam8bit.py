"""Tile sweep of the fused 8-bit Adam step (``pallas_kernels.adam8bit``) against its XLA reference.

One flat moment of ``--params`` values (default: the 1.24B Llama-3.2-1B tree's size, the case where the
kernel measured 17.98 ms against optax.adamw's 9.12 on an H200, ``benchmarks/results/nf4_h200.md``),
stepped in place like a donated optimizer state. For every ``BlockSizes(block_rows, num_warps)`` of the
grid it records the median step time, the bandwidth it reaches on the 12 bytes a value it must move
(fp32 gradient in, update out, two uint8 codes in and out) against ``x * 2`` on an fp32 array of the
gradient's size in the same run, and its agreement with the reference after one step from the same state:
the share of codes that differ and the largest index difference (the search is the same, so on a GPU
only fp32 rounding of the update can move a value across a midpoint), and the absmax's relative error.

Usage (GPU machine, repo root)::

    python3 benchmarks/bench_adam8bit.py --out $OUT/adam_sweep.jsonl
    python benchmarks/bench_adam8bit.py --params 20000 --rows 4,8 --warps 4   # CPU: interpret mode
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fastjax.pallas_kernels import adam8bit  # noqa: E402

BYTES_PER_VALUE = 12
HYPER = dict(b1=0.9, b2=0.999, eps=1e-8)


def _time_ms(step, state, repeats: int) -> tuple[float, tuple]:
    """Median ms of ``state = step(*state)`` (donated, so the moments are updated in place)."""
    state = jax.block_until_ready(step(*state))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state = jax.block_until_ready(step(*state))
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times), state


def start_state(n_blocks: int, seed: int = 0):
    """A gradient and the 8-bit moments after one step from zero (through the reference), so every
    variant starts from the same non-trivial codes."""
    key = jax.random.key(seed)
    g = jax.random.normal(key, (n_blocks, adam8bit.BLOCK), jnp.float32) * 1e-3
    zeros = jnp.zeros((n_blocks, adam8bit.BLOCK), jnp.uint8)
    absmax = jnp.zeros((n_blocks,), jnp.float32)
    scalars = jnp.asarray([0.1, 0.001, 0.19], jnp.float32)  # bc1, bc2, bc1_next at step 1
    _, mc, ma, vc, va = adam8bit.adam8bit_update_reference(
        g, zeros, absmax, zeros, absmax, scalars, **HYPER
    )
    g2 = jax.random.normal(jax.random.fold_in(key, 1), g.shape, jnp.float32) * 1e-3
    return g2, mc, ma, vc, va, jnp.asarray([0.19, 0.002, 0.271], jnp.float32)


def _stepper(impl: str, bs: adam8bit.BlockSizes | None, interpret: bool | None):
    def step(g, mc, ma, vc, va, scalars):
        u, mc, ma, vc, va = adam8bit.adam8bit_update(
            g, mc, ma, vc, va, scalars, impl=impl, interpret=interpret, block_sizes=bs, **HYPER
        )
        return u, mc, ma, vc, va, scalars

    # the update takes g's place, so the program donates every input as a real step does
    return jax.jit(step, donate_argnums=(0, 1, 2, 3, 4))


def _agreement(got, want) -> dict:
    gm, gv = (np.asarray(got[i]).astype(np.int32) for i in (1, 3))
    wm, wv = (np.asarray(want[i]).astype(np.int32) for i in (1, 3))
    diff = np.concatenate([np.abs(gm - wm).ravel(), np.abs(gv - wv).ravel()])
    absmax_err = max(
        float(np.max(np.abs(np.asarray(got[i]) - np.asarray(want[i])) / (np.abs(want[i]) + 1e-30)))
        for i in (2, 4)
    )
    return dict(
        codes_differ=float(np.mean(diff > 0)),
        max_code_diff=int(diff.max()),
        absmax_rel_err=absmax_err,
    )


def copy_gbps(n_values: int, repeats: int) -> float:
    x = jnp.ones((n_values,), jnp.float32)
    ms, _ = _time_ms(jax.jit(lambda x: (x * 2,), donate_argnums=0), (x,), repeats)
    return 2 * 4 * n_values / ms / 1e6


def sweep(args) -> list[dict]:
    n_blocks = -(-args.params // adam8bit.BLOCK)
    n = n_blocks * adam8bit.BLOCK
    interpret = True if args.interpret else None
    base = dict(
        device=str(jax.devices()[0].device_kind),
        jax=jax.__version__,
        params=n,
        command=" ".join(["python3", *sys.argv]),
        date=time.strftime("%Y-%m-%d"),
    )
    rows = [dict(base, impl="copy", gbps=copy_gbps(n, args.repeats))]
    ref_step = _stepper("xla", None, None)
    want = jax.device_get(ref_step(*start_state(n_blocks)))
    ms, _ = _time_ms(ref_step, start_state(n_blocks), args.repeats)
    rows.append(dict(base, impl="xla", ms=ms, gbps=BYTES_PER_VALUE * n / ms / 1e6))
    for r in rows:  # printed as they come: a call cut off by its time limit keeps what it measured
        print(json.dumps(r), flush=True)
    grid = [(r, w) for r in map(int, args.rows.split(",")) for w in map(int, args.warps.split(","))]
    for block_rows, warps in grid:
        row = dict(base, impl="pallas", block_rows=block_rows, num_warps=warps)
        try:
            bs = adam8bit.BlockSizes(block_rows=block_rows, num_warps=warps)
            step = _stepper("pallas", bs, interpret)
            row |= _agreement(jax.device_get(step(*start_state(n_blocks))), want)
            row["ms"], _ = _time_ms(step, start_state(n_blocks), args.repeats)
            row["gbps"] = BYTES_PER_VALUE * n / row["ms"] / 1e6
        except Exception as e:  # noqa: BLE001 - a tile that does not compile is a row, not the end
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=int, default=1_235_814_400)
    p.add_argument("--rows", default="4,8,16,32,64", help="block_rows values (powers of 2)")
    p.add_argument("--warps", default="2,4,8", help="num_warps values")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    rows = sweep(args)
    if args.out:
        with open(args.out, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    copy = rows[0]["gbps"]
    print(f"\n{rows[0]['device']}, {rows[0]['params']:,} values; copy {copy:,.0f} GB/s")
    print("| impl | block_rows | warps | ms | GB/s | of copy | codes differ | absmax rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows[1:]:
        if "error" in r:
            print(f"| {r['impl']} | {r['block_rows']} | {r['num_warps']} | {r['error'][:60]} |")
            continue
        print(
            f"| {r['impl']} | {r.get('block_rows', '-')} | {r.get('num_warps', '-')} | "
            f"{r['ms']:.2f} | {r['gbps']:,.0f} | {r['gbps'] / copy:.2f} | "
            f"{r.get('codes_differ', 0):.1e} | {r.get('absmax_rel_err', 0):.1e} |"
        )
    return rows


if __name__ == "__main__":
    main()
