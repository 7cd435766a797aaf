"""LoRA adapters as a separate pytree with PEFT names, plus merge/unmerge and PEFT file conversion.

Tree layout (``docs/ARCHITECTURE.md``): the same stacked paths as the model's params down to the
module, then PEFT's names, fp32::

    lora["model"]["layers"]["self_attn"]["q_proj"] = {"lora_A": [L, r, in], "lora_B": [L, out, r]}

A *linear module* is any dict under ``params["model"]["layers"]`` holding a ``"weight"`` whose
logical shape is ``[L, out, in]`` (a ``jax.Array`` or an ``NF4Tensor``). Nothing here knows Llama's
module names: fused ``qkv_proj`` / ``gate_up_proj`` modules of other families are found the same
way. ``lm_head`` and the embeddings are never adapted.

Initialisation follows PEFT's default: ``lora_A`` ~ kaiming-uniform(a=sqrt(5)), which is
U(-1/sqrt(in), 1/sqrt(in)), and ``lora_B = 0``, so a fresh adapter leaves the model unchanged.
Scale: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora`` (``lora_scale(config)``).

``target_modules`` (resolved against the full HF module names ``model.layers.{i}.<path>``):
  * a list/tuple of names: a module matches when its full name equals a name or ends with
    ``"." + name`` (PEFT's rule), so ``"q_proj"`` and ``"self_attn.q_proj"`` both work; a
    comma-separated string and a single plain name (``"q_proj"``) are read as such a list;
  * ``"all-linear"``: every linear module of the decoder layers (never ``lm_head``);
  * any other string: a regular expression, ``re.fullmatch``-ed against each full name, as PEFT
    does.

Layer subsets (a regex such as ``r"model\\.layers\\.(0|1)\\.self_attn\\.(q|v)_proj"``): adapters
stay stacked over all ``L`` layers; the layers a module is *not* selected in hold
``lora_A = lora_B = 0``. That point is a fixed point of training: the gradient of A is ``s * B^T
(...)`` and of B is ``s * (...) A^T``, both zero there, and weight decay keeps zero at zero.
``layer_masks`` exposes the selection so the trainer also zeros any optimizer update there
(``mask_unselected_layers``), which makes the guarantee independent of the optimizer. Export writes
only the selected layers, so PEFT sees exactly the adapters it would create.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastjax.models import registry

ALL_LINEAR = "all-linear"
LAYERS_PATH = ("model", "layers")
PEFT_PREFIX = "base_model.model."
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (PEFT's names). Frozen and hashable.

    ``target_modules``: a tuple of module names, ``"all-linear"``, or a regex string (module
    docstring).
    """

    r: int = 16
    lora_alpha: float = 16
    target_modules: tuple[str, ...] | str = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    lora_dropout: float = 0.0
    use_rslora: bool = False
    seed: int = 0

    def __post_init__(self):
        tm = self.target_modules
        if isinstance(tm, str):
            if "," in tm:
                tm = tuple(t.strip() for t in tm.split(",") if t.strip())
            elif tm != ALL_LINEAR and _PLAIN_NAME.fullmatch(tm):
                tm = (tm,)
        elif isinstance(tm, Sequence):
            tm = tuple(str(t) for t in tm)
        else:
            raise TypeError(
                f"LoraConfig.target_modules={tm!r}: expected names, 'all-linear' or a regex"
            )
        object.__setattr__(self, "target_modules", tm)
        if not tm:
            raise ValueError("LoraConfig.target_modules is empty")
        if isinstance(tm, str):
            try:
                re.compile(tm)
            except re.error as e:
                raise ValueError(
                    f"LoraConfig.target_modules={tm!r} is not a valid regex: {e}"
                ) from e
        if not isinstance(self.r, (int, np.integer)) or self.r <= 0:
            raise ValueError(f"LoraConfig.r={self.r!r}: expected a positive integer")
        if self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha={self.lora_alpha!r}: expected > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout={self.lora_dropout!r}: expected 0 <= p < 1")


def lora_scale(config: LoraConfig) -> float:
    """The adapter scale ``s`` in ``W x + s B A x``: ``alpha / r`` or ``alpha / sqrt(r)``
    (rsLoRA)."""
    return float(config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r))


# --------------------------------------------------------------------------------------------------
# Finding linear modules and resolving target_modules
# --------------------------------------------------------------------------------------------------


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", ()))


