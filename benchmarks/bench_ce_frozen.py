"""Cross-entropy with a frozen head (LoRA, QLoRA): every implementation's forward + backward, one program.

For ``hidden [T, D]`` and a frozen head ``[V, D]`` it times ``jax.value_and_grad`` with respect to the
hidden states: the Pallas kernel (GPU only; the logits three times: lse, dlogits, ``dz @ head``),
``xla_chunked`` (cuBLAS: lse, then the logits again and ``dz @ head`` in the backward) and
``xla_fused_grad`` (cuBLAS: the logits once and ``dz @ head`` in the forward, the backward one scale),
and the full-logits reference when it fits (``--with-full``). Each row: median ms of ``--repeats``
calls, TFLOP/s over the two ``T x V x D`` matmuls a frozen head needs (4TVD), the compiled program's
temporary bytes, and the relative L2 error of loss and d_hidden against the reference in fp32 on a
slice of the tokens.

Usage (repo root)::

    python3 benchmarks/bench_ce_frozen.py --shape llama-3-8b --tokens 8192 --out $OUT/ce_frozen.jsonl
    python benchmarks/bench_ce_frozen.py --shape smollm2 --tokens 2048 --dtype float32   # CPU
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

from fastjax.pallas_kernels import _common  # noqa: E402
from fastjax.pallas_kernels import cross_entropy as CE  # noqa: E402

# (D, V): the heads of the shapes this benchmark is run on (benchmarks/shapes.py for the big ones)
SHAPES = {"smollm2": (576, 49152), "llama-3-8b": (4096, 128256), "tiny": (40, 301)}


def _inputs(t, d, v, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(k[0], (t, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(k[1], (v, d), jnp.float32) * d**-0.5).astype(dtype)
    lab = jax.random.randint(k[2], (t,), 0, v)
    return h, w, jnp.where(jnp.arange(t) % 7 == 3, -100, lab)  # some ignored tokens


def _fn(impl: str, interpret):
    def loss(h, w, lab):
        if impl == "xla":
            return CE.cross_entropy_reference(h, w, lab)
        return CE.cross_entropy(h, w, lab, impl=impl, head_trainable=False, interpret=interpret)

    return jax.jit(jax.value_and_grad(loss))


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _error(impl: str, d: int, v: int, interpret) -> float:
    """Loss and d_hidden against the reference, fp32, on 96 tokens of the same head size."""
    h, w, lab = _inputs(96, d, v, jnp.float32, seed=1)
    got, want = _fn(impl, interpret)(h, w, lab), _fn("xla", None)(h, w, lab)
    return max(_rel(g, r) for g, r in zip(got, want))


def run(args) -> list[dict]:
    d, v = SHAPES[args.shape]
    dtype = jnp.dtype(args.dtype)
    h, w, lab = _inputs(args.tokens, d, v, dtype)
    interpret = True if args.interpret else None
    impls = (["pallas"] if _common.on_gpu() or args.interpret else []) + [
        "xla_chunked",
        "xla_fused_grad",
    ]
    if args.with_full:
        impls.append("xla")
    base = dict(
        device=str(jax.devices()[0].device_kind),
        jax=jax.__version__,
        shape=args.shape,
        tokens=args.tokens,
        dim=d,
        vocab=v,
        dtype=str(dtype),
        command=" ".join(["python3", *sys.argv]),
        date=time.strftime("%Y-%m-%d"),
    )
    rows = []
    for impl in impls:
        row = dict(base, impl=impl)
        try:
            f = _fn(impl, interpret)
            compiled = f.lower(h, w, lab).compile()
            mem = compiled.memory_analysis()
            row["temp_mib"] = None if mem is None else mem.temp_size_in_bytes / 2**20
            jax.block_until_ready(compiled(h, w, lab))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(h, w, lab))
                times.append(time.perf_counter() - t0)
            row["ms"] = 1e3 * statistics.median(times)
            row["tflops"] = 4 * args.tokens * v * d / row["ms"] / 1e9
            row["rel_err"] = _error(impl, d, v, interpret) if impl != "xla" else 0.0
        except Exception as e:  # noqa: BLE001 - an impl that does not fit is a row, not the end
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--with-full", action="store_true", help="also the full-logits reference")
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    rows = run(args)
    if args.out:
        with open(args.out, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\n{rows[0]['device']}, {args.shape} head, T={args.tokens}, {args.dtype}")
    print("| impl | ms | TFLOP/s (4TVD) | temporaries MiB | rel. error |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['error'][:70]} | | | |")
            continue
        temp = "-" if r["temp_mib"] is None else f"{r['temp_mib']:,.0f}"
        print(f"| {r['impl']} | {r['ms']:.2f} | {r['tflops']:.3g} | {temp} | {r['rel_err']:.1e} |")
    return rows


if __name__ == "__main__":
    main()
