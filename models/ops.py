"""The ops layer: every op the models use, dispatching between a pure-jnp reference and a Pallas kernel.

Each op lives in ``pallas_kernels/<op>.py`` next to its reference (``<op>_reference``). ``Ops`` records which
implementation each op uses: ``"xla"`` (the reference, runs everywhere), ``"pallas"`` (the kernel; compiled on a
GPU, interpret mode elsewhere) or ``"auto"`` (the kernel on a GPU, the reference elsewhere; attention's ``auto``
picks among cuDNN, Pallas and XLA per case, see ``pallas_kernels/attention.py``). Two ``auto`` choices on a GPU
follow end-to-end measurements instead (``Ops.resolve``): NF4 linears take XLA's dequantize-then-matmul and the
GLU takes ``xla_recompute`` (the kernel's math in jnp), both faster in the full training step on the H200.

One setting forces every op at once: env ``FASTJAX_KERNELS=xla|pallas|auto`` gives the default of every field;
an explicit ``Ops(...)`` argument wins. ``Ops`` is frozen and hashable, so it is a static argument of ``jax.jit``.

Several devices: XLA cannot partition a ``pallas_call``, so with ``Ops(mesh=mesh)`` (what
``fastjax.sharding.partitionable_ops`` returns for the trainer's mesh) every kernel runs per shard
under ``shard_map``. Axis 0 of every activation (the rows ``[B, ...]``, or the tokens of
cross-entropy's flat ``[N, D]``) is split over ALL axes of the mesh, the way the trainer splits its
batches; weights (norm scales, RoPE tables, the LM head) enter whole, so XLA all-gathers an
FSDP-sharded head at the boundary, and shard_map's transpose sums a whole weight's per-shard
gradients over the mesh. Per-token ops and attention (per row: q, k, v and segment ids share the
batch split, heads stay whole) need nothing more; cross-entropy returns each shard's loss sum, and
the mean divides the sum of those (an XLA all-reduce) by the global label count. The references
(``"xla"``) and cuDNN attention stay outside: XLA partitions them itself; so do inputs whose axis 0
does not divide over the mesh, which run the op's XLA path (with a warning). The NF4 linear is not
wrapped (its kernel would need the FSDP-sharded codes whole on every device):
``partitionable_ops`` puts it on XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fastjax.pallas_kernels import _common

log = logging.getLogger("fastjax")

ENV_KERNELS = "FASTJAX_KERNELS"
_CHOICES = ("auto", "pallas", "xla")


def env_default() -> str:
    """``FASTJAX_KERNELS`` (validated), ``"auto"`` when unset: every op's default implementation."""
    value = os.environ.get(ENV_KERNELS, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{ENV_KERNELS}={value!r}: expected one of {_CHOICES}")
    return value


def _field():
    return dataclasses.field(default_factory=env_default)


@dataclasses.dataclass(frozen=True)
class Ops:
    """Implementation per op: ``"auto" | "pallas" | "xla"`` (attention also ``"cudnn"``; cross-entropy also
    ``"xla_chunked"`` and ``"xla_fused_grad"``, the memory-bounded XLA paths). ``interpret`` overrides
    the Pallas interpret switch.
    ``mesh``: the activations' rows are split over all of its axes; kernels then run per shard
    under ``shard_map`` (module docstring). None, or one device: kernels see whole arrays.
    ``max_segments``: a static bound on the packed segments per row, which lets ``auto`` attention
    take cuDNN's packed layout on a GPU (``pallas_kernels.attention.AUTO_TABLE``). The trainer sets
    it from its packed rows (``DataLoader.max_segments``); a row with more segments than the bound
    would lose the extra ones, so only set it from the data itself."""

    rms_norm: str = _field()
    rope: str = _field()
    glu: str = _field()
    attention: str = _field()
    linear: str = _field()
    cross_entropy: str = _field()
    interpret: bool | None = None
    mesh: Mesh | None = None
    max_segments: int | None = None

    @classmethod
    def all(cls, impl: str, interpret: bool | None = None) -> "Ops":
        """Every op on one implementation (``Ops.all("xla")`` is plain XLA)."""
        return cls(impl, impl, impl, impl, impl, impl, interpret)

    def resolve(self, op: str) -> str:
        impl = getattr(self, op)
        if impl == "auto" and op == "linear":
            # NF4 linears: XLA's dequantize-then-matmul beats the fused Pallas kernel on the H200 at every
            # Llama-3-8B shape with T >= 2048 (fused 0.41-0.81x of it, benchmarks/results/nf4_h200.md);
            # "xla" is nf4_lora_xla (x.dtype results, backward re-dequantizes), not the fp32 reference.
            return "xla"
        if impl == "auto" and op == "glu" and _common.on_gpu():
            # The same recompute-in-backward math in jnp, which XLA may fuse with its neighbours (a
            # pallas_call is a fusion boundary); why it wins is not profiled. H200, Llama-3-8B 4x2048 LoRA, full remat,
            # one invocation: 11,950 tokens/s vs 11,676 with the Pallas kernel at the same 19.95 GiB peak
            # (benchmarks/results/train_step_h200.md, session 16); alone as fwd and bwd programs they tie
            # (0.784 + 0.554 vs 0.777 + 0.554 ms, kernels_h200.md run 4). Session 17, offload_layer_input,
            # one invocation: LoRA 11,280 vs 11,043 at the same 17.92 GiB; QLoRA 11,230 vs 10,991, but
            # at 8.27 GiB vs 8.06, so a memory-first QLoRA run forces glu="pallas".
            return "xla_recompute"
        if impl == "auto" and op != "attention":
            return "pallas" if _common.on_gpu() else "xla"
        return impl


# --------------------------------------------------------------------------------------------------
# Per-shard execution under a mesh
# --------------------------------------------------------------------------------------------------


def _shard_map(fn: Callable, mesh: Mesh, in_specs: tuple, out_specs: Any) -> Callable:
    """``shard_map`` across jax versions: ``jax.shard_map`` (0.10 and 0.11 both have it), else the
    older ``jax.experimental.shard_map``.

    ``check_vma=False``: a ``pallas_call``'s ``out_shape`` carries no varying-manual-axes type, and
    the check demands one (jax 0.10: "manual_axis_type on jax.ShapeDtypeStruct must not be None").
    Without the check, shard_map's transpose sums the cotangent of each replicated input over the
    mesh (the gradient of a weight every shard used) and passes split outputs' cotangents through
    unscaled; no output here is replicated, so that is the whole gradient.
    """
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _sharded_mesh(ops: Ops) -> Mesh | None:
    return ops.mesh if ops.mesh is not None and ops.mesh.size > 1 else None


_PARTITIONED_BY_XLA = ("xla", "xla_recompute", "cudnn")  # jnp paths and the cuDNN custom call


def _placement(
    op: str, ops: Ops, impl: str, rows: Sequence[jax.Array], fallback: str = "xla"
) -> tuple[Mesh | None, str]:
    """``(mesh to split rows over or None, implementation to run)``. None: no mesh (or one device),
    an implementation XLA partitions itself, or rows whose axis 0 does not divide over the mesh (the
    decoder's token-sliced MLP hands the GLU ``[1, c, F]`` slices); these run ``fallback``, an XLA
    path that XLA partitions, instead of a kernel XLA cannot partition."""
    mesh = _sharded_mesh(ops)
    if mesh is None or impl in _PARTITIONED_BY_XLA:
        return None, impl
    bad = [x.shape for x in rows if x.ndim == 0 or x.shape[0] % mesh.size]
    if bad:
        log.warning(
            "%s: inputs of shape %s do not split on axis 0 over the %d devices of "
            "Ops.mesh; running %r instead of the kernel",
            op,
            bad[0],
            mesh.size,
            fallback,
        )
        return None, fallback
    return mesh, impl


def _per_shard(
    op: str,
    ops: Ops,
    impl: str,
    run: Callable[[str], Callable],
    rows: Sequence[jax.Array],
    whole: Sequence[Any] = (),
) -> Any:
    """``run(impl)(*rows, *whole)``; under ``ops.mesh`` once per shard: each of ``rows`` split on
    axis 0 over every mesh axis, ``whole`` replicated, every output (a pytree) split on axis 0
    likewise (``_placement`` says when not)."""
    mesh, impl = _placement(op, ops, impl, rows)
    with jax.named_scope(op):  # profiles (benchmarks/profile_step.py) attribute kernels by scope
        if mesh is None:
            return run(impl)(*rows, *whole)
        split = P(tuple(mesh.axis_names))
        in_specs = (split,) * len(rows) + (P(),) * len(whole)
        return _shard_map(run(impl), mesh, in_specs, split)(*rows, *whole)


# --------------------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, w: jax.Array, *, eps: float, offset: float = 0.0, ops: Ops) -> jax.Array:
    from fastjax.pallas_kernels import rms_norm as k

    def run(impl):
        return functools.partial(
            k.rms_norm, eps=eps, offset=offset, impl=impl, interpret=ops.interpret
        )

    return _per_shard("rms_norm", ops, ops.resolve("rms_norm"), run, (x,), (w,))


def rms_norm_residual(
    x: jax.Array, residual: jax.Array, w: jax.Array, *, eps: float, offset: float = 0.0, ops: Ops
) -> tuple[jax.Array, jax.Array]:
    """Fused ``s = x + residual`` then ``rms_norm(s)``: returns ``(s, normed)``, both ``x.dtype``.

    The sum is rounded to ``x.dtype`` before the norm, exactly as ``rms_norm(x + residual)``; one
    kernel reads both inputs once and writes both outputs (the ``rms_norm`` field picks the
    implementation).
    """
    from fastjax.pallas_kernels import rms_norm as k

    def run(impl):
        return functools.partial(
            k.rms_norm_residual, eps=eps, offset=offset, impl=impl, interpret=ops.interpret
        )

    return _per_shard("rms_norm_residual", ops, ops.resolve("rms_norm"), run, (x, residual), (w,))


def rope(
    q: jax.Array,
    k: jax.Array,
    positions: jax.Array,
    inv_freq: jax.Array,
    *,
    attention_scaling: float = 1.0,
    ops: Ops,
) -> tuple[jax.Array, jax.Array]:
    from fastjax.pallas_kernels import rope as kr

    def run(impl):
        return functools.partial(
            kr.rope, attention_scaling=attention_scaling, impl=impl, interpret=ops.interpret
        )

    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    return _per_shard("rope", ops, ops.resolve("rope"), run, (q, k, positions), (inv_freq,))


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None):
    from fastjax.pallas_kernels import rope as kr

    return kr.rope_inv_freq(head_dim, theta, rope_scaling)