def linear_modules(params: Mapping) -> dict[tuple[str, ...], tuple[int, int, int]]:
    """Every stacked linear of the decoder: module path under ``model.layers`` -> ``(L, out,
    in)``."""
    try:
        layers = params[LAYERS_PATH[0]][LAYERS_PATH[1]]
    except (KeyError, TypeError) as e:
        raise ValueError(
            "params have no params['model']['layers'] subtree: not a fastjax model"
        ) from e
    found: dict[tuple[str, ...], tuple[int, int, int]] = {}

    def walk(node, path):
        if not isinstance(node, Mapping):
            return
        weight = node.get("weight")
        if weight is not None and not isinstance(weight, Mapping) and len(_shape(weight)) == 3:
            found[path] = _shape(weight)  # type: ignore[assignment]
            return
        for k, v in node.items():
            walk(v, (*path, str(k)))

    walk(layers, ())
    return found


def _full_name(path: tuple[str, ...], layer: int) -> str:
    return ".".join((*LAYERS_PATH, str(layer), *path))


def _name_matches(full: str, name: str) -> bool:
    return full == name or full.endswith("." + name)


def layer_selection(
    modules: Mapping[tuple[str, ...], tuple[int, int, int]], config: LoraConfig
) -> dict[tuple[str, ...], np.ndarray]:
    """Module path -> bool ``[L]``: in which layers ``config.target_modules`` selects the module.

    Only modules selected in at least one layer appear. Raises ``ValueError`` listing the available
    module names when a target name (or the regex) matches nothing.
    """
    tm = config.target_modules
    available = sorted({p[-1] for p in modules} | {".".join(p) for p in modules})
    selection: dict[tuple[str, ...], np.ndarray] = {}
    for path, (num_layers, _, _) in modules.items():
        names = [_full_name(path, i) for i in range(num_layers)]
        if tm == ALL_LINEAR:
            sel = np.ones(num_layers, bool)
        elif isinstance(tm, str):
            sel = np.array([re.fullmatch(tm, n) is not None for n in names])
        else:
            sel = np.array([any(_name_matches(n, t) for t in tm) for n in names])
        if sel.any():
            selection[path] = sel
    if isinstance(tm, tuple):
        unknown = [t for t in tm if not any(_name_matches(_full_name(p, 0), t) for p in modules)]
        if unknown:
            raise ValueError(
                f"target_modules {unknown} match no linear module of this model; "
                f"available: {available} (or 'all-linear', or a regex over names "
                f"like 'model.layers.0.self_attn.q_proj')"
            )
    if not selection:
        example = _full_name(next(iter(modules)), 0) if modules else "model.layers.0.<module>"
        raise ValueError(
            f"target_modules={tm!r} matches no linear module of this model; "
            f"available: {available}; regexes are fullmatched against names like "
            f"{example!r}"
        )
    return selection


def _get(tree: Mapping, path: Sequence[str]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def adapter_paths(lora: Mapping) -> list[tuple[str, ...]]:
    """Paths (from the root, e.g. ``("model", "layers", "self_attn", "q_proj")``) of every
    adapter."""
    out: list[tuple[str, ...]] = []

    def walk(node, path):
        if isinstance(node, Mapping):
            if "lora_A" in node and "lora_B" in node:
                out.append(path)
                return
            for k, v in node.items():
                walk(v, (*path, str(k)))

    walk(lora, ())
    return out


# --------------------------------------------------------------------------------------------------
# Creating adapters
# --------------------------------------------------------------------------------------------------


def _module_key(seed: int, path: Sequence[str]) -> jax.Array:
    # crc32, not hash(): Python's str hash is salted per process, and init must be reproducible.
    return jax.random.fold_in(
        jax.random.key(seed), zlib.crc32(".".join(path).encode()) & 0x7FFFFFFF
    )


def init_lora(params: Mapping, config: LoraConfig, *, dtype=jnp.float32) -> dict:
    """A fresh adapter tree for ``params`` (PEFT init: A ~ U(+-1/sqrt(in)), B = 0; unselected layers
    0)."""
    selection = layer_selection(linear_modules(params), config)
    modules = linear_modules(params)
    lora: dict = {}
    for path, sel in selection.items():
        num_layers, out_dim, in_dim = modules[path]
        bound = 1.0 / math.sqrt(in_dim)
        a = jax.random.uniform(
            _module_key(config.seed, path),
            (num_layers, config.r, in_dim),
            jnp.float32,
            -bound,
            bound,
        )
        a = a * jnp.asarray(sel, jnp.float32)[:, None, None]
        b = jnp.zeros((num_layers, out_dim, config.r), jnp.float32)
        _set(lora, (*LAYERS_PATH, *path), {"lora_A": a.astype(dtype), "lora_B": b.astype(dtype)})
    return lora


def get_peft_model(
    params: Mapping,
    cfg: Any = None,
    *,
    r: int = 16,
    lora_alpha: float = 16,
    target_modules: Sequence[str] | str = LoraConfig.target_modules,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    seed: int = 0,
    config: LoraConfig | None = None,
) -> tuple[dict, LoraConfig]:
    """Adapters for a loaded model: returns ``(lora_tree, LoraConfig)``.

    ``params`` stays untouched (and frozen: only ``lora_tree`` is ever differentiated). Pass either
    the keyword hyper-parameters or a ready ``config``. ``cfg`` (the model config) is accepted for
    symmetry with the rest of the API and checked against the params' layer count when given.
    """
    if config is None:
        config = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            target_modules=target_modules,
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            seed=seed,
        )
    lora = init_lora(params, config)
    if cfg is not None and hasattr(cfg, "num_hidden_layers"):
        for num_layers, _, _ in linear_modules(params).values():
            if num_layers != cfg.num_hidden_layers:
                raise ValueError(
                    f"params stack {num_layers} layers but cfg.num_hidden_layers="
                    f"{cfg.num_hidden_layers}"
                )
    return lora, config


