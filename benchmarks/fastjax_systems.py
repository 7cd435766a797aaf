"""One fastjax benchmark configuration, built on the device: random weights, adapters, AdamW, the jitted
step and its batch.

``build_fastjax`` is what ``train_step.py`` times and ``profile_step.py`` traces, so both measure the
same program. Systems (``train_step.py``'s docstring): ``fastjax-lora``, ``fastjax-qlora``, the lean
variants, ``fastjax-packed`` (rows of 4-8 packed segments with their bound), ``plain-xla``,
``xla-cudnn`` and ``ablate-OP=IMPL``.
"""

from __future__ import annotations

import dataclasses

from benchmarks import harness
from benchmarks.shapes import ModelShape, get


def split_system(system: str) -> tuple[str, dict]:
    """``"fastjax-qlora@glu=pallas,rope=xla"`` -> ``("fastjax-qlora", {"glu": "pallas", "rope": "xla"})``:
    any fastjax system with some ops forced (``ablate-OP=IMPL`` is ``fastjax-lora@OP=IMPL``)."""
    name, _, forced = system.partition("@")
    pairs = [piece.split("=") for piece in forced.split(",") if piece]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"system {system!r}: write forced ops as NAME@OP=IMPL[,OP=IMPL]")
    return name, dict(pairs)


def _ops_for(system: str):
    from fastjax.models.ops import Ops

    system, forced = split_system(system)
    if forced:
        return dataclasses.replace(_ops_for(system), **forced)
    if system == "plain-xla":
        return Ops.all("xla")
    if system == "xla-cudnn":
        return dataclasses.replace(Ops.all("xla"), attention="cudnn")
    if system.startswith("ablate-"):
        op, impl = system[len("ablate-") :].split("=")
        return dataclasses.replace(Ops(), **{op: impl})
    return Ops()


@dataclasses.dataclass
class FastjaxStep:
    """A built fastjax configuration: ``step(lora, opt_state, params, micro, i, key)`` and its state.

    ``base``: the row fields that name the configuration; ``lengths``: packed sequence lengths (or
    None) for the FLOP count."""

    step: object
    lora: object
    opt_state: object
    params: object
    micro: dict
    key: object
    base: dict
    lengths: list | None
    ops: object
    host_table: object = None  # the embedding in host memory (embed_on_host), else None
    host_ids: object = None

    def run(self, i: int):
        """One step (index ``i``); updates the state in place and returns its metrics. With the
        embedding on the host, the step's rows are gathered and sent here, as the trainer does."""
        import jax
        import jax.numpy as jnp

        from fastjax import host_embed

        micro = self.micro
        if self.host_table is not None:
            rows = host_embed.gather(self.host_table, self.host_ids)
            sharding = micro["inputs_embeds"].sharding
            micro = dict(micro, inputs_embeds=jax.device_put(rows, sharding))
        self.lora, self.opt_state, metrics = self.step(
            self.lora, self.opt_state, self.params, micro, jnp.int32(i), self.key
        )
        return metrics


def config_row(
    system: str,
    shape: ModelShape,
    batch: int,
    seq: int,
    *,
    remat: str,
    micro_rows: int | None,
    mlp_chunk_size: int | None,
    scan_layers: bool = True,
    embed_on_host: bool = False,
) -> dict:
    """The fields that name one fastjax configuration (every row of it carries them)."""
    rows = micro_rows or batch
    if batch % rows:
        raise ValueError(f"{batch=} is not a multiple of {micro_rows=}")
    return dict(
        system=system,
        shape=shape.name,
        batch=batch,
        seq=seq,
        remat=remat,
        micro_batches=batch // rows,
        mlp_chunk_size=mlp_chunk_size,
        scan_layers=scan_layers,
        base_weights="nf4" if system.startswith("fastjax-qlora") else "bfloat16",
        **({"embed_on_host": True} if embed_on_host else {}),
    )


