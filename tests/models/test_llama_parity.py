"""Llama parity with transformers: logits, packing, save -> transformers reload, generation."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

import fastjax
from fastjax.models import llama

import torch
import transformers

LOGITS_ATOL = 1e-4  # fp32 end to end

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

CASES = [
    dict(num_key_value_heads=1, tie_word_embeddings=True),
    dict(num_key_value_heads=2, tie_word_embeddings=False, rope_scaling=LLAMA3_SCALING),
    dict(num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True),
    dict(
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        mlp_bias=True,
    ),
]


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.numpy()


@pytest.mark.parametrize(
    "overrides",
    CASES,
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items() if k != "rope_scaling"),
)
def test_logits_match_transformers_and_roundtrip(tiny_llama_dir, tmp_path, overrides):
    ckpt, model = tiny_llama_dir(seed=len(str(overrides)), **overrides)
    params, cfg, _ = fastjax.from_pretrained(ckpt, dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 23))
    ref = _hf_logits(model, ids)
    out = np.asarray(llama.forward(params, jnp.asarray(ids), cfg=cfg))
    np.testing.assert_allclose(out, ref, atol=LOGITS_ATOL, rtol=0)

    saved = fastjax.save_pretrained(params, cfg, None, tmp_path / "saved", max_shard_size=20_000)
    assert (saved / "model.safetensors.index.json").exists(), "small shard size must shard"
    reloaded = transformers.LlamaForCausalLM.from_pretrained(saved).float().eval()
    np.testing.assert_allclose(_hf_logits(reloaded, ids), ref, atol=LOGITS_ATOL, rtol=0)


def test_packed_row_equals_separate_sequences(tiny_llama_dir):
    ckpt, _ = tiny_llama_dir(seed=3)
    params, cfg, _ = fastjax.from_pretrained(ckpt, dtype=jnp.float32)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, cfg.vocab_size, n) for n in (7, 11, 5)]
    ids = np.concatenate(seqs)[None]
    segment_ids = np.concatenate([np.full(len(s), i + 1) for i, s in enumerate(seqs)])[None]
    positions = np.concatenate([np.arange(len(s)) for s in seqs])[None]
    packed = np.asarray(
        llama.forward(
            params,
            jnp.asarray(ids),
            cfg=cfg,
            positions=jnp.asarray(positions),
            segment_ids=jnp.asarray(segment_ids),
        )
    )[0]
    start = 0
    for s in seqs:
        alone = np.asarray(llama.forward(params, jnp.asarray(s[None]), cfg=cfg))[0]
        np.testing.assert_allclose(packed[start : start + len(s)], alone, atol=1e-5, rtol=0)
        start += len(s)


def test_greedy_generation_matches_transformers(tiny_llama_dir):
    ckpt, model = tiny_llama_dir(seed=4, num_key_value_heads=1)
    params, cfg, _ = fastjax.from_pretrained(ckpt, dtype=jnp.float32)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 12, 1)]
    ours = fastjax.generate(params, cfg, prompts, max_new_tokens=8, eos_token_id=[])
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert got == ref


def test_generation_stops_at_eos_and_samples_deterministically(tiny_llama_dir):
    ckpt, _ = tiny_llama_dir(seed=5)
    params, cfg, _ = fastjax.from_pretrained(ckpt, dtype=jnp.float32)
    prompt = [[5, 6, 7]]
    greedy = fastjax.generate(params, cfg, prompt, max_new_tokens=6, eos_token_id=[])[0]
    stop = greedy[2]
    cut = fastjax.generate(params, cfg, prompt, max_new_tokens=6, eos_token_id=stop)[0]
    assert cut == greedy[: greedy.index(stop) + 1]
    a = fastjax.generate(params, cfg, prompt, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    b = fastjax.generate(params, cfg, prompt, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    assert a == b


def test_flax_module_matches_forward(tiny_llama_dir):
    import jax

    ckpt, _ = tiny_llama_dir(seed=6)
    params, cfg, _ = fastjax.from_pretrained(ckpt, dtype=jnp.float32)
    module = llama.LlamaForCausalLM(cfg)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 9)))
    variables = module.init(jax.random.key(0), ids)
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(params)
    out = module.apply({"params": params}, ids)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(llama.forward(params, ids, cfg=cfg)), atol=1e-6
    )
