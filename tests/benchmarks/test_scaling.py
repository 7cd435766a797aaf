"""scaling.py on 4 CPU devices: every device count in its own process, the trainer's sharded layout,
efficiency against the 1-device row, multicast off in every child."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import scaling

REPO = Path(__file__).resolve().parents[2]


def test_strong_scaling_rows_on_cpu_devices(tmp_path):
    out = tmp_path / "scaling.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu", NCCL_NVLS_ENABLE="1")  # the child must override it
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    cmd = [sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--allow-cpu"]
    cmd += [
        "--devices",
        "2,4",
        "--shape",
        "smollm2-135m",
        "--layers",
        "2",
        "--seq",
        "32",
        "--global-rows",
        "4",
    ]
    cmd += ["--steps", "1", "--warmup", "2", "--out", str(out)]
    subprocess.run(cmd, check=True, env=env, timeout=600, capture_output=True, text=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["num_devices"] for r in rows] == [1, 2, 4]  # the 1-device baseline is added
    assert len({r["run_id"] for r in rows}) == 1 and all(r["batch"] == 4 for r in rows)
    assert all(r["nccl_nvls_enable"] == "0" and r["num_hidden_layers"] == 2 for r in rows)
    one = rows[0]["tokens_per_s"]
    for r in rows:
        assert r["ok"] and r["tokens_per_s"] > 0
        assert r["scaling_efficiency"] == round(r["tokens_per_s"] / (r["num_devices"] * one), 3)
        # same global batch, same weights: the sharded steps train the same model (bf16 weights,
        # reductions in another order over 3 updates)
        assert abs(r["loss"] - rows[0]["loss"]) < 1e-3 * rows[0]["loss"]
    assert [r["mesh"] for r in rows[1:]] == [{"data": 1, "fsdp": 2}, {"data": 1, "fsdp": 4}]
    # plain data parallel (weights replicated): the same model again
    dp = tmp_path / "dp.jsonl"
    cmd_dp = [c if c != "2,4" else "2" for c in cmd[:-1]] + [str(dp), "--layout", "dp"]
    subprocess.run(cmd_dp, check=True, env=env, timeout=600, capture_output=True, text=True)
    two = [json.loads(line) for line in dp.read_text().splitlines()][-1]
    assert two["mesh"] == {"data": 2, "fsdp": 1}
    assert abs(two["loss"] - rows[0]["loss"]) < 1e-3 * rows[0]["loss"]


def test_efficiency_without_a_baseline_is_none():
    rows = scaling.with_efficiency(
        [{"num_devices": 2, "tokens_per_s": 100}, {"num_devices": 4, "error": "rc=1"}]
    )
    assert rows[0]["scaling_efficiency"] is None and rows[0]["tokens_per_s_per_device"] == 50
    assert "scaling_efficiency" not in rows[1]
