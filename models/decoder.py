"""The decoder every family shares: parameters, the pure forward, the Flax module (KV-cache
decoding on the same layers: ``decoding.py``).

A family (``models/llama.py``, ``mistral.py``, ``qwen2.py``, ``qwen3.py``, ``gemma2.py``, ``gemma3.py``,
``phi3.py``) is a config class (``models/config.py``: HF fields + ``arch()``) plus these functions, which it
re-exports; everything family-specific is read from ``cfg.arch()``. One layer::

    h = norm(x);  q, k, v = proj(h)  (fused qkv_proj: split)  [q, k = norm_head(q), norm_head(k)]
    q, k = rope(q, k)  (the layer kind's table; partial rotary rotates the leading rotary_dim dims)
    a = o_proj(attention(q, k, v; window, softcap, sm_scale))  [a = norm(a)]        x = x + a
    h = norm(x);  m = down(act(gate(h)) * up(h))  (fused gate_up_proj: split)  [m = norm(m)]  x = x + m

(brackets: Qwen3/Gemma 3 q/k norms, Gemma's "sandwich" norms). Each residual add followed by a norm
runs as one fused op (``ops.rms_norm_residual``; across layers only without remat, see
``_scan_layers``). Gemma scales the embedding by sqrt(hidden) in the activation dtype and uses
``(1 + w)`` norms; Gemma 2 softcaps attention scores and final logits.

Parameters (``docs/ARCHITECTURE.md``): a nested dict whose paths are HF safetensors names with the layer
index moved to a leading stacked axis: ``params["model"]["layers"]["self_attn"]["q_proj"]["weight"]`` has
shape ``[L, out, in]``; weights keep HF's ``[out, in]`` layout and fused HF tensors stay fused (Phi-3's
``qkv_proj``/``gate_up_proj``), so checkpoints round-trip without tables.

Layers with different attention (Gemma 2 alternates sliding/global, Gemma 3 also switches RoPE base,
Qwen2 with ``max_window_layers``): the attention op needs a static window, so each distinct layer kind is a
branch of ``lax.switch`` inside the one scanned layer, indexed by a per-layer int scanned alongside the
weights. Only RoPE + attention sit in the switch (projections, norms and MLP are shared code). Why not
scan over (local, global) groups: that needs ``num_hidden_layers % period == 0`` to be free, and Gemma 3
1B/4B/27B (26/34/62 layers, period 6) are not, so the remainder would need a sliced (copied) weight stack;
the switch runs one branch per layer, keeps one stacked weight tree for every family, and its backward
stores one shared set of residuals (``lax.cond`` merges same-shaped residuals across branches).

Dtype policy: activations run in the embedding's dtype (bf16 for training, fp32 for parity tests); matmuls
accumulate in fp32; norms and softmax compute in fp32; logits are returned in fp32.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from fastjax.models import ops as O
from jax.ad_checkpoint import checkpoint_name

from fastjax import remat

from fastjax.models.params import (  # noqa: F401  (re-exported: the family function set)
    LAYER_PREFIX,
    _set_path,
    init_params,
    layer_param_shapes,
    linear_modules,
    param_shapes,
    stack_layers,
    unstack_layers,
)


def lm_head(params: Mapping, cfg) -> jax.Array:
    """The output projection ``[V, D]`` (the embedding when tied)."""
    if cfg.tie_word_embeddings:
        return params["model"]["embed_tokens"]["weight"]
    return params["lm_head"]["weight"]


def final_logit_softcap(cfg) -> float | None:
    """``c`` of the final ``c * tanh(logits / c)`` (Gemma 2), else None. ``forward`` applies it to logits;
    a loss computed from ``return_hidden=True`` must pass it to ``ops.cross_entropy(softcap=...)``."""
    return cfg.arch().final_softcap


# --------------------------------------------------------------------------------------------------------------
# One layer
# --------------------------------------------------------------------------------------------------------------


def _proj(h, p, lp, module: str, name: str, ctx) -> jax.Array:
    mod = p[module][name]
    lora = None if lp is None else lp.get(module, {}).get(name)
    rng = None
    if lora is not None and ctx["dropout_rng"] is not None:
        rng = jax.random.fold_in(
            ctx["dropout_rng"], zlib.crc32(f"{module}.{name}".encode()) % (2**31)
        )
    with jax.named_scope(name):  # e.g. "q_proj": the profile's name for this projection's kernels
        return O.linear(
            h,
            mod["weight"],
            bias=mod.get("bias"),
            lora=lora,
            lora_scale=ctx["lora_scale"],
            dropout_rng=rng,
            lora_dropout=ctx["lora_dropout"],
            ops=ctx["ops"],
        )


def _norm(x, w, cfg, ctx):
    return O.rms_norm(x, w, eps=cfg.rms_norm_eps, offset=ctx["arch"].norm_offset, ops=ctx["ops"])


def _add_norm(x, branch, w, cfg, ctx):
    """``(s, norm(s))`` for ``s = x + branch``, one fused op (each residual add feeding a norm)."""
    return O.rms_norm_residual(
        branch, x, w, eps=cfg.rms_norm_eps, offset=ctx["arch"].norm_offset, ops=ctx["ops"]
    )


def _segment_max_positions(positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """``[B, T]``: the largest position in each token's (row, segment)."""
    B, T = positions.shape
    ids = (jnp.arange(B)[:, None] * (T + 1) + jnp.clip(segment_ids, 0, T)).reshape(-1)
    seg_max = jax.ops.segment_max(positions.reshape(-1), ids, num_segments=B * (T + 1))
    return seg_max[ids].reshape(B, T)


