"""Optimizers: 8-bit AdamW (bitsandbytes' blockwise 8-bit Adam) as an optax ``GradientTransformation``.

``adamw_8bit`` has ``optax.adamw``'s structure (``scale_by_adam`` -> ``add_decayed_weights`` ->
``scale_by_learning_rate``) with the Adam moments stored in 8 bits:

* tensors with at least ``min_8bit_size=4096`` elements keep each moment as ``QuantizedMoment``: the
  flattened tensor, zero-padded to a multiple of 256, in blocks of 256 values; per block an fp32 absmax and
  uint8 codes of ``value / absmax`` snapped to the nearest entry of bitsandbytes' dynamic map (signed for the
  first moment, unsigned for the second; ``fastjax.quant.create_dynamic_map``);
* smaller tensors (biases, norms, LoRA factors of tiny models) keep fp32 moments.

Each step dequantizes, does the fp32 Adam update (the step itself uses the fresh fp32 moments, as bitsandbytes
does), and requantizes. State is a pytree of arrays only (``ScaleByAdam8bitState`` of count + two trees
mirroring the params), so orbax and safetensors can save it.

Two implementations of that step, chosen by ``impl``: ``"xla"`` (``adam8bit_update_reference``, which XLA
splits into a few elementwise/reduce passes) and ``"pallas"`` (``fastjax.pallas_kernels.adam8bit``: one
kernel that reads the gradient and both moments once and writes the moments in place; the same codes on the
same fp32 values). ``"auto"`` follows ``FASTJAX_KERNELS`` when it is set, else it is ``"pallas"`` on a GPU
and ``"xla"`` elsewhere.

State bytes per quantized parameter: 2 (codes) + 8/256 (absmaxes) ~= 2.03, against fp32 AdamW's 8.
Speed (H200, 2026-12-02, benchmarks/results/nf4_h200.md), one step with fp32 params: on a full 1.24B tree
the kernel takes 18.0 ms, the XLA step 38.1 ms, optax.adamw 9.1 ms; on the Llama-3-8B r=16 LoRA tree (42M
params) 1.39, 1.95 and 0.87 ms. The kernel moves 12 bytes an element (14.8 GB for the 1.24B tree: 0.82
TB/s, against optax.adamw's 3.3 TB/s on its 24), so memory is not what bounds it; the per-element search
for the nearest code of both moments is the likely cost, not yet profiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastjax.models.ops import env_default
from fastjax.pallas_kernels._common import on_gpu
from fastjax.pallas_kernels.adam8bit import BLOCK, AdamHyper, adam8bit_update, adam_direction

IMPLS = ("auto", "pallas", "xla")


class QuantizedMoment(NamedTuple):
    """One moment of one tensor in 8 bits: ``codes`` uint8 ``[nb, 256]``, ``absmax`` fp32 ``[nb]``."""

    codes: jax.Array
    absmax: jax.Array


class ScaleByAdam8bitState(NamedTuple):
    count: jax.Array  # int32 []
    mu: Any  # params-shaped tree of fp32 arrays / QuantizedMoment
    nu: Any


def _update_quantized(g, mu: QuantizedMoment, nu: QuantizedMoment, scalars, hp: AdamHyper, **kw):
    """The Adam direction for ``g`` and its new 8-bit moments: ``g`` flattened and zero-padded to
    256-value blocks (the padding's moments stay exactly 0, so it never moves a block's absmax)."""
    n = g.size
    flat = g.reshape(-1)
    pad = -n % BLOCK
    if pad:
        flat = jnp.pad(flat, (0, pad))
    u, mc, ma, vc, va = adam8bit_update(
        flat.reshape(-1, BLOCK),
        mu.codes,
        mu.absmax,
        nu.codes,
        nu.absmax,
        scalars,
        **dataclasses.asdict(hp),
        **kw,
    )
    u = u.reshape(-1)[:n] if pad else u
    return u.reshape(g.shape), QuantizedMoment(mc, ma), QuantizedMoment(vc, va)


def _resolve_impl(impl: str) -> str:
    """``impl`` as given; ``"auto"`` follows ``FASTJAX_KERNELS`` (as every op does), else the fused
    kernel on a GPU and the XLA step elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"adamw_8bit: impl={impl!r}, expected one of {IMPLS}")
    if impl == "auto":
        impl = env_default()
    # H200, 2026-12-02 (nf4_h200.md): the kernel steps a 1.24B fp32 tree in 18.0 ms, the XLA step in
    # 38.1 ms; a 42M LoRA tree in 1.39 ms against 1.95 ms.
    if impl == "auto":
        impl = "pallas" if on_gpu() else "xla"
    return impl


