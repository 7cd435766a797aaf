"""Attention benchmark: Pallas flash attention vs cuDNN vs the XLA reference, plus compiled correctness.

Usage (GPU machine, repo root)::

    python3 benchmarks/bench_attention.py --plan check,sweep:128,bench:8192:128 --out $OUT --deadline 250
    python3 benchmarks/bench_attention.py --to-md benchmarks/results/attention_h200.jsonl   # table

Plan steps, run in order (a step that would start past ``--deadline`` seconds is skipped):
- ``check``: compiled kernels vs ``attention_reference`` (fp32, HIGHEST) at small odd shapes, every feature.
- ``check2``: fp32 inputs (IEEE dots) and cuDNN's packed layout (``max_segments``) vs the reference.
- ``sweep:D``: tiles per kernel at B=4, T=4096, causal, bf16: forward, then dk/dv and dq each timed alone,
  then the fused backward (one kernel, dq by atomics), kept when it beats the split pair's best sum.
- ``bench:T:D``: fwd and fwd+bwd for pallas / cudnn (/ xla at T=2048, D=128), B*T = 32k tokens, causal,
  without and with 4-8 packed segments per row, the packed rows also run as a padded batch [n_seq, max_len]
  through cuDNN and Pallas, and (T=8192) through cuDNN's packed layout; the Pallas rows also run the other
  backward schedule (``pallas_fused`` or ``pallas_split``: ``BlockSizes.fused_bwd``) on the same tiles.
- ``pbench:T:D``: only the Pallas rows of ``bench`` (plus cuDNN packed at T=8192), with the swept tiles.

FLOPs count only allowed (query, key) pairs: forward ``4 * H * D * pairs``, fwd+bwd 3.5x that
(the backward's five matmuls against the forward's two). Every row goes to ``<out>/attention.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

try:
    from fastjax.pallas_kernels import attention as A
except ModuleNotFoundError:  # repo not pip-installed (GPU machine): map the package dir by hand
    import importlib

    import fastjax

    sys.modules["fastjax.pallas_kernels"] = importlib.import_module("pallas_kernels")
    fastjax.pallas_kernels = sys.modules["fastjax.pallas_kernels"]
    from fastjax.pallas_kernels import attention as A

from benchmarks.common import record

T0 = time.time()
DEADLINE = [1e9]
OUT = [None]


def left() -> float:
    return DEADLINE[0] - (time.time() - T0)


def timeit(fn, *args, budget: float = 0.25) -> float:
    """Median seconds per call after compile + one warm-up; repeats fill ``budget`` seconds (3..15)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    n = int(min(15, max(3, budget / max(one, 1e-6))))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


ROWS: list[dict] = []


def out_row(**kw):
    row = record(elapsed_s=round(time.time() - T0, 1), **kw)
    ROWS.append(row)
    if OUT[0]:
        with open(os.path.join(OUT[0], "attention.jsonl"), "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    short = {
        k: v
        for k, v in row.items()
        if k not in ("command", "date", "gpu", "jax", "jaxlib", "python", "blocks", "block_sizes")
    }
    print(json.dumps(short, default=str)[:400], flush=True)


def summary():
    """A short table, printed last (the device tool returns only the tail of the output)."""
    print("\n=== summary ===")
    for r in ROWS:
        k = r["kind"]
        if k == "check":
            errs = [r.get(f"rel_err_{x}") for x in ("out", "dq", "dk", "dv")]
            print(
                f"check {r['impl']:12s} D{r['D']} {r['dtype']:8s} c={r['causal']} seg={r.get('segments')} "
                f"w={r.get('window')} cap={r.get('softcap')} ok={r['ok']} "
                + " ".join("-" if e is None else f"{e:.1e}" for e in errs)
                + (f" ERR {r['error'][:120]}" if r.get("error") else "")
            )
        elif k.startswith("sweep_") and k != "sweep_best":
            print(
                f"{k:11s} D{r['D']} {r.get('cfg', r.get('pass_'))} {r['ms']:.2f}ms "
                f"{r['tflops']:.0f}TF" + (f" ERR {r['error'][:100]}" if r.get("error") else "")
            )
        elif k == "sweep_best":
            print(f"best D{r['D']} {r['block_sizes']}")
        elif k == "skipped":
            print(f"skipped {r['step']}")
        elif k == "bench":
            ms = r.get("ms", float("nan"))
            print(
                f"bench {r['impl']:22s} {r['pass_']:7s} T{r['T']} D{r['D']} seg={r.get('segments')} "
                f"{ms:.2f}ms {r.get('tflops', float('nan')):.0f}TF"
                + (f" ERR {str(r.get('error'))[:100]}" if r.get("error") else "")
            )


