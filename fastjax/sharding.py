"""Multi-device training on ``jax.sharding``: a (data, fsdp) mesh and the rules placing every array.

``SFTTrainer(..., mesh=mesh)`` or ``SFTConfig(num_devices=8)`` (optionally ``mesh_data=2,
mesh_fsdp=4``) is all a user changes; the trainer calls ``resolve_mesh`` and ``step_shardings`` and
jits its step with the resulting in/out shardings. XLA's SPMD partitioner inserts the all-gathers
(FSDP weights, per layer inside the ``lax.scan``) and the reduce-scatters / all-reduces (gradients,
loss sums).

Rules (one place, stated once):
- **Mesh**: axes ``(data, fsdp)``. Default split: every device on ``fsdp`` (``data=1``): for a
  frozen base that is the most memory-efficient layout, and on one host the per-layer all-gather is
  cheap next to the matmuls.
- **Batch**: the batch (row) axis is split over BOTH mesh axes, ``P(("data", "fsdp"))``: FSDP is
  data parallel too, so every device works on different rows. ``batch_size`` (rows per micro-batch)
  is the GLOBAL micro-batch and must be divisible by the device count; the loss is a sum over the
  global batch divided by the global label count, so 1 and N devices compute the same loss and the
  same update.
- **Frozen base weights** (bf16/fp32 arrays, and each array inside an ``NF4Tensor``): FSDP-sharded
  over ``"fsdp"`` along their largest axis that the fsdp size divides, never the stacked-layer axis
  0 of ``params["model"]["layers"]`` (``lax.scan`` slices it); replicated over ``"data"``. Leaves
  with fewer than ``min_shard_elements`` elements, or with no divisible axis, stay replicated.
- **Trainable tensors**: LoRA adapters are replicated (about 0.5% of the model; replicated adapters
  keep the optimizer update a local op after the gradient all-reduce). In full fine-tuning the
  trainable params are the base weights and follow the frozen rule.
- **Optimizer state** follows its trainable tree's rule applied leaf by leaf
  (``optimizer_sharding``): with replicated adapters everything is replicated; in full fine-tuning
  each state leaf gets the FSDP rule by its own shape and path, so Adam moments (same shape, same
  path under ``mu``/``nu``) land exactly like their parameter, and counts / scales stay replicated.
- **Kernels**: XLA does not partition a ``pallas_call``, so under a mesh of more than one device
  ``partitionable_ops`` hands the mesh to ``Ops`` and every Pallas kernel (RMSNorm, fused
  residual + RMSNorm, RoPE, GLU, flash attention with segment ids, blockwise cross-entropy, also
  ``"xla_chunked"`` cross-entropy) runs per shard under ``shard_map`` over the batch axes: rows
  split over ``("data", "fsdp")`` exactly as above, weights whole (the LM head is all-gathered at
  the cross-entropy, and its gradient summed over the mesh when it is trained); cross-entropy sums
  its per-shard loss sums before dividing by the global label count (``fastjax.models.ops``). The
  one op left to XLA is the NF4 linear (``linear="pallas"`` becomes ``"xla"``): its Pallas kernel
  would need the FSDP-sharded codes whole on every device, while XLA's dequantize-then-matmul
  partitions like any matmul (and is the faster one on the H200, ``Ops.resolve``).

Checkpoints: orbax writes each array's shards (``fastjax.checkpoint``) and restores into whatever
shardings the restoring run asks for, so a run saved on 8 devices resumes on 1 (or 2, or 4) with
``resume=True``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("fastjax")

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
MIN_SHARD_ELEMENTS = 2**14


def make_mesh(
    num_devices: int | None = None,
    *,
    data: int | None = None,
    fsdp: int | None = None,
    devices=None,
) -> Mesh:
    """A ``(data, fsdp)`` mesh over the first ``num_devices`` devices (default: ``data * fsdp`` if
    both are given, else all). Every device goes on fsdp unless ``data``/``fsdp`` say otherwise;
    giving one of them derives the other."""
    devices = list(devices if devices is not None else jax.devices())
    n = num_devices or (data * fsdp if data and fsdp else len(devices))
    if n > len(devices):
        raise ValueError(f"make_mesh: {num_devices=} but only {len(devices)} devices are visible")
    if data is None and fsdp is None:
        data, fsdp = 1, n
    elif data is None:
        data = n // fsdp
    elif fsdp is None:
        fsdp = n // data
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(f"make_mesh: data={data} x fsdp={fsdp} != {n} devices")
    return Mesh(np.asarray(devices[:n]).reshape(data, fsdp), (DATA, FSDP))


def resolve_mesh(
    mesh: Mesh | None = None,
    num_devices: int | None = None,
    *,
    data: int | None = None,
    fsdp: int | None = None,
) -> Mesh | None:
    """The trainer's mesh: ``mesh`` as given, else one built from ``num_devices`` / ``data`` /
    ``fsdp``, else None (no mesh: the single-device path, nothing is placed)."""
    if mesh is not None:
        if tuple(mesh.axis_names) != BATCH_AXES:
            raise ValueError(
                f"mesh axes {mesh.axis_names} must be {BATCH_AXES} (make it with "
                "fastjax.sharding.make_mesh)"
            )
        given = {
            "num_devices": (num_devices, mesh.size),
            "mesh_data": (data, mesh.shape[DATA]),
            "mesh_fsdp": (fsdp, mesh.shape[FSDP]),
        }
        for name, (want, got) in given.items():
            if want is not None and want != got:
                raise ValueError(
                    f"{name}={want} disagrees with the mesh given ({dict(mesh.shape)})"
                )
        return mesh
    if num_devices is None and data is None and fsdp is None:
        return None
    return make_mesh(num_devices, data=data, fsdp=fsdp)


def num_batch_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA] * mesh.shape[FSDP]


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_elements: int, stacked: bool) -> P:
    if fsdp_size == 1 or int(np.prod(shape)) < min_elements:
        return P()
    first = 1 if stacked else 0
    candidates = [a for a in range(first, len(shape)) if shape[a] % fsdp_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda a: shape[a])
    spec = [None] * len(shape)
    spec[axis] = FSDP
    return P(*spec)


def _is_stacked(path) -> bool:
    return any(getattr(k, "key", None) == "layers" for k in path)


def param_shardings(tree: Any, mesh: Mesh, *, min_shard_elements: int = MIN_SHARD_ELEMENTS) -> Any:
    """NamedShardings for a frozen / full-fine-tune param tree (NF4Tensor leaves included) by the
    FSDP rule. Works on arrays and ``jax.ShapeDtypeStruct`` leaves alike."""
    fsdp_size = mesh.shape[FSDP]

    def leaf_sharding(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        spec = _fsdp_spec(shape, fsdp_size, min_shard_elements, _is_stacked(path))
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def batch_sharding(mesh: Mesh, *, axis: int = 0, ndim: int = 2) -> NamedSharding:
    """Split array axis ``axis`` (the batch axis) over both mesh axes."""
    spec = [None] * ndim
    spec[axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, *, axis: int = 0) -> dict:
    """Place a host batch on the mesh, split on the batch axis (``axis=1`` for the trainer's
    ``[A, B, T]`` micro-batch stacks)."""
    n = num_batch_shards(mesh)
    out = {}
    for k, v in batch.items():
        if v.shape[axis] % n:
            raise ValueError(
                f"batch[{k!r}] has batch size {v.shape[axis]}, not divisible by "
                f"the {n} devices of the mesh"
            )
        out[k] = jax.device_put(v, batch_sharding(mesh, axis=axis, ndim=v.ndim))
    return out


def shard_params(params: Any, mesh: Mesh, *, min_shard_elements: int = MIN_SHARD_ELEMENTS) -> Any:
    """``params`` placed by the FSDP rule (a no-op for leaves already placed that way)."""
    shardings = param_shardings(params, mesh, min_shard_elements=min_shard_elements)
    return jax.device_put(params, shardings)


def optimizer_sharding(
    opt_state: Any, mesh: Mesh, *, fsdp: bool, min_shard_elements: int = MIN_SHARD_ELEMENTS
) -> Any:
    """Shardings for an optax state (arrays or ``jax.eval_shape`` output): the trainable tree's rule
    applied leaf by leaf. ``fsdp=False`` (replicated adapters): all replicated. ``fsdp=True`` (full
    fine-tuning): the FSDP rule by each leaf's shape and path, which puts Adam moments exactly where
    their parameter is."""
    if not fsdp:
        return replicated(opt_state, mesh)
    return param_shardings(opt_state, mesh, min_shard_elements=min_shard_elements)


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where every argument of the trainer's step lives: pytrees of NamedShardings (``frozen`` is
    None when nothing is frozen); ``batch`` splits the row axis of ``[A, B, T]``; ``scalar`` is
    replicated (step index, RNG key, metrics)."""

    mesh: Mesh
    trainable: Any
    opt_state: Any
    frozen: Any
    batch: NamedSharding
    scalar: NamedSharding


