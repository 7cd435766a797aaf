"""The XLA implementation of ``nf4_lora_linear`` (``impl="xla"``): dequantize W, then matmuls.

``nf4_lora.nf4_lora_linear_reference`` is the oracle: fp32 matmul results, one rounding at the end, plain
autodiff. Trained through, that reference costs two things a training step should not pay:

- fp32 ``[T, out]`` results. The dot writes fp32 and a convert pass rounds it; in the backward the fp32
  cotangent meets the bf16 weight, so the dx matmul runs in fp32 (TF32 at best). The dense projections
  dropped exactly this in call 3 of ``benchmarks/results/train_step_h200.md`` (8,924 -> 11,722 tokens/s);
  the QLoRA rows still had it (8,839 -> 9,026).
- the dequantized bf16 W as an autodiff residual (``dx = dy @ W``): with ``remat="none"`` every layer's
  bf16 weights stayed alive until the backward (Llama-3-8B: 57.6 GiB peak with an NF4 base against 53.9
  GiB with a bf16 one, so the "4-bit" base held a full bf16 copy).

Here the matmuls take and return ``x.dtype`` (fp32 accumulation inside the dot, as cuBLAS does for bf16),
and a ``custom_vjp`` saves only the NF4 leaves, x, the adapters and ``x @ A.T``: the backward dequantizes W
again (one memory-bound pass over 1/4 of the bf16 bytes) instead of keeping it. W is frozen: its cotangent
is zero. fp32 inputs use IEEE fp32 dots (``Precision.HIGHEST``), so fp32 results match the reference to
rounding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastjax.quant import NF4Tensor, dequantize_nf4


def _prec(dt) -> Any:
    return jax.lax.Precision.HIGHEST if dt == jnp.float32 else None


def _mm(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
    """``einsum(spec)`` in ``a.dtype`` (operands cast to it), fp32 accumulation in the dot."""
    return jnp.einsum(spec, a, b.astype(a.dtype), precision=_prec(a.dtype))


@jax.custom_vjp
def _nf4_xla_2d(x, w, lora_a, lora_b, bias, scale):
    return _fwd(x, w, lora_a, lora_b, bias, scale)[0]


def _fwd(x, w, lora_a, lora_b, bias, scale):
    dt = x.dtype
    y = _mm(x, dequantize_nf4(w, dt), "ti,oi->to")
    xa = None
    if lora_a is not None:
        xa = _mm(x, lora_a, "ti,ri->tr")
        y = y + (scale * _mm(xa, lora_b, "tr,or->to")).astype(dt)
    if bias is not None:
        y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dt)
    return y, (x, w, lora_a, lora_b, bias, scale, xa)


def _bwd(res, dy):
    x, w, lora_a, lora_b, bias, scale, xa = res
    dt = x.dtype
    dy = dy.astype(dt)
    dx = _mm(dy, dequantize_nf4(w, dt), "to,oi->ti")
    da = db = None
    if lora_a is not None:
        dyb = _mm(dy, lora_b, "to,or->tr")  # [T, r]
        dx = dx + (scale * _mm(dyb, lora_a, "tr,ri->ti")).astype(dt)
        prec = _prec(dt)
        da = scale * jnp.einsum(
            "tr,ti->ri", dyb, x, precision=prec, preferred_element_type=jnp.float32
        )
        db = scale * jnp.einsum(
            "to,tr->or", dy, xa, precision=prec, preferred_element_type=jnp.float32
        )
        da, db = da.astype(lora_a.dtype), db.astype(lora_b.dtype)
    dw, dbias, dscale = frozen_cotangents(dy, w, bias, scale)
    return dx, dw, da, db, dbias, dscale


def frozen_cotangents(dy, w, bias, scale):
    """The NF4 linear's other cotangents (shared with the Pallas op): zeros for W's leaves (float0 for
    the integer ones) and for the LoRA scale; ``sum(dy)`` over rows for the bias (or None)."""
    dbias = None if bias is None else jnp.sum(dy.astype(jnp.float32), axis=0).astype(bias.dtype)
    dw = jax.tree.map(
        lambda a: (
            jnp.zeros_like(a)
            if jnp.issubdtype(a.dtype, jnp.floating)
            else np.zeros(a.shape, jax.dtypes.float0)
        ),
        w,
    )
    return dw, dbias, jnp.zeros_like(scale)


_nf4_xla_2d.defvjp(_fwd, _bwd)
nf4_xla_backward = _bwd  # the Pallas op's ``impl="pallas_fwd"`` backward (same residuals)


def nf4_lora_linear_xla(
    x: jax.Array,
    w: NF4Tensor,
    lora_a: jax.Array | None = None,
    lora_b: jax.Array | None = None,
    *,
    lora_scale: Any = 1.0,
    bias: jax.Array | None = None,
) -> jax.Array:
    """``x @ dequant(w).T + lora_scale * (x @ lora_a.T) @ lora_b.T (+ bias)`` in ``x.dtype``; shapes as
    ``nf4_lora.nf4_lora_linear``. Differentiable in x, lora_a, lora_b and bias."""
    out, n_in = w.shape
    lead = x.shape[:-1]
    scale = jnp.asarray(lora_scale, jnp.float32)
    y = _nf4_xla_2d(x.reshape(-1, n_in), w, lora_a, lora_b, bias, scale)
    return y.reshape(*lead, out)
