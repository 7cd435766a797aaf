"""The README report on CPU: the table and PNG rendered from synthetic rows, legacy rows grouped into
runs with MFU filled in, and the row labels. Ratios are checked to the printed two decimals.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import harness, report
from benchmarks.shapes import get


# --------------------------------------------------------------------------------------- the report
def _row(system, tps, peak, *, run, shape="llama-3-8b", batch=4, seq=2048, date="2026-12-02", **kw):
    return dict(
        system=system,
        shape=shape,
        batch=batch,
        seq=seq,
        tokens_per_s=tps,
        peak_gib=peak,
        step_s=round(batch * seq / tps, 4),
        gpu="NVIDIA H200",
        date=date,
        run_id=run,
        time=f"{date}T0{run[-1]}:00:00Z",
        **kw,
    )


def _synthetic(results: Path) -> None:
    rows = [
        dict(
            system="ceilings",
            matmul_tflops=620.0,
            gpu="NVIDIA H200",
            date="2026-12-02",
            run_id="r1",
            time="2026-12-02T01:00:00Z",
        ),
        _row("fastjax-lora", 14000, 27.9, run="r1", mfu=0.70, remat="full"),
        _row("fastjax-lean", 12500, 17.5, run="r1", mfu=0.61, remat="offload_layer_input"),
        _row("hf+peft", 6400, 31.4, run="r1"),
        _row("unsloth-lora", 11200, 17.8, run="r1"),
        _row("fastjax-qlora", 13000, 8.0, run="r1", remat="full"),
        _row("unsloth-qlora", 11000, 8.2, run="r1"),
        _row("fastjax-lora", 9000, 27.0, run="r1", seq=8192, batch=1, remat="full"),
        _row("fastjax-lora", 50000, 9.0, run="r2", shape="llama-3.2-1b", remat="full"),
        dict(
            system="hf+peft-qlora",
            skipped="bitsandbytes not importable: ModuleNotFoundError",
            gpu="NVIDIA H200",
            date="2026-12-02",
            run_id="r2",
            time="2026-12-02T02:00:01Z",
        ),
        _row(
            "fastjax-lora", 13000, 27.9, run="r0", date="2026-12-01", remat="full"
        ),  # older: not shown
    ]
    ctx = [
        dict(
            kind="max_context",
            system=s,
            shape="llama-3-8b",
            cap_gib=c,
            max_fit=f,
            min_fail=f + 8192,
            stopped="converged",
            trials=[[f, True], [f + 8192, False]],
            gpu="NVIDIA H200",
            date="2026-12-02",
            run_id="r3",
            time="2026-12-02T03:00:00Z",
            remat="offload_layer_input",
        )
        for s, c, f in (
            ("fastjax-qlora", 24, 131072),
            ("unsloth-qlora", 24, 65536),
            ("fastjax-qlora", 80, 393216),
        )
    ]
    ctx.append(  # a search whose time budget ran out before its first probe: no "0 tokens" bar
        dict(
            ctx[1],
            system="hf+peft-qlora",
            max_fit=0,
            min_fail=None,
            trials=[],
            stopped="inconclusive at 65536",
            why="--budget-s 460 spent",
        )
    )
    results.mkdir()
    (results / "train_step_h200.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (results / "max_context_h200.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ctx))
    (results / "nf4_h200.jsonl").write_text(
        json.dumps({"tokens_per_s": 1, "system": "other"}) + "\n"
    )


def test_report_renders_table_and_png_from_rows(tmp_path):
    pytest.importorskip("matplotlib", reason="the chart needs the 'plot' extra")
    results = tmp_path / "results"
    _synthetic(results)
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# x\n\n## Performance\n\nhand-written\n\n{report.BEGIN}\nold\n{report.END}\n\ntail\n"
    )
    assert report.render(results, readme) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n## Performance\n\nhand-written\n\n") and text.endswith(
        f"{report.END}\n\ntail\n"
    )
    block = text[text.index(report.BEGIN) : text.index(report.END)]
    assert "**NVIDIA H200**, measured 2026-12-02" in block and "\nold\n" not in block
    lines = [ln for ln in block.splitlines() if ln.startswith("| Llama")]
    first = lines[0].split(" | ")
    assert first[:4] == ["| Llama-3.2-1B", "4 x 2048", "fastjax LoRA (bf16 base)", "50,000"]
    lora = next(ln for ln in lines if "Llama-3-8B | 4 x 2048 | fastjax LoRA (bf16 base)" in ln)
    assert (
        "| 14,000 |" in lora and "| 2.19x |" in lora and "| 1.25x |" in lora
    )  # vs HF, vs Unsloth 16-bit
    qlora = next(ln for ln in lines if "fastjax QLoRA" in ln)
    assert "| 1.18x |" in qlora  # against Unsloth QLoRA, not Unsloth 16-bit
    long = next(ln for ln in lines if "1 x 8192" in ln)
    assert long.rstrip().endswith("| — | — | 1 |")  # no HF or Unsloth row on that cell
    assert sum("Llama-3-8B | 4 x 2048 | fastjax LoRA (bf16 base)" in ln for ln in lines) == 1
    assert "| 13,000 |" in qlora and "| 13,000 |" not in lora  # the older run-0 row is superseded
    assert (
        "| Llama-3-8B | fastjax QLoRA (NF4 base), remat offload_layer_input | 24 | 131,072 | "
        "139,264 | converged | 3 |"
    ) in block
    assert "| 80 | 393,216 |" in block
    hf_ctx = next(ln for ln in lines if "transformers + PEFT QLoRA" in ln and "| 24 |" in ln)
    assert "not searched: --budget-s 460 spent" in hf_ctx and "| 0 |" not in hf_ctx
    assert "transformers + PEFT QLoRA (bitsandbytes): bitsandbytes not importable" in block
    assert "](results/performance_h200.png)" in block
    png = results / "performance_h200.png"
    from PIL import Image

    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.width >= 1000 and im.height >= 800
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 8  # bars and text, not a blank canvas
    assert report.render(results, readme, check=True) == 0
    readme.write_text(text.replace("14,000", "15,000"))
    assert report.render(results, readme, check=True) == 1
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        report.render(results, readme)


def test_report_groups_legacy_rows_into_runs_and_fills_mfu(tmp_path):
    legacy = [
        dict(system="ceilings", matmul_tflops=600.0, gpu="NVIDIA H200", date="2026-11-29"),
        dict(
            system="hf+peft",
            shape="llama-3-8b",
            batch=4,
            seq=2048,
            tokens_per_s=6400,
            step_s=1.28,
            peak_gib=31.4,
            gpu="NVIDIA H200",
            date="2026-11-29",
        ),
        dict(system="ceilings", matmul_tflops=640.0, gpu="NVIDIA H200", date="2026-11-29"),
        dict(
            system="fastjax-lora",
            shape="llama-3-8b",
            batch=4,
            seq=2048,
            tokens_per_s=11700,
            step_s=0.7,
            peak_gib=28.0,
            mfu=0.62,
            remat="save_dots",
            gpu="NVIDIA H200",
            date="2026-11-29",
        ),
    ]
    path = tmp_path / "train_step_x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in legacy))
    rows = report.load([path])
    assert [r["_run"] for r in rows] == ["train_step_x#1"] * 2 + ["train_step_x#2"] * 2
    hf = rows[1]
    want = harness.train_flops(get("llama-3-8b"), 4, 2048) / 1.28 / 600e12
    assert hf["mfu"] == round(want, 3)
    block = report.markdown(rows, gpu="NVIDIA H200", png=None)
    assert "fastjax LoRA (bf16 base), remat save_dots" in block and "| 1.83x* | 2 |" in block
    assert "`*`: against the newest row of another run" in block


def test_report_labels_ablations_by_the_forced_impl():
    assert report.label({"system": "ablate-glu=xla"}) == (
        "ablation: fastjax LoRA with glu on its XLA reference"
    )
    assert report.label({"system": "ablate-glu=xla_recompute", "remat": "none"}) == (
        "ablation: fastjax LoRA with glu on xla_recompute, remat none"
    )
    assert report.label({"system": "fastjax-lean", "remat": "full", "micro_batches": 2}) == (
        "fastjax LoRA, lean: remat full, 2 micro-batches"
    )
    assert report.label({"system": "fastjax-qlora-lean", "remat": "full", "micro_batches": 2}) == (
        "fastjax QLoRA, lean: remat full, 2 micro-batches"
    )
    forced = {"system": "fastjax-qlora-lean@cross_entropy=xla_fused_grad", "remat": "full"}
    assert report.label(forced) == "fastjax QLoRA (cross_entropy=xla_fused_grad), lean: remat full"
    sliced = {"system": "fastjax-lean", "remat": "full", "micro_batches": 2, "mlp_chunk_size": 512}
    assert report.label(sliced) == (
        "fastjax LoRA, lean: remat full, 2 micro-batches, MLP in 512-token slices"
    )
    flagged = {"system": "fastjax-qlora", "xla_flags": "--xla_gpu_enable_command_buffer="}
    assert report.label(flagged) == (
        "fastjax QLoRA (NF4 base) [XLA_FLAGS --xla_gpu_enable_command_buffer=]"
    )
