"""Parameters of the shared decoder: per-layer linear modules, HF names and shapes, the one stack/unstack
rule, random init (``docs/ARCHITECTURE.md``: "Parameters: HF names, one stacking rule").

``models/decoder.py`` re-exports every public name here, so families and callers import them from there.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LAYER_PREFIX = "model.layers."


def linear_modules(cfg) -> dict[str, tuple[int, int]]:
    """Per-layer linear modules: path inside ``model.layers.{i}.`` -> ``(in_features, out_features)``.

    These are exactly the ``nn.Linear`` modules of the HF layer (what PEFT's ``all-linear`` targets inside
    the decoder; fused ``qkv_proj``/``gate_up_proj`` are single modules, as in HF and PEFT).
    """
    arch = cfg.arch()
    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    mods: dict[str, tuple[int, int]] = {}
    if arch.fused_qkv:
        mods["self_attn.qkv_proj"] = (D, q + 2 * kv)
    else:
        mods.update(
            {"self_attn.q_proj": (D, q), "self_attn.k_proj": (D, kv), "self_attn.v_proj": (D, kv)}
        )
    mods["self_attn.o_proj"] = (q, D)
    if arch.fused_gate_up:
        mods["mlp.gate_up_proj"] = (D, 2 * F)
    else:
        mods.update({"mlp.gate_proj": (D, F), "mlp.up_proj": (D, F)})
    mods["mlp.down_proj"] = (F, D)
    return mods


def layer_param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Per-layer tensors: name inside ``model.layers.{i}.`` -> shape (HF ``[out, in]``)."""
    arch = cfg.arch()
    D = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (D,),
        "post_attention_layernorm.weight": (D,),
    }
    if arch.sandwich_norms:
        shapes.update(
            {"pre_feedforward_layernorm.weight": (D,), "post_feedforward_layernorm.weight": (D,)}
        )
    mods = linear_modules(cfg)
    for mod, (n_in, n_out) in mods.items():
        shapes[f"{mod}.weight"] = (n_out, n_in)
    if arch.qk_norm:
        shapes.update(
            {"self_attn.q_norm.weight": (cfg.head_dim,), "self_attn.k_norm.weight": (cfg.head_dim,)}
        )
    biased = []
    if arch.qkv_bias:
        biased += [m for m in mods if m.startswith("self_attn.") and m != "self_attn.o_proj"]
    if arch.o_bias:
        biased.append("self_attn.o_proj")
    if arch.mlp_bias:
        biased += [m for m in mods if m.startswith("mlp.")]
    for mod in biased:
        shapes[f"{mod}.bias"] = (mods[mod][1],)
    return shapes


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of the checkpoint -> shape (unstacked, as in safetensors files)."""
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "model.norm.weight": (cfg.hidden_size,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for i in range(cfg.num_hidden_layers):
        for name, shape in layer_param_shapes(cfg).items():
            shapes[f"{LAYER_PREFIX}{i}.{name}"] = shape
    return shapes


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def stack_layers(flat: Mapping[str, Any] | Iterable[tuple[str, Any]], num_layers: int) -> dict:
    """Flat HF names -> nested tree, per-layer tensors stacked on a new leading axis.

    ``model.layers.{i}.<rest>`` for i in 0..L-1 becomes ``tree["model"]["layers"][<rest split on ".">]`` of
    shape ``[L, ...]``; every other name becomes ``tree[<name split on ".">]``.

    ``flat`` is a mapping or an iterator of ``(name, value)`` pairs. Each layer slice is written into a
    preallocated ``[L, ...]`` buffer as it arrives (device arrays through a donated in-place update), so
    fed from an iterator the peak memory is the stacked model plus one slice: never the per-layer
    tensors and the stacked copy side by side (that doubling is 13 GiB for Llama-3-8B in bf16). Values
    may be numpy arrays, jax arrays, or pytrees of them (``NF4Tensor`` from quantize-on-load).
    """
    items = flat.items() if isinstance(flat, Mapping) else flat
    tree: dict = {}
    stacks: dict[str, list] = {}  # rest -> [buffer tree, filled flags]
    for name, value in items:
        if not name.startswith(LAYER_PREFIX):
            _set_path(tree, name.split("."), value)
            continue
        idx, rest = name[len(LAYER_PREFIX) :].split(".", 1)
        i = int(idx)
        if not 0 <= i < num_layers:
            raise KeyError(f"{name}: layer index {i} outside 0..{num_layers - 1}")
        if rest not in stacks:
            stacks[rest] = [
                jax.tree.map(lambda x: _empty_stack(x, num_layers), value),
                [False] * num_layers,
            ]
        entry = stacks[rest]
        entry[0] = jax.tree.map(lambda buf, x, i=i: _put_slice(buf, x, i), entry[0], value)
        entry[1][i] = True
        del value  # the slice is now in the buffer: let it go before the next one arrives
    for rest, (stacked, filled) in stacks.items():
        if not all(filled):
            raise KeyError(f"{LAYER_PREFIX}{filled.index(False)}.{rest} is missing")
        _set_path(tree, ["model", "layers"] + rest.split("."), stacked)
    return tree


def _empty_stack(x, num_layers: int):
    if isinstance(x, np.ndarray):
        return np.empty((num_layers, *x.shape), x.dtype)
    return jnp.zeros((num_layers, *x.shape), x.dtype, device=_device_of(x))


def _device_of(x):
    sharding = getattr(x, "sharding", None)
    return sharding if isinstance(sharding, jax.sharding.SingleDeviceSharding) else None


@functools.partial(jax.jit, donate_argnums=0)
def _put_slice_donated(buf: jax.Array, x: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0)


def _put_slice(buf, x, i: int):
    if isinstance(buf, np.ndarray):
        buf[i] = np.asarray(x)
        return buf
    return _put_slice_donated(buf, x, jnp.int32(i))


def unstack_layers(tree: Mapping) -> dict[str, Any]:
    """Inverse of ``stack_layers``: nested tree -> flat HF names (per-layer leaves split on axis 0)."""
    flat: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, prefix + [k])
            return
        name = ".".join(prefix)
        if prefix[:2] == ["model", "layers"]:
            rest = ".".join(prefix[2:])
            for i in range(node.shape[0]):
                flat[f"{LAYER_PREFIX}{i}.{rest}"] = node[i]
        else:
            flat[name] = node

    walk(tree, [])
    return flat


def init_params(cfg, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random parameters (normal(0, std) matrices, identity norms, zero biases), stacked."""
    arch = cfg.arch()
    D = cfg.hidden_size
    L = cfg.num_hidden_layers
    flat = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        flat["lm_head.weight"] = (cfg.vocab_size, D)
    for name, shape in layer_param_shapes(cfg).items():
        flat[f"{LAYER_PREFIX}*.{name}"] = (L, *shape)
    keys = iter(jax.random.split(key, len(flat)))
    tree: dict = {}
    for name, shape in flat.items():
        k = next(keys)
        if name.endswith("norm.weight"):  # identity: w = 1, or w = 0 for Gemma's (1 + w)
            value = jnp.full(shape, 1.0 - arch.norm_offset, dtype)
        elif name.endswith(".bias"):
            value = jnp.zeros(shape, dtype)
        else:
            value = (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
        _set_path(tree, name.replace(f"{LAYER_PREFIX}*.", "model.layers.").split("."), value)
    return tree