def glu(gate: jax.Array, up: jax.Array, *, activation: str, ops: Ops) -> jax.Array:
    from fastjax.pallas_kernels import swiglu as k

    def run(impl):
        return functools.partial(k.glu, activation=activation, impl=impl, interpret=ops.interpret)

    return _per_shard("glu", ops, ops.resolve("glu"), run, (gate, up))


def attention(
    q, k, v, *, segment_ids=None, causal=True, window=None, softcap=None, sm_scale=None, ops: Ops
) -> jax.Array:
    from fastjax.pallas_kernels import attention as ka

    impl = ops.resolve("attention")
    if impl == "auto" and _sharded_mesh(ops) is not None:
        # Decided on the whole arrays: the choice depends on dtype, head_dim, softcap and whether
        # segment ids exist, none of which a batch split changes.
        impl = ka.choose_impl(q, segment_ids, softcap, ops.max_segments)

    def run(impl):
        def attend(q, k, v, *seg):
            return ka.attention(
                q,
                k,
                v,
                segment_ids=seg[0] if seg else None,
                causal=causal,
                window=window,
                softcap=softcap,
                sm_scale=sm_scale,
                impl=impl,
                interpret=ops.interpret,
                max_segments=ops.max_segments,
            )

        return attend

    rows = (q, k, v) if segment_ids is None else (q, k, v, segment_ids)
    return _per_shard("attention", ops, impl, run, rows)