def _rope_tables(arch, positions, segment_ids) -> list[tuple]:
    """Per layer kind: (inv_freq, long_inv_freq | None, use_long [B, T] | None, attention_scaling,
    rotary_dim).

    Longrope uses its long table for a sequence whose length (largest position + 1) exceeds
    ``original_max_position_embeddings``. transformers decides once per call from ``max(position_ids)``
    over the whole batch; here it is decided per sequence (per packed segment; per row when decoding,
    where the call's positions are the new tokens' ones, as in transformers), so a sequence gets the
    same result as transformers running it alone, whatever else is in the batch or the packed row.
    """
    tables = []
    for kind in arch.kinds:
        inv, long_inv, scaling = kind.rope.inv_freqs()
        use_long = None
        if long_inv is not None:
            use_long = (
                _segment_max_positions(positions, segment_ids) + 1
                > kind.rope.original_max_position_embeddings
            )
        tables.append((inv, long_inv, use_long, scaling, kind.rope.rotary_dim))
    return tables


def _rope(q, k, positions, table, ops):
    inv_freq, long_inv_freq, use_long, scaling, rd = table

    def rotate(inv):
        if rd == q.shape[-1]:
            return O.rope(q, k, positions, inv, attention_scaling=scaling, ops=ops)
        qr, kr = O.rope(
            q[..., :rd], k[..., :rd], positions, inv, attention_scaling=scaling, ops=ops
        )
        return jnp.concatenate([qr, q[..., rd:]], axis=-1), jnp.concatenate(
            [kr, k[..., rd:]], axis=-1
        )

    if long_inv_freq is None:
        return rotate(inv_freq)
    (qs, ks), (ql, kl) = rotate(inv_freq), rotate(long_inv_freq)
    pick = use_long[:, :, None, None]
    return jnp.where(pick, ql, qs), jnp.where(pick, kl, ks)


def _by_kind(arch, kind_idx, fn, *args):
    """``fn(kind_index, *args)`` for this layer's kind: a plain call when every layer is alike, else a
    ``lax.switch`` over the kinds (each branch sees its window and RoPE table as static values)."""
    if len(arch.kinds) == 1:
        return fn(0, *args)
    return jax.lax.switch(
        kind_idx, [functools.partial(fn, i) for i in range(len(arch.kinds))], *args
    )


