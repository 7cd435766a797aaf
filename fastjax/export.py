"""Export a fine-tuned model: merged 16-bit HF checkpoint, PEFT adapter, or GGUF.

Merged checkpoint (``save_pretrained_merged``): every adapted linear becomes
``W' = cast(W_f32 + s * B_f32 @ A_f32)``, ``s = lora_scale`` (alpha / r, or alpha / sqrt(r) with
rsLoRA). After a QLoRA run ``W_f32`` is the dequantized NF4 weight, so the merged model computes
what the adapter model computed up to one rounding to the output dtype. Tensors are produced lazily,
one at a time, as ``loading.write_safetensors`` asks for them: beyond the params, the device holds
about one tensor (the host keeps converted copies until ``write_safetensors`` writes the shards).

PEFT adapter (``save_adapter`` / ``load_adapter``): the stacked adapter tree
``lora["model"]["layers"]["self_attn"]["q_proj"] = {"lora_A": [L, r, in], "lora_B": [L, out, r]}``
is written per layer under PEFT's names
(``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ``[r, in]``, ``lora_B``
``[out, r]``) with an ``adapter_config.json`` that ``peft.PeftModel.from_pretrained`` reads.
``load_adapter`` reads such a directory, including one written by peft itself. PEFT features that
do not fit one stacked tree with one rank and one scale (DoRA, ``modules_to_save``,
``rank_pattern``, LoRA biases, embedding LoRA, ...) are rejected with an error naming the field;
layer subsets (``layers_to_transform``, ``exclude_modules``) load as zeros in the other layers.

Everything written goes through ``fastjax._io.atomic_dir``: an output directory is replaced as a
whole or left as it was.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastjax import loading
from fastjax._io import atomic_dir
from fastjax.lora import LoraConfig, adapter_paths, lora_scale
from fastjax.models import registry

log = logging.getLogger("fastjax")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LAYER_PREFIX = "model.layers."

_DTYPES = {
    "bf16": jnp.bfloat16,
    "bfloat16": jnp.bfloat16,
    "fp16": jnp.float16,
    "float16": jnp.float16,
    "f16": jnp.float16,
    "fp32": jnp.float32,
    "float32": jnp.float32,
    "f32": jnp.float32,
}


class AdapterError(ValueError):
    """A PEFT adapter that fastjax cannot load: unsupported feature, bad key, wrong shape."""


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """``"bf16" | "fp16" | "fp32"`` (or long names, or a dtype) -> a jnp dtype."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of bf16, fp16, fp32")
        return jnp.dtype(_DTYPES[dtype.lower()])
    dt = jnp.dtype(dtype)
    if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        raise ValueError(f"dtype={dt}: expected bfloat16, float16 or float32")
    return dt


def _resolve_scale(lora_config: LoraConfig | float) -> float:
    if isinstance(lora_config, (int, float)):
        return float(lora_config)
    return lora_scale(lora_config)


def _is_quantized(leaf: Any) -> bool:
    return not isinstance(leaf, (jax.Array, np.ndarray)) and hasattr(leaf, "dequantize")


