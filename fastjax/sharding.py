"""Multi-device training on ``jax.sharding``: a (data, fsdp) mesh and the rules that place every array.

Rules (one place, stated once):
- **Batch**: the batch axis is split over both mesh axes, ``P(("data", "fsdp"))`` — FSDP is data parallel too.
- **Frozen base weights** (bf16 arrays or the arrays inside an NF4Tensor): FSDP-sharded over ``"fsdp"`` along
  their largest axis that the fsdp size divides, never the stacked-layer axis 0 (``lax.scan`` slices it);
  replicated over ``"data"``. Leaves too small to matter (< ``min_shard_elements``) stay replicated.
- **Trainable tensors**: LoRA adapters are replicated (they are ~0.5% of the model, and replicated adapters
  keep the update a local op after the gradient all-reduce). In full fine-tuning the trainable params are the
  base weights and follow the frozen rule. **Optimizer state** follows the tree it updates (adam moments have
  the same shapes: ``optimizer_sharding`` maps each state leaf to its parameter's sharding by shape).

XLA's SPMD partitioner inserts the all-gathers (weights, per layer inside the scan) and the reduce-scatters /
all-reduces (gradients). Pallas kernels are not auto-partitioned by XLA: under a mesh of more than one device
the trainer runs every op on its XLA reference (cuDNN attention stays available through ``impl="cudnn"``,
which XLA partitions), until the kernels are wrapped in ``shard_map``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)


def make_mesh(num_devices: int | None = None, *, data: int | None = None, fsdp: int | None = None,
              devices=None) -> Mesh:
    """A ``(data, fsdp)`` mesh over the first ``num_devices`` devices (all by default).

    By default every device goes on the fsdp axis (data=1): for a frozen base that is both the most memory
    efficient and, with the base all-gathered per layer, as fast as pure data parallelism on one host.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = num_devices or len(devices)
    if n > len(devices):
        raise ValueError(f"make_mesh: {num_devices=} but only {len(devices)} devices are visible")
    if data is None and fsdp is None:
        data, fsdp = 1, n
    elif data is None:
        data = n // fsdp
    elif fsdp is None:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"make_mesh: data={data} x fsdp={fsdp} != {n} devices")
    return Mesh(np.asarray(devices[:n]).reshape(data, fsdp), (DATA, FSDP))


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_elements: int, stacked: bool) -> P:
    if fsdp_size == 1 or int(np.prod(shape)) < min_elements:
        return P()
    first = 1 if stacked and len(shape) > 1 else 0
    candidates = [a for a in range(first, len(shape)) if shape[a] % fsdp_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda a: shape[a])
    spec = [None] * len(shape)
    spec[axis] = FSDP
    return P(*spec)


def param_shardings(tree: Any, mesh: Mesh, *, min_shard_elements: int = 2**14) -> Any:
    """NamedShardings for a frozen/full-fine-tune param tree (NF4Tensor leaves included) by the FSDP rule."""
    fsdp_size = mesh.shape[FSDP]

    def leaf_sharding(path, leaf):
        stacked = any(getattr(k, "key", None) == "layers" for k in path)
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, _fsdp_spec(shape, fsdp_size, min_shard_elements, stacked))

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def batch_sharding(mesh: Mesh, *, axis: int = 0, ndim: int = 2) -> NamedSharding:
    """Split array axis ``axis`` (the batch axis) over both mesh axes."""
    spec = [None] * ndim
    spec[axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, *, axis: int = 0) -> dict:
    """Place a host batch on the mesh, split on the batch axis (``axis=1`` for the trainer's ``[A, B, T]``
    micro-batch stacks)."""
    n = mesh.shape[DATA] * mesh.shape[FSDP]
    out = {}
    for k, v in batch.items():
        if v.shape[axis] % n:
            raise ValueError(f"batch[{k!r}] has batch size {v.shape[axis]}, not divisible by the {n} devices "
                             f"of the mesh")
        out[k] = jax.device_put(v, batch_sharding(mesh, axis=axis, ndim=v.ndim))
    return out


def shard_params(params: Any, mesh: Mesh, *, min_shard_elements: int = 2**14) -> Any:
    return jax.device_put(params, param_shardings(params, mesh, min_shard_elements=min_shard_elements))


def optimizer_sharding(opt_state: Any, trainable: Any, trainable_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state: a leaf shaped like a trainable leaf takes that leaf's sharding (adam
    moments), anything else (step counts, scalars, 8-bit scales) is replicated."""
    by_shape: dict[tuple, Any] = {}
    for leaf, sh in zip(jax.tree.leaves(trainable), jax.tree.leaves(trainable_shardings)):
        by_shape.setdefault(tuple(leaf.shape), sh)
    return jax.tree.map(lambda x: by_shape.get(tuple(getattr(x, "shape", ())), NamedSharding(mesh, P())),
                        opt_state)
