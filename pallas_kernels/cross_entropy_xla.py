"""The XLA (cuBLAS) paths of the fused linear cross-entropy, over token chunks (``cross_entropy.py``
holds the math, the Pallas path and the public function).

Both run ``lax.map`` / ``lax.scan`` over chunks of ``token_chunk`` tokens, so a chunk's ``[c, V]`` fp32
logits are the largest buffer; neither ever holds ``[T, V]``.

* ``xla_chunked``: :func:`lse_chunked` in the forward (one matmul a chunk), :func:`grads_chunked` in the
  backward (the logits again, then ``dz @ head`` and, for a trained head, ``dz^T @ hidden``): three
  ``T x V x D`` matmuls for a frozen head.
* ``xla_fused_grad``: :func:`lse_and_unit_grad` computes, from the same chunk of logits, the log-sum-exp
  and ``u_t = d loss_t / d hidden_t`` (the gradient for a unit cotangent) in the forward, so the backward is
  ``d_hidden = g[:, None] * u``. Two matmuls instead of three, for an fp32 ``[T, D]`` residual in place
  of hidden. This works because each token's loss depends on its own hidden row only, so its cotangent
  ``g_t`` scales a gradient known in the forward. The head gradient ``sum_t g_t dz_t^T hidden_t`` needs
  ``g`` inside the sum over tokens, so a trained head takes the ``xla_chunked`` backward instead.
  (Liger Kernel's fused linear cross-entropy also computes its gradient in the forward.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["grads_chunked", "lse_and_unit_grad", "lse_chunked", "softcap_logits", "token_chunks"]


def softcap_logits(z, softcap: float | None):
    return z if softcap is None else softcap * jnp.tanh(z / softcap)


def token_chunks(x, c: int):
    """``[T, ...] -> [T/c, c, ...]`` (zero padded)."""
    pad = (-x.shape[0]) % c
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(-1, c, *x.shape[1:])


def _logits(hc, w, precision):
    return jnp.einsum("td,vd->tv", hc, w, preferred_element_type=jnp.float32, precision=precision)


def _capped(z, softcap):
    """``(capped logits, tanh(z / softcap) or None)``: the tanh once, for the lse and for ``dz``."""
    if softcap is None:
        return z, None
    t = jnp.tanh(z / softcap)
    return softcap * t, t


def _dz(zc, t, lab, lse_c, g_c, *, vocab: int, z_loss: float, dtype):
    """``g * (p * (1 + 2 z_loss lse) - onehot) * (1 - tanh^2)`` from capped logits, in ``dtype``."""
    p = jnp.exp(zc - lse_c[:, None]) * (1.0 + 2.0 * z_loss * lse_c)[:, None]
    dz = g_c[:, None] * (p - jax.nn.one_hot(lab, vocab, dtype=jnp.float32))
    if t is not None:
        dz = dz * (1.0 - t * t)
    return dz.astype(dtype)


def lse_chunked(h, w, *, softcap, token_chunk: int, precision):
    c = min(token_chunk, h.shape[0])

    def one(hc):
        return jax.nn.logsumexp(softcap_logits(_logits(hc, w, precision), softcap), axis=-1)

    return lax.map(one, token_chunks(h, c)).reshape(-1)[: h.shape[0]]


def grads_chunked(
    h,
    w,
    labels,
    lse,
    g,
    *,
    softcap,
    z_loss: float,
    token_chunk: int,
    precision,
    head_trainable: bool,
):
    """``(d_hidden fp32 [T, D], d_head [V, D] or None)`` for per-token cotangents ``g`` (0 at ignored
    tokens), the logits recomputed chunk by chunk."""
    n_tok, c = h.shape[0], min(token_chunk, h.shape[0])

    def step(dw, xs):
        hc, lab, lse_c, g_c = xs
        zc, t = _capped(_logits(hc, w, precision), softcap)
        dz = _dz(zc, t, lab, lse_c, g_c, vocab=w.shape[0], z_loss=z_loss, dtype=h.dtype)
        dh = jnp.dot(dz, w, preferred_element_type=jnp.float32, precision=precision)
        if dw is not None:
            dw = dw + lax.dot_general(
                dz,
                hc,
                (((0,), (0,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
        return dw, dh

    dw0 = jnp.zeros(w.shape, jnp.float32) if head_trainable else None
    xs = tuple(token_chunks(x, c) for x in (h, labels, lse, g))
    dw, dh = lax.scan(step, dw0, xs)
    return dh.reshape(-1, h.shape[1])[:n_tok], None if dw is None else dw.astype(w.dtype)


def lse_and_unit_grad(
    h, w, labels, *, softcap, z_loss: float, ignore_index: int, token_chunk: int, precision
):
    """``(lse fp32 [T], u fp32 [T, D])``: ``u_t`` is ``d loss_t / d hidden_t`` for a unit cotangent, 0 at
    ignored tokens; one logits matmul and one ``dz @ head`` matmul a chunk."""
    n_tok, c = h.shape[0], min(token_chunk, h.shape[0])

    def step(_, xs):
        hc, lab = xs
        zc, t = _capped(_logits(hc, w, precision), softcap)
        lse_c = jax.nn.logsumexp(zc, axis=-1)
        g_c = (lab != ignore_index).astype(jnp.float32)
        dz = _dz(zc, t, lab, lse_c, g_c, vocab=w.shape[0], z_loss=z_loss, dtype=h.dtype)
        return None, (
            lse_c,
            jnp.dot(dz, w, preferred_element_type=jnp.float32, precision=precision),
        )

    _, (lse, u) = lax.scan(step, None, (token_chunks(h, c), token_chunks(labels, c)))
    return lse.reshape(-1)[:n_tok], u.reshape(-1, h.shape[1])[:n_tok]