def _scoped(name: str) -> Callable:
    """Run the decorated op under ``jax.named_scope(name)``: its HLO ops carry the name in their
    metadata, which is how ``benchmarks/profile_step.py`` attributes GPU kernels to model ops."""

    def wrap(fn):
        @functools.wraps(fn)
        def scoped(*args, **kwargs):
            with jax.named_scope(name):
                return fn(*args, **kwargs)

        return scoped

    return wrap


@_scoped("cross_entropy")
def cross_entropy(
    hidden,
    head,
    labels,
    *,
    weights=None,
    softcap=None,
    z_loss=0.0,
    reduction="mean",
    head_trainable: bool = True,
    ops: Ops,
):
    """Cross-entropy of ``hidden @ head.T`` (``pallas_kernels/cross_entropy.py``);
    ``head_trainable=False`` skips the ``[V, D]`` head gradient (a frozen head under LoRA).

    Under ``ops.mesh`` the tokens (axis 0 of hidden/labels/weights) are split over the mesh and the
    head enters whole; each shard returns its loss sum (its per-token losses for
    ``reduction="none"``), the sums are added across shards, and ``"mean"`` divides by the global
    count of labels != -100. Tokens that do not split run ``"xla_chunked"`` (no ``[T, V]`` logits).
    """
    from fastjax.pallas_kernels import cross_entropy as k

    impl = ops.resolve("cross_entropy")
    if ops.cross_entropy == "auto" and impl == "pallas" and not head_trainable:
        # A frozen head (LoRA, QLoRA) on a GPU: the logits once, d_hidden in the forward. H200,
        # Llama-3-8B head, 8,192 tokens, bf16, fwd+bwd: 30.1 ms against 44.0 for xla_chunked (the
        # Pallas kernel ran out of shared memory at this shape in that benchmark); in the 8B 4x2048
        # step, one invocation: LoRA 12,176 against 11,863 tokens/s with the Pallas kernel, QLoRA
        # lean 11,566 against 11,255 at the same 7.33 GiB (benchmarks/results/train_step_h200.md,
        # session 22). A trained head keeps the Pallas kernel (not measured against the XLA paths).
        impl = "xla_fused_grad"
    rows = (hidden, labels) if weights is None else (hidden, labels, weights)
    kw = {
        "softcap": softcap,
        "z_loss": z_loss,
        "head_trainable": head_trainable,
        "interpret": ops.interpret,
    }
    mesh, impl = _placement("cross_entropy", ops, impl, rows, fallback="xla_chunked")
    if mesh is None:
        return k.cross_entropy(
            hidden, head, labels, weights=weights, reduction=reduction, impl=impl, **kw
        )
    if reduction not in k.REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {k.REDUCTIONS}")

    def run(hidden, labels, *rest):
        *w, head = rest
        out = k.cross_entropy(
            hidden,
            head,
            labels,
            weights=w[0] if w else None,
            reduction="none" if reduction == "none" else "sum",
            impl=impl,
            **kw,
        )
        return out if reduction == "none" else out[None]  # [1] per shard: they stack to [shards]

    split = P(tuple(mesh.axis_names))
    out = _shard_map(run, mesh, (split,) * len(rows) + (P(),), split)(*rows, head)
    if reduction == "none":
        return out
    total = jnp.sum(out)
    if reduction == "sum":
        return total
    count = jnp.sum(labels != -100)
    return total / jnp.maximum(count, 1).astype(jnp.float32)