def _get(tree: Mapping | None, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


# -------------------------------------------------------------------------------------------------
# Merged checkpoint
# -------------------------------------------------------------------------------------------------


def _lora_node(adapters: Mapping, param_path: tuple[str, ...]) -> Mapping | None:
    """The ``{"lora_A", "lora_B"}`` node adapting the weight at ``param_path``, if any."""
    if param_path[-1] != "weight":
        return None
    node = _get(adapters, param_path[:-1])
    return node if isinstance(node, Mapping) and "lora_A" in node else None


def _dense_f32(w: Any) -> jax.Array:
    return w.dequantize(jnp.float32) if _is_quantized(w) else jnp.asarray(w).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _merge(w, a, b, scale, *, dtype):
    """``cast(dense_f32(w) + scale * b @ a)``; leading (stacked) dims broadcast; a, b may be None"""
    w = _dense_f32(w)
    if a is not None:
        delta = jnp.einsum(
            "...or,...ri->...oi",
            b.astype(jnp.float32),
            a.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        w = w + scale * delta
    return w.astype(dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _merge_layer(w, a, b, scale, i, *, dtype):
    """Layer ``i`` of a stacked leaf, merged (slicing inside the jit: no stacked copy is made)."""

    def take(tree):
        return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), tree)

    return _merge(take(w), take(a), take(b), scale, dtype=dtype)


class _MergedTensors(Mapping):
    """HF name -> merged tensor in ``dtype``, computed on access (``write_safetensors`` reads each
    name once, so only one merged tensor is alive at a time)."""

    def __init__(self, params: Mapping, adapters: Mapping | None, cfg, scale: float, dtype):
        self.params, self.adapters, self.scale, self.dtype = params, adapters or {}, scale, dtype
        self.names = list(registry.family_of(cfg).param_shapes(cfg))
        missing = [n for n in self.names if self._leaf(n)[0] is None]
        if missing:
            raise KeyError(
                f"params lack {missing[0]}"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )

    def _leaf(self, name: str) -> tuple[Any, Mapping | None, int | None]:
        if name.startswith(LAYER_PREFIX):
            idx, rest = name[len(LAYER_PREFIX) :].split(".", 1)
            path = ("model", "layers", *rest.split("."))
            layer = int(idx)
        else:
            path, layer = tuple(name.split(".")), None
        return _get(self.params, path), _lora_node(self.adapters, path), layer

    def __getitem__(self, name: str) -> jax.Array:
        w, lora, layer = self._leaf(name)
        if w is None:
            raise KeyError(name)
        a, b = (None, None) if lora is None else (lora["lora_A"], lora["lora_B"])
        if layer is None:
            return _merge(w, a, b, self.scale, dtype=self.dtype)
        return _merge_layer(w, a, b, self.scale, layer, dtype=self.dtype)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _check_adapters(adapters: Mapping | None, params: Mapping, lora_config: Any) -> float:
    modules = [(p, _get(adapters, p)) for p in adapter_paths(adapters)] if adapters else []
    if not modules:
        return 0.0
    if lora_config is None:
        raise ValueError(
            "adapters given without lora_config: pass the LoraConfig (or the float lora_scale)"
        )
    for path, node in modules:
        w = _get(params, (*path, "weight"))
        if w is None:
            raise KeyError(f"adapter for {'.'.join(path)} has no base weight in params")
        a, b = node["lora_A"], node["lora_B"]
        if (
            tuple(b.shape[:-2]) != tuple(w.shape[:-2])
            or (b.shape[-2], a.shape[-1]) != tuple(w.shape[-2:])
            or a.shape[-2] != b.shape[-1]
        ):
            raise ValueError(
                f"{'.'.join(path)}: lora_A {a.shape} / lora_B {b.shape} do not fit the base "
                f"weight {tuple(w.shape)}"
            )
    return _resolve_scale(lora_config)


def save_pretrained_merged(
    params: Mapping,
    adapters: Mapping | None,
    cfg,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    lora_config: Any = None,
    dtype: Any = "bf16",
    max_shard_size: int | str = "5GB",
) -> Path:
    """Merge ``adapters`` into ``params`` and save an HF checkpoint transformers loads, atomically.

    ``lora_config``: the ``LoraConfig`` the adapters were trained with, or the float ``lora_scale``
    (needed when ``adapters`` is not empty). NF4 weights (QLoRA) are dequantized to fp32 first; the
    merge runs in fp32 and each tensor is cast once to ``dtype`` (``"bf16" | "fp16" | "fp32"``).
    Writes sharded safetensors (+ index), ``config.json``, ``generation_config.json`` and the
    tokenizer files.
    """
    dt = resolve_dtype(dtype)
    scale = _check_adapters(adapters, params, lora_config)
    tensors = _MergedTensors(params, adapters, cfg, scale, dt)
    with atomic_dir(out_dir) as tmp:
        loading.write_safetensors(tensors, tmp, max_shard_size=max_shard_size)
        loading.write_config_files(cfg, tmp, dtype_name=dt.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def merge_adapters(
    params: Mapping, adapters: Mapping | None, *, lora_config: Any = None, dtype: Any = "fp32"
) -> dict:
    """A new dense param tree (same stacked layout) with the adapters merged and NF4 dequantized.

    One stacked leaf at a time (fp32 merge, one cast); the result holds a full copy of the model in
    ``dtype``. For GGUF export; ``save_pretrained_merged`` streams instead.
    """
    dt = resolve_dtype(dtype)
    scale = _check_adapters(adapters, params, lora_config)
    adapters = adapters or {}

    def walk(node, path):
        if isinstance(node, Mapping):
            return {k: walk(v, (*path, k)) for k, v in node.items()}
        lora = _lora_node(adapters, path)
        a, b = (None, None) if lora is None else (lora["lora_A"], lora["lora_B"])
        return _merge(node, a, b, scale, dtype=dt)

    return walk(params, ())


# -------------------------------------------------------------------------------------------------
# PEFT adapter
# -------------------------------------------------------------------------------------------------

# adapter_config.json fields that do not change what a loaded LoRA adapter computes: metadata,
# init-only options, and layer selection (the weights present in the file already express it). Every
# other field must hold its "unused" value (None, False, {}, [], ""), else ``load_adapter`` refuses,
# naming it.
_HARMLESS_PEFT_FIELDS = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_rslora",
    "bias",
    "inference_mode",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "auto_mapping",
    "peft_version",
    "qalora_group_size",
    "ensure_weight_tying",
}
_WHY_UNSUPPORTED = {
    "use_dora": "DoRA adds a magnitude vector per module",
    "modules_to_save": "fully trained copies of whole modules are not LoRA factors",
    "rank_pattern": "fastjax uses one rank for every module",
    "alpha_pattern": "fastjax uses one lora_alpha (one scale) for every module",
    "lora_bias": "LoRA biases on lora_B are not supported",
    "fan_in_fan_out": "only [out, in] (nn.Linear) weights are supported, not GPT-2 style Conv1D",
    "layer_replication": "replicated layers do not exist in the base checkpoint",
    "trainable_token_indices": "trainable embedding rows are not LoRA factors",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not supported",
    "use_qalora": "QA-LoRA pools the input and changes the forward",
}
_LAYER_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_[AB](?:\.[A-Za-z0-9_]+)?\.weight$"
)