def rel(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30))


def make_inputs(key, b, t, h, kv, d, dtype):
    ks = jax.random.split(key, 4)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, t, kv, d), dtype)
    v = jax.random.normal(ks[2], (b, t, kv, d), dtype)
    do = jax.random.normal(ks[3], (b, t, h, d), dtype)
    return q, k, v, do


def packed_lengths(rng, b, t, n_min=4, n_max=8, pad_frac=0.03):
    """Per row: 4-8 random segment lengths summing to ~97% of T (the rest is padding, id 0)."""
    rows = []
    for _ in range(b):
        n = int(rng.integers(n_min, n_max + 1))
        real = int(t * (1 - pad_frac))
        w = rng.dirichlet(np.full(n, 2.0))
        lens = np.maximum(16, np.floor(w * real).astype(int))
        lens[-1] = max(16, real - lens[:-1].sum())
        rows.append([int(x) for x in lens])
    return rows


def segment_ids_from(rows, t):
    seg = np.zeros((len(rows), t), np.int32)
    for r, lens in enumerate(rows):
        pos = 0
        for i, n in enumerate(lens):
            seg[r, pos : pos + n] = i + 1
            pos += n
    return jnp.asarray(seg)


def pairs(rows=None, *, b=1, t=0, causal=True) -> int:
    if rows is None:
        return b * (t * (t + 1) // 2 if causal else t * t)
    return sum(n * (n + 1) // 2 for lens in rows for n in lens)


def fns(impl, *, bs=None, seg=None, causal=True, window=None, softcap=None, max_segments=None):
    def f(q, k, v):
        return A.attention(
            q,
            k,
            v,
            segment_ids=seg,
            causal=causal,
            window=window,
            softcap=softcap,
            impl=impl,
            block_sizes=bs,
            max_segments=max_segments,
        )

    def fb(q, k, v, do):
        _, vjp = jax.vjp(f, q, k, v)
        return vjp(do)

    def fob(q, k, v, do):
        o, vjp = jax.vjp(f, q, k, v)
        return (o, *vjp(do))

    return jax.jit(f), jax.jit(fb), jax.jit(fob)


# ----------------------------------------------------------------------------------------------------


CHECK_CASES = [  # (B, T, H, KV, D, dtype, causal, segments, window, softcap)
    (2, 300, 8, 2, 128, "bfloat16", True, False, None, None),
    (2, 300, 8, 2, 128, "bfloat16", True, True, 100, 30.0),
    (1, 257, 8, 8, 64, "bfloat16", False, True, None, None),
    (2, 200, 4, 1, 256, "bfloat16", True, True, None, 50.0),
    (1, 130, 4, 2, 128, "float16", True, False, 64, None),
    (1, 100, 4, 4, 64, "float32", True, True, None, None),
]


def mode_check():
    rng = np.random.default_rng(0)
    worst = 0.0
    for i, (b, t, h, kv, d, dt, causal, use_seg, window, softcap) in enumerate(CHECK_CASES):
        dtype = jnp.dtype(dt)
        q, k, v, do = make_inputs(jax.random.key(100 + i), b, t, h, kv, d, dtype)
        seg = segment_ids_from(packed_lengths(rng, b, t, 1, 4, 0.05), t) if use_seg else None
        kw = {"seg": seg, "causal": causal, "window": window, "softcap": softcap}
        try:
            got = fns("pallas", **kw)[2](q, k, v, do)
            want = fns("xla", **kw)[2](q, k, v, do)
            errs = [rel(a, w) for a, w in zip(got, want)]
            nan = bool(any(jnp.isnan(x).any() for x in got))
            err = None
        except Exception as e:  # noqa: BLE001 - report and keep going
            errs, nan, err = [float("nan")] * 4, True, f"{type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc()
        tol = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}[dt]
        ok = (not nan) and max(errs) < tol
        worst = max(worst, max(errs))
        out_row(
            kind="check",
            impl="pallas",
            B=b,
            T=t,
            H=h,
            KV=kv,
            D=d,
            dtype=dt,
            causal=causal,
            segments=use_seg,
            window=window,
            softcap=softcap,
            rel_err_out=errs[0],
            rel_err_dq=errs[1],
            rel_err_dk=errs[2],
            rel_err_dv=errs[3],
            ok=ok,
            error=err,
        )
    # cuDNN on the same odd shape, window included (its sliding window must equal ours).
    q, k, v, do = make_inputs(jax.random.key(7), 1, 300, 8, 2, 128, jnp.bfloat16)
    try:
        e = rel(fns("cudnn", window=100)[0](q, k, v), fns("xla", window=100)[0](q, k, v))
        err = None
    except Exception as ex:  # noqa: BLE001
        e, err = float("nan"), f"{type(ex).__name__}: {str(ex)[:300]}"
    out_row(
        kind="check",
        impl="cudnn",
        B=1,
        T=300,
        H=8,
        KV=2,
        D=128,
        dtype="bfloat16",
        causal=True,
        window=100,
        rel_err_out=e,
        ok=bool(e < 3e-2),
        error=err,
    )
    print(f"check: worst rel err {worst:.2e}")


# ----------------------------------------------------------------------------------------------------

SWEEP_HEADS = {64: (32, 8), 128: (32, 8), 256: (16, 8)}
SWEEP_FWD = {  # (block_q, block_k, num_warps, num_stages)
    # Left out after run 2 (over the H200's shared memory): 128x128 at 4 stages; 64x128 at D=256.
    128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 4, 3)],
    256: [(64, 64, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2)],
}
SWEEP_DKDV = {  # (block_q, block_k, num_warps, num_stages); block_k is the resident kv tile
    # 2026-12-01 (run 2): 64x128 at 8 warps 383 TFLOP/s, 64x64 209, 32x128 at 4 warps 115.
    # Left out after run 2 (over shared memory): 128x128 at 3 stages; 64x128 at D=256.
    128: [(64, 128, 8, 3), (64, 128, 8, 4), (64, 128, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)],
    256: [(32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2), (32, 64, 8, 3)],
}
SWEEP_FUSED = {  # fused backward (dk/dv tiles + dq atomics); block_k is the resident kv tile
    # 2026-12-01 (run 2), D=128: the best of six tiles ran 119 TFLOP/s against the split pair's 283
    # (dq atomics: every kv block adds into each q row's fp32 dq), so one tile stays as the check.
    128: [(64, 128, 8, 3)],
    256: [(32, 64, 8, 2)],
}
SWEEP_DQ = {  # (block_q, block_k, num_warps, num_stages); block_q is the resident q tile
    # 2026-12-01 (run 2): 128x64 at 3 stages 415 TFLOP/s, 128x32 411, 64x64 184.
    # Left out after run 2 (over shared memory): 128x128 at 3 stages; 128x64 at D=256.
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 32, 8, 4)],
    256: [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
}
BEST: dict[int, A.BlockSizes] = {}


