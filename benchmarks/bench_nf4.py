"""Benchmark: fused NF4+LoRA linear (Pallas) vs dequantize-then-matmul (XLA) vs the bf16 matmul, and 8-bit
AdamW vs optax.adamw. Checks compiled correctness against the reference in the same run.

Run on the GPU machine (repo root)::

    pip install --no-deps --no-build-isolation -e . -q
    PYTHONUNBUFFERED=1 python3 benchmarks/bench_nf4.py --out $OUT/nf4_h200.jsonl --budget 260

Shapes: Llama-3-8B projections (4096->4096, 4096->1024, 4096->14336, 14336->4096) x T in {1, 16, 2048, 8192},
forward and forward+backward (dx, dA, dB; W frozen), LoRA r=16 on every variant, bf16. Each timed program
runs the op on ``K`` distinct input sets (rotating weights, so decode shapes don't time the L2), is launched
several times back to back, and the median wall time over repeats / K is reported.

Variants are what training runs: "xla_dequant" is ``impl="xla"`` (``nf4_lora_xla``: bf16 results, backward
re-dequantizes), "bf16" the model's dense projection (bf16 results). Rows before 2026-12-01 timed the fp32-
result reference and an fp32-result dense einsum instead. ``--ts 16,1`` times only those T (decode);
``--decode-sweep`` times forward tile variants at T=1 and 16 on every shape, with the GB/s of NF4 bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from fastjax.pallas_kernels import nf4_lora as k

from fastjax import optim, quant

SHAPES = [
    ("q/o 4096->4096", 4096, 4096),
    ("k/v 4096->1024", 4096, 1024),
    ("gate/up 4096->14336", 4096, 14336),
    ("down 14336->4096", 14336, 4096),
]
RANK, SCALE = 16, 2.0
TS, SWEEP_T = (2048, 8192, 16, 1), 2048
T0 = time.time()


def log(rec: dict, fh) -> None:
    rec = {
        k2: (float(v) if isinstance(v, (np.floating, jnp.ndarray)) else v) for k2, v in rec.items()
    }
    fh.write(json.dumps(rec) + "\n")
    fh.flush()


def bench(fn, sets, *, launches: int, repeats: int = 5):
    """(median seconds per op, outputs for the first set): ``fn`` maps one input set to outputs; all sets run
    in one program, launched ``launches`` times back to back per timing."""
    multi = jax.jit(lambda ss: [fn(*s) for s in ss])
    first = jax.block_until_ready(multi(sets))[0]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(launches):
            out = multi(sets)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / (launches * len(sets)))
    return statistics.median(times), first


def rel(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30))


def make_sets(n_in, out, t, n_sets, seed=0):
    key = jax.random.key(seed)
    qfn = jax.jit(quant.quantize_nf4)
    sets = []
    for i in range(n_sets):
        ks = jax.random.split(jax.random.fold_in(key, i), 5)
        w16 = (jax.random.normal(ks[0], (out, n_in), jnp.float32) * 0.02).astype(jnp.bfloat16)
        sets.append(
            {
                "x": jax.random.normal(ks[1], (t, n_in), jnp.bfloat16),
                "w": qfn(w16),
                "w16": w16,
                "a": (jax.random.normal(ks[2], (RANK, n_in), jnp.float32) * 0.02).astype(
                    jnp.bfloat16
                ),
                "b": (jax.random.normal(ks[3], (out, RANK), jnp.float32) * 0.02).astype(
                    jnp.bfloat16
                ),
                "dy": jax.random.normal(ks[4], (t, out), jnp.bfloat16),
            }
        )
    return sets


def dense_lora(x, w16, a, b):
    """The model's dense projection (``models.ops.linear``): bf16 in, bf16 out, fp32 accumulation."""
    y = jnp.einsum("ti,oi->to", x, w16)
    h = jnp.einsum("ti,ri->tr", x, a)
    return y + (SCALE * jnp.einsum("tr,or->to", h, b)).astype(x.dtype)


