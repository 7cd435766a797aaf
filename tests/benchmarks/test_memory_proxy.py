"""memory_proxy.py: the real-size step compiled on the CPU with abstract weights; its buffer sizes
must move the way the configurations say (micro-batches and MLP slices shrink temporaries, never the
arguments)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import memory_proxy

REPO = Path(__file__).resolve().parents[2]


def test_micro_batches_and_mlp_slices_shrink_temporaries():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the tool adds its own flag before jax starts
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "memory_proxy.py"),
            "--shape",
            "llama-3.2-1b",
            "--batch",
            "2",
            "--seq",
            "2048",
            "--micro-rows",
            "0,1",
            "--mlp-chunk-size",
            "0,256",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=600,
    ).stdout
    rows = {(r["micro_batches"], r["mlp_chunk_size"]): r for r in map(json.loads, out.splitlines())}
    assert set(rows) == {(1, None), (1, 256), (2, None), (2, 256)}
    assert len({r["arguments_gib"] for r in rows.values()}) == 1  # same weights, adapters, state
    # 1B bf16 weights (1.24B params; embeddings tied) are most of the arguments
    assert 2.2 < rows[1, None]["arguments_gib"] < 2.8
    t = {k: r["temporaries_gib"] for k, r in rows.items()}
    assert t[2, None] < t[1, None] and t[1, 256] < t[1, None] and t[2, 256] < t[2, None]
    for r in rows.values():
        assert (
            r["backend"] == "cpu"
            and r["arguments_gib"] < r["gpu_peak_estimate_gib"] < r["total_gib"]
        )


def test_flag_is_required_before_jax_starts(monkeypatch):
    """In a process whose jax already runs, the hoisting flag cannot take effect: say so."""
    import jax

    jax.numpy.zeros(1).block_until_ready()  # the CPU backend exists now
    monkeypatch.setenv("XLA_FLAGS", "")
    try:
        memory_proxy._ensure_flags()
    except RuntimeError as e:
        assert "XLA_FLAGS" in str(e)
    else:
        raise AssertionError("expected a RuntimeError")
    monkeypatch.setenv("XLA_FLAGS", memory_proxy.NO_HOIST)
    memory_proxy._ensure_flags()  # already set: nothing to do


def test_forced_ops_of_the_system_reach_the_step(monkeypatch):
    """``NAME@OP=IMPL`` overrides one op on top of the interpreted Pallas kernels."""
    from benchmarks import fastjax_systems

    seen = {}

    class Built(Exception):
        pass

    def fake_build(system, shape, batch, seq, **kw):
        seen.update(kw)
        raise Built

    monkeypatch.setattr(fastjax_systems, "build_fastjax", fake_build)
    try:
        memory_proxy.proxy("fastjax-qlora-lean@cross_entropy=xla_fused_grad", "llama-3-8b", 4, 2048)
    except Built:
        pass
    ops = seen["ops"]
    assert ops.cross_entropy == "xla_fused_grad" and ops.attention == "pallas" and ops.interpret