def layer_masks(lora: Mapping, config: LoraConfig) -> dict | None:
    """A tree like ``lora`` whose leaves are fp32 ``[L, 1, 1]`` masks (1 = layer selected), or
    ``None`` when every adapter covers all layers (the common case: nothing to mask)."""
    shapes = {
        path[len(LAYERS_PATH) :]: (
            node["lora_A"].shape[0],
            node["lora_B"].shape[1],
            node["lora_A"].shape[2],
        )
        for path in adapter_paths(lora)
        for node in [_get(lora, path)]
    }
    selection = layer_selection(shapes, config)
    if all(sel.all() for sel in selection.values()):
        return None
    masks: dict = {}
    for path in adapter_paths(lora):
        sel = selection.get(path[len(LAYERS_PATH) :])
        m = jnp.asarray(np.ones(1, bool) if sel is None else sel, jnp.float32)[:, None, None]
        _set(masks, path, {"lora_A": m, "lora_B": m})
    return masks


def mask_unselected_layers(masks: Mapping | None) -> optax.GradientTransformation:
    """An optax transform zeroing updates of layers an adapter is not selected in (identity for
    None)."""
    if masks is None:
        return optax.identity()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, masks), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def num_trainable_params(lora: Mapping, config: LoraConfig | None = None) -> int:
    """Adapter parameters actually trained (unselected layers of a layer-subset regex excluded)."""
    masks = None if config is None else layer_masks(lora, config)
    if masks is None:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(lora)))
    return int(
        sum(
            np.prod(x.shape[1:]) * float(np.asarray(m).sum())
            for x, m in zip(jax.tree.leaves(lora), jax.tree.leaves(masks))
        )
    )


# --------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------


def _as_scale(scale: float | LoraConfig) -> float:
    return lora_scale(scale) if isinstance(scale, LoraConfig) else float(scale)


def _delta(node: Mapping, scale: float) -> jax.Array:
    a = jnp.asarray(node["lora_A"], jnp.float32)
    b = jnp.asarray(node["lora_B"], jnp.float32)
    return scale * jnp.einsum("lor,lri->loi", b, a, precision=jax.lax.Precision.HIGHEST)


def _copy_dicts(node: Any) -> Any:
    """New dicts all the way down (so ``_set`` never mutates the caller's tree); leaves are
    shared."""
    return {k: _copy_dicts(v) for k, v in node.items()} if isinstance(node, Mapping) else node


def _merge(params: Mapping, lora: Mapping, scale: float, sign: float) -> dict:
    out = _copy_dicts(params)
    for path in adapter_paths(lora):
        module = _get(params, path)
        w = module["weight"]
        if hasattr(w, "dequantize") and not isinstance(w, jax.Array):
            if sign < 0:
                raise TypeError(f"{'.'.join(path)}: cannot unmerge into a quantized (NF4) weight")
            dtype = w.dtype
            w32 = w.dequantize(jnp.float32)
        else:
            dtype = w.dtype
            w32 = jnp.asarray(w, jnp.float32)
        merged = (w32 + sign * _delta(_get(lora, path), scale)).astype(dtype)
        _set(out, (*path, "weight"), merged)
    return out


