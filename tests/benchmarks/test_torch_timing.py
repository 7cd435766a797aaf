"""The torch systems' shared timing loop (``harness.time_torch_steps``) trains the way HF's Trainer does."""

from __future__ import annotations

import contextlib

import pytest

from benchmarks import harness

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_timing_loop_trains_in_training_mode_with_checkpointing():
    """A model handed over in eval mode (``from_pretrained``'s) must still checkpoint its layers:
    transformers checkpoints a layer only while the model is training. Without ``model.train()`` the
    HF+PEFT QLoRA rows of 2026-12-02 ran without checkpointing (97 GiB at Llama-3-8B 4 x 2048)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    for layer in model.model.layers:
        inner = layer._gradient_checkpointing_func

        def counted(*args, _inner=inner, **kwargs):
            calls.append(1)
            return _inner(*args, **kwargs)

        layer._gradient_checkpointing_func = counted
    model.eval()
    ids = torch.randint(0, 64, (2, 16))
    dt, loss = harness.time_torch_steps(
        model, ids, warmup=1, steps=2, autocast=contextlib.nullcontext()
    )
    assert model.training
    assert len(calls) == 3 * cfg.num_hidden_layers  # every layer, every step
    assert dt > 0 and loss == loss