def _layer(x, h, p, lp, kind_idx, cfg, ctx, core):
    """One decoder layer on the residual stream ``x``; ``h = input_layernorm(x)`` or None (computed
    here).

    Returns ``(x, m, extra)``: the layer's output is ``x + m``, left to the caller so that it can
    fuse the add with the next norm (``_scan_layers``). ``core(kind, q, k, v)`` runs the attention
    and returns ``(attn [B, T, H, hd], extra)``.
    """
    arch = ctx["arch"]
    B, T, _ = x.shape
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if h is None:
        h = _norm(x, p["input_layernorm"]["weight"], cfg, ctx)
    if arch.fused_qkv:
        qkv = _proj(h, p, lp, "self_attn", "qkv_proj", ctx)
        q, k, v = jnp.split(qkv, [H * hd, (H + KV) * hd], axis=-1)
    else:
        q, k, v = (_proj(h, p, lp, "self_attn", n, ctx) for n in ("q_proj", "k_proj", "v_proj"))
    q, k, v = q.reshape(B, T, H, hd), k.reshape(B, T, KV, hd), v.reshape(B, T, KV, hd)
    if arch.qk_norm:
        q = _norm(q, p["self_attn"]["q_norm"]["weight"], cfg, ctx)
        k = _norm(k, p["self_attn"]["k_norm"]["weight"], cfg, ctx)

    def attend(i, q, k, v):
        q, k = _rope(q, k, ctx["positions"], ctx["rope_tables"][i], ctx["ops"])
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
        return core(arch.kinds[i], q, k, v)

    a, extra = _by_kind(arch, kind_idx, attend, q, k, v)
    a = checkpoint_name(a.reshape(B, T, H * hd), "attn_out")
    a = _proj(a, p, lp, "self_attn", "o_proj", ctx)
    if arch.sandwich_norms:  # Gemma: the post-norm is on the branch, before the add
        a = _norm(a, p["post_attention_layernorm"]["weight"], cfg, ctx)
    norm_name = "pre_feedforward_layernorm" if arch.sandwich_norms else "post_attention_layernorm"
    x, h = _add_norm(x, a, p[norm_name]["weight"], cfg, ctx)
    chunk = ctx.get("mlp_chunk_size")
    m = _mlp(h, p, lp, ctx) if not chunk or T <= chunk else _chunked_mlp(h, p, lp, ctx, chunk)
    if arch.sandwich_norms:
        m = _norm(m, p["post_feedforward_layernorm"]["weight"], cfg, ctx)
    return x, m, extra


def _mlp(h, p, lp, ctx):
    if ctx["arch"].fused_gate_up:
        gate, up = jnp.split(
            checkpoint_name(_proj(h, p, lp, "mlp", "gate_up_proj", ctx), "mlp_up"), 2, -1
        )
    else:
        gate = checkpoint_name(_proj(h, p, lp, "mlp", "gate_proj", ctx), "mlp_up")
        up = checkpoint_name(_proj(h, p, lp, "mlp", "up_proj", ctx), "mlp_up")
    m = O.glu(gate, up, activation=ctx["arch"].activation, ops=ctx["ops"])
    return checkpoint_name(_proj(m, p, lp, "mlp", "down_proj", ctx), "mlp_out")


def _chunked_mlp(h, p, lp, ctx, chunk: int):
    """The MLP over slices of ``chunk`` tokens of every row, one slice at a time, each slice
    rematerialized in the backward: the ``[tokens, intermediate]`` activations (gate, up, their product
    and the gradients of each; 3.5 GiB apiece for Llama-3-8B at 128k tokens) exist for one slice only.
    Slices keep the batch axis in front (``[B, chunk, D]``), so under a mesh the rows stay sharded and
    the GLU kernel runs per shard. The math is per token, so the result equals the unchunked MLP (LoRA
    dropout draws per slice)."""
    B, T, D = h.shape
    pad = -T % chunk
    slices = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, -1, chunk, D).swapaxes(0, 1)
    rng = ctx["dropout_rng"]

    @jax.checkpoint
    def one(args):
        h_c, i = args
        c = ctx if rng is None else dict(ctx, dropout_rng=jax.random.fold_in(rng, i))
        return _mlp(h_c, p, lp, c)

    out = jax.lax.map(one, (slices, jnp.arange(slices.shape[0])))  # [n, B, chunk, D]
    return out.swapaxes(0, 1).reshape(B, -1, out.shape[-1])[:, :T]