def variants(bs):
    fused = lambda x, w, a, b: k.nf4_lora_linear(
        x, w, a, b, lora_scale=SCALE, impl="pallas", block_sizes=bs
    )
    xla = lambda x, w, a, b: k.nf4_lora_linear(x, w, a, b, lora_scale=SCALE, impl="xla")
    return {"fused": (fused, "w"), "xla_dequant": (xla, "w"), "bf16": (dense_lora, "w16")}


def fwd_fn(f, wkey):
    return lambda s: f(s["x"], s[wkey], s["a"], s["b"])


def fwdbwd_fn(f, wkey):
    def run(s):
        y, vjp = jax.vjp(lambda x, a, b: f(x, s[wkey], a, b), s["x"], s["a"], s["b"])
        return (*vjp(s["dy"]), y)  # y returned too, else XLA drops the forward kernel

    return run


_SETS: dict = {}
_REF: dict = {}


def run_case(name, n_in, out, t, bs, fh, *, modes=("fwd", "fwdbwd"), which=None, tag="grid"):
    """Time the variants on one shape; errors of the fused outputs against the XLA reference's (set 0)."""
    n_sets = 16 if t <= 16 else (2 if t >= 8192 else 4)
    launches = 8 if t <= 16 else 2
    key = (n_in, out, t)
    if key not in _SETS:
        _SETS.clear()
        _REF.clear()
        _SETS[key] = make_sets(n_in, out, t, n_sets)
    sets = _SETS[key]
    v = variants(bs)
    recs = []
    for mode in modes:
        rec = {
            "tag": tag,
            "shape": name,
            "n_in": n_in,
            "out": out,
            "T": t,
            "mode": mode,
            "block_sizes": str(bs),
        }
        outs = {}
        names = [n for n in v if not which or n in which]
        if "fused" in names and (key, mode) not in _REF and "xla_dequant" not in names:
            names.append("xla_dequant")  # the reference for the error columns
        for vname in names:
            f, wkey = v[vname]
            fn = fwd_fn(f, wkey) if mode == "fwd" else fwdbwd_fn(f, wkey)
            try:
                sec, first = bench(lambda s, fn=fn: fn(s), [(s,) for s in sets], launches=launches)
                rec[f"ms_{vname}"] = 1e3 * sec
                outs[vname] = first
            except Exception as e:  # noqa: BLE001 - report and keep going
                rec[f"ms_{vname}"] = None
                rec[f"error_{vname}"] = f"{type(e).__name__}: {str(e)[:600]}"
        if "xla_dequant" in outs:
            _REF[(key, mode)] = outs["xla_dequant"]
        ref = _REF.get((key, mode))
        if "fused" in outs and ref is not None:
            got = outs["fused"]
            if mode == "fwd":
                rec["err_y"] = rel(got, ref)
            else:
                rec.update(
                    err_dx=rel(got[0], ref[0]),
                    err_dA=rel(got[1], ref[1]),
                    err_dB=rel(got[2], ref[2]),
                )
            rec["finite"] = bool(all(bool(jnp.all(jnp.isfinite(z))) for z in jax.tree.leaves(got)))
        flops = 2 * t * n_in * out * (1 if mode == "fwd" else 2)
        if rec.get("ms_fused"):
            rec["tflops_fused"] = flops / rec["ms_fused"] / 1e9
        log(rec, fh)
        recs.append(rec)
        print(
            f"[{time.time() - T0:6.1f}s] {tag} {name} T={t} {mode} "
            + " ".join(
                f"{kk}={rec[kk]:.4g}" if isinstance(rec.get(kk), float) else f"{kk}={rec.get(kk)}"
                for kk in (
                    "ms_fused",
                    "ms_xla_dequant",
                    "ms_bf16",
                    "err_y",
                    "err_dx",
                    "error_fused",
                )
                if kk in rec
            ),
            flush=True,
        )
    return recs


