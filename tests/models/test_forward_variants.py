"""Forward variants that must not change the math, against the plain model (fp32, LoRA on every linear).

``mlp_chunk_size=c``: the MLP run over c-token slices equals the unchunked model, logits and gradients
(chunk sizes that do and do not divide B*T; under every remat preset), and the slices really bound the MLP
activations (compiled temp memory of a long row). ``scan_layers=False``: the layers as a Python loop equal
the scanned model (remat presets, Gemma 2's alternating local/global layers), and the program really has no
layer loop (the scan's stacked activation buffers are gone).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from fastjax import lora as L
from fastjax.models import decoder, gemma2, llama

TOL = {"logits": 1e-5, "grads": 1e-5}  # fp32, relative to the largest value
LLAMA = llama.LlamaConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _setup(cfg, seed, B, T):
    k = jax.random.split(jax.random.key(seed), 4)
    params = decoder.init_params(cfg, k[0], std=0.2)
    lora = L.init_lora(params, L.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(k[1], x.shape), lora)  # B != 0
    ids = jax.random.randint(k[2], (B, T), 0, cfg.vocab_size)
    cot = jax.random.normal(k[3], (B, T, cfg.vocab_size))
    return params, lora, ids, cot


@pytest.mark.parametrize("chunk", [7, 12, 1000], ids=["ragged", "divides", "longer-than-rows"])
@pytest.mark.parametrize("remat_policy", ["none", "full", "save_qkv_attn"])
def test_chunked_mlp_equals_unchunked(chunk, remat_policy):
    params, lora, ids, cot = _setup(LLAMA, 1, 2, 24)

    def run(c):
        f = lambda lo: llama.forward(
            params, ids, cfg=LLAMA, lora=lo, mlp_chunk_size=c, remat_policy=remat_policy
        )
        out, vjp = jax.vjp(f, lora)
        return out, vjp(cot)[0]

    (want, gw), (got, gg) = run(None), run(chunk)
    assert _rel(got, want) < TOL["logits"]
    for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gw), strict=True):
        assert _rel(a, b) < TOL["grads"]


def test_chunked_mlp_gemma2_geglu_sandwich_norms():
    cfg = gemma2.Gemma2Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        max_position_embeddings=512,
    )
    params, lora, ids, cot = _setup(cfg, 2, 1, 37)
    f = lambda c: jax.vjp(
        lambda lo: gemma2.forward(params, ids, cfg=cfg, lora=lo, mlp_chunk_size=c), lora
    )
    (want, vw), (got, vg) = f(None), f(10)
    assert _rel(got, want) < TOL["logits"]
    for a, b in zip(jax.tree.leaves(vg(cot)[0]), jax.tree.leaves(vw(cot)[0]), strict=True):
        assert _rel(a, b) < TOL["grads"]


def test_chunks_bound_the_mlp_activation_memory():
    """One long row, full remat: the compiled temp memory of forward+backward shrinks by about the
    [tokens, intermediate] activations when the MLP runs in slices."""
    cfg = llama.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=16384,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
    )
    params = jax.eval_shape(lambda k: decoder.init_params(cfg, k), jax.random.key(0))
    lora = jax.eval_shape(
        lambda p: L.init_lora(p, L.LoraConfig(r=4, target_modules="all-linear")), params
    )
    ids = jax.ShapeDtypeStruct((1, 1024), jnp.int32)  # scores [2, T, T]: small next to [T, F]

    def temp(chunk):
        def loss(lo, p, x):
            h = llama.forward(
                p,
                x,
                cfg=cfg,
                lora=lo,
                remat_policy="full",
                return_hidden=True,
                mlp_chunk_size=chunk,
            )
            return jnp.sum(h.astype(jnp.float32) ** 2)

        c = jax.jit(jax.grad(loss)).lower(lora, params, ids).compile()
        return c.memory_analysis().temp_size_in_bytes

    full, sliced = temp(None), temp(256)
    print(f"temp MiB: unchunked {full / 2**20:.0f}, 256-token slices {sliced / 2**20:.0f}")
    one_activation = 1024 * 16384 * 4  # [T, F] fp32: 64 MiB
    assert full - sliced > 2 * one_activation, (full / 2**20, sliced / 2**20)


# --- scan_layers=False ------------------------------------------------------------------------------

GEMMA2 = gemma2.Gemma2Config(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=8,
    max_position_embeddings=512,
)


def _vjp(fam, cfg, params, lora, ids, cot, **kw):
    out, vjp = jax.vjp(lambda lo: fam.forward(params, ids, cfg=cfg, lora=lo, **kw), lora)
    return out, vjp(cot)[0]


@pytest.mark.parametrize(
    "fam,cfg,remat_policy",
    [
        (llama, LLAMA, "none"),
        (llama, LLAMA, "full"),
        (llama, LLAMA, "save_qkv_attn"),
        (gemma2, GEMMA2, "none"),  # local / global layers: lax.switch on the per-layer kind
    ],
    ids=["llama-none", "llama-full", "llama-save_qkv_attn", "gemma2-none"],
)
def test_unrolled_equals_scanned(fam, cfg, remat_policy):
    params, lora, ids, cot = _setup(cfg, 3, 2, 21)
    segs = jnp.asarray([[1] * 9 + [2] * 12, [1] * 17 + [0] * 4], jnp.int32)  # packed + padding
    pos = jnp.asarray([list(range(9)) + list(range(12)), list(range(17)) + [0] * 4], jnp.int32)
    kw = dict(remat_policy=remat_policy, segment_ids=segs, positions=pos)
    want, gw = _vjp(fam, cfg, params, lora, ids, cot, **kw)
    got, gg = _vjp(fam, cfg, params, lora, ids, cot, scan_layers=False, **kw)
    assert _rel(got, want) < TOL["logits"]
    for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gw), strict=True):
        assert _rel(a, b) < TOL["grads"]
    # The last layer runs too: with its output projections zeroed (an identity layer; LoRA off) the
    # logits change, so a loop that skipped layers would fail the comparison above.
    layers = params["model"]["layers"]
    cut = {
        name: {
            k: ({"weight": v["weight"].at[-1].set(0.0)} if k in ("o_proj", "down_proj") else v)
            for k, v in sub.items()
        }
        if name in ("self_attn", "mlp")
        else sub
        for name, sub in layers.items()
    }
    cut_params = dict(params, model=dict(params["model"], layers=cut))
    out_cut = fam.forward(cut_params, ids, cfg=cfg, scan_layers=False, **kw)
    out_full = fam.forward(params, ids, cfg=cfg, scan_layers=False, **kw)
    assert _rel(out_cut, out_full) > 1e-3


def test_unrolled_program_has_no_layer_loop():
    params, lora, ids, cot = _setup(LLAMA, 4, 1, 16)

    def hlo(scan_layers):
        def loss(lo):
            out = llama.forward(params, ids, cfg=LLAMA, lora=lo, scan_layers=scan_layers)
            return jnp.sum(out * cot)

        return jax.jit(jax.grad(loss)).lower(lora).compile().as_text()

    scanned, unrolled = hlo(True), hlo(False)
    assert " while(" in scanned
    assert " while(" not in unrolled
    assert unrolled.count("dynamic-update-slice(") < scanned.count("dynamic-update-slice(")


def _small_long_row():
    cfg = llama.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
    )
    params = jax.eval_shape(lambda k: decoder.init_params(cfg, k), jax.random.key(0))
    lora = jax.eval_shape(
        lambda p: L.init_lora(p, L.LoraConfig(r=4, target_modules="all-linear")), params
    )
    return cfg, params, lora, jax.ShapeDtypeStruct((1, 512), jnp.int32)


def _grad_fn(cfg, remat_policy, scan_layers):
    def loss(lo, p, x):
        h = llama.forward(
            p,
            x,
            cfg=cfg,
            lora=lo,
            remat_policy=remat_policy,
            return_hidden=True,
            scan_layers=scan_layers,
        )
        return jnp.sum(h.astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss))


def _remat_eqns(jaxpr):
    for e in jaxpr.eqns:
        if e.primitive.name in ("checkpoint", "remat", "remat2"):
            yield e
        for sub in jax_core.jaxprs_in_params(e.params):
            yield from _remat_eqns(sub)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_full_remat_recomputes_the_layers(scan_layers):
    """Under ``full`` the backward recomputes each layer: more matmuls in the compiled program than
    ``none``, and the compiled temp memory falls far below it with the layers scanned. In a Python loop
    the checkpoint must keep its CSE barrier (``prevent_cse``): without it XLA:GPU merged the
    recomputation back into the forward (an unrolled Llama-3-8B ``full`` step peaked at 59.05 GiB on the
    H200, as ``none`` did). XLA:CPU neither merges nor delays the recomputation there, so the unrolled
    case checks the barrier itself; the GPU run checks its peak."""
    cfg, params, lora, ids = _small_long_row()
    compiled = {
        r: _grad_fn(cfg, r, scan_layers).lower(lora, params, ids).compile()
        for r in ("none", "full")
    }
    dots = {r: c.as_text().count(" dot(") for r, c in compiled.items()}
    assert dots["full"] > dots["none"], dots
    eqns = list(
        _remat_eqns(jax.make_jaxpr(_grad_fn(cfg, "full", scan_layers))(lora, params, ids).jaxpr)
    )
    assert eqns and all(e.params["prevent_cse"] is (not scan_layers) for e in eqns)
    if scan_layers:
        temp = {r: c.memory_analysis().temp_size_in_bytes for r, c in compiled.items()}
        one_layer_mlp = 512 * 2048 * 4 * 2  # gate and up, [T, F] fp32: 8 MiB
        assert temp["none"] - temp["full"] > 2 * one_layer_mlp, temp
