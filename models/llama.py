"""Llama-family decoder (Llama 2/3, SmolLM2, ...): config, parameters, pure forward, KV-cache decode.

Parameters are a nested dict whose paths are HF safetensors names with the layer index moved to a leading
stacked axis (``docs/ARCHITECTURE.md``): ``params["model"]["layers"]["self_attn"]["q_proj"]["weight"]`` has
shape ``[L, out, in]``. Weights stay in HF's ``[out, in]`` layout and are contracted with einsum.

Dtype policy: activations run in the embedding's dtype (bf16 for training, fp32 for parity tests); matmuls
accumulate in fp32; norms and softmax compute in fp32; logits are returned in fp32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from fastjax import remat
from fastjax.models import ops as O

LAYER_PREFIX = "model.layers."
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _freeze(value: Any) -> Any:
    """Dicts/lists -> sorted tuples so the config stays hashable (it is a static jit argument)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and value and all(isinstance(i, tuple) and len(i) == 2 and
                                                  isinstance(i[0], str) for i in value):
        return {k: _thaw(v) for k, v in value}
    return value


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """HF ``LlamaConfig`` fields (names as in ``config.json``). Frozen and hashable."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None  # frozen dict (tuple of items); read with .rope_scaling_dict
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: Any = None  # int or tuple of ints
    pad_token_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, Mapping):
            set_("rope_scaling", _freeze(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"LlamaConfig.{name}={value!r}: expected a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: num_attention_heads={self.num_attention_heads} is not a "
                             f"multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ValueError(f"LlamaConfig.hidden_act={self.hidden_act!r}: only 'silu' is supported")
        scaling = self.rope_scaling_dict
        if scaling is not None:
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"LlamaConfig.rope_scaling: unsupported rope type {rope_type!r}; "
                                 f"supported: {SUPPORTED_ROPE_TYPES}")

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else _thaw(self.rope_scaling)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "LlamaConfig":
        """From an HF ``config.json`` dict (transformers 4 ``rope_theta``/``rope_scaling`` or 5
        ``rope_parameters`` style). Unknown keys are ignored."""
        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"LlamaConfig.from_hf: model_type={model_type!r} is not 'llama'")
        d = dict(config)
        rope_params = d.pop("rope_parameters", None)
        if rope_params:
            rope_params = dict(rope_params)
            d.setdefault("rope_theta", rope_params.pop("rope_theta", 10000.0))
            if rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
                d.setdefault("rope_scaling", rope_params)
        if d.get("rope_scaling") is not None:
            rs = dict(d["rope_scaling"])
            if rs.get("rope_type", rs.get("type")) == "default":
                d["rope_scaling"] = None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf(self) -> dict:
        """An HF ``config.json`` dict that transformers loads as ``LlamaForCausalLM``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["rope_scaling"] = self.rope_scaling_dict
        d["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) \
            else self.eos_token_id
        d["architectures"] = ["LlamaForCausalLM"]
        return d


# --------------------------------------------------------------------------------------------------------------
# Parameters: names, shapes, the stack/unstack rule, random init
# --------------------------------------------------------------------------------------------------------------

def layer_param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer tensors: name inside ``model.layers.{i}.`` -> shape (HF ``[out, in]``)."""
    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {
        "input_layernorm.weight": (D,),
        "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (q, D),
        "self_attn.k_proj.weight": (kv, D),
        "self_attn.v_proj.weight": (kv, D),
        "self_attn.o_proj.weight": (D, q),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
    }
    if cfg.attention_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                       "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (D,)})
    if cfg.mlp_bias:
        shapes.update({"mlp.gate_proj.bias": (F,), "mlp.up_proj.bias": (F,), "mlp.down_proj.bias": (D,)})
    return shapes


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of the checkpoint -> shape (unstacked, as in safetensors files)."""
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
              "model.norm.weight": (cfg.hidden_size,)}
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


