"""Shared plumbing for the Pallas kernels: the interpret-mode switch and Triton compiler params.

Interpret mode: ``FASTJAX_PALLAS_INTERPRET=1`` forces it on, ``=0`` forces it off; unset, it is on exactly when
JAX's default backend is not a GPU. It is read at call time (not import time), so a test can set the variable
with ``monkeypatch.setenv`` and see the effect on the next trace.
"""

from __future__ import annotations

import functools
import os

import jax

ENV_INTERPRET = "FASTJAX_PALLAS_INTERPRET"


@functools.cache
def _default_backend() -> str:
    return jax.default_backend()


def on_gpu() -> bool:
    return _default_backend() == "gpu"


def resolve_interpret(interpret: bool | None) -> bool:
    """The interpret flag to pass to ``pl.pallas_call``: explicit argument, else env, else "no GPU"."""
    if interpret is not None:
        return bool(interpret)
    env = os.environ.get(ENV_INTERPRET, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    if env:
        raise ValueError(f"{ENV_INTERPRET}={env!r}: expected 1/0 (or true/false)")
    return not on_gpu()


def triton_params(num_warps: int | None = None, num_stages: int | None = None):
    """Triton compiler params across jax 0.10 / 0.11 (the class was renamed once)."""
    from jax.experimental.pallas import triton as plt

    cls = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams")
    kw = {}
    if num_warps is not None:
        kw["num_warps"] = num_warps
    if num_stages is not None:
        kw["num_stages"] = num_stages
    return cls(**kw)


def pallas_call_kwargs(
    interpret: bool | None, num_warps: int | None = None, num_stages: int | None = None
) -> dict:
    """Keyword arguments for ``pl.pallas_call``: interpret flag and (when compiling) Triton params."""
    interp = resolve_interpret(interpret)
    kw: dict = {"interpret": interp}
    if not interp:
        kw["compiler_params"] = triton_params(num_warps, num_stages)
    return kw


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def masked_load(ref, mask, other=0.0):
    """Masked load; Triton rejects ``other`` without a mask (all-in-bounds blocks pass ``mask=None``)."""
    from jax.experimental.pallas import triton as plt

    return plt.load(ref, mask=mask, other=None if mask is None else other)