def build_fastjax(
    system: str,
    shape: str | ModelShape,
    batch: int,
    seq: int,
    *,
    remat: str = "full",
    micro_rows: int | None = None,
    mlp_chunk_size: int | None = None,
    scan_layers: bool = True,
    embed_on_host: bool = False,
    abstract: bool = False,
    ops=None,
    num_devices: int = 1,
    mesh_data: int = 1,
    compiler_options: bool = True,
) -> FastjaxStep:
    """Random weights on the device, LoRA r=16 alpha=16 on all linears, AdamW, the jitted step and
    its batch (``harness.token_batch``, seed 0) for one configuration (``run_fastjax``'s
    docstring). Shared by ``run_fastjax``, ``profile_step.py`` and ``memory_proxy.py``.

    ``abstract``: weights, adapters, optimizer state and batch as ``jax.ShapeDtypeStruct`` (nothing
    allocated: enough to lower and compile). ``ops`` overrides the system's ``models.ops.Ops``.
    ``num_devices > 1``: the trainer's multi-device layout (``fastjax.sharding``: a ``(data, fsdp)``
    mesh with every device on fsdp, frozen weights FSDP-sharded, adapters and optimizer state
    replicated, rows split over the mesh, kernels per shard); ``batch`` is the global batch.
    ``mesh_data``: devices on the mesh's data axis (1: all on fsdp, the trainer's default;
    ``num_devices``: plain data parallel, every device holding the whole frozen model).
    ``compiler_options``: compile the step with ``fastjax.remat.compiler_options(remat)``, as the
    trainer does (``False``: XLA's defaults)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from fastjax.models import registry

    from benchmarks import common
    from fastjax import host_embed
    from fastjax import lora as lora_mod
    from fastjax import remat as remat_lib
    from fastjax import sharding
    from fastjax.trainer import make_loss_fn, make_train_step

    shape = shape if isinstance(shape, ModelShape) else get(shape)
    base = config_row(
        system,
        shape,
        batch,
        seq,
        remat=remat,
        micro_rows=micro_rows,
        mlp_chunk_size=mlp_chunk_size,
        scan_layers=scan_layers,
        embed_on_host=embed_on_host,
    )
    rows = batch // base["micro_batches"]
    cfg = registry.config_from_hf(shape.hf_config())
    ops = _ops_for(system) if ops is None else ops
    ids = harness.token_batch(cfg.vocab_size, batch, seq)
    labels = np.concatenate([ids[:, 1:], np.full((batch, 1), -100, np.int32)], axis=1)
    if split_system(system)[0] == "fastjax-packed":
        seg, pos = harness.packed_segments(batch, seq)
        labels = np.where(np.roll(seg, -1, axis=1) == seg, labels, -100)
        lengths = [int(n) for row in seg for n in np.unique(row, return_counts=True)[1]]
        # the bound the trainer takes from its loader: packed rows then use cuDNN's packed layout
        ops = dataclasses.replace(
            ops, max_segments=max(len(set(row) - {0}) for row in seg.tolist())
        )
    else:
        seg, lengths = None, None
        pos = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    arrays = dict(input_ids=ids, labels=labels, positions=pos)
    if seg is not None:  # one sequence per row passes no segment ids (the cuDNN attention path)
        arrays["segment_ids"] = seg
    micro = {
        k: jnp.asarray(v.reshape(batch // rows, rows, seq)) for k, v in arrays.items()
    }  # [A, B, T]
    mesh = None
    if num_devices > 1:  # kernels per shard under the mesh, as the trainer runs them
        if abstract:
            raise ValueError("num_devices > 1 needs real arrays (abstract=False)")
        if rows % num_devices:
            raise ValueError(f"{rows} rows per micro-batch do not split over {num_devices} devices")
        mesh = sharding.make_mesh(num_devices, data=mesh_data)
        ops = sharding.partitionable_ops(ops, mesh)
    quantize = base["base_weights"] == "nf4"
    make_params = lambda: common.random_params(cfg, jax.random.key(0), quantize=quantize)
    peft = lambda p: lora_mod.get_peft_model(
        p, cfg, r=16, lora_alpha=16, target_modules="all-linear"
    )
    if abstract:
        params = jax.eval_shape(make_params)
        config_out = {}  # the LoRA config is static: keep it from the one traced call

        def adapters(p):
            tree, config_out["lcfg"] = peft(p)
            return tree

        lora = jax.eval_shape(adapters, params)
        lcfg = config_out["lcfg"]
        micro = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in micro.items()}
    else:
        params = make_params()
        lora, lcfg = peft(params)
    table = None
    if embed_on_host:  # the step takes the batch's rows; run() gathers them on the host each step
        if abstract:
            embed = params["model"]["embed_tokens"]["weight"]
            shape_e = (*micro["input_ids"].shape, cfg.hidden_size)
            micro["inputs_embeds"] = jax.ShapeDtypeStruct(shape_e, embed.dtype)
        else:
            params = host_embed.embed_to_host(params, cfg)
            table = host_embed.host_table(params)
            micro["inputs_embeds"] = jnp.asarray(
                host_embed.gather(table, np.asarray(micro["input_ids"]))
            )
        params = host_embed.without_table(params)
    loss_sum = make_loss_fn(
        cfg,
        full_finetune=False,
        lora_scale=lora_mod.lora_scale(lcfg),
        lora_dropout=0.0,
        remat_policy=remat,
        ops=ops,
        mlp_chunk_size=mlp_chunk_size,
        scan_layers=scan_layers,
    )
    schedule = optax.constant_schedule(2e-4)
    opt = optax.adamw(schedule, weight_decay=0.0)
    shardings = None
    if mesh is not None:
        shardings = sharding.step_shardings(
            mesh, lora, params, jax.eval_shape(opt.init, lora), full_finetune=False
        )
        params = jax.device_put(params, shardings.frozen)
        lora = jax.device_put(jax.tree.map(jnp.copy, lora), shardings.trainable)
        micro = jax.device_put(micro, shardings.batch)
        opt_state = jax.jit(opt.init, out_shardings=shardings.opt_state)(lora)
    elif abstract:
        opt_state = jax.eval_shape(opt.init, lora)
    else:
        opt_state = opt.init(lora)
    options = remat_lib.compiler_options(remat) if compiler_options else None  # as the trainer
    if options:
        base["compiler_options"] = options
    step = make_train_step(loss_sum, opt, schedule, shardings=shardings, compiler_options=options)
    host_ids = None if table is None else np.asarray(micro["input_ids"])
    return FastjaxStep(
        step, lora, opt_state, params, micro, jax.random.key(0), base, lengths, ops, table, host_ids
    )
