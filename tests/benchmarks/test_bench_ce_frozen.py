"""The frozen-head cross-entropy benchmark on the CPU: every implementation runs, agrees with the
reference (fp32, relative L2 <= 1e-5) and writes the rows the GPU table needs."""

from __future__ import annotations

import json

from benchmarks import bench_ce_frozen


def test_rows_agree_with_the_reference(tmp_path):
    out = tmp_path / "ce.jsonl"
    rows = bench_ce_frozen.main(
        ["--shape", "tiny", "--tokens", "37", "--dtype", "float32", "--repeats", "1"]
        + ["--interpret", "--with-full", "--out", str(out)]
    )
    assert [r["impl"] for r in rows] == ["pallas", "xla_chunked", "xla_fused_grad", "xla"]
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["tflops"] > 0 and r["rel_err"] <= 1e-5, r
        assert (r["dim"], r["vocab"], r["tokens"]) == (40, 301, 37)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
