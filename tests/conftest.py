"""Shared test fixtures: tiny random HF Llama checkpoints built with transformers (the test oracle)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU; this conftest defaults JAX_PLATFORMS to cpu, so on a GPU machine "
        "run: JAX_PLATFORMS=cuda,cpu pytest -m gpu"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """Factory: build a tiny random fp32 ``LlamaForCausalLM``, save it, return (dir, torch model)."""
    import torch
    import transformers

    def make(seed: int = 0, **overrides):
        kw = dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=131,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )
        kw.update(overrides)
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).float().eval()
        out = tmp_path / f"llama-{seed}-{abs(hash(tuple(sorted(map(str, overrides.items())))))}"
        model.save_pretrained(out)
        return out, model

    return make