def sweep(fh, budget, base_ms):
    """Block-size / lookup sweep on gate/up at T=2048; returns the best forward and backward configs."""
    name, n_in, out = SHAPES[2]
    t = SWEEP_T
    base = k.pick_block_sizes(t, out, n_in)
    fwd_cfgs = [
        {"bm": 256},
        {"bm": 256, "bn": 32},
        {"w_lhs": True},
        {"w_lhs": True, "bm": 256},
        {"num_warps": 4},
        {"lookup": "gather", "bm": 256},
    ]
    best_f, best_fms = base, base_ms[0]
    print("sweep base:", base, base_ms, flush=True)
    for cfg in fwd_cfgs:
        if time.time() - T0 > budget * 0.2:
            break
        bs = dataclasses.replace(base, **cfg)
        r = run_case(name, n_in, out, t, bs, fh, modes=("fwd",), which=("fused",), tag="sweep_fwd")[
            0
        ]
        ok = r.get("ms_fused") and r.get("err_y", 1) < 2e-2
        if ok and r["ms_fused"] < best_fms:
            best_f, best_fms = bs, r["ms_fused"]
    bwd_cfgs = [
        {"bwd_bm": 256, "bwd_bk": 64},
        {"bwd_w_lhs": True},
        {"bwd_w_lhs": True, "bwd_bm": 256, "bwd_bk": 64},
        {"bwd_bk": 256},
    ]
    if best_f != base:
        bwd_cfgs.insert(0, {})
    best_b, best_bms = best_f, float("inf") if best_f != base else base_ms[1]
    for cfg in bwd_cfgs:
        if time.time() - T0 > budget * 0.3:
            break
        bs = dataclasses.replace(best_f, **cfg)
        r = run_case(
            name, n_in, out, t, bs, fh, modes=("fwdbwd",), which=("fused",), tag="sweep_bwd"
        )[0]
        ok = r.get("ms_fused") and r.get("err_dx", 1) < 2e-2
        if ok and r["ms_fused"] < best_bms:
            best_b, best_bms = bs, r["ms_fused"]
    return best_b