def stack_layers(flat: Mapping[str, Any], num_layers: int) -> dict:
    """Flat HF names -> nested tree, per-layer tensors stacked on a new leading axis (``np.stack``).

    ``model.layers.{i}.<rest>`` for i in 0..L-1 becomes ``tree["model"]["layers"][<rest split on ".">]`` of
    shape ``[L, ...]``; every other name becomes ``tree[<name split on ".">]``.
    """
    tree: dict = {}
    per_layer: dict[str, list] = {}
    for name, value in flat.items():
        if name.startswith(LAYER_PREFIX):
            idx, rest = name[len(LAYER_PREFIX):].split(".", 1)
            per_layer.setdefault(rest, [None] * num_layers)[int(idx)] = value
        else:
            _set_path(tree, name.split("."), value)
    for rest, values in per_layer.items():
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            raise KeyError(f"{LAYER_PREFIX}{missing[0]}.{rest} is missing")
        stack = jnp.stack if isinstance(values[0], jax.Array) else np.stack
        _set_path(tree, ["model", "layers"] + rest.split("."), stack(values))
    return tree


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


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random parameters (normal(0, std) matrices, ones for norms, zeros for biases), stacked."""
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
        if name.endswith("norm.weight"):
            value = jnp.ones(shape, dtype)
        elif name.endswith(".bias"):
            value = jnp.zeros(shape, dtype)
        else:
            value = (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
        path = name.replace(f"{LAYER_PREFIX}*.", "model.layers.").split(".")
        _set_path(tree, path, value)
    return tree


def lm_head(params: Mapping, cfg: LlamaConfig) -> jax.Array:
    """The output projection ``[V, D]`` (the embedding when tied)."""
    if cfg.tie_word_embeddings:
        return params["model"]["embed_tokens"]["weight"]
    return params["lm_head"]["weight"]


# --------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------

def _proj(h, p, lp, module: str, name: str, ctx) -> jax.Array:
    mod = p[module][name]
    lora = None if lp is None else lp.get(module, {}).get(name)
    rng = None
    if lora is not None and ctx["dropout_rng"] is not None:
        rng = jax.random.fold_in(ctx["dropout_rng"], hash((module, name)) % (2**31))
    return O.linear(h, mod["weight"], bias=mod.get("bias"), lora=lora, lora_scale=ctx["lora_scale"],
                    dropout_rng=rng, lora_dropout=ctx["lora_dropout"], ops=ctx["ops"])


def _attention_block(x, p, lp, cfg: LlamaConfig, ctx, attend):
    B, T, _ = x.shape
    hd = cfg.head_dim
    h = O.rms_norm(x, p["input_layernorm"]["weight"], eps=cfg.rms_norm_eps, ops=ctx["ops"])
    q = _proj(h, p, lp, "self_attn", "q_proj", ctx).reshape(B, T, cfg.num_attention_heads, hd)
    k = _proj(h, p, lp, "self_attn", "k_proj", ctx).reshape(B, T, cfg.num_key_value_heads, hd)
    v = _proj(h, p, lp, "self_attn", "v_proj", ctx).reshape(B, T, cfg.num_key_value_heads, hd)
    q, k = O.rope(q, k, ctx["positions"], ctx["inv_freq"], ops=ctx["ops"])
    q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
    a, extra = attend(q, k, v)
    a = checkpoint_name(a.reshape(B, T, cfg.num_attention_heads * hd), "attn_out")
    return x + _proj(a, p, lp, "self_attn", "o_proj", ctx), extra


def _mlp_block(x, p, lp, cfg: LlamaConfig, ctx):
    h = O.rms_norm(x, p["post_attention_layernorm"]["weight"], eps=cfg.rms_norm_eps, ops=ctx["ops"])
    gate = checkpoint_name(_proj(h, p, lp, "mlp", "gate_proj", ctx), "mlp_up")
    up = checkpoint_name(_proj(h, p, lp, "mlp", "up_proj", ctx), "mlp_up")
    act = O.glu(gate, up, activation="silu", ops=ctx["ops"])
    return x + checkpoint_name(_proj(act, p, lp, "mlp", "down_proj", ctx), "mlp_out")


def _layer_lora(lora: Mapping | None) -> Mapping | None:
    if lora is None:
        return None
    return lora.get("model", {}).get("layers")


def _embed(params, input_ids, cfg):
    embed = params["model"]["embed_tokens"]["weight"]
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got {input_ids.shape=}")
    return jnp.take(embed, input_ids, axis=0)


def forward(params: Mapping, input_ids: jax.Array, *, cfg: LlamaConfig, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None, lora: Mapping | None = None, lora_scale: float = 1.0,
            lora_dropout: float = 0.0, dropout_rng: jax.Array | None = None, remat_policy: str = "none",
            ops: O.Ops | None = None, return_hidden: bool = False) -> jax.Array:
    """Logits ``[B, T, V]`` (fp32), or the final normed hidden states ``[B, T, D]`` with ``return_hidden``.

    ``positions``/``segment_ids`` ``[B, T]``: packed rows restart positions at 0 per segment and a token
    attends only to earlier tokens of its own segment (id 0 = padding). ``lora`` is an adapter tree
    (``fastjax.lora``) added to every linear it names, scaled by ``lora_scale``.
    """
    ops = ops or O.Ops()
    B, T = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    x = _embed(params, input_ids, cfg)
    ctx = dict(positions=positions, inv_freq=O.rope_inv_freq(cfg.head_dim, cfg.rope_theta,
                                                             cfg.rope_scaling_dict),
               lora_scale=lora_scale, lora_dropout=lora_dropout, ops=ops, dropout_rng=None)

    def attend(q, k, v):
        out = O.attention(q, k, v, segment_ids=segment_ids, causal=True, sm_scale=cfg.head_dim ** -0.5,
                          ops=ops)
        return out, None

    def body(x, xs):
        p, lp, rng = xs
        layer_ctx = dict(ctx, dropout_rng=rng)
        x = checkpoint_name(x, "layer_input")
        x, _ = _attention_block(x, p, lp, cfg, layer_ctx, attend)
        return _mlp_block(x, p, lp, cfg, layer_ctx), None

    rngs = None if dropout_rng is None else jax.random.split(dropout_rng, cfg.num_hidden_layers)
    x, _ = jax.lax.scan(remat.wrap(body, remat_policy), x,
                        (params["model"]["layers"], _layer_lora(lora), rngs))
    x = O.rms_norm(x, params["model"]["norm"]["weight"], eps=cfg.rms_norm_eps, ops=ops)
    if return_hidden:
        return x
    head = lm_head(params, cfg)
    return jnp.einsum("btd,vd->btv", x, head.astype(x.dtype), preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------------------------------------------
# KV-cache decoding (generation): slots are absolute cache indices shared by every row (left padding)
# --------------------------------------------------------------------------------------------------------------

def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype) -> dict:
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cached_attention_reference(q, k_cache, v_cache, q_slots, kv_valid, *, sm_scale, softcap=None,
                               window=None, q_positions=None, kv_positions=None):
    """Attention of new queries ``[B, T, H, D]`` over a cache ``[B, S, KV, D]``.

    Query t (at cache slot ``q_slots[t]``) sees slot j when ``j <= q_slots[t]`` and ``kv_valid[b, j]``;
    with ``window``, also ``q_positions - kv_positions < window``. fp32 math.
    """
    B, T, H, D = q.shape
    S, KV = k_cache.shape[1], k_cache.shape[2]
    G = H // KV
    qg = q.astype(jnp.float32).reshape(B, T, KV, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache.astype(jnp.float32)) * sm_scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    mask = (jnp.arange(S)[None, :] <= q_slots[:, None])[None] & kv_valid[:, None, :]  # [B, T, S]
    if window is not None:
        mask &= (q_positions[:, :, None] - kv_positions[:, None, :]) < window
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[:, None, None], p, 0.0)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v_cache.astype(jnp.float32))
    return o.reshape(B, T, H, D).astype(q.dtype)


def forward_cached(params: Mapping, input_ids: jax.Array, cache: dict, *, cfg: LlamaConfig,
                   positions: jax.Array, cache_index: jax.Array, kv_valid: jax.Array,
                   lora: Mapping | None = None, lora_scale: float = 1.0, ops: O.Ops | None = None):
    """Run ``input_ids [B, T]`` whose k/v go to cache slots ``cache_index .. cache_index+T-1``.

    Returns (logits of the last position ``[B, V]`` fp32, updated cache). ``kv_valid [B, S]`` marks slots
    holding real tokens (including the new ones).
    """
    ops = ops or O.Ops()
    B, T = input_ids.shape
    x = _embed(params, input_ids, cfg)
    q_slots = cache_index + jnp.arange(T)
    ctx = dict(positions=positions, inv_freq=O.rope_inv_freq(cfg.head_dim, cfg.rope_theta,
                                                             cfg.rope_scaling_dict),
               lora_scale=lora_scale, lora_dropout=0.0, ops=ops, dropout_rng=None)

    def body(x, xs):
        p, lp, k_cache, v_cache = xs

        def attend(q, k, v):
            kc = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, 1)
            vc = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, 1)
            out = cached_attention_reference(q, kc, vc, q_slots, kv_valid, sm_scale=cfg.head_dim ** -0.5)
            return out, (kc, vc)

        x, (kc, vc) = _attention_block(x, p, lp, cfg, ctx, attend)
        return _mlp_block(x, p, lp, cfg, ctx), (kc, vc)

    x, (k_new, v_new) = jax.lax.scan(body, x, (params["model"]["layers"], _layer_lora(lora),
                                               cache["k"], cache["v"]))
    x = O.rms_norm(x[:, -1:], params["model"]["norm"]["weight"], eps=cfg.rms_norm_eps, ops=ops)
    head = lm_head(params, cfg)
    logits = jnp.einsum("btd,vd->btv", x, head.astype(x.dtype), preferred_element_type=jnp.float32)
    return logits[:, 0], {"k": k_new, "v": v_new}


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Forward FLOPs per token: 2 * matmul params + causal attention (half the T x T scores)."""
    D, F, L, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    mm = L * (D * q + 2 * D * kv + q * D + 3 * D * F) + cfg.vocab_size * D
    attn = L * 2 * 2 * q * seq_len / 2
    return 2 * mm + attn


