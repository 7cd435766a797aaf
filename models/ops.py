"""The ops layer: every op the models use, dispatching between a pure-jnp reference and a Pallas kernel.

Each op lives in ``pallas_kernels/<op>.py`` next to its reference (``<op>_reference``). ``Ops`` records which
implementation each op uses: ``"xla"`` (the reference, runs everywhere), ``"pallas"`` (the kernel; compiled on a
GPU, interpret mode elsewhere) or ``"auto"`` (the kernel on a GPU, the reference elsewhere; attention's ``auto``
picks among cuDNN, Pallas and XLA per case, see ``pallas_kernels/attention.py``).

One setting forces every op at once: env ``FASTJAX_KERNELS=xla|pallas|auto`` gives the default of every field;
an explicit ``Ops(...)`` argument wins. ``Ops`` is frozen and hashable, so it is a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from fastjax.pallas_kernels import _common

ENV_KERNELS = "FASTJAX_KERNELS"
_CHOICES = ("auto", "pallas", "xla")


def _env_default() -> str:
    value = os.environ.get(ENV_KERNELS, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{ENV_KERNELS}={value!r}: expected one of {_CHOICES}")
    return value


def _field():
    return dataclasses.field(default_factory=_env_default)


@dataclasses.dataclass(frozen=True)
class Ops:
    """Implementation per op: ``"auto" | "pallas" | "xla"`` (attention also ``"cudnn"``; cross-entropy also
    ``"xla_chunked"``, the memory-bounded XLA path). ``interpret`` overrides the Pallas interpret switch."""

    rms_norm: str = _field()
    rope: str = _field()
    glu: str = _field()
    attention: str = _field()
    linear: str = _field()
    cross_entropy: str = _field()
    interpret: bool | None = None

    @classmethod
    def all(cls, impl: str, interpret: bool | None = None) -> "Ops":
        """Every op on one implementation (``Ops.all("xla")`` is plain XLA)."""
        return cls(impl, impl, impl, impl, impl, impl, interpret)

    def resolve(self, op: str) -> str:
        impl = getattr(self, op)
        if impl == "auto" and op == "linear":
            # NF4 linears: XLA's dequantize-then-matmul beats the fused Pallas kernel on the H200 at every
            # Llama-3-8B shape with T >= 2048 (fused 0.41-0.81x of it, benchmarks/results/nf4_h200.md).
            return "xla"
        if impl == "auto" and op != "attention":
            return "pallas" if _common.on_gpu() else "xla"
        return impl


def rms_norm(x: jax.Array, w: jax.Array, *, eps: float, offset: float = 0.0, ops: Ops) -> jax.Array:
    from fastjax.pallas_kernels import rms_norm as k

    return k.rms_norm(x, w, eps=eps, offset=offset, impl=ops.resolve("rms_norm"), interpret=ops.interpret)


def rms_norm_residual(x: jax.Array, residual: jax.Array, w: jax.Array, *, eps: float,
                      offset: float = 0.0, ops: Ops) -> tuple[jax.Array, jax.Array]:
    """Fused ``s = x + residual`` then ``rms_norm(s)``: returns ``(s, normed)``, both ``x.dtype``.

    The sum is rounded to ``x.dtype`` before the norm, exactly as ``rms_norm(x + residual)``; one
    kernel reads both inputs once and writes both outputs (the ``rms_norm`` field picks the
    implementation).
    """
    from fastjax.pallas_kernels import rms_norm as k

    return k.rms_norm_residual(x, residual, w, eps=eps, offset=offset, impl=ops.resolve("rms_norm"),
                               interpret=ops.interpret)


def rope(q: jax.Array, k: jax.Array, positions: jax.Array, inv_freq: jax.Array, *,
         attention_scaling: float = 1.0, ops: Ops) -> tuple[jax.Array, jax.Array]:
    from fastjax.pallas_kernels import rope as kr

    return kr.rope(q, k, positions, inv_freq, attention_scaling=attention_scaling,
                   impl=ops.resolve("rope"), interpret=ops.interpret)


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None):
    from fastjax.pallas_kernels import rope as kr

    return kr.rope_inv_freq(head_dim, theta, rope_scaling)


def glu(gate: jax.Array, up: jax.Array, *, activation: str, ops: Ops) -> jax.Array:
    from fastjax.pallas_kernels import swiglu as k

    return k.glu(gate, up, activation=activation, impl=ops.resolve("glu"), interpret=ops.interpret)


def attention(q, k, v, *, segment_ids=None, causal=True, window=None, softcap=None, sm_scale=None,
              ops: Ops) -> jax.Array:
    from fastjax.pallas_kernels import attention as ka

    return ka.attention(q, k, v, segment_ids=segment_ids, causal=causal, window=window,
                        softcap=softcap, sm_scale=sm_scale, impl=ops.resolve("attention"),
                        interpret=ops.interpret)


def cross_entropy(hidden, head, labels, *, weights=None, softcap=None, z_loss=0.0,
                  reduction="mean", ops: Ops):
    from fastjax.pallas_kernels import cross_entropy as k

    return k.cross_entropy(hidden, head, labels, weights=weights, softcap=softcap, z_loss=z_loss,
                           reduction=reduction, impl=ops.resolve("cross_entropy"),
                           interpret=ops.interpret)


def _is_quantized(w: Any) -> bool:
    return not isinstance(w, (jax.Array, jnp.ndarray)) and hasattr(w, "dequantize")


def linear(x: jax.Array, w: Any, *, bias: jax.Array | None = None, lora: dict | None = None,
           lora_scale: float = 1.0, dropout_rng: jax.Array | None = None, lora_dropout: float = 0.0,
           ops: Ops) -> jax.Array:
    """``x @ w.T (+ bias) (+ lora_scale * dropout(x) @ A.T @ B.T)``; ``w`` is ``[out, in]`` or an NF4Tensor.

    Matmuls run in ``x``'s dtype with fp32 accumulation; LoRA factors are cast to ``x``'s dtype.
    """
    lora_x = x
    if lora is not None and lora_dropout > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - lora_dropout, x.shape)
        lora_x = jnp.where(keep, x / (1.0 - lora_dropout), 0).astype(x.dtype)
    if _is_quantized(w):
        from fastjax.pallas_kernels import nf4_lora as k

        if lora is not None and lora_x is not x:
            # Dropout only feeds the adapter path: run base and adapter separately.
            y = k.nf4_lora_linear(x, w, None, None, bias=bias, impl=ops.resolve("linear"),
                                  interpret=ops.interpret)
            return y + _lora_term(lora_x, lora, lora_scale)
        a = None if lora is None else lora["lora_A"]
        b = None if lora is None else lora["lora_B"]
        return k.nf4_lora_linear(x, w, a, b, lora_scale=lora_scale, bias=bias,
                                 impl=ops.resolve("linear"), interpret=ops.interpret)
    # No preferred_element_type: the GPU dot accumulates in fp32 anyway, and an fp32 [T, out] result would
    # cost an extra write + convert pass per projection (bf16 in, bf16 out, as cuBLAS does natively).
    y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    if bias is not None:
        y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
    if lora is not None:
        y = y + _lora_term(lora_x, lora, lora_scale)
    return y


def _lora_term(x: jax.Array, lora: dict, scale: float) -> jax.Array:
    a = lora["lora_A"].astype(x.dtype)
    b = lora["lora_B"].astype(x.dtype)
    h = jnp.einsum("...i,ri->...r", x, a)
    return (scale * jnp.einsum("...r,or->...o", h, b)).astype(x.dtype)