def decode_variants(t, n_in, out):
    """Forward tiles to try at a decode T: the picker's, then one change each (lookup, column tile,
    split-k, warps, stages). Only configurations the kernel accepts."""
    base = k.pick_block_sizes(t, out, n_in)
    nh, k_steps = out // 2, n_in // k.QBLOCK
    cfgs = [{}, {"lookup": "gather"}, {"num_warps": 2}, {"num_warps": 8}, {"num_stages": 2}]
    cfgs += [{"num_stages": 4}]
    cfgs += [{"bn": bn} for bn in (16, 64) if bn != base.bn and nh % bn == 0]
    for f in (2, 4):
        for split in (base.split_k * f, base.split_k // f):
            if split >= 1 and k_steps % split == 0 and k_steps // split >= 1:
                cfgs.append({"split_k": split})
    seen, out_cfgs = set(), []
    for cfg in cfgs:
        bs = dataclasses.replace(base, **cfg)
        if bs not in seen:
            seen.add(bs)
            out_cfgs.append((cfg, bs))
    return out_cfgs


def decode_sweep(fh, budget, ts=(1, 16)):
    """Fused forward at decode T over ``decode_variants``, on every projection shape; each row also
    gets the NF4 bytes streamed per ms (GB/s: packed codes + 8-bit absmax, what the kernel must read)."""
    rows = []
    for t in ts:
        for name, n_in, out in SHAPES:
            for cfg, bs in decode_variants(t, n_in, out):
                if time.time() - T0 > budget - 20:
                    print(f"budget: decode sweep stops before {name} T={t} {cfg}", flush=True)
                    return rows
                which = ("fused", "xla_dequant") if not cfg else ("fused",)
                r = run_case(name, n_in, out, t, bs, fh, modes=("fwd",), which=which, tag="decode")
                r = r[0]
                nf4_bytes = out * n_in // 2 + out * n_in // k.QBLOCK
                if r.get("ms_fused"):
                    r["gbps_fused"] = nf4_bytes / r["ms_fused"] / 1e6
                r["variant"] = json.dumps(cfg) if cfg else "picker"
                log(
                    {
                        "tag": "decode_gbps",
                        **{
                            kk: r.get(kk)
                            for kk in ("shape", "T", "variant", "gbps_fused", "ms_fused")
                        },
                    },
                    fh,
                )
                rows.append(r)
    return rows


ADAM_VARIANTS = (
    ("adamw_fp32", lambda: __import__("optax").adamw(1e-4)),
    ("adamw_8bit", lambda: optim.adamw_8bit(1e-4, impl="xla")),
    ("adamw_8bit_pallas", lambda: optim.adamw_8bit(1e-4, impl="pallas")),
)


def adam_case(name, tree, fh):
    """Time one step (update + apply_updates, donated) of each optimizer on ``tree``'s shapes, from the
    same params and gradients; the fused 8-bit step's params after it are checked against the XLA
    8-bit step's (``err_pallas_vs_xla``: relative L2 over all leaves)."""
    import optax

    shapes = jax.tree.map(
        lambda sh: jax.ShapeDtypeStruct(sh, jnp.float32),
        tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    recs, after = {}, {}
    for oname, make in ADAM_VARIANTS:
        opt = make()
        leaves, treedef = jax.tree.flatten(shapes)
        params = treedef.unflatten([jnp.full(s.shape, 0.01, jnp.float32) for s in leaves])
        grads = treedef.unflatten(
            [jax.random.normal(jax.random.key(i), s.shape) * 1e-3 for i, s in enumerate(leaves)]
        )
        state = opt.init(params)

        def step(p, s, g, opt=opt):
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        step = jax.jit(step, donate_argnums=(0, 1))
        params, state = step(params, state, grads)
        if oname.startswith("adamw_8bit"):  # one step from the same start: comparable
            after[oname] = jax.tree.map(np.asarray, params)
        jax.block_until_ready(params)
        times = []
        for _ in range(10):
            t = time.perf_counter()
            params, state = step(params, state, grads)
            jax.block_until_ready(params)
            times.append(time.perf_counter() - t)
        recs[oname] = {
            "ms": 1e3 * statistics.median(times),
            "state_bytes": optim.state_nbytes(state),
        }
        del params, state, grads
    err = None
    if len(after) == 2:
        a, b = (jax.tree.leaves(after[k]) for k in ("adamw_8bit_pallas", "adamw_8bit"))
        num = sum(float(np.sum((x.astype(np.float64) - y) ** 2)) for x, y in zip(a, b))
        den = sum(float(np.sum(y.astype(np.float64) ** 2)) for y in b)
        err = (num / max(den, 1e-30)) ** 0.5
    rec = dict(
        tag="adam",
        tree=name,
        n_params=n,
        err_pallas_vs_xla=err,
        **{f"{o}_{kk}": v for o, r in recs.items() for kk, v in r.items()},
    )
    log(rec, fh)
    print(
        f"[{time.time() - T0:6.1f}s] adam {name} n={n / 1e6:.1f}M err={err} " + json.dumps(recs),
        flush=True,
    )
    return rec


def adam_cases(tiny: bool, fh) -> None:
    trees = (
        (("tiny", {"a": (64, 256), "b": (100,), "c": (4097,)}),)
        if tiny
        else (("llama3-8b LoRA r16", lora_tree_8b()), ("llama3.2-1b full", full_tree_1b()))
    )
    for tname, tree in trees:
        try:
            adam_case(tname, tree, fh)
        except Exception as e:  # noqa: BLE001
            print("adam", tname, "failed:", type(e).__name__, str(e)[:300], flush=True)


def lora_tree_8b(r=16):
    L, D, F, KV = 32, 4096, 14336, 1024
    mods = {
        "q_proj": (D, D),
        "k_proj": (D, KV),
        "v_proj": (D, KV),
        "o_proj": (D, D),
        "gate_proj": (D, F),
        "up_proj": (D, F),
        "down_proj": (F, D),
    }
    return {m: {"lora_A": (L, r, i), "lora_B": (L, o, r)} for m, (i, o) in mods.items()}


def full_tree_1b():
    L, D, F, KV, V = 16, 2048, 8192, 512, 128256
    layer = {
        "q_proj": (L, D, D),
        "k_proj": (L, KV, D),
        "v_proj": (L, KV, D),
        "o_proj": (L, D, D),
        "gate_proj": (L, F, D),
        "up_proj": (L, F, D),
        "down_proj": (L, D, F),
        "input_layernorm": (L, D),
        "post_attention_layernorm": (L, D),
    }
    return {"embed_tokens": (V, D), "layers": layer, "norm": (D,)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="nf4_h200.jsonl")
    ap.add_argument(
        "--budget", type=float, default=260.0, help="seconds; later cases are skipped past it"
    )
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument(
        "--tiny", action="store_true", help="CPU smoke test: small shapes, interpret mode"
    )
    ap.add_argument(
        "--ts",
        default=None,
        help="comma-separated T values: time only these (picked tiles; no sweep, no 8-bit AdamW)",
    )
    ap.add_argument(
        "--adam-only", action="store_true", help="only the 8-bit AdamW cases (all three steps)"
    )
    ap.add_argument(
        "--decode-sweep",
        action="store_true",
        help="only the decode tile sweep (T=1 and 16, fused forward, every projection shape)",
    )
    args = ap.parse_args(argv)
    global SHAPES, TS, SWEEP_T
    if args.tiny:
        SHAPES = [
            ("tiny 128->256", 128, 256),
            ("tiny 256->64", 256, 64),
            ("tiny 128->512", 128, 512),
            ("tiny 512->128", 512, 128),
        ]
        TS, SWEEP_T = (128, 256, 16, 1), 128
    print(jax.devices(), jax.__version__, flush=True)
    rows = []
    with open(args.out, "w") as fh:
        log(
            {
                "tag": "env",
                "jax": jax.__version__,
                "device": str(jax.devices()[0]),
                "argv": sys.argv,
            },
            fh,
        )

        def grid(t, bs_for):
            for name, n_in, out in SHAPES:
                if time.time() - T0 > args.budget - 40:
                    print(f"budget: skipping {name} T={t}", flush=True)
                    continue
                rows.extend(run_case(name, n_in, out, t, bs_for(t, n_in, out), fh))

        if args.adam_only:
            adam_cases(args.tiny, fh)
            return
        if args.decode_sweep:
            drows = decode_sweep(fh, args.budget)
            print("\n| shape | T | variant | fused ms | GB/s | xla-dequant ms | err y |")
            print("|---|---|---|---|---|---|---|")
            for r in drows:
                print(
                    f"| {r['shape']} | {r['T']} | {r['variant']} | {r.get('ms_fused') or float('nan'):.4f} | "
                    f"{r.get('gbps_fused') or float('nan'):.0f} | {r.get('ms_xla_dequant') or float('nan'):.4f} | "
                    f"{r.get('err_y', float('nan')):.1e} |"
                )
            return
        best = None
        only_ts = [int(t) for t in args.ts.split(",")] if args.ts else None
        for t in only_ts or ():
            grid(t, lambda t, i, o: k.pick_block_sizes(t, o, i))
        if not args.no_sweep and not only_ts:
            name, n_in, out = SHAPES[2]
            base = k.pick_block_sizes(SWEEP_T, out, n_in)
            base_rows = run_case(
                name, n_in, out, SWEEP_T, base, fh, which=("fused",), tag="sweep_base"
            )
            base_ms = tuple(r.get("ms_fused") or float("inf") for r in base_rows)
            best = sweep(fh, args.budget, base_ms)
            print("best large-T config:", best, flush=True)
        large = lambda t, i, o: (
            best if (best is not None and t >= SWEEP_T) else k.pick_block_sizes(t, o, i)
        )
        if only_ts:
            TS = ()
        else:
            grid(SWEEP_T, large)
            grid(TS[1], large)
        if not only_ts:
            adam_cases(args.tiny, fh)
        for t in TS[2:]:
            grid(t, large)
    print(
        "\n| shape | T | mode | fused ms | xla-dequant ms | bf16 ms | vs xla | vs bf16 | err y / dx |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, x, b = r.get("ms_fused"), r.get("ms_xla_dequant"), r.get("ms_bf16")
        sx = f"{x / f:.2f}x" if f and x else "-"
        sb = f"{b / f:.2f}x" if f and b else "-"
        fmt = lambda v: f"{v:.3f}" if v else "-"
        print(
            f"| {r['shape']} | {r['T']} | {r['mode']} | {fmt(f)} | {fmt(x)} | {fmt(b)} | {sx} | {sb} | "
            f"{r.get('err_y', float('nan')):.1e} / {r.get('err_dx', float('nan')):.1e} |"
        )


if __name__ == "__main__":
    main()