def _replace(bs, prefix, cfg):
    bq, bk, w, st = cfg
    sfx = {"fwd": "", "dkdv": "_dkv", "dq": "_dq"}[prefix]
    return dataclasses.replace(
        bs,
        **{f"block_q{sfx}": bq, f"block_k{sfx}": bk, f"num_warps{sfx}": w, f"num_stages{sfx}": st},
    )


def _try_time(fn, *args):
    try:
        return timeit(fn, *args), None
    except Exception as e:  # noqa: BLE001 - a config that fails to compile is a data point
        return float("nan"), f"{type(e).__name__}: {str(e)[:300]}"


def step_sweep(d, b=4, t=4096):
    """Forward tiles, then the dk/dv and dq kernels each timed alone on the forward's residuals, then
    the fused backward (dk/dv + dq atomics, ``BlockSizes.fused_bwd``) against their best sum."""
    from fastjax.pallas_kernels import _common
    from fastjax.pallas_kernels import attention_bwd as AB

    h, kv = SWEEP_HEADS[d]
    q, k, v, do = make_inputs(jax.random.key(d), b, t, h, kv, d, jnp.bfloat16)
    fl = 4 * h * d * pairs(b=b, t=t)
    best = A.pick_block_sizes(d)
    shape = {"D": d, "B": b, "T": t, "H": h, "KV": kv}
    res = {}
    for cfg in SWEEP_FWD[d]:
        if left() < 20:
            break
        s, err = _try_time(fns("pallas", bs=_replace(best, "fwd", cfg))[0], q, k, v)
        out_row(kind="sweep_fwd", cfg=cfg, ms=s * 1e3, tflops=fl / s / 1e12, error=err, **shape)
        res[cfg] = s
    if res:
        best = _replace(best, "fwd", min(res, key=lambda c: np.nan_to_num(res[c], nan=1e9)))
    st = A._Static(
        causal=True,
        window=None,
        softcap=None,
        sm_scale=1 / math.sqrt(d),
        blocks=best,
        interpret=_common.resolve_interpret(None),
        t=t,
        kv_len=t,
        head_dim=d,
    )
    out, lse = jax.jit(lambda q, k, v: A._fwd_impl(q, k, v, None, st))(q, k, v)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    split_s = {}
    for name, cfgs, call, mult in (
        ("dkdv", SWEEP_DKDV[d], AB.dkdv_call, 2.0),
        ("dq", SWEEP_DQ[d], AB.dq_call, 1.5),
    ):
        res = {}
        for cfg in cfgs:
            if left() < 20:
                break
            st2 = dataclasses.replace(st, blocks=_replace(best, name, cfg))
            f = jax.jit(
                lambda q, k, v, do, lse, delta, st2=st2, call=call: call(
                    q, k, v, None, do, lse, delta, st2
                )
            )
            s, err = _try_time(f, q, k, v, do, lse, delta)
            out_row(
                kind=f"sweep_{name}",
                cfg=cfg,
                ms=s * 1e3,
                tflops=mult * fl / s / 1e12,
                error=err,
                **shape,
            )
            res[cfg] = s
        if res:
            pick = min(res, key=lambda c: np.nan_to_num(res[c], nan=1e9))
            best = _replace(best, name, pick)
            split_s[name] = res[pick]
    best = _sweep_fused(d, best, st, (q, k, v, do, lse, delta), split_s, shape, fl)
    BEST[d] = best
    out_row(kind="sweep_best", block_sizes=dataclasses.asdict(best), **shape)
    del q, k, v, do, out, lse, delta


