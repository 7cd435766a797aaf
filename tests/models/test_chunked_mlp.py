"""``forward(..., mlp_chunk_size=c)``: the MLP run over c-token slices equals the unchunked model, logits
and gradients (fp32; LoRA on every linear; chunk sizes that do and do not divide B*T; under every remat
preset), and the slices really bound the MLP activations (compiled temp memory of a long row)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