def step_shardings(
    mesh: Mesh,
    trainable: Any,
    frozen: Any,
    opt_state: Any,
    *,
    full_finetune: bool,
    min_shard_elements: int = MIN_SHARD_ELEMENTS,
) -> StepShardings:
    """The rules above for one train step; ``opt_state`` may be abstract (``jax.eval_shape``)."""
    kw = {"min_shard_elements": min_shard_elements}
    trainable_sh = (
        param_shardings(trainable, mesh, **kw) if full_finetune else replicated(trainable, mesh)
    )
    return StepShardings(
        mesh=mesh,
        trainable=trainable_sh,
        opt_state=optimizer_sharding(opt_state, mesh, fsdp=full_finetune, **kw),
        frozen=None if frozen is None else param_shardings(frozen, mesh, **kw),
        batch=batch_sharding(mesh, axis=1, ndim=3),
        scalar=NamedSharding(mesh, P()),
    )


def partitionable_ops(ops: Any, mesh: Mesh | None) -> Any:
    """``ops`` for a step partitioned over ``mesh``: the mesh handed to ``ops`` (its kernels then run
    per shard under ``shard_map``) and the NF4 Pallas linear moved to XLA (module docstring).
    ``ops`` unchanged without a mesh or on one device."""
    if mesh is None or mesh.size == 1:
        return ops
    changes: dict[str, Any] = {"mesh": mesh}
    if ops.resolve("linear") == "pallas":
        changes["linear"] = "xla"
        log.info(
            "mesh of %d devices: the NF4 linear runs on XLA (its Pallas kernel is not "
            "shard_mapped: it would need the FSDP-sharded weights whole)",
            mesh.size,
        )
    return dataclasses.replace(ops, **changes)
