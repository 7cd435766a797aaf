"""Helpers shared by the Pallas kernel tests (fixtures, so they work under ``--import-mode=importlib``)."""

from __future__ import annotations

import jax
import pytest
from fastjax.pallas_kernels import _common

# Interpret-mode kernels become large XLA while-loops; the optimizer is most of their compile time.
FAST_XLA = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture
def run_fast():
    """``run_fast(fn, *args)``: jit ``fn`` and compile it with XLA's cheap settings (CPU test speed)."""

    def run(fn, *args):
        return jax.jit(fn).lower(*args).compile(compiler_options=FAST_XLA)(*args)

    return run


@pytest.fixture
def lower_for_cuda(monkeypatch):
    """``lower_for_cuda(fn, *args, interpret="0") -> int``: Triton launches in ``fn`` lowered for CUDA.

    With ``FASTJAX_PALLAS_INTERPRET=0`` every ``pallas_call`` goes through the Triton lowering (Pallas
    -> Triton IR, on this CPU machine), so a kernel the Triton backend cannot express fails here; the
    lowered module holds one Triton custom call per kernel launch (none in interpret mode).
    jaxlib > 0.10.2 also runs Triton's compiler inside the lowering, which needs a GPU: skipped there
    when there is none.
    """
    from jax._src.lib import version as jaxlib_version

    def lower(fn, *args, interpret: str = "0") -> int:
        if jaxlib_version > (0, 10, 2) and not _common.on_gpu():
            pytest.skip("this jaxlib compiles Triton during lowering; needs a GPU")
        monkeypatch.setenv(_common.ENV_INTERPRET, interpret)
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        return sum(
            text.count(f"custom_call @{t}") for t in ("__gpu$xla.gpu.triton", "triton_kernel_call")
        )

    return lower