def _unrolled_scan(body, carry, xs):
    """``lax.scan(body, carry, xs)`` as a Python loop: the backward's activations stay one buffer per
    layer instead of zero-filled ``[L, ...]`` stacks written and read slice by slice (87 ms of a 577 ms
    remat-none Llama-3-8B step on the H200, train_step_h200.md session 16); compiles L times longer."""
    n = jax.tree.leaves(xs)[0].shape[0]
    ys = []
    for i in range(n):
        carry, y = body(carry, jax.tree.map(lambda a: a[i], xs))
        ys.append(y)
    if all(y is None for y in ys):
        return carry, None
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _scan_layers(layer, x, xs, params, cfg, ctx, *, remat_policy: str = "none", scan: bool = True):
    """``lax.scan`` of ``layer(x, h, xs_i) -> (x, m, ys_i)`` (see ``_layer``) over the stacked
    layers; returns (the final normed hidden states ``[B, T, D]``, the stacked ``ys``). ``scan=False``
    runs the same body as a Python loop (``_unrolled_scan``).

    Without remat, each layer's closing ``x + m`` runs fused with the norm that follows it (the
    next layer's input_layernorm; the final norm after the last layer), so the scan carries the
    stream and its normed value. A checkpointed body saves its whole carry, so under a remat policy
    that carry would cost 2·T·D a layer instead of T·D (vjp residuals of a 4-layer T=1024 D=256
    model: 18 vs 14 MiB under ``full``, 30 vs 26 under ``save_qkv_attn``): there the carry is the
    stream alone and the add and the norm run separately. Without remat the normed value is saved
    anyway (the q/k/v projections' backward reads it), so fusing costs no memory (66.1 MiB either
    way). ``layer_input`` names the stream entering a layer either way.
    """
    w_in = params["model"]["layers"]["input_layernorm"]["weight"]
    w_final = params["model"]["norm"]["weight"]
    run = jax.lax.scan if scan else _unrolled_scan
    if remat_policy != "none":

        def body(x, xs):
            x, m, ys = layer(checkpoint_name(x, "layer_input"), None, xs)
            return x + m, ys

        x, ys = run(remat.wrap(body, remat_policy, in_scan=scan), x, xs)
        return _norm(x, w_final, cfg, ctx), ys

    def fused_body(carry, xs):
        (x, h), (w_next, xs) = carry, xs
        x, m, ys = layer(checkpoint_name(x, "layer_input"), h, xs)
        return _add_norm(x, m, w_next, cfg, ctx), ys

    # Layer i's closing add feeds layer i+1's input norm: scan the weights shifted by one.
    w_next = jnp.concatenate([w_in[1:], w_final[None].astype(w_in.dtype)])
    (_, h), ys = run(fused_body, (x, _norm(x, w_in[0], cfg, ctx)), (w_next, xs))
    return h, ys


def _layer_lora(lora: Mapping | None) -> Mapping | None:
    if lora is None:
        return None
    return lora.get("model", {}).get("layers")


def _embed(params, input_ids, arch, inputs_embeds=None):
    """The embedded rows ``[B, T, D]``: a lookup of ``input_ids``, or ``inputs_embeds`` (rows of the
    embedding table gathered elsewhere, e.g. on the host) with the same scaling."""
    with jax.named_scope("embed"):
        if inputs_embeds is not None:
            if inputs_embeds.ndim != 3:
                raise ValueError(
                    f"inputs_embeds must be [batch, tokens, hidden], got {inputs_embeds.shape=}"
                )
            x = inputs_embeds
        else:
            if input_ids is None or input_ids.ndim != 2:
                shape = None if input_ids is None else input_ids.shape
                raise ValueError(f"input_ids must be [batch, tokens], got {shape}")
            x = jnp.take(params["model"]["embed_tokens"]["weight"], input_ids, axis=0)
        if arch.embed_scale is not None:  # HF: embed * tensor(sqrt(D)).to(weight dtype)
            x = x * jnp.asarray(arch.embed_scale, x.dtype)
    return x


def _logits(x, params, cfg, arch):
    head = lm_head(params, cfg)
    logits = jnp.einsum("btd,vd->btv", x, head.astype(x.dtype), preferred_element_type=jnp.float32)
    if arch.final_softcap is not None:
        logits = arch.final_softcap * jnp.tanh(logits / arch.final_softcap)
    return logits


def _context(cfg, arch, positions, segment_ids, ops, lora_scale, lora_dropout, mlp_chunk_size=None):
    if mlp_chunk_size is not None and mlp_chunk_size < 1:
        raise ValueError(f"{mlp_chunk_size=} must be a positive number of tokens (or None)")
    return {
        "arch": arch,
        "positions": positions,
        "rope_tables": _rope_tables(arch, positions, segment_ids),
        "ops": ops,
        "lora_scale": lora_scale,
        "lora_dropout": lora_dropout,
        "dropout_rng": None,
        "mlp_chunk_size": mlp_chunk_size,
    }


# --------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------


