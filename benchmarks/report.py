"""Render the benchmark rows: a PNG chart per GPU and the README's performance table.

    python benchmarks/report.py          # rewrite README.md's perf table and results/*.png
    python benchmarks/report.py --check  # exit 1 when the README table is not what the rows give

Reads ``benchmarks/results/train_step*.jsonl`` (rows with ``tokens_per_s``) and
``max_context*.jsonl`` (``kind == "max_context"`` rows). For each GPU, the newest row per (model,
batch x seq, system, remat) is shown; ``run`` numbers the invocations chronologically, so rows with
the same run number were measured in one process sequence, and "vs HF+PEFT" divides by the HF+PEFT
row of the same run when there is one (``*`` marks a ratio against another run's). Rows written
before ``run_id`` existed are grouped into runs by their ``ceilings`` rows (each invocation starts
with one). Systems that only ever skipped or failed in the newest run are listed under the table
with the reason. A row with a ``void`` field (why it did not measure what it names) is left out.

The README table goes between ``<!-- perf-table -->`` and ``<!-- /perf-table -->``; nothing outside
the markers changes. The chart needs matplotlib (the ``plot`` extra); without it only the table is
written.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from benchmarks.shapes import get  # noqa: E402

REPO = harness.REPO
BEGIN, END = "<!-- perf-table -->", "<!-- /perf-table -->"
SYSTEM_ORDER = (
    "fastjax-lora",
    "fastjax-qlora",
    "fastjax-lean",
    "fastjax-qlora-lean",
    "fastjax-packed",
    "plain-xla",
    "xla-cudnn",
    "hf+peft",
    "hf+peft-qlora",
    "unsloth-lora",
    "unsloth-qlora",
)
SYSTEM_NAMES = {
    "fastjax-lora": "fastjax LoRA (bf16 base)",
    "fastjax-qlora": "fastjax QLoRA (NF4 base)",
    "fastjax-lean": "fastjax LoRA, lean (remat, micro-batches)",
    "fastjax-qlora-lean": "fastjax QLoRA, lean (remat, micro-batches)",
    "fastjax-packed": "fastjax LoRA, packed rows",
    "plain-xla": "plain XLA (every op its reference)",
    "xla-cudnn": "plain XLA + cuDNN attention",
    "hf+peft": "transformers + PEFT (sdpa, grad ckpt)",
    "hf+peft-qlora": "transformers + PEFT QLoRA (bitsandbytes)",
    "unsloth-lora": "Unsloth 16-bit LoRA",
    "unsloth-qlora": "Unsloth QLoRA",
}
DEFAULT_REMAT = {
    "fastjax-lean": "offload_layer_input",
    "fastjax-qlora-lean": "offload_layer_input",
}  # others: "full"
SHAPE_NAMES = {
    "llama-3.2-1b": "Llama-3.2-1B",
    "llama-3-8b": "Llama-3-8B",
    "qwen2.5-7b": "Qwen2.5-7B",
    "gemma-2-9b": "Gemma-2-9B",
    "mistral-small-24b": "Mistral-Small-24B",
}
COLORS = {
    "fastjax": "#1f77b4",
    "plain": "#7f7f7f",
    "xla": "#7f7f7f",
    "hf+peft": "#ff7f0e",
    "unsloth": "#2ca02c",
}


# --------------------------------------------------------------------------------------------- rows
def load(paths: list[Path]) -> list[dict]:
    """Rows of every file with ``_file``, ``_order`` (global file order) and ``_run`` (invocation
    id).

    A timed row without ``mfu`` (HF+PEFT rows written before the parent filled it in) gets it from
    its shape and its run's ``ceilings`` row, with the same formula (``harness.train_flops``).
    """
    rows = []
    for path in paths:
        legacy_run = 0
        for r in harness.read_rows([path]):
            if "run_id" not in r and r.get("system") == "ceilings":
                legacy_run += 1
            r = dict(r, _file=path.name, _order=len(rows))
            r["_run"] = r.get("run_id") or f"{path.stem}#{legacy_run}"
            rows.append(r)
    ceilings = {
        r["_run"]: r["matmul_tflops"]
        for r in rows
        if r.get("system") == "ceilings" and r.get("matmul_tflops")
    }
    for r in rows:
        if r.get("mfu") is None and r.get("step_s") and r["_run"] in ceilings and not r.get("kind"):
            try:
                shape = get(r["shape"])
            except KeyError:
                continue
            flops = r.get("model_flops") or harness.train_flops(shape, r["batch"], r["seq"])
            r["mfu"] = harness.mfu(flops, r["step_s"], ceilings[r["_run"]])
    return rows


def _when(r: dict) -> tuple:
    return (r.get("time") or r.get("date") or "", r["_order"])


def label(r: dict) -> str:
    """A row's system as the table names it: configuration included, so variants never merge."""
    chunk = r.get("mlp_chunk_size")
    out = _label(r) + (f", MLP in {chunk}-token slices" if chunk else "")
    if r.get("scan_layers") is False:
        out += ", layers unrolled"
    if r.get("embed_on_host"):
        out += ", embedding on host"
    if r.get("command_buffers"):  # train_step.py --command-buffers options / xla
        out += f", command buffers: {r['command_buffers']}"
    if r.get("xla_flags"):
        out += f" [XLA_FLAGS {r['xla_flags']}]"
    return out


