"""Fixtures shared by the benchmark tests."""

from __future__ import annotations

import json

import pytest

from benchmarks import harness

CPU_GPU_INFO = json.dumps({"name": "cpu", "total_bytes": None})


@pytest.fixture
def cpu_context(monkeypatch):
    """Children and rows see a CPU-only machine without probing for a GPU again."""
    monkeypatch.setenv(harness.ENV_GPU, CPU_GPU_INFO)
    monkeypatch.setenv(harness.ENV_RUN_ID, "test-run")
    monkeypatch.setenv(harness.ENV_COMMAND, "python3 test")
    harness.gpu_info.cache_clear()
    yield
    harness.gpu_info.cache_clear()