def forward(
    params: Mapping,
    input_ids: jax.Array | None,
    *,
    cfg,
    inputs_embeds: jax.Array | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    lora: Mapping | None = None,
    lora_scale: float = 1.0,
    lora_dropout: float = 0.0,
    dropout_rng: jax.Array | None = None,
    remat_policy: str = "none",
    ops: O.Ops | None = None,
    return_hidden: bool = False,
    mlp_chunk_size: int | None = None,
    scan_layers: bool = True,
) -> jax.Array:
    """Logits ``[B, T, V]`` (fp32, final softcap applied), or the final normed hidden states ``[B, T, D]``
    with ``return_hidden``.

    ``positions``/``segment_ids`` ``[B, T]``: packed rows restart positions at 0 per segment and a token
    attends only to earlier tokens of its own segment (id 0 = padding). ``lora`` is an adapter tree
    (``fastjax.lora``) added to every linear it names, scaled by ``lora_scale``. ``mlp_chunk_size``
    (tokens per row): run each MLP over slices of that many tokens of every row (long-context
    training: see ``_chunked_mlp``). ``scan_layers=False``: layers as a Python loop (``_unrolled_scan``).
    ``inputs_embeds`` ``[B, T, D]`` replaces ``input_ids`` (pass None): rows of the embedding table
    gathered elsewhere (the trainer gathers on the host when the table lives there), scaled as a lookup is.
    """
    ops = ops or O.Ops()
    arch = cfg.arch()
    x = _embed(params, input_ids, arch, inputs_embeds)
    B, T = x.shape[:2]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    # No segment ids = one sequence per row (right padding needs none under causal masking): attention then
    # takes the cuDNN path on a GPU (2.2x the Pallas kernel at T=2048, benchmarks/results/attention_h200.md).
    attn_segment_ids = segment_ids
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    ctx = _context(cfg, arch, positions, segment_ids, ops, lora_scale, lora_dropout, mlp_chunk_size)

    def core(kind, q, k, v):
        out = O.attention(
            q,
            k,
            v,
            segment_ids=attn_segment_ids,
            causal=True,
            window=kind.window,
            softcap=arch.attn_softcap,
            sm_scale=arch.sm_scale,
            ops=ops,
        )
        return out, None

    def layer(x, h, xs):
        p, lp, rng, kind_idx = xs
        x, m, _ = _layer(x, h, p, lp, kind_idx, cfg, dict(ctx, dropout_rng=rng), core)
        return x, m, None

    rngs = None if dropout_rng is None else jax.random.split(dropout_rng, cfg.num_hidden_layers)
    kind_ids = jnp.asarray(arch.layer_kind, jnp.int32)
    xs = (params["model"]["layers"], _layer_lora(lora), rngs, kind_ids)
    x, _ = _scan_layers(layer, x, xs, params, cfg, ctx, remat_policy=remat_policy, scan=scan_layers)
    if return_hidden:
        return x
    return _logits(x, params, cfg, arch)


def flops_per_token(cfg, seq_len: int) -> float:
    """Forward FLOPs per token: 2 * matmul params + causal attention (half the T x T scores, or the
    window's share of them on sliding-window layers)."""
    D, F, L, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    mm = L * (D * q + 2 * D * kv + q * D + 3 * D * F) + cfg.vocab_size * D
    arch = cfg.arch()
    attn = 0.0
    for i in arch.layer_kind:
        w = arch.kinds[i].window
        keys = seq_len / 2 if w is None or w >= seq_len else w * (1 - w / (2 * seq_len))
        attn += 2 * 2 * q * keys
    return 2 * mm + attn


# --------------------------------------------------------------------------------------------------------------
# Flax
# --------------------------------------------------------------------------------------------------------------


class CausalLM:
    """A thin Flax (linen) module over ``forward``, for Flax programs that embed the model.

    ``module.init(key, input_ids)`` creates the parameters under ``{"params": {"model": ...}}`` with the same
    tree as ``init_params``; ``module.apply(variables, input_ids, positions=..., segment_ids=...)`` runs
    ``forward``. Loaded weights plug in as ``{"params": params}``.
    """

    def __new__(cls, config, **forward_kwargs):
        return _flax_module()(config=config, forward_kwargs=tuple(sorted(forward_kwargs.items())))


@functools.cache
def _flax_module():
    import flax.linen as nn

    class _DecoderModule(nn.Module):
        config: Any
        forward_kwargs: tuple = ()

        @nn.compact
        def __call__(self, input_ids, positions=None, segment_ids=None, lora=None):
            cfg = self.config
            tree = {}
            template = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
            for name in template:
                tree[name] = self.param(name, lambda key, n=name: init_params(cfg, key)[n])
            return forward(
                tree,
                input_ids,
                cfg=cfg,
                positions=positions,
                segment_ids=segment_ids,
                lora=lora,
                **dict(self.forward_kwargs),
            )

    return _DecoderModule