def _sweep_fused(d, best, st, args, split_s, shape, fl):
    """Time the fused backward per tile; keep it (``fused_bwd=True``) only when its dq, dk, dv match
    the split kernels' (rel. error < 2e-2, bf16) and it beats their best dk/dv + dq time. The fused
    row's TFLOP/s counts the backward's 2.5x forward FLOPs."""
    from fastjax.pallas_kernels import attention_bwd as AB

    split = split_s.get("dkdv", float("nan")) + split_s.get("dq", float("nan"))
    out_row(
        kind="sweep_split_sum",
        cfg="dkdv+dq",
        ms=split * 1e3,
        tflops=2.5 * fl / split / 1e12,
        **shape,
    )
    q, k, v, do, lse, delta = args
    st_split = dataclasses.replace(st, blocks=best)
    want_dk, want_dv = AB.dkdv_call(q, k, v, None, do, lse, delta, st_split)
    want = (AB.dq_call(q, k, v, None, do, lse, delta, st_split), want_dk, want_dv)
    res = {}
    for cfg in SWEEP_FUSED.get(d, []):
        if left() < 20:
            break
        blocks = dataclasses.replace(_replace(best, "dkdv", cfg), fused_bwd=True)
        st2 = dataclasses.replace(st, blocks=blocks)
        f = jax.jit(
            lambda q, k, v, do, lse, delta, st2=st2: AB.dkdv_call(
                q, k, v, None, do, lse, delta, st2, fused=True
            )
        )
        s, err = _try_time(f, *args)
        errs = [float("nan")] * 3
        if err is None:
            dk, dv, dq = f(*args)
            errs = [rel(dq, want[0]), rel(dk, want[1]), rel(dv, want[2])]
        ok = err is None and max(errs) < 2e-2
        out_row(
            kind="sweep_fused",
            cfg=cfg,
            ms=s * 1e3,
            tflops=2.5 * fl / s / 1e12,
            rel_err_dq_dk_dv=errs,
            ok=ok,
            error=err,
            **shape,
        )
        if ok:
            res[cfg] = s
    if not res:
        return best
    pick = min(res, key=lambda c: res[c])
    if not res[pick] < np.nan_to_num(split, nan=1e9):
        return best
    return dataclasses.replace(_replace(best, "dkdv", pick), fused_bwd=True)