def merge_lora(
    params: Mapping, lora: Mapping, cfg: Any = None, scale: float | LoraConfig = 1.0
) -> dict:
    """``W + s * B @ A`` for every adapted module (fp32 math, cast back to W's dtype); other leaves
    shared.

    ``scale`` is the adapter scale or the ``LoraConfig`` (its ``lora_scale``). An NF4 weight is
    dequantized and replaced by the dense merged weight in its compute dtype. ``cfg`` (model config)
    is unused; it is part of the signature so every model-level function takes ``(params, ...,
    cfg)``.
    """
    del cfg
    return _merge(params, lora, _as_scale(scale), 1.0)


def unmerge_lora(
    params: Mapping, lora: Mapping, cfg: Any = None, scale: float | LoraConfig = 1.0
) -> dict:
    """The inverse of ``merge_lora``: ``W - s * B @ A`` (dense weights only)."""
    del cfg
    return _merge(params, lora, _as_scale(scale), -1.0)


# --------------------------------------------------------------------------------------------------
# PEFT files: state dict names, adapter_config.json
# --------------------------------------------------------------------------------------------------


def _selection_of(
    lora: Mapping, config: LoraConfig | None
) -> dict[tuple[str, ...], np.ndarray] | None:
    if config is None:
        return None
    shapes = {
        p[len(LAYERS_PATH) :]: (_get(lora, p)["lora_A"].shape[0], 0, 0) for p in adapter_paths(lora)
    }
    return layer_selection(shapes, config)


def to_peft_state_dict(
    lora: Mapping, cfg: Any, config: LoraConfig | None = None, *, dtype: Any = None
) -> dict[str, np.ndarray]:
    """The adapter as PEFT's saved state dict: ``base_model.model.<HF module name>.lora_A.weight``
    -> numpy ``[r, in]`` (``lora_B``: ``[out, r]``), one entry per selected layer, in ``dtype``
    (default: as stored, fp32). ``cfg`` picks the family's unstack rule."""
    unstack = registry.family_of(cfg).unstack_layers if cfg is not None else None
    selection = _selection_of(lora, config)
    out: dict[str, np.ndarray] = {}
    for path in adapter_paths(lora):
        node = _get(lora, path)
        for which in ("lora_A", "lora_B"):
            sub: dict = {}
            _set(sub, (*path, which), np.asarray(jax.device_get(node[which])))
            flat = unstack(sub) if unstack is not None else _unstack(sub)
            for name, value in flat.items():
                if path[: len(LAYERS_PATH)] == LAYERS_PATH and selection is not None:
                    layer = int(name[len(".".join(LAYERS_PATH)) + 1 :].split(".", 1)[0])
                    if not selection[path[len(LAYERS_PATH) :]][layer]:
                        continue
                value = np.asarray(value)
                out[f"{PEFT_PREFIX}{name}.weight"] = value if dtype is None else value.astype(dtype)
    return out


def _unstack(tree: Mapping) -> dict[str, Any]:
    from fastjax.models import llama

    return llama.unstack_layers(tree)


_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$"
)


def from_peft_state_dict(
    state_dict: Mapping[str, Any], cfg: Any, config: LoraConfig | None = None, *, dtype=jnp.float32
) -> dict:
    """Inverse of ``to_peft_state_dict``: PEFT keys (with or without an adapter name such as
    ``.default``) -> the stacked adapter tree. Layers absent from the file (layer-subset adapters)
    become zeros."""
    num_layers = cfg.num_hidden_layers
    prefix = ".".join(LAYERS_PATH) + "."
    per_module: dict[tuple[str, ...], dict[str, dict[int, np.ndarray]]] = {}
    for key, value in state_dict.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ValueError(
                f"{key!r} is not a PEFT LoRA key (expected "
                f"'{PEFT_PREFIX}model.layers.<i>.<module>.lora_A.weight')"
            )
        name, which = m.groups()
        if not name.startswith(prefix):
            raise ValueError(
                f"{key!r}: only decoder-layer adapters ({prefix}<i>....) are supported"
            )
        idx, rest = name[len(prefix) :].split(".", 1)
        layer = int(idx)
        if not 0 <= layer < num_layers:
            raise ValueError(f"{key!r}: layer {layer} out of range for {num_layers} layers")
        module = per_module.setdefault(tuple(rest.split(".")), {})
        module.setdefault(which, {})[layer] = np.asarray(value)
    if not per_module:
        raise ValueError("the PEFT state dict holds no LoRA weights")
    lora: dict = {}
    for path, parts in per_module.items():
        if set(parts) != {"lora_A", "lora_B"} or parts["lora_A"].keys() != parts["lora_B"].keys():
            raise ValueError(
                f"{'.'.join(path)}: lora_A and lora_B must be present for the same layers"
            )
        node = {}
        for which, layers in parts.items():
            template = next(iter(layers.values()))
            stacked = np.zeros((num_layers, *template.shape), np.float32)
            for i, v in layers.items():
                if v.shape != template.shape:
                    raise ValueError(
                        f"{'.'.join(path)}.{which}: layer {i} has shape {v.shape}, "
                        f"others {template.shape}"
                    )
                stacked[i] = v.astype(np.float32)
            node[which] = jnp.asarray(stacked, dtype)
        _set(lora, (*LAYERS_PATH, *path), node)
    if config is not None:
        for path in adapter_paths(lora):
            r = _get(lora, path)["lora_A"].shape[1]
            if r != config.r:
                raise ValueError(f"{'.'.join(path)}: rank {r} in the file, LoraConfig.r={config.r}")
    return lora


