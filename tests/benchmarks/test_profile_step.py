"""profile_step.py: kernel events attributed to model ops through HLO metadata.

The pure pieces run on synthetic traces shaped like a GPU Perfetto trace (a ``/device:GPU:0`` process
whose events are kernels naming their HLO instruction); the whole tool runs on a tiny Llama on the CPU
backend, where XLA:CPU's thunk events play the kernels.
"""

from __future__ import annotations

import json
import os

import pytest
from benchmarks import profile_step as P
from benchmarks.shapes import ModelShape

HLO = """HloModule jit_step

%fused_computation.7 (p0: bf16[8,16]) -> bf16[8,16] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  ROOT %multiply.3 = bf16[8,16]{1,0} multiply(%p0, %p0), metadata={op_name="jit(step)/jvp(while/body/closed_call/glu/mul)"}
}

ENTRY %main.9 (a: bf16[8,16]) -> bf16[8,16] {
  %a = bf16[8,16]{1,0} parameter(0)
  %loop_multiply_fusion.7 = bf16[8,16]{1,0} fusion(%a), kind=kLoop, calls=%fused_computation.7
  %custom-call.2 = bf16[8,16]{1,0} custom-call(%a), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/transpose(jvp(while/body/closed_call/q_proj/...i,oi->...o/dot_general))"}
  ROOT %cc.3 = bf16[8,16]{1,0} custom-call(%a), metadata={op_name="jit(step)/jvp(while/body/closed_call/q_proj/lora/dot_general)"}
}
"""


def _gpu_trace(events):
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0 (pid 7)"}},
    ]
    meta += [
        {
            "ph": "M",
            "pid": 7,
            "tid": 3,
            "name": "thread_name",
            "args": {"name": "Stream #13(Compute)"},
        },
        {"ph": "M", "pid": 7, "tid": 9, "name": "thread_name", "args": {"name": "XLA Modules"}},
    ]
    host = [{"ph": "X", "pid": 1, "tid": 1, "ts": 0.0, "dur": 999.0, "name": "PjitFunction(step)"}]
    derived = [{"ph": "X", "pid": 7, "tid": 9, "ts": 0.0, "dur": 2000.0, "name": "jit_step"}]
    return {"traceEvents": meta + host + derived + events}


def _kernel(name, hlo, ts, dur):
    return {
        "ph": "X",
        "pid": 7,
        "tid": 3,
        "ts": ts,
        "dur": dur,
        "name": name,
        "args": {"hlo_op": hlo},
    }


def test_hlo_op_names_reads_metadata_and_fusion_roots():
    names = P.hlo_op_names(HLO)
    assert names["custom-call.2"].endswith("q_proj/...i,oi->...o/dot_general))")
    # the fusion has no metadata of its own: it takes its fused computation's
    assert names["loop_multiply_fusion.7"] == "jit(step)/jvp(while/body/closed_call/glu/mul)"
    assert names["cc.3"].endswith("q_proj/lora/dot_general)")
    assert "a" not in names  # a parameter without metadata stays unnamed


@pytest.mark.parametrize(
    "op_name, scope, pass_",
    [
        ("jit(step)/transpose(jvp(while/body/closed_call/q_proj/lora/dot_general))", "lora", "bwd"),
        (
            "jit(step)/jvp(while/body/closed_call/down_proj/...i,oi->...o/dot_general)",
            "down_proj",
            "fwd",
        ),
        (
            "jit(step)/jvp(while/body/checkpoint/rms_norm_residual/reduce_sum)",
            "rms_norm_residual",
            "fwd",
        ),
        ("jit(step)/transpose(jvp(attention/pallas_call))", "attention", "bwd"),
        ("jit(step)/optimizer/mul", "optimizer", "fwd"),
        ("jit(step)/add", "other", "fwd"),
        ("", "other", "fwd"),
    ],
)
def test_scope_and_pass(op_name, scope, pass_):
    assert P.scope_of(op_name) == scope and P.pass_of(op_name) == pass_


@pytest.mark.parametrize(
    "kernel, kind",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
        ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "gemm"),
        ("cutlass3x_sm90_tensorop_gemm", "gemm"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma", "cudnn"),
        ("fastjax_attention_dkdv", "pallas"),
        ("loop_multiply_fusion_3", "xla_fusion"),
        ("input_reduce_fusion", "xla_fusion"),
        ("MemcpyD2H", "copy"),
        ("ncclDevKernel_AllReduce_Sum_bf16", "nccl"),
    ],
)
def test_kind_of(kernel, kind):
    assert P.kind_of(kernel) == kind


def test_kind_of_pallas_by_hlo_op():
    """The H200 trace of 2026-12-01 filed ``cross_entropy_lse`` (a pallas_call) under xla_fusion."""
    assert P.kind_of("cross_entropy_lse", "pallas_call.39") == "pallas"
    assert P.kind_of("loop_multiply_fusion_3", "loop_multiply_fusion.3") == "xla_fusion"