def _label(r: dict) -> str:
    system, _, forced_ops = r.get("system", "?").partition("@")  # NAME@OP=IMPL[,OP=IMPL]
    remat = r.get("remat")
    name = SYSTEM_NAMES.get(system, system)
    if forced_ops:
        name += " (" + ", ".join(forced_ops.split(",")) + ")"
    if system.startswith("ablate-"):  # ablate-OP=IMPL[,OP=IMPL...]
        forced = [piece.split("=") for piece in system[len("ablate-") :].split(",")]
        ops = " + ".join(
            f"{op} on its XLA reference" if impl == "xla" else f"{op} on {impl}"
            for op, impl in forced
        )
        name = f"ablation: fastjax LoRA with {ops}"
    if system in ("fastjax-lean", "fastjax-qlora-lean"):
        micro = r.get("micro_batches")
        base = "QLoRA" if system == "fastjax-qlora-lean" else "LoRA"
        forced = f" ({', '.join(forced_ops.split(','))})" if forced_ops else ""
        return f"fastjax {base}{forced}, lean: remat {remat}" + (
            f", {micro} micro-batches" if micro else ""
        )
    if (
        remat
        and system.startswith(("fastjax", "plain", "xla", "ablate"))
        and remat != DEFAULT_REMAT.get(system, "full")
    ):
        name += f", remat {remat}"
    return name


def _system_rank(r: dict) -> tuple:
    s = r.get("system", "")
    return (SYSTEM_ORDER.index(s) if s in SYSTEM_ORDER else len(SYSTEM_ORDER), s, label(r))


def _shape_rank(shape: str) -> tuple:
    order = list(SHAPE_NAMES)
    return (order.index(shape) if shape in order else len(order), shape)


def train_rows(rows: list[dict]) -> list[dict]:
    return [
        r
        for r in rows
        if "tokens_per_s" in r
        and not r.get("kind")
        and r.get("system") != "ceilings"
        and not r.get("void")  # a row that did not measure what it names (its ``void`` says why)
    ]


def latest(rows: list[dict], key) -> dict:
    """The newest row per ``key(row)``."""
    out = {}
    for r in sorted(rows, key=_when):
        out[key(r)] = r
    return out


def newest_gpu(rows: list[dict]) -> str | None:
    return max(rows, key=_when).get("gpu") if rows else None


def run_numbers(rows: list[dict]) -> dict[str, int]:
    """Invocation id -> 1, 2, ... in the order of each run's first row."""
    first = {}
    for r in sorted(rows, key=_when):
        first.setdefault(r["_run"], len(first) + 1)
    return first