def step_check2():
    """fp32 inputs (IEEE dots on the GPU) and cuDNN's packed layout against the reference."""
    rng = np.random.default_rng(3)
    q, k, v, do = make_inputs(jax.random.key(11), 1, 100, 4, 4, 64, jnp.float32)
    seg = segment_ids_from(packed_lengths(rng, 1, 100, 1, 4, 0.05), 100)
    got = fns("pallas", seg=seg)[2](q, k, v, do)
    want = fns("xla", seg=seg)[2](q, k, v, do)
    errs = [rel(a, w) for a, w in zip(got, want)]
    out_row(
        kind="check",
        impl="pallas",
        B=1,
        T=100,
        H=4,
        KV=4,
        D=64,
        dtype="float32",
        causal=True,
        segments=True,
        rel_err_out=errs[0],
        rel_err_dq=errs[1],
        rel_err_dk=errs[2],
        rel_err_dv=errs[3],
        ok=bool(max(errs) < 1e-4),
    )
    for d, window in ((128, None), (128, 100), (256, None)):
        b, t, h, kv = 2, 1000, 8, 2
        q, k, v, do = make_inputs(jax.random.key(12 + d), b, t, h, kv, d, jnp.bfloat16)
        rows = packed_lengths(rng, b, t, 3, 6, 0.05)
        seg = segment_ids_from(rows, t)
        try:
            got = fns("cudnn", seg=seg, window=window, max_segments=8)[2](q, k, v, do)
            want = fns("xla", seg=seg, window=window)[2](q, k, v, do)
            errs = [rel(a, w) for a, w in zip(got, want)]
            pad = np.asarray(seg) == 0
            pad_zero = all(not np.any(np.asarray(x, np.float32)[pad]) for x in got[:2])
            nan = bool(any(jnp.isnan(x).any() for x in got))
            err = None
        except Exception as e:  # noqa: BLE001
            errs, pad_zero, nan = [float("nan")] * 4, False, True
            err = f"{type(e).__name__}: {str(e)[:300]}"
        out_row(
            kind="check",
            impl="cudnn_packed",
            B=b,
            T=t,
            H=h,
            KV=kv,
            D=d,
            dtype="bfloat16",
            causal=True,
            segments=True,
            window=window,
            rel_err_out=errs[0],
            rel_err_dq=errs[1],
            rel_err_dk=errs[2],
            rel_err_dv=errs[3],
            padding_zero=pad_zero,
            ok=bool(not nan and max(errs) < 3e-2 and pad_zero),
            error=err,
        )


