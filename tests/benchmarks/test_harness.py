"""The benchmark harness on CPU: FLOP counts, child processes, and what is skipped when and why.

Nothing here needs a GPU: the child processes run on the CPU, where every GPU system must come back as a
``skipped`` row that says why (no GPU, torch / bitsandbytes / Unsloth absent). The max-context search is
in ``test_max_context.py``, the README report in ``test_report.py``. Tolerances: the FLOP counts are exact
integers (0).
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
from benchmarks.shapes import ModelShape, get

REPO = Path(__file__).resolve().parents[2]
# The skip paths are what a machine without a GPU does; on a GPU machine these would run for real.
cpu_only = pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None, reason="checks what happens without a GPU"
)


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


def test_embedding_on_host_reaches_the_child_and_the_row(cpu_context, monkeypatch):
    """``--embed-on-host``: the child gathers the rows on the host each step; same weights, same loss."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the label below is that of a row without flags
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