def _check_peft_config(conf: Mapping[str, Any], where: Path) -> None:
    if conf.get("peft_type", "LORA") != "LORA":
        raise AdapterError(
            f"{where}: peft_type={conf.get('peft_type')!r}; only LORA adapters are supported"
        )
    if conf.get("bias", "none") != "none":
        raise AdapterError(
            f"{where}: bias={conf['bias']!r}; only bias='none' is supported (trained biases "
            "are not LoRA factors)"
        )
    if "r" not in conf:
        raise AdapterError(f"{where}: no 'r' (rank)")
    for key, value in conf.items():
        if key in _HARMLESS_PEFT_FIELDS or key == "bias" or value in (None, False, {}, [], ""):
            continue
        why = _WHY_UNSUPPORTED.get(key, "fastjax does not know what it changes")
        raise AdapterError(
            f"{where}: {key}={value!r} is not supported ({why}); merge it with peft "
            "(merge_and_unload) or retrain without it"
        )


def _base_shapes(cfg) -> dict[str, tuple[int, ...]]:
    return registry.family_of(cfg).param_shapes(cfg)


def _check_adapter_shapes(adapters: Mapping, cfg, r: int, where: str) -> None:
    shapes = _base_shapes(cfg)
    L = cfg.num_hidden_layers
    for path in adapter_paths(adapters):
        name = ".".join(path)
        if path[:2] == ("model", "layers"):
            name = f"{LAYER_PREFIX}*.{'.'.join(path[2:])}"
        else:
            raise AdapterError(
                f"{where}: adapter on {name}: only decoder-layer linears can be adapted"
            )
        base = shapes.get(f"{LAYER_PREFIX}0.{'.'.join(path[2:])}.weight")
        if base is None or len(base) != 2:
            raise AdapterError(
                f"{where}: adapter on {name}, which is not a linear of this {cfg.model_type} model"
            )
        out, n_in = base
        node = _get(adapters, path)
        a, b = tuple(node["lora_A"].shape), tuple(node["lora_B"].shape)
        if a != (L, r, n_in) or b != (L, out, r):
            raise AdapterError(
                f"{where}: {name}: lora_A {a} / lora_B {b}, expected {(L, r, n_in)} / "
                f"{(L, out, r)} (r={r}, base weight {(out, n_in)}, {L} layers)"
            )