class LlamaForCausalLM:
    """A thin Flax (linen) module over ``forward``, for Flax programs that embed the model.

    ``module.init(key, input_ids)`` creates the parameters under ``{"params": {"model": ...}}`` with the same
    tree as ``init_params``; ``module.apply(variables, input_ids, positions=..., segment_ids=...)`` runs
    ``forward``. Loaded weights plug in as ``{"params": params}``.
    """

    def __new__(cls, config: LlamaConfig, **forward_kwargs):
        return _flax_module()(config=config, forward_kwargs=tuple(sorted(forward_kwargs.items())))


def _flax_module():
    import flax.linen as nn

    global _FLAX_MODULE
    if _FLAX_MODULE is None:
        class _LlamaModule(nn.Module):
            config: LlamaConfig
            forward_kwargs: tuple = ()

            @nn.compact
            def __call__(self, input_ids, positions=None, segment_ids=None, lora=None):
                cfg = self.config
                tree = {}
                template = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
                for name in template:
                    tree[name] = self.param(name, lambda key, n=name: init_params(cfg, key)[n])
                return forward(tree, input_ids, cfg=cfg, positions=positions, segment_ids=segment_ids,
                               lora=lora, **dict(self.forward_kwargs))

        _FLAX_MODULE = _LlamaModule
    return _FLAX_MODULE


_FLAX_MODULE = None