def _zeros_moment(p: jax.Array, min_8bit_size: int, dtype: Any = None):
    if p.size >= min_8bit_size:
        nb = -(-p.size // BLOCK)
        return QuantizedMoment(jnp.zeros((nb, BLOCK), jnp.uint8), jnp.zeros((nb,), jnp.float32))
    return jnp.zeros(p.shape, dtype or jnp.float32)


def _is_moment(x) -> bool:
    return isinstance(x, QuantizedMoment)


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    min_8bit_size: int = 4096,
    impl: str = "auto",
    interpret: bool | None = None,
) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` with blockwise 8-bit moments (module docstring).

    Same arguments and math as optax: ``eps_root`` inside the square root, Nesterov momentum as in
    ``optax.scale_by_adam(nesterov=True)``; ``mu_dtype`` applies to the first moment of the tensors kept in
    full precision (8-bit moments are 8-bit whatever it says). ``impl``: ``"auto"``, ``"pallas"`` or
    ``"xla"`` (module docstring); ``interpret`` runs the kernel in Pallas interpret mode.
    """
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
    impl = _resolve_impl(impl)
    hp = AdamHyper(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov)

    def init_fn(params):
        mu = jax.tree.map(lambda p: _zeros_moment(p, min_8bit_size, mu_dtype), params)
        nu = jax.tree.map(lambda p: _zeros_moment(p, min_8bit_size), params)
        return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), mu, nu)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        bc1 = 1.0 - jnp.asarray(b1, jnp.float32) ** count
        bc2 = 1.0 - jnp.asarray(b2, jnp.float32) ** count
        bc1_next = 1.0 - jnp.asarray(b1, jnp.float32) ** optax.safe_int32_increment(count)
        leaves, treedef = jax.tree.flatten(updates)
        mus = treedef.flatten_up_to(state.mu)
        nus = treedef.flatten_up_to(state.nu)
        scalars = jnp.stack([bc1, bc2, bc1_next])
        new_u, new_mu, new_nu = [], [], []
        for g, m_s, v_s in zip(leaves, mus, nus):
            if _is_moment(m_s):
                u, m, v = _update_quantized(
                    g, m_s, v_s, scalars, hp, impl=impl, interpret=interpret
                )
            else:
                g32 = g.astype(jnp.float32)
                m, v, u = adam_direction(g32, m_s.astype(jnp.float32), v_s, bc1, bc2, bc1_next, hp)
                u = u.astype(g.dtype)
                if mu_dtype is not None:
                    m = m.astype(mu_dtype)
            new_u.append(u)
            new_mu.append(m)
            new_nu.append(v)
        return (
            treedef.unflatten(new_u),
            ScaleByAdam8bitState(count, treedef.unflatten(new_mu), treedef.unflatten(new_nu)),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = False,
    min_8bit_size: int = 4096,
    impl: str = "auto",
    interpret: bool | None = None,
) -> optax.GradientTransformation:
    """Drop-in for ``optax.adamw``: the same signature, defaults and chain, with 8-bit Adam moments
    (``impl``/``interpret``: ``scale_by_adam_8bit``)."""
    return optax.chain(
        scale_by_adam_8bit(
            b1,
            b2,
            eps,
            eps_root,
            mu_dtype,
            nesterov=nesterov,
            min_8bit_size=min_8bit_size,
            impl=impl,
            interpret=interpret,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def state_nbytes(state: Any) -> int:
    """Bytes held by the array leaves of an optimizer state."""
    return sum(
        int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(state)
        if hasattr(x, "dtype")
    )
