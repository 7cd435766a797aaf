"""The max-context search on CPU: the doubling-then-bisection against fake ``fits(n)`` oracles, the
probe's memory caps and outcome rules, and the rows written when no GPU is found. Nothing here needs a GPU;
the search's answers are exact integers (tolerance 0).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from benchmarks import harness, max_context
from benchmarks.max_context import search_max_context

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