def gpu_slug(gpu: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    return re.sub(r"^nvidia-", "", slug) or "gpu"


# ------------------------------------------------------------------------------------------- tables
def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def cell_table(rows: list[dict]) -> list[tuple]:
    """``[(shape, batch, seq, [newest row per system])]``, by model, then sequence length."""
    best = latest(rows, lambda r: (r.get("shape"), r.get("batch"), r.get("seq"), label(r)))
    cells = defaultdict(list)
    for r in best.values():
        cells[(r.get("shape"), r.get("batch"), r.get("seq"))].append(r)
    ordered = sorted(cells, key=lambda k: (_shape_rank(k[0]), k[2], k[1]))
    return [(*k, sorted(cells[k], key=_system_rank)) for k in ordered]


def ratio(r: dict, ref_system: str, all_train: list[dict]) -> str:
    """``r``'s tokens/s over ``ref_system``'s on the same cell: same run if possible, else the
    newest."""
    same_cell = [
        x
        for x in all_train
        if x.get("system") == ref_system
        and x.get("shape") == r.get("shape")
        and x.get("batch") == r.get("batch")
        and x.get("seq") == r.get("seq")
        and x.get("gpu") == r.get("gpu")
    ]
    if not same_cell:
        return "—"
    same_run = [x for x in same_cell if x["_run"] == r["_run"]]
    ref = max(same_run or same_cell, key=_when)
    mark = "" if same_run else "*"
    return f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x{mark}"


def _ctx_key(r: dict) -> tuple:
    """One max-context search configuration: a search of another one never hides it."""
    parts = (
        "system",
        "shape",
        "cap_gib",
        "remat",
        "mlp_chunk_size",
        "embed_on_host",
        "command_buffers",
    )
    return tuple(r.get(k) for k in parts)


def markdown(rows: list[dict], *, gpu: str, png: str | None) -> str:
    """The generated README block (without the markers)."""
    train = [r for r in train_rows(rows) if r.get("gpu") == gpu]
    ctx = [
        r for r in rows if r.get("kind") == "max_context" and r.get("gpu") == gpu and "max_fit" in r
    ]
    cells = cell_table(train)
    searched = [r for r in ctx if r.get("trials")]  # a search that ran no probe says nothing
    best_ctx = latest(searched, _ctx_key)
    searched_keys = {(r.get("system"), r.get("shape"), r.get("cap_gib")) for r in best_ctx.values()}
    unsearched = {  # the newest probe-less search of a cell that no search with probes covers
        key: r
        for r in sorted(ctx, key=_when)
        if not r.get("trials")
        and (key := (r.get("system"), r.get("shape"), r.get("cap_gib"))) not in searched_keys
    }
    shown = [r for c in cells for r in c[3]] + list(best_ctx.values()) + list(unsearched.values())
    runs = run_numbers(shown)
    dates = sorted({r.get("date") for r in shown if r.get("date")})
    when = dates[0] if len(dates) == 1 else (f"{dates[0]} to {dates[-1]}" if dates else "?")
    has_unsloth = any(r.get("system", "").startswith("unsloth") for r in train)
    intro = (
        f"**{gpu}**, measured {when}. Random weights, LoRA r=16 on all 7 projections, AdamW, "
        "2 warm-up + 6 timed steps, each system in its own process. The newest row per system "
        "is shown; rows with the same **run** number come from one invocation of "
        "`benchmarks/train_step.py` (raw rows: `benchmarks/results/train_step*.jsonl`). "
        "MFU = (4·N·tokens + attention FLOPs) / step time / the bf16 matmul ceiling measured "
        "in the same run."
    )
    lines = [
        "<!-- generated by `python benchmarks/report.py` from benchmarks/results/*.jsonl: "
        "do not edit -->",
        *textwrap.wrap(intro, 110, break_on_hyphens=False),
        "",
    ]
    head = "| model | batch x seq | system | tokens/s | step s | peak GiB | MFU | vs HF+PEFT |"
    sep = "|---|---|---|---:|---:|---:|---:|---:|"
    if has_unsloth:
        head += " vs Unsloth |"
        sep += "---:|"
    lines += [head + " run |", sep + "---:|"]
    cross_run = False
    for shape, b, s, cell_rows in cells:
        for r in cell_rows:
            vs_hf = ratio(r, "hf+peft", train)
            cross_run |= vs_hf.endswith("*")
            cols = [
                SHAPE_NAMES.get(shape, shape),
                f"{b} x {s}",
                label(r),
                f"{r['tokens_per_s']:,}",
                _fmt(r.get("step_s"), ".3f"),
                _fmt(r.get("peak_gib"), ".2f"),
                _fmt(r.get("mfu"), ".3f"),
                vs_hf,
            ]
            if has_unsloth:
                ref = "unsloth-qlora" if "qlora" in r.get("system", "") else "unsloth-lora"
                vs_u = ratio(r, ref, train)
                cross_run |= vs_u.endswith("*")
                cols.append(vs_u)
            cols.append(str(runs.get(r["_run"], "?")))
            lines.append("| " + " | ".join(cols) + " |")
    if cross_run:
        lines += ["", "`*`: against the newest row of another run (none in this row's run)."]
    if ctx:
        lines += [
            "",
            *textwrap.wrap(
                "Longest batch-1 sequence for which one full training step fits under a memory "
                "cap (`benchmarks/max_context.py`: doubling, then bisection; each probe its own "
                "process):",
                110,
            ),
            "",
            "| model | system | cap GiB | trains | does not fit | search | run |",
            "|---|---|---:|---:|---:|---|---:|",
        ]
        for r in sorted(
            best_ctx.values(),
            key=lambda r: (_shape_rank(r.get("shape", "")), r.get("cap_gib", 0), _system_rank(r)),
        ):
            lines.append(
                f"| {SHAPE_NAMES.get(r.get('shape'), r.get('shape'))} | {label(r)} | "
                f"{r.get('cap_gib'):g} | {r['max_fit']:,} | "
                f"{_fmt(r.get('min_fail'), ',')} | {r.get('stopped', '')} | "
                f"{runs.get(r['_run'], '?')} |"
            )
        for (_, shape, cap), r in sorted(unsearched.items(), key=lambda kv: str(kv[0])):
            lines.append(
                f"| {SHAPE_NAMES.get(shape, shape)} | {label(r)} | {cap:g} | not searched: "
                f"{r.get('why') or r.get('stopped', '?')} | — | — | "
                f"{runs.get(r['_run'], '?')} |"
            )
    notes = not_measured(rows, gpu)
    if notes:
        lines += ["", "Not measured in the newest run:"] + [f"- {n}" for n in notes]
    if png:
        lines += ["", f"![tokens/s and peak memory per system on {gpu}]({png})"]
    return "\n".join(lines) + "\n"


def not_measured(rows: list[dict], gpu: str) -> list[str]:
    """``system: why`` for systems of the newest run that have only skipped / error rows in it."""
    mine = [r for r in rows if r.get("gpu") == gpu and not r.get("kind")]
    if not mine:
        return []
    newest = max(mine, key=_when)["_run"]
    run_rows = [
        r for r in mine if r["_run"] == newest and r.get("system") not in (None, "ceilings")
    ]
    ok = {r["system"] for r in run_rows if "tokens_per_s" in r}
    why = {}
    for r in run_rows:
        if r["system"] not in ok and ("skipped" in r or "error" in r):
            text = r.get("skipped") or "error: " + str(r.get("error"))
            why.setdefault(r["system"], " ".join(str(text).split())[:160])
    return [f"{SYSTEM_NAMES.get(s, s)}: {w}" for s, w in sorted(why.items())]


# -------------------------------------------------------------------------------------------- chart
def _color(system: str) -> str:
    for prefix, c in COLORS.items():
        if system.startswith(prefix):
            return c
    return "#9467bd"


def chart(rows: list[dict], *, gpu: str, path: Path) -> Path | None:
    """tokens/s and peak GiB per system for each (model, batch x seq), and max context per cap."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    train = [r for r in train_rows(rows) if r.get("gpu") == gpu]
    ctx = [
        r for r in rows if r.get("kind") == "max_context" and r.get("gpu") == gpu and "max_fit" in r
    ]
    cells = cell_table(train)
    ctx = [r for r in ctx if r.get("trials")]  # a search that ran no probe has no bar
    best = latest(ctx, _ctx_key)
    shown = [r for c in cells for r in c[3]] + list(best.values())
    runs = run_numbers(shown)
    n_rows = len(cells) + (1 if ctx else 0)
    if not n_rows:
        return None
    heights = [max(1.6, 0.42 * len(c[3]) + 0.9) for c in cells] + ([3.0] if ctx else [])
    fig, axes = plt.subplots(
        n_rows,
        2,
        figsize=(13, sum(heights) + 0.9),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for (shape, b, s, cell_rows), (ax_t, ax_m) in zip(cells, axes, strict=False):
        names = [label(r) for r in cell_rows][::-1]
        colors = [_color(r.get("system", "")) for r in cell_rows][::-1]
        tps = [r["tokens_per_s"] for r in cell_rows][::-1]
        mem = [r.get("peak_gib") or 0 for r in cell_rows][::-1]
        tags = [f" (run {runs.get(r['_run'], '?')})" for r in cell_rows][::-1]
        title = f"{SHAPE_NAMES.get(shape, shape)}, batch {b} x {s}"
        for ax, values, unit, fmt in (
            (ax_t, tps, "tokens/s", "{:,.0f}"),
            (ax_m, mem, "peak GiB", "{:.1f}"),
        ):
            bars = ax.barh(names, values, color=colors)
            ax.set_title(f"{title}: {unit}", fontsize=10, loc="left")
            ax.bar_label(
                bars,
                labels=[fmt.format(v) + t for v, t in zip(values, tags, strict=False)],
                padding=3,
                fontsize=8,
            )
            ax.set_xlim(0, max(values + [1]) * 1.3)
            ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
            ax.tick_params(axis="y", labelsize=8)
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(axis="x", alpha=0.3)
        ax_m.set_yticklabels([])
    if ctx:
        gs = axes[-1][0].get_gridspec()
        for a in axes[-1]:
            a.remove()
        ax = fig.add_subplot(gs[-1, :])
        caps = sorted({r["cap_gib"] for r in best.values()})
        systems = sorted(
            {r["system"] for r in best.values()},
            key=lambda s: SYSTEM_ORDER.index(s) if s in SYSTEM_ORDER else 99,
        )
        width = 0.8 / max(1, len(systems))
        for i, system in enumerate(systems):
            xs, ys = [], []
            for j, cap in enumerate(caps):
                r = next(
                    (r for r in best.values() if r["system"] == system and r["cap_gib"] == cap),
                    None,
                )
                if r is not None:
                    xs.append(j + i * width - 0.4 + width / 2)
                    ys.append(r["max_fit"])
            bars = ax.bar(
                xs,
                ys,
                width,
                label=SYSTEM_NAMES.get(system, system),
                color=_color(system),
                alpha=0.55 + 0.45 * (i + 1) / len(systems),
            )
            ax.bar_label(bars, labels=[f"{y:,}" for y in ys], padding=2, fontsize=8)
        ax.set_xticks(range(len(caps)), [f"cap {c:g} GiB" for c in caps])
        ax.set_ylabel("longest batch-1 sequence", fontsize=9)
        ax.set_ylim(0, max([r["max_fit"] for r in best.values()] + [1]) * 1.15)
        ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        ax.set_title(
            "Max context that trains (one full step) under a memory cap", fontsize=10, loc="left"
        )
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    dates = sorted({r.get("date") for r in shown if r.get("date")})
    when = dates[0] if len(dates) == 1 else " to ".join([dates[0], dates[-1]]) if dates else "?"
    fig.suptitle(
        f"LoRA / QLoRA training step per system on {gpu}, {when} (python benchmarks/report.py)",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------- README
def splice(readme: str, block: str) -> str:
    """``readme`` with the text between the perf-table markers replaced by ``block``."""
    i, j = readme.find(BEGIN), readme.find(END)
    if i < 0 or j < i:
        raise SystemExit(f"README has no {BEGIN} ... {END} markers around its performance table")
    return readme[: i + len(BEGIN)] + "\n" + block + readme[j:]


def render(results: Path, readme: Path | None, *, check: bool = False, plot: bool = True) -> int:
    files = sorted(results.glob("train_step*.jsonl")) + sorted(results.glob("max_context*.jsonl"))
    rows = load(files)
    measured = train_rows(rows) + [
        r for r in rows if r.get("kind") == "max_context" and "max_fit" in r
    ]
    gpu = newest_gpu(measured)
    if gpu is None:
        print(
            f"no measured rows in {results}/train_step*.jsonl or max_context*.jsonl",
            file=sys.stderr,
        )
        return 1
    png = results / f"performance_{gpu_slug(gpu)}.png"
    png_rel = None
    if plot and not check:
        written = chart(rows, gpu=gpu, path=png)
        if written is None:
            print(
                "chart skipped: matplotlib is not installed (pip install 'fastjax[plot]')",
                file=sys.stderr,
            )
        else:
            print(f"wrote {written}")
    if png.exists():
        try:
            png_rel = (
                str(png.resolve().relative_to(readme.resolve().parent)) if readme else str(png)
            )
        except ValueError:
            png_rel = str(png)
    block = markdown(rows, gpu=gpu, png=png_rel)
    if readme is None:
        print(block)
        return 0
    text = readme.read_text()
    new = splice(text, block)
    if check:
        if new != text:
            print(
                f"{readme}: the perf table is stale: run python benchmarks/report.py",
                file=sys.stderr,
            )
            return 1
        return 0
    if new != text:
        readme.write_text(new)
        print(f"updated {readme}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--results", default=str(harness.RESULTS), help="folder of the JSONL rows")
    ap.add_argument(
        "--readme", default=str(REPO / "README.md"), help="'-': print the table instead"
    )
    ap.add_argument("--check", action="store_true", help="exit 1 when the README table is stale")
    ap.add_argument("--no-plot", action="store_true", help="table only")
    args = ap.parse_args(argv)
    readme = None if args.readme == "-" else Path(args.readme)
    return render(Path(args.results), readme, check=args.check, plot=not args.no_plot)


if __name__ == "__main__":
    raise SystemExit(main())