def _time_pair(tag, fpair, args_f, args_b, flops, **kw):
    for pass_, fn, args, mult in (
        ("fwd", fpair[0], args_f, 1.0),
        ("fwd_bwd", fpair[1], args_b, 3.5),
    ):
        if left() < 15:
            out_row(kind="bench", impl=tag, pass_=pass_, skipped="deadline", **kw)
            continue
        try:
            s = timeit(fn, *args)
            err = None
        except Exception as e:  # noqa: BLE001
            s, err = float("nan"), f"{type(e).__name__}: {str(e)[:300]}"
        out_row(
            kind="bench",
            impl=tag,
            pass_=pass_,
            ms=s * 1e3,
            tflops=mult * flops / s / 1e12,
            error=err,
            **kw,
        )


def step_bench(t, d, *, pallas_only=False, tokens=32768):
    rng = np.random.default_rng(1)  # same packed rows for a given (T, D) in every run
    b = max(1, tokens // t)
    h, kv = SWEEP_HEADS[d]
    bs = BEST.get(d, A.pick_block_sizes(d))
    q, k, v, do = make_inputs(jax.random.key(t + d), b, t, h, kv, d, jnp.bfloat16)
    shape = {"B": b, "T": t, "H": h, "KV": kv, "D": d, "causal": True}
    tiles = {"block_sizes": dataclasses.asdict(bs)}
    fl = 4 * h * d * pairs(b=b, t=t)
    impls = (
        ["pallas"]
        if pallas_only
        else ["pallas", "cudnn"] + (["xla"] if (t, d) == (2048, 128) else [])
    )
    for impl in impls:
        _time_pair(
            impl,
            fns(impl, bs=bs if impl == "pallas" else None)[:2],
            (q, k, v),
            (q, k, v, do),
            fl,
            segments=0,
            **shape,
            **(tiles if impl == "pallas" else {}),
        )
    # The other backward schedule on the same tiles (fused when the sweep kept split, and back),
    # unless this run's sweep already timed both schedules for this head_dim.
    if d not in BEST:
        other = dataclasses.replace(bs, fused_bwd=not bs.fused_bwd)
        _time_pair(
            "pallas_split" if bs.fused_bwd else "pallas_fused",
            fns("pallas", bs=other)[:2],
            (q, k, v),
            (q, k, v, do),
            fl,
            segments=0,
            **shape,
            block_sizes=dataclasses.asdict(other),
        )
    rows = packed_lengths(rng, b, t)
    seg = segment_ids_from(rows, t)
    flp = 4 * h * d * pairs(rows)
    nseg = sum(len(r) for r in rows)
    packed = {"segments": nseg, **shape}
    _time_pair(
        "pallas",
        fns("pallas", bs=bs, seg=seg)[:2],
        (q, k, v),
        (q, k, v, do),
        flp,
        **packed,
        **tiles,
    )
    if not pallas_only and (t, d) == (2048, 128):
        _time_pair("xla", fns("xla", seg=seg)[:2], (q, k, v), (q, k, v, do), flp, **packed)
    if t == 8192:  # cuDNN's packed (THD) layout, static bound on segments per row
        m = max(len(r) for r in rows)
        _time_pair(
            "cudnn_packed",
            fns("cudnn", seg=seg, max_segments=m)[:2],
            (q, k, v),
            (q, k, v, do),
            flp,
            **packed,
        )
    if not pallas_only and (d == 128 or t == 8192):  # the same sequences as a padded batch, causal
        lmax = -(-max(max(r) for r in rows) // 64) * 64
        qp, kp, vp, dop = make_inputs(jax.random.key(5), nseg, lmax, h, kv, d, jnp.bfloat16)
        padded = {"segments": nseg, "padded_to": [nseg, lmax], **shape}
        for impl in ("cudnn", "pallas"):
            _time_pair(
                f"{impl}_padded_batch",
                fns(impl, bs=bs if impl == "pallas" else None)[:2],
                (qp, kp, vp),
                (qp, kp, vp, dop),
                flp,
                **padded,
            )
        del qp, kp, vp, dop
    del q, k, v, do


# ----------------------------------------------------------------------------------------------------


def to_md(path):
    with open(path) as f:
        rows = [json.loads(x) for x in f if x.strip()]
    bench = [r for r in rows if r.get("kind") == "bench" and "ms" in r]
    cmd = next((r.get("command") for r in rows if r.get("command")), "")
    gpu = next((r.get("gpu") for r in rows if r.get("gpu")), "")
    print(f"# Attention on {gpu}\n\nCommand: `{cmd}`\n")
    print(
        "TFLOP/s count allowed (query, key) pairs only; fwd+bwd = 3.5x forward FLOPs. bf16, "
        "causal, B*T = 32k tokens.\n"
    )
    print(
        "| T | D | B | H/KV | segments | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    key = {}
    for r in bench:
        k = (r["T"], r["D"], r["B"], f"{r['H']}/{r['KV']}", r.get("segments", 0), r["impl"])
        key.setdefault(k, {})[r["pass_"]] = r
    for k in sorted(key, key=lambda x: (x[1], x[0], x[4] > 0, x[5])):
        f, fb = key[k].get("fwd", {}), key[k].get("fwd_bwd", {})

        def c(x, f_):
            v = x.get(f_)
            if v is None or math.isnan(v):
                return "n/a"
            return f"{v:.1f}" if f_ == "tflops" else f"{v:.2f}"

        print(
            f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {k[5]} | {c(f, 'ms')} | "
            f"{c(f, 'tflops')} | {c(fb, 'ms')} | {c(fb, 'tflops')} |"
        )
    sweep = [r for r in rows if r.get("kind", "").startswith("sweep")]
    if sweep:
        print("\n## Block-size sweep (B=4, T=4096, causal, bf16)\n")
        print("| kind | D | cfg | ms | TFLOP/s |\n|---|---|---|---|---|")
        for r in sweep:
            if "ms" in r:
                cfg = r.get("cfg", r.get("pass_", ""))
                print(f"| {r['kind']} | {r['D']} | {cfg} | {r['ms']:.2f} | {r['tflops']:.1f} |")
    checks = [r for r in rows if r.get("kind") == "check"]
    if checks:
        print("\n## Compiled correctness (rel. L2 error vs fp32 reference)\n")
        print(
            "| impl | shape | dtype | causal | seg | window | softcap | out | dq | dk | dv | ok |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in checks:
            errs = [r.get(f"rel_err_{x}") for x in ("out", "dq", "dk", "dv")]
            es = " | ".join("-" if e is None else f"{e:.1e}" for e in errs)
            print(
                f"| {r['impl']} | {r['B']}x{r['T']}x{r['H']}/{r['KV']}x{r['D']} | {r['dtype']} | "
                f"{r['causal']} | {r.get('segments')} | {r.get('window')} | {r.get('softcap')} | "
                f"{es} | {r['ok']} |"
            )


def main():
    p = argparse.ArgumentParser()
    p.add_argument(
        "--plan",
        default="check,sweep:128,sweep:256,bench:8192:128,bench:8192:256,"
        "bench:2048:128,bench:32768:128,bench:2048:256,bench:32768:256",
    )
    p.add_argument("--out", default=None)
    p.add_argument("--deadline", type=float, default=1e9, help="seconds; later steps are skipped")
    p.add_argument("--tokens", type=int, default=32768, help="B * T per bench shape")
    p.add_argument("--to-md", default=None)
    a = p.parse_args()
    if a.to_md:
        to_md(a.to_md)
        return
    DEADLINE[0], OUT[0] = a.deadline, a.out
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    try:
        from jax._src.lib import cuda_versions

        cudnn = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception:  # noqa: BLE001 - informational only
        cudnn = None
    print(jax.devices(), jax.__version__, f"cudnn={cudnn}", flush=True)
    for step in a.plan.split(","):
        name, *nums = step.split(":")
        if left() < 20:
            out_row(kind="skipped", step=step)
            continue
        if name == "check":
            mode_check()
        elif name == "check2":
            step_check2()
        elif name == "sweep":
            step_sweep(*(int(x) for x in nums))  # sweep:D or sweep:D:B:T
        elif name in ("bench", "pbench"):
            step_bench(int(nums[0]), int(nums[1]), pallas_only=name == "pbench", tokens=a.tokens)
        else:
            raise ValueError(f"unknown plan step {step!r}")
    summary()
    print(f"done in {time.time() - T0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
