"""The benchmark harness on CPU: the max-context search, the report, and what is skipped when and
why.

Nothing here needs a GPU: the search runs against fake ``fits(n)`` oracles, the report renders
synthetic rows, and the child processes run on the CPU, where every GPU system must come back as a
``skipped`` row that says why (no GPU, torch / bitsandbytes / Unsloth absent). Tolerances: the FLOP
counts are exact integers (0).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks import harness, max_context, report, torch_systems, train_step, unsloth_runner
from benchmarks.max_context import search_max_context
from benchmarks.shapes import ModelShape, get

REPO = Path(__file__).resolve().parents[2]
# The skip paths are what a machine without a GPU does; on a GPU machine these would run for real.
cpu_only = pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None, reason="checks what happens without a GPU"
)


# -------------------------------------------------------------------------------- the search itself
def _oracle(limit: int):
    calls = []

    def fits(n: int) -> bool:
        calls.append(n)
        return n <= limit

    return fits, calls


@pytest.mark.parametrize("seed", range(6))
def test_search_brackets_the_limit_on_a_fake_oracle(seed):
    rng = np.random.default_rng(seed)
    start, granularity = int(rng.choice([1000, 4096, 16384])), int(rng.choice([512, 4096, 8192]))
    max_seq = 1 << 20
    for limit in rng.integers(0, max_seq + granularity, 25).tolist() + [start - 1, start, max_seq]:
        fits, calls = _oracle(limit)
        res = search_max_context(
            fits, start=start, granularity=granularity, max_trials=64, max_seq=max_seq
        )
        assert len(calls) == len(set(calls)), f"{limit=}: probed twice: {calls}"
        assert all(fits_ == (n <= limit) for n, fits_ in res.trials)
        assert res.max_fit <= limit
        if limit >= max_seq:
            assert (res.max_fit, res.min_fail, res.stopped) == (max_seq, None, "max_seq")
            continue
        assert res.stopped == "converged", (limit, res)
        assert res.min_fail is not None and res.min_fail > limit
        assert res.min_fail - res.max_fit <= granularity
        # doubling: <= log2(max_seq / start) + 2 probes; bisection: <= log2(gap / granularity) + 1
        assert len(calls) <= np.log2(max_seq / start) + 2 + np.log2(max_seq / granularity) + 1


def test_search_doubles_then_bisects_in_order():
    fits, calls = _oracle(70_000)  # Unsloth QLoRA at 24 GiB: 65,536 fit, 81,920 did not
    res = search_max_context(fits, start=16384, granularity=8192, max_seq=524288)
    assert calls == [16384, 32768, 65536, 131072, 98304, 81920, 73728]
    assert (res.max_fit, res.min_fail, res.stopped) == (65536, 73728, "converged")


def test_search_when_even_the_start_fails():
    fits, calls = _oracle(5000)
    res = search_max_context(fits, start=16384, granularity=4096)
    assert calls == [16384, 8192, 4096]
    assert (res.max_fit, res.min_fail) == (4096, 8192)
    fits, calls = _oracle(4000)
    res = search_max_context(fits, start=16384, granularity=4096)
    assert calls == [16384, 8192, 4096] and (res.max_fit, res.min_fail) == (0, 4096)


def test_search_resumes_from_known_probes_without_asking_again():
    fits, calls = _oracle(123_456)
    full = search_max_context(fits, start=16384, granularity=8192, max_seq=524288)
    known = dict(full.trials[:4])  # a first call that a time limit cut after four probes
    fits2, calls2 = _oracle(123_456)
    res = search_max_context(fits2, start=16384, granularity=8192, max_seq=524288, known=known)
    assert (res.max_fit, res.min_fail) == (full.max_fit, full.min_fail)
    assert not set(calls2) & set(known), calls2
    assert calls == [n for n, _ in full.trials] and len(calls2) == len(calls) - 4


def test_search_stops_on_inconclusive_probe_and_on_max_trials():
    res = search_max_context(lambda n: True if n < 60000 else None, start=16384, granularity=8192)
    assert (res.max_fit, res.min_fail, res.stopped) == (32768, None, "inconclusive at 65536")
    fits, calls = _oracle(10**9)
    res = search_max_context(fits, start=1024, granularity=1024, max_trials=3)
    assert res.stopped == "max_trials" and calls == [1024, 2048, 4096] and res.max_fit == 4096
    with pytest.raises(ValueError, match="granularity"):
        search_max_context(fits, start=1024, granularity=0)


def test_probe_caps_use_total_device_memory():
    total = int(140.4 * 2**30)
    argv, env = max_context.probe_job(
        "fastjax-qlora",
        "llama-3-8b",
        65536,
        cap_gib=24,
        total_bytes=total,
        remat="offload_layer_input",
    )
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(24 / 140.4, abs=1e-4)
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] is None  # the child preallocates exactly the cap
    assert argv[argv.index("--seq") + 1] == "65536" and argv[argv.index("--warmup") + 1] == "0"
    argv, env = max_context.probe_job(
        "unsloth-qlora",
        "llama-3-8b",
        8192,
        cap_gib=80,
        total_bytes=total,
        remat="full",
        site_env={"PYTHONPATH": "/site"},
    )
    assert (
        argv[0].endswith("unsloth_runner.py")
        and "--qlora" in argv
        and env == {"PYTHONPATH": "/site"}
    )
    assert argv[argv.index("--cap-gib") + 1] == "80"
    argv, env = max_context.probe_job(
        "hf+peft",
        "llama-3-8b",
        8192,
        cap_gib=24,
        total_bytes=total,
        remat="full",
        site_env={"PYTHONPATH": "/site"},
    )
    assert "--qlora" not in argv and env == {}
    with pytest.raises(ValueError, match="not below"):
        max_context.probe_job(
            "fastjax-qlora", "llama-3-8b", 8192, cap_gib=200, total_bytes=total, remat="full"
        )
    assert max_context.probe_outcome({"ok": True, "step_s": 1.0}) is True
    assert (
        max_context.probe_outcome({"error": "rc=1: ... RESOURCE_EXHAUSTED: Out of memory"}) is False
    )
    assert max_context.probe_outcome({"ok": False, "oom": True}) is False
    assert max_context.probe_outcome({"error": "rc=-11: Segmentation fault"}) is None
    assert max_context.probe_outcome({"skipped": "no CUDA device"}) is None


@cpu_only
def test_max_context_without_a_gpu_writes_skipped_rows(tmp_path, monkeypatch):
    """The real GPU query (nvidia-smi, then torch in a child) finds none here, so nothing is
    capped."""
    monkeypatch.delenv(harness.ENV_GPU, raising=False)
    monkeypatch.setenv(harness.ENV_RUN_ID, "test-run")
    monkeypatch.setenv(harness.ENV_COMMAND, "python3 test")
    harness.gpu_info.cache_clear()
    out = tmp_path / "mc.jsonl"
    rows = max_context.main(
        ["--systems", "fastjax-qlora,unsloth-qlora", "--cap-gib", "24", "--out", str(out)]
    )
    harness.gpu_info.cache_clear()
    assert [r["system"] for r in rows] == ["fastjax-qlora", "unsloth-qlora"]
    assert all(r["skipped"].startswith("no GPU found") and r["gpu"] == "cpu" for r in rows)
    assert len(out.read_text().splitlines()) == 2


# -------------------------------------------------------------------------------------- the harness
def test_train_flops_match_the_documented_formula():
    s = get("llama-3-8b")
    want = 4 * s.n_params() * 4 * 2048 + 4 * s.num_hidden_layers * 2048 * 2048 * s.q_dim * 4 / 2 * 3
    assert harness.train_flops(s, 4, 2048) == want  # the anchors' formula, exactly
    packed = harness.train_flops(s, 1, 2048, [1024, 1024])
    assert packed == 4 * s.n_params() * 2048 + 6 * s.num_hidden_layers * s.q_dim * 2 * 1024**2
    assert harness.mfu(want, 1.0, 500.0) == round(want / 500e12, 3)
    assert harness.mfu(None, 1.0, 500.0) is None and harness.mfu(want, 1.0, None) is None


def test_run_subprocess_reports_crashes_ooms_and_timeouts(cpu_context):
    rows = harness.run_subprocess(
        ["-c", "import sys; print('RESOURCE_EXHAUSTED: oom', file=sys.stderr); sys.exit(1)"],
        system="x",
    )
    assert (
        rows[0]["oom"] is True and rows[0]["error"].startswith("rc=1") and rows[0]["system"] == "x"
    )
    rows = harness.run_subprocess(["-c", "import time; time.sleep(30)"], timeout=1, system="slow")
    assert rows[0]["timeout"] is True and "timeout after 1s" in rows[0]["error"]
    # rows printed before the kill are kept, and the kill still gets its own row
    code = "import json, time; print(json.dumps({'checkpoint': 'x'}), flush=True); time.sleep(30)"
    rows = harness.run_subprocess(["-c", code], timeout=2, system="half")
    assert [r.get("checkpoint") for r in rows] == ["x", None] and rows[1]["timeout"] is True
    rows = harness.run_subprocess(["-c", "import json; print(json.dumps({'a': 1})); exit(3)"])
    assert rows[0] == {"a": 1, "wall_s": rows[0]["wall_s"]} and rows[1]["error"].startswith("rc=3")
    code = (
        "import json, os; print(json.dumps({k: os.environ.get(k) for k in "
        "('FASTJAX_BENCH_RUN_ID', 'FASTJAX_BENCH_GPU', 'GONE')}))"
    )
    os.environ["GONE"] = "1"
    try:
        (row,) = harness.run_subprocess(["-c", code], env={"GONE": None})
    finally:
        del os.environ["GONE"]
    assert (
        row["FASTJAX_BENCH_RUN_ID"] == "test-run"
        and json.loads(row["FASTJAX_BENCH_GPU"])["name"] == "cpu"
    )
    assert row["GONE"] is None


def test_token_batch_is_shared_and_seeded():
    a, b = harness.token_batch(128256, 2, 64), harness.token_batch(128256, 2, 64)
    assert a.dtype == np.int32 and a.shape == (2, 64) and (a == b).all() and a.max() < 128256
    seg, pos = harness.packed_segments(3, 97)
    for s_row, p_row in zip(seg, pos, strict=False):
        assert 4 <= s_row.max() <= 8 and (np.diff(s_row) >= 0).all() and s_row.min() == 1
        starts = np.flatnonzero(np.diff(s_row, prepend=0))
        assert (p_row[starts] == 0).all()


# -------------------------------------------------------------------------------- what gets skipped
@cpu_only
def test_train_step_on_cpu_skips_every_gpu_system_with_a_reason(tmp_path, cpu_context):
    out = tmp_path / "ts.jsonl"
    rows = train_step.main(
        [
            "--shapes",
            "llama-3-8b",
            "--grid",
            "1x64",
            "--systems",
            "fastjax-lora,hf+peft-qlora,unsloth-qlora,bogus",
            "--ceiling",
            "600",
            "--steps",
            "1",
            "--out",
            str(out),
        ]
    )
    why = {r["system"]: r.get("skipped") for r in rows}
    assert why["fastjax-lora"] == "no GPU: jax backend is 'cpu'"
    assert why["hf+peft-qlora"].startswith("bitsandbytes not importable") or why[
        "hf+peft-qlora"
    ].startswith("no CUDA device")
    assert why["unsloth-qlora"].startswith("no --unsloth-dir given")
    assert why["bogus"].startswith("unknown system")
    assert all(r["run_id"] == "test-run" and r["gpu"] == "cpu" and r["seq"] == 64 for r in rows)
    assert [json.loads(line)["system"] for line in out.read_text().splitlines()] == list(why)


def test_train_step_plan_covers_the_issue_grid():
    args = train_step.build_parser().parse_args([])
    jobs = train_step.plan(args)
    cells = {(j.shape, j.batch, j.seq) for j in jobs}
    assert cells == {
        (s, b, t) for s in ("llama-3.2-1b", "llama-3-8b") for b, t in ((4, 2048), (1, 8192))
    }
    systems = {j.system for j in jobs}
    assert {
        "fastjax-lora",
        "fastjax-qlora",
        "fastjax-lean",
        "plain-xla",
        "hf+peft",
        "hf+peft-qlora",
        "unsloth-lora",
        "unsloth-qlora",
    } <= systems
    for name in ("fastjax-lean", "fastjax-qlora-lean"):
        lean = next(j for j in jobs if j.system == name and j.batch == 4)
        assert (
            "offload_layer_input" in lean.argv
            and lean.argv[lean.argv.index("--micro-rows") + 1] == "1"
        )
    assert all(
        j.argv[j.argv.index("--steps") + 1] == "6" and j.argv[j.argv.index("--warmup") + 1] == "2"
        for j in jobs
    )


@cpu_only
def test_torch_system_without_torch_is_skipped(tmp_path, cpu_context):
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('torch hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "stub"))
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "torch_systems.py"), "--shape", "llama-3-8b"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["system"] == "hf+peft" and row["skipped"].startswith(
        "torch not importable: ImportError"
    )
    assert (
        torch_systems.why_not(qlora=False, device="cuda")
        == "no CUDA device (torch.cuda.is_available() is False)"
    )


def _fake_wheel(folder: Path) -> Path:
    """A minimal ``unsloth`` wheel (an importable package and its metadata, nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "unsloth-2026.10.9-py3-none-any.whl"
    info = "unsloth-2026.10.9.dist-info"
    files = {
        "unsloth/__init__.py": "__version__ = '2026.10.9'\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: unsloth\nVersion: 2026.10.9\n",
        f"{info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


@cpu_only
def test_unsloth_site_install_and_skips(tmp_path, cpu_context):
    assert unsloth_runner.prepare_site(None, tmp_path / "s")[1].startswith("no --unsloth-dir")
    assert "not a directory" in unsloth_runner.prepare_site(tmp_path / "absent", tmp_path / "s")[1]
    (tmp_path / "empty").mkdir()
    assert "no unsloth-*.whl" in unsloth_runner.prepare_site(tmp_path / "empty", tmp_path / "s")[1]
    _fake_wheel(tmp_path / "carried" / ".whl-b")
    site, why = unsloth_runner.prepare_site(tmp_path / "carried", tmp_path / "site")
    assert why is None and (site / "unsloth" / "__init__.py").exists()
    stamp = (site / ".fastjax-installed").stat().st_mtime_ns
    assert unsloth_runner.prepare_site(tmp_path / "carried", tmp_path / "site") == (site, None)
    assert (site / ".fastjax-installed").stat().st_mtime_ns == stamp  # not installed twice
    assert unsloth_runner.prepare_site(site, tmp_path / "other") == (
        site,
        None,
    )  # a site dir as it is
    runner = [
        sys.executable,
        str(REPO / "benchmarks" / "unsloth_runner.py"),
        "--qlora",
        "--batch",
        "1",
    ]
    env = dict(os.environ, **unsloth_runner.child_env(site))
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONPATH"].split(os.pathsep)[0] == str(site)
    row = json.loads(
        subprocess.run(runner, capture_output=True, text=True, env=env, timeout=120)
        .stdout.strip()
        .splitlines()[-1]
    )
    assert row["system"] == "unsloth-qlora" and row["skipped"].startswith("no CUDA device")
    assert row["unsloth"] == "2026.10.9"  # the version came from the private site dir
    row = json.loads(
        subprocess.run(
            runner,
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, **unsloth_runner.OFFLINE_ENV),
        ).stdout
    )
    assert row["skipped"].startswith("unsloth not importable")


@pytest.mark.parametrize(
    "system, base", [("fastjax-lean", "bfloat16"), ("fastjax-qlora-lean", "nf4")]
)
def test_fastjax_lean_step_runs_on_cpu(cpu_context, system, base):
    """The child's whole step (micro-batches + offload preset, which degrades to full remat on
    CPU), bf16 and NF4 base."""
    tiny = ModelShape("tiny", "llama", 64, 128, 1, 4, 2, 16, 320)
    row = train_step.run_fastjax(
        system, tiny, 2, 16, steps=1, warmup=0, remat="offload_layer_input", micro_rows=1
    )
    assert row["ok"] and row["micro_batches"] == 2 and row["tokens_per_s"] > 0
    assert row["base_weights"] == base
    assert np.isfinite(row["loss"]) and abs(row["loss"] - np.log(320)) < 1.0
    assert row["model_flops"] == harness.train_flops(tiny, 2, 16)
    assert row["timed_includes_compile"] is True and row["first_step_s"] is None


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


def test_parent_modules_import_neither_jax_nor_torch():
    """The parents run while children hold the GPU: importing them creates no device client."""
    code = (
        "import sys; sys.path.insert(0, '.'); "
        "import benchmarks.train_step, benchmarks.max_context, benchmarks.report; "
        "bad = [m for m in ('jax', 'torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_fastjax_qlora_long_context_settings_run_on_cpu(cpu_context):
    """What max_context.py runs for fastjax QLoRA: NF4 base, offload preset, MLP in token slices."""
    tiny = ModelShape("tiny", "llama", 64, 128, 1, 4, 2, 16, 320)
    row = train_step.run_fastjax(
        "fastjax-qlora",
        tiny,
        1,
        40,
        steps=1,
        warmup=0,
        remat="offload_layer_input",
        mlp_chunk_size=16,
    )
    assert row["ok"] and row["mlp_chunk_size"] == 16 and np.isfinite(row["loss"])
    argv, env = max_context.probe_job(
        "fastjax-qlora",
        "llama-3-8b",
        131072,
        cap_gib=24,
        total_bytes=141 * 2**30,
        remat="offload_layer_input",
        mlp_chunk_size=8192,
    )
    assert argv[argv.index("--mlp-chunk-size") + 1] == "8192"
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(24 / 141, abs=1e-4)
    assert "--embed-on-host" not in argv
    argv, _ = max_context.probe_job(
        "fastjax-qlora",
        "llama-3-8b",
        131072,
        cap_gib=24,
        total_bytes=141 * 2**30,
        remat="offload_layer_input",
        embed_on_host=True,
    )
    assert "--embed-on-host" in argv


def test_unrolled_layers_reach_the_child_and_the_row(cpu_context):
    tiny = ModelShape("tiny", "llama", 64, 128, 2, 4, 2, 16, 320)
    row = train_step.run_fastjax("fastjax-lora", tiny, 1, 24, steps=1, warmup=0, scan_layers=False)
    assert row["ok"] and row["scan_layers"] is False and np.isfinite(row["loss"])
    kw = dict(steps=1, warmup=0, remat="full")
    assert "--unroll-layers" in train_step.fastjax_argv(
        "fastjax-lora", "tiny", 1, 24, scan_layers=False, **kw
    )
    assert "--unroll-layers" not in train_step.fastjax_argv(
        "fastjax-lora", "tiny", 1, 24, scan_layers=True, **kw
    )
    assert report.label({"system": "fastjax-lora", "scan_layers": False}).endswith(
        ", layers unrolled"
    )


def test_hf_peft_bf16_step_runs_on_cpu():
    """The HF+PEFT child's whole step (model build, PEFT wrap, the shared timing loop) on a tiny
    shape, on the CPU: the row is complete and its loss is the untrained model's ~log(V)."""
    from benchmarks import torch_systems

    tiny = ModelShape("tiny", "llama", 64, 128, 1, 4, 2, 16, 320)
    row = torch_systems.bench(tiny, 2, 16, steps=2, warmup=1, device="cpu")
    assert row["ok"] and row["tokens_per_s"] > 0 and row["step_s"] > 0
    assert abs(row["loss"] - np.log(320)) < 1.0 and row["n_trainable"] > 0


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
    sliced = {"system": "fastjax-lean", "remat": "full", "micro_batches": 2, "mlp_chunk_size": 512}
    assert report.label(sliced) == (
        "fastjax LoRA, lean: remat full, 2 micro-batches, MLP in 512-token slices"
    )
    flagged = {"system": "fastjax-qlora", "xla_flags": "--xla_gpu_enable_command_buffer="}
    assert report.label(flagged) == (
        "fastjax QLoRA (NF4 base) [XLA_FLAGS --xla_gpu_enable_command_buffer=]"
    )


def test_record_keeps_xla_flags_set_around_the_command(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert "xla_flags" not in harness.record(system="x", packages=())
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")
    row = harness.record(system="x", packages=())
    assert row["xla_flags"] == "--xla_gpu_enable_command_buffer=" and row["system"] == "x"


def test_forced_ops_systems_and_void_rows(cpu_context, tmp_path):
    """``NAME@OP=IMPL``: any fastjax system with ops forced, in the child's Ops, the row and the
    report's label; a row marked ``void`` never reaches the table."""
    from benchmarks import fastjax_systems

    assert fastjax_systems.split_system("fastjax-qlora@glu=pallas,rope=xla") == (
        "fastjax-qlora",
        {"glu": "pallas", "rope": "xla"},
    )
    with pytest.raises(ValueError, match="NAME@OP=IMPL"):
        fastjax_systems.split_system("fastjax-qlora@glu")
    tiny = ModelShape("tiny", "llama", 64, 128, 2, 4, 2, 16, 320)
    row = train_step.run_fastjax("fastjax-qlora@glu=xla", tiny, 1, 24, steps=1, warmup=0)
    assert row["ok"] and row["base_weights"] == "nf4" and "glu='xla'" in row["ops"], row
    assert report.label({"system": "fastjax-qlora@glu=pallas", "remat": "full"}).startswith(
        "fastjax QLoRA (NF4 base) (glu=pallas)"
    )
    cell = dict(shape="llama-3-8b", batch=4, seq=2048, step_s=0.7, peak_gib=20.0, gpu="NVIDIA H200")
    rows = [
        dict(system="ceilings", matmul_tflops=640.0, gpu="NVIDIA H200", run_id="r1"),
        dict(cell, system="fastjax-lora", tokens_per_s=11111, run_id="r1", time="t1"),
        dict(cell, system="fastjax-lora", tokens_per_s=99999, run_id="r2", time="t2", void="a bug"),
    ]
    path = tmp_path / "train_step_v.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    block = report.markdown(report.load([path]), gpu="NVIDIA H200", png=None)
    assert "11,111" in block and "99,999" not in block


def test_embedding_on_host_reaches_the_child_and_the_row(cpu_context):
    """``--embed-on-host``: the child gathers the rows on the host each step; same weights, same loss."""
    tiny = ModelShape("tiny", "llama", 64, 128, 2, 4, 2, 16, 320)
    kw = dict(steps=2, warmup=0)
    host = train_step.run_fastjax("fastjax-lora", tiny, 2, 24, embed_on_host=True, **kw)
    device = train_step.run_fastjax("fastjax-lora", tiny, 2, 24, **kw)
    assert host["ok"] and host["embed_on_host"] is True and "embed_on_host" not in device
    assert host["loss"] == pytest.approx(device["loss"], rel=1e-5)
    argv = train_step.fastjax_argv(
        "fastjax-lora", "tiny", 1, 24, embed_on_host=True, **kw, remat="full"
    )
    assert "--embed-on-host" in argv
    assert report.label(host).endswith(", embedding on host")
