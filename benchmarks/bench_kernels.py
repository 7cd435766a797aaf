"""Time the Pallas kernels against their XLA references on real model shapes; check them in the same run.

    PYTHONPATH=. python3 benchmarks/bench_kernels.py --out "$OUT/kernels_h200.jsonl"
    python benchmarks/bench_kernels.py --lower-only     # CPU: lower every Pallas variant for CUDA

For each op and shape: the XLA reference (``impl="xla"``, XLA's own fusions, autodiff backward) and each
Pallas block-size variant (the picker's first) are timed forward and forward+backward (``jax.vjp`` with a
random cotangent, inside one jit). Memory-bound ops report achieved GB/s over the fewest bytes the op must
move (each input read once, each output written once) and that as a % of the copy bandwidth measured in
the same run (``x * 2`` on 1 GiB: read + write). Cross-entropy reports TFLOP/s over 2TVD (fwd) / 6TVD
(fwd+bwd) and the compiled program's memory (XLA memory analysis: arguments + outputs + temporaries).
Every Pallas output and gradient is compared with the reference (relative L2 error) before timing.
Bytes of fwd+bwd = bytes of the forward plus bytes of the backward, as a training step moves them (the
forward's outputs are consumed before the backward runs). Timed as one jit, XLA may fuse the forward
into the backward and move less, so its fwd+bwd can exceed 100% of the bandwidth ceiling.
Timing: compile + warm up, then the mean of back-to-back calls (several input sets rotated so that
inputs do not sit in the 50 MB L2), median of 3 such means. Results stream to --out as JSON lines; a
short table is printed last. --budget stops starting new cases after that many seconds.

    python benchmarks/bench_kernels.py --table benchmarks/results/kernels_h200.jsonl   # markdown
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastjax.pallas_kernels import cross_entropy as CE
from fastjax.pallas_kernels import rms_norm as RN
from fastjax.pallas_kernels import rope as RP
from fastjax.pallas_kernels import swiglu as SG

from benchmarks.shapes import get

BF16 = jnp.bfloat16
T_BIG, T_SMALL = 16384, 4096  # Llama-3-8B benchmark token counts


class Bench:
    def __init__(self, out: str | None, budget_s: float, lower_only: bool):
        self.t0 = time.time()
        self.budget_s = budget_s
        self.lower_only = lower_only
        self.out = open(out, "a") if out else None  # noqa: SIM115 (streams until exit)
        self.rows: list[dict] = []
        self.copy_gbps = None

    def over_budget(self) -> bool:
        return time.time() - self.t0 > self.budget_s

    def record(self, **row):
        row = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
        row["t_s"] = round(time.time() - self.t0, 1)
        self.rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if self.out:
            self.out.write(line + "\n")
            self.out.flush()


def _time_ms(fn, arg_sets, min_time=0.05, max_reps=100) -> float:
    jax.block_until_ready(fn(*arg_sets[0]))  # compile + warm up
    jax.block_until_ready(fn(*arg_sets[-1]))
    t = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    one = time.perf_counter() - t
    reps = int(min(max_reps, max(3, min_time / max(one, 1e-6))))
    means = []
    for _ in range(3):
        t = time.perf_counter()
        out = None
        for i in range(reps):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        means.append((time.perf_counter() - t) / reps * 1e3)
    return float(np.median(means))


def _rel(got, want) -> float:
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    if not np.all(np.isfinite(got)):
        return float("nan")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _fwd_bwd(fn, n_diff: int):
    """(*diff_args, *static_args, cts) -> (out, grads) through jax.vjp."""

    def run(*args):
        diff, rest, ct = args[:n_diff], args[n_diff:-1], args[-1]
        out, vjp = jax.vjp(lambda *d: fn(*d, *rest), *diff)
        return out, vjp(ct)

    return run


def _fwd_saving(fn, n_diff: int):
    """(*diff_args, *static_args, cts) -> (out, vjp function holding the residuals): the forward half
    of a training step, as its own program."""

    def run(*args):
        diff, rest = args[:n_diff], args[n_diff:-1]
        return jax.vjp(lambda *d: fn(*d, *rest), *diff)

    return run


def _split_times(fn, n_diff: int, sets) -> tuple[float, float]:
    """(forward-with-residuals ms, backward ms), each its own jitted program, as in a training step
    where the rest of the network runs between them. One program doing both (``_fwd_bwd``) lets XLA
    fuse the forward into the backward and skip writing what only the backward reads, which a
    model's forward cannot do: elementwise ops measured that way look faster than they are."""
    fwd = jax.jit(_fwd_saving(fn, n_diff))
    bwd = jax.jit(lambda vjp, ct: vjp(ct))
    saved = [(fwd(*s)[1], s[-1]) for s in sets]
    fwd_ms = _time_ms(fwd, sets)
    bwd_ms = _time_ms(bwd, saved)
    del saved
    return fwd_ms, bwd_ms