def resolved_target_modules(lora: Mapping, config: LoraConfig) -> list[str] | str:
    """``target_modules`` as written to ``adapter_config.json``: names stay names, ``all-linear``
    becomes the module names it selected (PEFT-version independent), a regex stays the regex."""
    if isinstance(config.target_modules, str) and config.target_modules != ALL_LINEAR:
        return config.target_modules
    if config.target_modules == ALL_LINEAR:
        return sorted({p[-1] for p in adapter_paths(lora)})
    return list(config.target_modules)


def peft_adapter_config(
    config: LoraConfig, base_model_name_or_path: str | None = None, *, lora: Mapping | None = None
) -> dict[str, Any]:
    """``adapter_config.json`` contents PEFT loads (``PeftModel.from_pretrained``)."""
    target = (
        resolved_target_modules(lora, config)
        if lora is not None
        else (
            config.target_modules
            if isinstance(config.target_modules, str)
            else list(config.target_modules)
        )
    )
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(config.r),
        "lora_alpha": config.lora_alpha,
        "lora_dropout": float(config.lora_dropout),
        "target_modules": target,
        "use_rslora": bool(config.use_rslora),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
    }


def config_from_peft(adapter_config: Mapping[str, Any]) -> LoraConfig:
    """A ``LoraConfig`` from a PEFT ``adapter_config.json`` dict (rank/alpha patterns are not
    supported)."""
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"peft_type={adapter_config.get('peft_type')!r}: only LORA adapters are supported"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if adapter_config.get(key):
            raise ValueError(f"adapter_config.{key} is not supported")
    if adapter_config.get("use_dora"):
        raise ValueError("DoRA adapters (use_dora=True) are not supported")
    tm = adapter_config.get("target_modules")
    return LoraConfig(
        r=int(adapter_config["r"]),
        lora_alpha=adapter_config.get("lora_alpha", 8),
        target_modules=tuple(tm) if isinstance(tm, (list, tuple, set)) else tm,
        lora_dropout=float(adapter_config.get("lora_dropout", 0.0)),
        use_rslora=bool(adapter_config.get("use_rslora", False)),
    )


def save_peft_adapter(
    lora: Mapping,
    cfg: Any,
    config: LoraConfig,
    out_dir: str,
    *,
    base_model_name_or_path: str | None = None,
) -> str:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (fp32) atomically into
    ``out_dir``."""
    from safetensors.numpy import save_file

    from fastjax._io import atomic_dir, write_json

    state = {k: np.ascontiguousarray(v) for k, v in to_peft_state_dict(lora, cfg, config).items()}
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(
            tmp / "adapter_config.json",
            peft_adapter_config(config, base_model_name_or_path, lora=lora),
        )
    return str(out_dir)


def load_peft_adapter(path: str, cfg: Any) -> tuple[dict, LoraConfig]:
    """Read a PEFT adapter directory -> ``(lora_tree, LoraConfig)``."""
    import json
    from pathlib import Path

    from safetensors.numpy import load_file

    d = Path(path)
    config = config_from_peft(json.loads((d / "adapter_config.json").read_text()))
    return from_peft_state_dict(
        load_file(str(d / "adapter_model.safetensors")), cfg, config
    ), config