def save_adapter(
    adapters: Mapping,
    lora_config: LoraConfig,
    cfg,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str = "",
) -> Path:
    """Write a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``,
    fp32 factors under PEFT's names) that ``peft.PeftModel.from_pretrained`` loads onto the HF
    base model, atomically (``fastjax.lora.save_peft_adapter`` converts; this checks shapes)."""
    from fastjax.lora import save_peft_adapter

    _check_adapter_shapes(adapters, cfg, lora_config.r, "save_adapter")
    save_peft_adapter(
        adapters, cfg, lora_config, str(out_dir), base_model_name_or_path=base_model_name_or_path
    )
    return Path(out_dir)


def _target_modules(
    present: Mapping[tuple[str, ...], set[int]], num_layers: int
) -> tuple[str, ...] | str:
    """``target_modules`` selecting exactly the (module, layer) pairs of the file: module names when
    every module covers every layer, else a regex fullmatching exactly the present module names."""
    if all(len(layers) == num_layers for layers in present.values()):
        leaves = [rel[-1] for rel in present]
        names = leaves if len(set(leaves)) == len(leaves) else [".".join(rel) for rel in present]
        return tuple(sorted(names))
    alternatives = [
        rf"model\.layers\.(?:{'|'.join(map(str, sorted(layers)))})\.{re.escape('.'.join(rel))}"
        for rel, layers in sorted(present.items())
    ]
    return "(?:" + "|".join(alternatives) + ")"


