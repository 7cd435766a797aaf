"""Checkpoint loading errors: each bad input gives one clear error naming the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jax.numpy as jnp

import fastjax
from fastjax.loading import CheckpointError
from fastjax.models import llama, registry


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"falcon.*supports: .*llama"):
        fastjax.from_pretrained(tmp_path)


def test_unsupported_rope_scaling_names_it():
    with pytest.raises(ValueError, match="yarn"):
        llama.LlamaConfig(
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            rope_scaling={"rope_type": "yarn", "factor": 2.0},
        )


def test_config_roundtrip_both_rope_styles():
    base = dict(
        model_type="llama",
        vocab_size=10,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    v4 = registry.config_from_hf(
        dict(base, rope_theta=5e5, rope_scaling={"rope_type": "linear", "factor": 2.0})
    )
    v5 = registry.config_from_hf(
        dict(base, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})
    )
    assert (
        v4 == v5
        and v4.rope_theta == 5e5
        and v4.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
    )
    assert registry.config_from_hf(v4.to_hf()) == v4
    hash(v4)  # static jit argument


def test_truncated_shard(tiny_llama_dir):
    ckpt, _ = tiny_llama_dir(seed=0)
    shard = ckpt / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        fastjax.from_pretrained(ckpt, dtype=jnp.float32)


def test_missing_shard_and_missing_key(tiny_llama_dir, tmp_path):
    ckpt, _ = tiny_llama_dir(seed=1)
    params, cfg, _ = fastjax.from_pretrained(ckpt, dtype=jnp.float32)
    out = fastjax.save_pretrained(params, cfg, None, tmp_path / "sharded", max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (out / victim).rename(out / "moved.bin")
    with pytest.raises(CheckpointError, match=f"shard .*{victim}.* is missing"):
        fastjax.from_pretrained(out, dtype=jnp.float32)
    (out / "moved.bin").rename(out / victim)
    name = "model.layers.1.mlp.up_proj.weight"
    del index["weight_map"][name]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"index.json: missing tensor {name}"):
        fastjax.from_pretrained(out, dtype=jnp.float32)
    # the index names a shard that does not hold the tensor
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(f for f in shards if name not in _keys(out / f))
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=rf"{name}: the index names .* but that shard lacks it"
    ):
        fastjax.from_pretrained(out, dtype=jnp.float32)


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return set(f.keys())


def test_shape_mismatch_names_tensor(tiny_llama_dir):
    ckpt, _ = tiny_llama_dir(seed=2)
    cfg_path = ckpt / "config.json"
    config = json.loads(cfg_path.read_text())
    config["intermediate_size"] = 100
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"mlp\.\w+_proj\.weight in .*model\.safetensors: shape"
    ):
        fastjax.from_pretrained(ckpt, dtype=jnp.float32)


def test_max_seq_length_is_recorded_on_the_tokenizer(tiny_llama_dir, tmp_path):
    from fastjax.tokenizer import Tokenizer

    ckpt, _ = tiny_llama_dir(seed=4)
    params, cfg, _ = fastjax.from_pretrained(ckpt, dtype=jnp.float32)
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}
    tok = Tokenizer(BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>")), eos_token="</s>")
    fastjax.save_pretrained(params, cfg, tok, ckpt)
    _, _, tok = fastjax.from_pretrained(ckpt, dtype=jnp.float32, max_seq_length=48)
    assert tok.model_max_length == 48


def test_offline_repo_id_says_pass_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local directory"):
        fastjax.from_pretrained("no-such-org/no-such-model")


def test_prompt_longer_than_max_seq_length(tiny_llama_dir):
    ckpt, _ = tiny_llama_dir(seed=3)
    params, cfg, _ = fastjax.from_pretrained(ckpt, dtype=jnp.float32)
    with pytest.raises(ValueError, match="exceeds max_seq_length=16"):
        fastjax.generate(params, cfg, [list(range(3, 15))], max_new_tokens=8, max_seq_length=16)


def test_save_is_atomic_and_replaces(tiny_llama_dir, tmp_path, monkeypatch):
    ckpt, _ = tiny_llama_dir(seed=4)
    params, cfg, _ = fastjax.from_pretrained(ckpt, dtype=jnp.float32)
    out = tmp_path / "out"
    fastjax.save_pretrained(params, cfg, None, out, max_shard_size=20_000)
    first = sorted(p.name for p in out.iterdir())
    from fastjax import loading

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(loading, "write_config_files", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        fastjax.save_pretrained(params, cfg, None, out)
    assert sorted(p.name for p in out.iterdir()) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    monkeypatch.undo()
    fastjax.save_pretrained(params, cfg, None, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    reloaded, _, _ = fastjax.from_pretrained(out, dtype=jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(reloaded["model"]["norm"]["weight"]),
        np.asarray(params["model"]["norm"]["weight"]),
    )