def _is_quantized(w: Any) -> bool:
    return not isinstance(w, (jax.Array, jnp.ndarray)) and hasattr(w, "dequantize")


# Decode-sized NF4 linears on a GPU: the fused kernel's forward beats XLA's dequantize-then-
# matmul at T <= 16 on weights of >= 16M elements (H200, benchmarks/results/nf4_h200.md run 3:
# gate/up and down 1.32-1.40x, q/o 1.03-1.14x) and loses on k/v at T=16 (4M elements, 0.55x);
# its backward at these sizes is slower than XLA's (0.59-0.90x): "pallas_fwd" pairs the fused
# forward with the XLA backward.
FUSED_NF4_MAX_TOKENS = 16
FUSED_NF4_MIN_WEIGHT = 1 << 24


def nf4_linear_impl(ops: Ops, x: jax.Array, w: Any, lora_a: jax.Array | None = None) -> str:
    """The NF4 implementation ``linear`` runs for ``x``, the NF4 weight ``w`` and its adapter."""
    impl = ops.resolve("linear")
    if ops.linear != "auto" or not _common.on_gpu() or _sharded_mesh(ops) is not None:
        return impl  # under a mesh XLA partitions the linear (fastjax.sharding.partitionable_ops)
    from fastjax.pallas_kernels import nf4_lora as k

    tokens = math.prod(x.shape[:-1])
    out, n_in = w.shape[-2:]
    big = out * n_in >= FUSED_NF4_MIN_WEIGHT
    if tokens <= FUSED_NF4_MAX_TOKENS and big and k.supports_pallas(w, lora_a):
        return "pallas_fwd"
    return impl


def linear(
    x: jax.Array,
    w: Any,
    *,
    bias: jax.Array | None = None,
    lora: dict | None = None,
    lora_scale: float = 1.0,
    dropout_rng: jax.Array | None = None,
    lora_dropout: float = 0.0,
    ops: Ops,
) -> jax.Array:
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
            impl = nf4_linear_impl(ops, x, w)
            y = k.nf4_lora_linear(x, w, None, None, bias=bias, impl=impl, interpret=ops.interpret)
            return y + _lora_term(lora_x, lora, lora_scale)
        a = None if lora is None else lora["lora_A"]
        b = None if lora is None else lora["lora_B"]
        return k.nf4_lora_linear(
            x,
            w,
            a,
            b,
            lora_scale=lora_scale,
            bias=bias,
            impl=nf4_linear_impl(ops, x, w, a),
            interpret=ops.interpret,
        )
    # No preferred_element_type: the GPU dot accumulates in fp32 anyway, and an fp32 [T, out] result would
    # cost an extra write + convert pass per projection (bf16 in, bf16 out, as cuBLAS does natively).
    y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    if bias is not None:
        y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
    if lora is not None:
        y = y + _lora_term(lora_x, lora, lora_scale)
    return y


@_scoped("lora")
def _lora_term(x: jax.Array, lora: dict, scale: float) -> jax.Array:
    a = lora["lora_A"].astype(x.dtype)
    b = lora["lora_B"].astype(x.dtype)
    h = jnp.einsum("...i,ri->...r", x, a)
    return (scale * jnp.einsum("...r,or->...o", h, b)).astype(x.dtype)