def copy_bandwidth(b: Bench):
    """Best of ``x * 2`` on a flat and on a 2-D 1 GiB bf16 array (read + write). The flat one alone
    measured 3.31 TB/s on an H200 while the GLU kernels moved 4.29 TB/s in the same run."""
    rows = 8192 if jax.default_backend() == "gpu" else 64
    best = 0.0
    for shape in ((rows * 65536,), (rows, 65536)):
        x = [
            jax.random.normal(jax.random.key(i), shape, jnp.float32).astype(BF16) for i in range(2)
        ]
        ms = _time_ms(jax.jit(lambda x: x * 2), [(xi,) for xi in x])
        gbps = 2 * x[0].nbytes / ms / 1e6
        best = max(best, gbps)
        b.record(
            op="copy",
            shape=f"{'x'.join(map(str, shape))}-bf16",
            impl="xla",
            fwd_ms=ms,
            fwd_gbps=gbps,
            device=str(jax.devices()[0].device_kind),
            jax=jax.__version__,
        )
    b.copy_gbps = best


def run_op(
    b: Bench,
    *,
    op,
    shape,
    make_inputs,
    n_diff,
    impls,
    bytes_fwd,
    bytes_fwdbwd,
    n_sets=3,
    extra=None,
    flops_fwd=None,
):
    """impls: list of (impl_label, variant_label, fn(*diff, *static) -> out). First one = reference."""
    if b.over_budget():
        b.record(op=op, shape=shape, skipped="budget")
        return
    if b.lower_only:
        shapes = jax.eval_shape(lambda: make_inputs(0))  # no memory: shapes only
        for impl, variant, fn in impls:
            if impl == "xla":
                continue
            t = time.time()
            try:
                for f in (lambda *a, fn=fn: fn(*a[:-1]), _fwd_bwd(fn, n_diff)):
                    jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",))
                b.record(
                    op=op,
                    shape=shape,
                    impl=impl,
                    variant=variant,
                    lowered=True,
                    lower_s=time.time() - t,
                )
            except Exception as e:  # noqa: BLE001
                b.record(
                    op=op,
                    shape=shape,
                    impl=impl,
                    variant=variant,
                    lowered=False,
                    error=f"{type(e).__name__}: {e}"[:400],
                )
        return
    sets = [make_inputs(i) for i in range(n_sets)]  # each: (*args, ct)
    ref = None
    ref_ms = {}
    for impl, variant, fn in impls:
        row = dict(op=op, shape=shape, impl=impl, variant=variant, **(extra or {}))
        try:
            fwd = jax.jit(lambda *a, fn=fn: fn(*a[:-1]))
            fb = jax.jit(_fwd_bwd(fn, n_diff))
            outs = jax.block_until_ready(fb(*sets[0]))
            leaves = jax.tree.leaves(outs)
            if ref is None:
                ref = leaves
            else:
                errs = [_rel(g, r) for g, r in zip(leaves, ref)]
                row.update(max_rel_err=max(errs), rel_errs=[round(e, 6) for e in errs])
            del outs, leaves
            row["fwd_ms"] = _time_ms(fwd, sets)
            row["fwdbwd_ms"] = _time_ms(fb, sets)
            for k, nbytes in (("fwd", bytes_fwd), ("fwdbwd", bytes_fwdbwd)):
                if nbytes:
                    gbps = nbytes / row[f"{k}_ms"] / 1e6
                    row[f"{k}_gbps"] = gbps
                    row[f"{k}_pct_copy_bw"] = 100 * gbps / b.copy_gbps
            if flops_fwd:  # fwd 2TVD; fwd+bwd counted as 6TVD for every impl
                row["fwd_tflops"] = flops_fwd / row["fwd_ms"] / 1e9
                row["fwdbwd_tflops"] = 3 * flops_fwd / row["fwdbwd_ms"] / 1e9
            row["fwdsave_ms"], row["bwd_ms"] = _split_times(fn, n_diff, sets)
            row["split_ms"] = row["fwdsave_ms"] + row["bwd_ms"]
            if bytes_fwdbwd:
                row["split_pct_copy_bw"] = 100 * bytes_fwdbwd / row["split_ms"] / 1e6 / b.copy_gbps
            if impl == "xla" and not ref_ms:
                ref_ms = {k: row[f"{k}_ms"] for k in ("fwd", "fwdbwd", "split")}
            elif ref_ms:
                for k in ("fwd", "fwdbwd", "split"):
                    row[f"{k}_speedup_vs_xla"] = ref_ms[k] / row[f"{k}_ms"]
            if op.startswith("cross_entropy"):
                for k, f in (("fwd", fwd), ("fwdbwd", fb)):
                    ma = f.lower(*sets[0]).compile().memory_analysis()
                    if ma is not None:
                        row[f"{k}_temp_mib"] = ma.temp_size_in_bytes / 2**20
                        row[f"{k}_total_mib"] = (
                            ma.argument_size_in_bytes
                            + ma.output_size_in_bytes
                            + ma.temp_size_in_bytes
                            - ma.alias_size_in_bytes
                        ) / 2**20
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:600]
            traceback.print_exc()
        b.record(**row)
        if b.over_budget():
            break
    del sets, ref


