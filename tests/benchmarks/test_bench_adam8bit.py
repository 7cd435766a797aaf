"""The 8-bit Adam tile sweep on the CPU (interpret mode): every tile agrees with the reference, and the
rows carry what the GPU table needs."""

from __future__ import annotations

import json

from benchmarks import bench_adam8bit


def test_sweep_rows_agree_with_the_reference(tmp_path):
    out = tmp_path / "sweep.jsonl"
    # 4,100 values: 17 blocks, so block_rows=4 and 8 both end on a partial tile
    rows = bench_adam8bit.main(
        ["--params", "4100", "--rows", "4,8", "--warps", "4", "--repeats", "1"]
        + ["--interpret", "--out", str(out)]
    )
    assert [r["impl"] for r in rows] == ["copy", "xla", "pallas", "pallas"]
    assert all(r["params"] == 17 * 256 for r in rows)
    for r in rows[2:]:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["gbps"] > 0
        assert r["codes_differ"] <= 1e-3 and r["max_code_diff"] <= 1, r
        assert r["absmax_rel_err"] <= 1e-6, r
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


def test_a_tile_that_fails_is_a_row_with_the_error():
    rows = bench_adam8bit.main(["--params", "512", "--rows", "3", "--warps", "4", "--interpret"])
    assert "block_rows=3 must be a power of 2" in rows[-1]["error"]