def load_adapter(path: str | os.PathLike, cfg) -> tuple[dict, LoraConfig]:
    """Read a PEFT LoRA adapter directory (from ``save_adapter`` or from peft itself) ->
    ``(adapters, lora_config)``: the stacked fp32 adapter tree and a ``LoraConfig`` with its scale.

    Layer subsets (``layers_to_transform``, ``exclude_modules``, regex ``target_modules``) load as
    zero factors in the unselected layers, with ``target_modules`` rewritten to a regex selecting
    exactly the layers in the file. Unsupported PEFT features raise ``AdapterError``, naming the
    field.
    """
    from safetensors.numpy import load_file

    from fastjax.lora import from_peft_state_dict

    d = Path(path)
    conf_path = d / ADAPTER_CONFIG
    if not conf_path.is_file():
        raise AdapterError(f"{d}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    conf = json.loads(conf_path.read_text())
    _check_peft_config(conf, conf_path)
    weights = d / ADAPTER_WEIGHTS
    if not weights.is_file():
        hint = (
            " (found adapter_model.bin: re-save it with safe_serialization=True)"
            if (d / "adapter_model.bin").is_file()
            else ""
        )
        raise AdapterError(f"{d}: no {ADAPTER_WEIGHTS}{hint}")
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise AdapterError(f"{weights}: corrupt or truncated safetensors file ({e})") from e
    present: dict[tuple[str, ...], set[int]] = {}
    for key in state:
        m = _LAYER_KEY.match(key)
        if m is None:
            raise AdapterError(
                f"{weights}: tensor {key!r} is not a decoder-layer LoRA factor (expected "
                f"'{PEFT_PREFIX}{LAYER_PREFIX}<i>.<module>.lora_A.weight'); embedding/lm_head "
                "LoRA and other PEFT tensors are not supported"
            )
        present.setdefault(tuple(m.group(2).split(".")), set()).add(int(m.group(1)))
    try:
        adapters = from_peft_state_dict(state, cfg)
    except ValueError as e:
        raise AdapterError(f"{weights}: {e}") from e
    r = int(conf["r"])
    _check_adapter_shapes(adapters, cfg, r, str(weights))
    lora_config = LoraConfig(
        r=r,
        lora_alpha=conf.get("lora_alpha", 8),
        target_modules=_target_modules(present, cfg.num_hidden_layers),
        lora_dropout=float(conf.get("lora_dropout") or 0.0),
        use_rslora=bool(conf.get("use_rslora", False)),
    )
    return adapters, lora_config


# -------------------------------------------------------------------------------------------------
# CLI: fastjax export
# -------------------------------------------------------------------------------------------------


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastjax export`` on an ``argparse`` subparsers object; the handler is
    ``args.func = export_command``."""
    p = subparsers.add_parser(
        "export",
        help="merge a LoRA adapter and export (HF 16-bit, PEFT adapter, or GGUF)",
        description="Export a fine-tuned model. merged: an HF checkpoint with the adapter merged "
        "in "
        "(transformers/vLLM load it). adapter: a PEFT adapter directory. gguf: a llama.cpp file.",
    )
    p.add_argument(
        "--model", required=True, help="base model: HF checkpoint directory, hub id, or .gguf"
    )
    p.add_argument("--adapter", help="PEFT adapter directory (from fastjax training or from peft)")
    p.add_argument("--format", choices=("merged", "adapter", "gguf"), default="merged")
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="merged: output dtype (default bf16); gguf: merge precision (default fp32)",
    )
    p.add_argument(
        "--quant", choices=("f16", "q8_0", "q4_0"), default="f16", help="GGUF tensor type"
    )
    p.add_argument(
        "--out",
        required=True,
        help="output directory (gguf: a .gguf path, or a directory to hold model-<quant>.gguf)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="merged: largest safetensors shard")
    p.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="merge onto the NF4-dequantized base, i.e. the weights a QLoRA adapter was trained on",
    )
    p.set_defaults(func=export_command)
    return p


def _checkpoint_dtype(model: str) -> Any:
    """The dtype to load the base in: its own (no rounding before the fp32 merge); fp32 for GGUF."""
    if model.endswith(".gguf"):
        return jnp.float32
    config = Path(model) / "config.json"
    if config.is_file():
        conf = json.loads(config.read_text())
        name = conf.get("dtype") or conf.get("torch_dtype")
        if isinstance(name, str) and name.replace("torch.", "") in _DTYPES:
            return _DTYPES[name.replace("torch.", "")]
    return jnp.bfloat16


def export_command(args: argparse.Namespace) -> int:
    """Handler of ``fastjax export`` (see ``add_export_parser``). Returns the exit status."""
    from fastjax.cli import resolve_model_path  # ``--model default`` -> the embedded GGUF

    model = resolve_model_path(args.model)
    if args.format == "adapter":
        if not args.adapter:
            raise SystemExit("fastjax export --format adapter needs --adapter DIR")
        cfg = (
            loading.load_config(model)
            if (Path(model) / "config.json").is_file()
            else loading.from_pretrained(model, dtype=jnp.float32, load_tokenizer=False)[1]
        )
        adapters, lora_config = load_adapter(args.adapter, cfg)
        out = save_adapter(adapters, lora_config, cfg, args.out, base_model_name_or_path=model)
        print(f"fastjax export: wrote adapter to {out}")
        return 0
    params, cfg, tokenizer = loading.from_pretrained(
        model, dtype=_checkpoint_dtype(model), load_in_4bit=args.load_in_4bit
    )
    adapters, lora_config = load_adapter(args.adapter, cfg) if args.adapter else (None, None)
    if adapters is None:
        log.warning("no --adapter given: exporting the base model unchanged")
    if args.format == "merged":
        out = save_pretrained_merged(
            params,
            adapters,
            cfg,
            tokenizer,
            args.out,
            lora_config=lora_config,
            dtype=args.dtype or "bf16",
            max_shard_size=args.max_shard_size,
        )
    else:
        from fastjax.gguf_io import save_gguf

        # fp32 by default: merging to bf16 first would round twice (bf16 keeps 7 mantissa bits,
        # GGUF f16 keeps 10). The dense merged copy is the model's size in that dtype.
        dtype = args.dtype or "fp32"
        merged = merge_adapters(params, adapters, lora_config=lora_config, dtype=dtype)
        del params
        out = Path(args.out)
        if out.suffix != ".gguf":
            out = out / f"model-{args.quant}.gguf"
        out = save_gguf(merged, cfg, tokenizer, out, quant=args.quant)
    print(f"fastjax export: wrote {args.format} to {out}")
    return 0
