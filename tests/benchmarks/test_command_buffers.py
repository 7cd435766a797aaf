"""How train_step.py's fastjax child treats XLA's command buffers under host offload
(``--command-buffers``): ``env`` puts the CLI's XLA_FLAGS switch in place before jax starts,
``options`` leaves it to the per-step compiler options, ``xla`` to XLA's default."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from benchmarks import report, train_step
from benchmarks.shapes import ModelShape
from fastjax import remat

KW = dict(steps=1, warmup=0, remat="offload_layer_input")


def test_the_choice_reaches_the_child_argv():
    argv = lambda cb: train_step.fastjax_argv(
        "fastjax-qlora", "tiny", 1, 24, command_buffers=cb, **KW
    )
    assert "--command-buffers" not in argv("env")  # the default, as the CLI trains
    for cb in ("options", "xla"):
        assert argv(cb)[-2:] == ("--command-buffers", cb)
    args = train_step.build_parser().parse_args(["--command-buffers", "xla", "--dry-run"])
    assert train_step.plan(args)[0].argv[-2:] == ("--command-buffers", "xla")
    with pytest.raises(SystemExit):
        train_step.build_parser().parse_args(["--command-buffers", "off"])


@pytest.mark.parametrize("choice, flag", [("env", True), ("options", False), ("xla", False)])
def test_child_sets_the_flag_only_for_env(monkeypatch, capsys, choice, flag):
    """The child switches command buffers off in XLA_FLAGS for ``env`` (before its step starts the
    backend), leaves the variable alone otherwise, and passes the choice to ``run_fastjax``."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
    monkeypatch.setenv(train_step.ENV_ALLOW_CPU, "1")
    seen = {}

    def fake_run(*a, **kw):
        seen.update(kw, xla_flags=os.environ["XLA_FLAGS"])
        return {"ok": True}

    monkeypatch.setattr(train_step, "run_fastjax", fake_run)
    argv = ["--one", "fastjax-qlora", "--shape", "llama-3-8b", "--remat", "offload_layer_input"]
    train_step._child(train_step.build_parser().parse_args(argv + ["--command-buffers", choice]))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"ok": True}
    assert (remat.COMMAND_BUFFER_FLAG in seen["xla_flags"]) is flag
    assert seen["xla_flags"].startswith("--xla_cpu_use_thunk_runtime=true")
    assert seen["command_buffers"] == choice


def test_rows_name_a_non_default_choice(cpu_context, monkeypatch):
    # the labels below are those of rows without flags (the suite's conftest sets one)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    tiny = ModelShape("tiny", "llama", 64, 128, 1, 4, 2, 16, 320)
    rows = {
        cb: train_step.run_fastjax("fastjax-lora", tiny, 1, 24, command_buffers=cb, **KW)
        for cb in ("env", "xla")
    }
    assert all(r["ok"] for r in rows.values())
    assert "command_buffers" not in rows["env"] and rows["xla"]["command_buffers"] == "xla"
    # on the CPU there is no pinned host memory: no per-step options, the same loss
    assert "compiler_options" not in rows["env"]
    np.testing.assert_allclose(rows["xla"]["loss"], rows["env"]["loss"], rtol=1e-6)
    assert report.label(rows["xla"]).endswith(", command buffers: xla")
    assert "command buffers" not in report.label(rows["env"])


def test_context_probes_carry_the_choice(tmp_path):
    """max_context.py passes ``--command-buffers`` to its probes, and a search reuses only the
    probes of its own choice (and host-embedding setting) when it resumes from ``--out``."""
    from benchmarks import max_context

    job = lambda **kw: max_context.probe_job(
        "fastjax-qlora",
        "llama-3-8b",
        131072,
        cap_gib=24,
        total_bytes=141 * 2**30,
        remat="offload_layer_input",
        **kw,
    )[0]
    assert "--command-buffers" not in job()
    assert job(command_buffers="xla")[-2:] == ["--command-buffers", "xla"]
    out = tmp_path / "mc.jsonl"
    base = dict(kind="max_context_trial", system="fastjax-qlora", shape="llama-3-8b", cap_gib=24)
    rows = [
        dict(base, seq=1000, fits=True),
        dict(base, seq=2000, fits=False, command_buffers="xla"),
        dict(base, seq=3000, fits=True, embed_on_host=True),
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    key = dict(system="fastjax-qlora", shape="llama-3-8b", cap_gib=24)
    assert max_context._known_probes(str(out), key) == {1000: True}
    assert max_context._known_probes(str(out), dict(key, command_buffers="xla")) == {2000: False}
    assert max_context._known_probes(str(out), dict(key, embed_on_host=True)) == {3000: True}
    args = max_context.build_parser().parse_args(["--command-buffers", "options"])
    assert args.command_buffers == "options"