def test_busy_is_the_union_of_intervals():
    evs = [{"ts": 0, "dur": 10}, {"ts": 5, "dur": 10}, {"ts": 30, "dur": 5}, {"ts": 31, "dur": 1}]
    assert P.busy_us(evs) == 20.0


def test_attribute_on_a_gpu_shaped_trace():
    kernels = [
        _kernel("sm90_xmma_gemm_bf16", "custom-call.2", 0.0, 400.0),  # q_proj backward GEMM
        _kernel("loop_multiply_fusion", "loop_multiply_fusion.7", 500.0, 100.0),  # glu forward
        _kernel("fastjax_lora", "cc.3", 600.0, 50.0),
        _kernel("sm90_xmma_gemm_bf16", "custom-call.2", 1000.0, 400.0),
        _kernel("mystery_kernel", "no-such-op.1", 1500.0, 50.0),
    ]
    events, where = P.device_events(_gpu_trace(kernels))
    assert where == "gpu" and len(events) == 5  # neither the host event nor the module line
    res = P.attribute(events, P.hlo_op_names(HLO), steps=2)
    assert res["by_op"] == {"q_proj": 0.4, "glu": 0.05, "lora": 0.025, "other": 0.025}
    assert res["by_op_pass"]["q_proj bwd"] == 0.4 and res["by_op_pass"]["glu fwd"] == 0.05
    assert res["by_kind"] == {"gemm": 0.4, "xla_fusion": 0.075, "pallas": 0.025}
    assert res["unattributed_ms_per_step"] == 0.025
    assert res["kernel_ms_per_step"] == res["busy_ms_per_step"] == 0.5
    top = res["top_kernels"][0]
    assert (top["op"], top["pass_"], top["kind"], top["ms"], top["calls"]) == (
        "q_proj",
        "bwd",
        "gemm",
        0.4,
        1.0,
    )


def test_host_events_keep_only_leaves():
    """XLA:CPU nests the thunks of a while body inside the while thunk: count the body once."""
    ev = lambda ts, dur, op: {
        "ph": "X",
        "pid": 1,
        "tid": 2,
        "ts": ts,
        "dur": dur,
        "name": op,
        "args": {"hlo_op": op},
    }
    trace = {
        "traceEvents": [
            {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            ev(0, 100, "while.1"),
            ev(10, 20, "fusion.1"),
            ev(40, 30, "fusion.2"),
            ev(200, 5, "fusion.3"),
        ]
    }
    events, where = P.device_events(trace)
    assert where == "host"
    assert sorted(e["name"] for e in events) == ["fusion.1", "fusion.2", "fusion.3"]


def test_profile_a_tiny_step_on_cpu(tmp_path, monkeypatch):
    """The whole tool: build, warm up, trace, attribute. Every scope of the model shows up."""
    tiny = ModelShape("tiny", "llama", 64, 128, 2, 4, 2, 16, 320)
    args = P.build_parser().parse_args(
        ["--out", str(tmp_path), "--batch", "2", "--seq", "32", "--steps", "2"]
    )
    args.shape = tiny
    res = P.profile(args)
    assert res["kind"] == "profile" and res["events_from"] == "host" and res["steps"] == 2
    for op in (
        "attention",
        "glu",
        "rope",
        "rms_norm",
        "cross_entropy",
        "lora",
        "q_proj",
        "optimizer",
    ):
        assert res["by_op"].get(op, 0) > 0, (op, res["by_op"])
    assert any(k.endswith(" bwd") for k in res["by_op_pass"])
    assert 0 < res["busy_ms_per_step"] <= res["kernel_ms_per_step"] + 1e-9
    assert res["unattributed_ms_per_step"] < 0.5 * res["kernel_ms_per_step"]
    text = P.tables(res)
    assert "| attention |" in text and "kernel kind" in text
    # main(): the same result lands in profile.json (written atomically) and the tables print
    monkeypatch.setattr(P, "profile", lambda a: res)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    P.main(["--out", str(tmp_path / "m")])
    # command buffers (CUDA graphs) off, the other flags kept
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=1",
        P.NO_COMMAND_BUFFERS,
    ]
    assert json.loads((tmp_path / "m" / "profile.json").read_text())["by_op"] == res["by_op"]


def test_embed_on_host_reaches_the_build(tmp_path, monkeypatch):
    """``--embed-on-host`` profiles the step the lean setting runs: the table in host memory."""
    from benchmarks import fastjax_systems

    seen = {}

    def fake_build(*a, **kw):
        seen.update(kw)
        raise RuntimeError("stop after the build's arguments")

    monkeypatch.setattr(fastjax_systems, "build_fastjax", fake_build)
    for flags, want in (([], False), (["--embed-on-host"], True)):
        args = P.build_parser().parse_args(["--out", str(tmp_path), *flags])
        with pytest.raises(RuntimeError, match="build's arguments"):
            P.profile(args)
        assert seen["embed_on_host"] is want