def _normal(key, shape, dtype=BF16, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


# ------------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------------
def _rms_label(v) -> str:
    bwd = f"-bw{v.bwd_num_warps}" if v.bwd_num_warps else ""
    return f"rows{v.block_rows}-w{v.num_warps}-p{v.bwd_programs}{bwd}"


def bench_rms_norm(b: Bench, model: str, n_tok: int, offset: float):
    d = get(model).hidden_size
    s = 2

    def inputs(i):
        k = jax.random.split(jax.random.key(100 + i), 3)
        return _normal(k[0], (n_tok, d)), _normal(k[1], (d,), scale=0.5), _normal(k[2], (n_tok, d))

    pick = RN.pick_block_sizes(n_tok, d, BF16)
    variants = [pick] + [
        dataclasses.replace(pick, block_rows=r, num_warps=w)
        for r, w in ((1, 4), (4, 8))
        if (r, w) != (pick.block_rows, pick.num_warps)
    ]
    variants += [dataclasses.replace(pick, bwd_programs=2 * pick.bwd_programs)]
    variants += [dataclasses.replace(pick, bwd_num_warps=w) for w in (8, 16) if w != pick.num_warps]
    impls = [
        ("xla", "reference", lambda x, w: RN.rms_norm(x, w, eps=1e-5, offset=offset, impl="xla"))
    ]
    impls += [
        (
            "pallas",
            _rms_label(v),
            lambda x, w, v=v: RN.rms_norm(x, w, eps=1e-5, offset=offset, block_sizes=v),
        )
        for v in variants
    ]
    run_op(
        b,
        op=f"rms_norm(offset={offset})",
        shape=f"{model}:T{n_tok}xD{d}",
        make_inputs=inputs,
        n_diff=2,
        impls=impls,
        bytes_fwd=2 * n_tok * d * s,
        bytes_fwdbwd=5 * n_tok * d * s,
    )


def bench_rms_norm_residual(b: Bench, model: str, n_tok: int):
    d = get(model).hidden_size
    s = 2

    def inputs(i):
        k = jax.random.split(jax.random.key(200 + i), 5)
        x, r, w = _normal(k[0], (n_tok, d)), _normal(k[1], (n_tok, d)), _normal(k[2], (d,))
        return x, r, w, (_normal(k[3], (n_tok, d)), _normal(k[4], (n_tok, d)))

    pick = RN.pick_block_sizes(n_tok, d, BF16)
    impls = [
        ("xla", "reference", lambda x, r, w: RN.rms_norm_residual(x, r, w, eps=1e-5, impl="xla")),
        ("pallas", "picker", lambda x, r, w: RN.rms_norm_residual(x, r, w, eps=1e-5)),
    ]
    impls += [
        (
            "pallas",
            _rms_label(v),
            lambda x, r, w, v=v: RN.rms_norm_residual(x, r, w, eps=1e-5, block_sizes=v),
        )
        for v in (
            dataclasses.replace(pick, bwd_num_warps=8),
            dataclasses.replace(pick, bwd_num_warps=16),
        )
    ]
    run_op(
        b,
        op="rms_norm_residual",
        shape=f"{model}:T{n_tok}xD{d}",
        make_inputs=inputs,
        n_diff=3,
        impls=impls,
        bytes_fwd=4 * n_tok * d * s,
        bytes_fwdbwd=8 * n_tok * d * s,
    )


def bench_rope(b: Bench, model: str, n_tok: int):
    cfg = get(model)
    h, kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    inv_freq = jnp.asarray(RP.rope_inv_freq(dh, cfg.rope_theta))
    s = 2

    def inputs(i):
        k = jax.random.split(jax.random.key(300 + i), 4)
        q, kk = _normal(k[0], (1, n_tok, h, dh)), _normal(k[1], (1, n_tok, kv, dh))
        pos = (jnp.arange(n_tok, dtype=jnp.int32) % 4096)[None]  # packed: restarts every 4096
        return q, kk, pos, (_normal(k[2], q.shape), _normal(k[3], kk.shape))

    pick = RP.pick_block_sizes(n_tok, h, kv, dh)
    variants = [pick] + [
        RP.BlockSizes(t, w)
        for t, w in ((1, 2), (1, 4), (1, 8), (2, 4))
        if (t, w) != (pick.block_t, pick.num_warps)
    ]
    variants += [  # the rows layout: whole head rows, cos/sin tables
        RP.BlockSizes(1, w, layout="rows", block_rows=r)
        for r, w in ((32, 4), (64, 4), (64, 8), (128, 8))
    ]
    impls = [("xla", "reference", lambda q, k, pos: RP.rope(q, k, pos, inv_freq, impl="xla"))]
    impls += [
        (
            "pallas",
            f"rows{v.block_rows}-w{v.num_warps}"
            if v.layout == "rows"
            else f"t{v.block_t}-w{v.num_warps}",
            lambda q, k, pos, v=v: RP.rope(q, k, pos, inv_freq, block_sizes=v),
        )
        for v in variants
    ]
    nbytes = 2 * n_tok * (h + kv) * dh * s
    run_op(
        b,
        op="rope",
        shape=f"{model}:T{n_tok}",
        make_inputs=inputs,
        n_diff=2,
        impls=impls,
        bytes_fwd=nbytes,
        bytes_fwdbwd=2 * nbytes,
    )


def bench_glu(b: Bench, model: str, n_tok: int, activation: str, sweep: bool = True):
    f = get(model).intermediate_size
    s = 2

    def inputs(i):
        k = jax.random.split(jax.random.key(400 + i), 3)
        return (
            _normal(k[0], (n_tok, f), scale=2.0),
            _normal(k[1], (n_tok, f)),
            _normal(k[2], (n_tok, f)),
        )

    pick = SG.pick_block_sizes(n_tok * f)
    variants = [pick] + (
        [
            SG.BlockSizes(bl, w)
            for bl, w in ((2048, 4), (8192, 8))  # run 3: within 1% of the picker's 1024 x 4
            if (bl, w) != (pick.block, pick.num_warps)
        ]
        if sweep
        else []
    )
    impls = [("xla", "reference", lambda g, u: SG.glu(g, u, activation=activation, impl="xla"))]
    impls += [  # the reference's math with the kernel's residual policy, for XLA to fuse
        (
            "xla_recompute",
            "custom-vjp",
            lambda g, u: SG.glu(g, u, activation=activation, impl="xla_recompute"),
        )
    ]
    impls += [
        (
            "pallas",
            f"b{v.block}-w{v.num_warps}",
            lambda g, u, v=v: SG.glu(g, u, activation=activation, block_sizes=v),
        )
        for v in variants
    ]
    run_op(
        b,
        op=f"glu({activation})",
        shape=f"{model}:T{n_tok}xF{f}",
        make_inputs=inputs,
        n_diff=2,
        impls=impls,
        bytes_fwd=3 * n_tok * f * s,
        bytes_fwdbwd=8 * n_tok * f * s,
    )


def bench_cross_entropy(
    b: Bench, model: str, n_tok: int, *, softcap=None, variants=(), with_full: bool = True
):
    cfg = get(model)
    d, v = cfg.hidden_size, cfg.vocab_size

    def inputs(i):
        k = jax.random.split(jax.random.key(500 + i), 3)
        lab = jax.random.randint(k[2], (n_tok,), 0, v)
        lab = jnp.where(jnp.arange(n_tok) % 7 == 0, -100, lab)
        return _normal(k[0], (n_tok, d)), _normal(k[1], (v, d), scale=0.02), lab, jnp.float32(1.0)

    kw = {"softcap": softcap}
    impls = [
        ("xla", "full-logits", lambda h, w, lab: CE.cross_entropy(h, w, lab, impl="xla", **kw))
    ]
    if not with_full:
        impls = []
    pick = CE.pick_block_sizes(n_tok, v, d, BF16)
    for bs in [pick, *[dataclasses.replace(pick, **var) for var in variants]]:
        name = (
            f"t{bs.block_t}v{bs.block_v}k{bs.block_k}-w{bs.num_warps}s{bs.num_stages}"
            f"-sp{bs.vocab_splits}-c{bs.bwd_vocab_chunk}"
        )
        impls.append(
            (
                "pallas",
                name,
                lambda h, w, lab, bs=bs: CE.cross_entropy(h, w, lab, block_sizes=bs, **kw),
            )
        )
    impls.append(
        (
            "xla_chunked",
            f"tc{pick.token_chunk}",
            lambda h, w, lab: CE.cross_entropy(h, w, lab, impl="xla_chunked", **kw),
        )
    )
    run_op(
        b,
        op="cross_entropy" + (f"(softcap={softcap})" if softcap else ""),
        shape=f"{model}:T{n_tok}xV{v}xD{d}",
        make_inputs=inputs,
        n_diff=2,
        impls=impls,
        bytes_fwd=None,
        bytes_fwdbwd=None,
        n_sets=1,
        flops_fwd=2 * n_tok * v * d,
    )


# ------------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------------
def _ce_flops(shape: str) -> float:
    """2TVD from a ``model:T{T}xV{V}xD{D}`` shape label."""
    t, v, d = (int(x[1:]) for x in shape.split(":")[1].split("x"))
    return 2.0 * t * v * d


def table(rows: list[dict]) -> str:
    """Markdown: %BW is against the ceiling = the best forward rate of the run (copy probe included).
    Forward bytes are moved by every impl alike; fwd+bwd rows are not used (XLA's fused fwd+bwd moves
    fewer bytes than the count, so its rate is not a physical one)."""
    ceiling = max([r.get("fwd_gbps", 0.0) for r in rows] + [1e-9])
    out = [
        f"Bandwidth ceiling {ceiling:.0f} GB/s = best forward rate of this run (copy probe included).",
        "",
        (
            "| op | shape | impl | variant | fwd ms | fwd+bwd ms | fwd %BW or TF/s "
            "| fwd+bwd %BW or TF/s | vs XLA fwd / fwd+bwd | fwd, bwd as two programs: ms, vs XLA "
            "| fwd+bwd MiB (temp) | max rel err |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("op") in ("copy", "meta"):
            continue
        if "fwd_ms" not in r:
            why = r.get("error", r.get("skipped", ""))[:60]
            out.append(
                f"| {r['op']} | {r.get('shape', '')} | {r.get('impl', '')} | "
                f"{r.get('variant', '')} | not run: {why} | | | | | | | |"
            )
            continue
        rates = []
        for k, mult in (("fwd", 1), ("fwdbwd", 3)):
            if k + "_gbps" in r:
                rates.append(f"{100 * r[k + '_gbps'] / ceiling:.0f}%")
            elif r["op"].startswith("cross_entropy"):
                rates.append(f"{mult * _ce_flops(r['shape']) / r[k + '_ms'] / 1e9:.0f}")
            else:
                rates.append("")
        vs = (
            f"{r['fwd_speedup_vs_xla']:.2f}x / {r['fwdbwd_speedup_vs_xla']:.2f}x"
            if "fwd_speedup_vs_xla" in r
            else ""
        )
        mem = (
            f"{r['fwdbwd_total_mib']:.0f} ({r['fwdbwd_temp_mib']:.0f})"
            if "fwdbwd_total_mib" in r
            else ""
        )
        split = ""
        if "split_ms" in r:
            split = f"{r['fwdsave_ms']:.3f} + {r['bwd_ms']:.3f}"
            if "split_speedup_vs_xla" in r:
                split += f", {r['split_speedup_vs_xla']:.2f}x"
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "reference"
        out.append(
            f"| {r['op']} | {r['shape']} | {r['impl']} | {r['variant']} | {r['fwd_ms']:.3f} | "
            f"{r['fwdbwd_ms']:.3f} | {rates[0]} | {rates[1]} | {vs} | {split} | {mem} | {err} |"
        )
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON-lines file to append results to")
    p.add_argument("--budget", type=float, default=270.0, help="seconds; no new case after that")
    p.add_argument("--lower-only", action="store_true", help="only lower Pallas variants for CUDA")
    p.add_argument("--only", default="", help="comma list of ops: ce,rms,res,rope,glu")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run of this script: tiny shapes")
    p.add_argument(
        "--table", default=None, help="print the markdown table of a results JSONL; exit"
    )
    args = p.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return 0
    if args.tiny:
        global get, T_BIG, T_SMALL
        tiny = get("smollm2-135m")
        get = lambda name: dataclasses.replace(tiny, vocab_size=1000, hidden_size=64)
        T_BIG, T_SMALL = 64, 32
    if args.lower_only:
        os.environ["FASTJAX_PALLAS_INTERPRET"] = "0"
    b = Bench(args.out, args.budget, args.lower_only)
    only = set(filter(None, args.only.split(",")))

    def want(k: str) -> bool:
        return not only or k in only

    if not args.lower_only:
        copy_bandwidth(b)
    if want("ce"):
        bench_cross_entropy(
            b,
            "llama-3-8b",
            T_BIG,
            variants=[
                {"block_v": 128},
                {"block_t": 64, "block_v": 128, "num_warps": 4, "num_stages": 4},
            ],
        )
        bench_cross_entropy(b, "llama-3-8b", T_SMALL)
    if want("rms"):
        for t in (T_BIG, T_SMALL):
            bench_rms_norm(b, "llama-3-8b", t, 0.0)
    if want("glu"):
        for t in (T_BIG, T_SMALL):
            bench_glu(b, "llama-3-8b", t, "silu")
    if want("rope"):
        for t in (T_BIG, T_SMALL):
            bench_rope(b, "llama-3-8b", t)
    if want("res"):
        bench_rms_norm_residual(b, "llama-3-8b", T_BIG)
    if want("rms"):
        bench_rms_norm(b, "gemma-2-9b", T_BIG, 1.0)
    if want("glu"):
        bench_glu(b, "gemma-2-9b", T_BIG, "gelu_tanh", sweep=False)
    if want("rope"):
        bench_rope(b, "qwen2.5-7b", T_BIG)
    if want("ce"):
        bench_cross_entropy(b, "gemma-2-9b", T_SMALL, softcap=30.0)
    if not args.lower_only:
        print(
            f"\ncopy bandwidth {b.copy_gbps:.0f} GB/s on {jax.devices()[0].device_kind}; "
            f"jax {jax.__version__}; {time.time() - b.t0:.0f} s"
        )
        print(table(b.rows))
    else:
        bad = [r for r in b.rows if r.get("lowered") is False]
        print(f"lowered {len(b.rows) - len(bad)} variants, {len(bad)} failed")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
