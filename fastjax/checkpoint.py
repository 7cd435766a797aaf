"""Training checkpoints with orbax: trainable tree, optimizer state, step, RNG and data position.

Layout: ``<output_dir>/checkpoints/<step>/`` with two orbax items:

    state   pytree ``{"trainable": adapters or params, "opt_state": ..., "rng": uint32 key data}``
    meta    JSON ``{"step": int, "data": DataLoader.state(), "seed": int, "fingerprint": {...}}``

Orbax writes every step into a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoint as the latest one. Saving is synchronous: LoRA adapters and
their optimizer state are small, and the train step donates these buffers right after the save.

Multi-device: orbax writes each array as its shards (a full fine-tune's FSDP-sharded params and
Adam moments are never gathered on one device) and ``restore`` reads them into the shardings of
``like``, whatever mesh wrote them: a checkpoint from 8 devices resumes on 1
(``tests/fastjax/test_sharding.py``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

log = logging.getLogger("fastjax")


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


class Checkpointer:
    """A thin wrapper over ``orbax.checkpoint.CheckpointManager`` for the trainer's state."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 2):
        ocp = _ocp()
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        ocp = _ocp()
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        log.info("saved checkpoint %s", self.directory / str(step))

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restore ``step`` into a tree shaped like ``like`` (arrays or ShapeDtypeStructs)."""
        ocp = _ocp()
        abstract = jax.tree.map(_abstract, like)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        )
        out = self._manager.restore(step, args=args)
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        self._manager.close()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, (jax.Array, np.ndarray)):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return x
