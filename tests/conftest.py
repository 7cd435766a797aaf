"""Shared test fixtures: tiny random HF Llama checkpoints built with transformers (the test oracle)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On the CPU backend the tests' programs are tiny and compile far longer than they run, and most of
# the compile is LLVM: at -O0 test_unrolled_equals_scanned takes 80 s instead of 139 on 2 cores, and
# the whole suite 1,366 s instead of 1,689. The tests that read the optimized HLO (matmul counts, the
# layer loop, remat's recompute) pass unchanged. Child processes inherit it through XLA_FLAGS; a test
# whose tolerance sits at the rounding level compiles at the default level itself (test_optim).
if os.environ["JAX_PLATFORMS"] == "cpu":
    from benchmarks.harness import add_xla_flag  # noqa: E402  (imports no jax)

    add_xla_flag("--xla_backend_optimization_level=0")

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
