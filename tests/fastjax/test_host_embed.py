"""fastjax.host_embed: the input embedding in host memory.

The model fed gathered rows (``inputs_embeds``) equals the lookup, logits and adapter gradients, with
Gemma's embedding scale too; a LoRA run with the table on the host trains the same adapters, losses
and all, as the run with it on the device, and never hands the table to the step; loading with
``embed_on_host`` gives the same table as NumPy; tied embeddings, full fine-tuning, GRPO and bad token
ids are refused with a message naming the reason.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastjax.models import gemma2, llama
from fastjax.models.ops import Ops

import fastjax
from fastjax import host_embed
from fastjax import lora as L
from fastjax.trainer import SFTConfig, SFTTrainer

CFG = llama.LlamaConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
GEMMA = gemma2.Gemma2Config(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    sliding_window=4,
    max_position_embeddings=128,
)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("fam,cfg", [(llama, CFG), (gemma2, GEMMA)], ids=["llama", "gemma2-scaled"])
def test_inputs_embeds_equal_the_lookup(fam, cfg):
    k = jax.random.split(jax.random.key(3), 4)
    params = fam.init_params(cfg, k[0], std=0.2)
    lora = L.init_lora(params, L.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(k[1], x.shape), lora)
    ids = jax.random.randint(k[2], (2, 19), 0, cfg.vocab_size)
    cot = jax.random.normal(k[3], (2, 19, cfg.vocab_size))
    rows = host_embed.gather(np.asarray(params["model"]["embed_tokens"]["weight"]), np.asarray(ids))
    headless = host_embed.without_table(params) if not cfg.tie_word_embeddings else params

    def run(p, x, e):
        out, vjp = jax.vjp(lambda lo: fam.forward(p, x, cfg=cfg, lora=lo, inputs_embeds=e), lora)
        return out, vjp(cot)[0]

    want, gw = run(params, ids, None)
    got, gg = run(headless, None, jnp.asarray(rows))
    assert _rel(got, want) < 1e-6
    for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gw), strict=True):
        assert _rel(a, b) < 1e-6
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, tokens, hidden\]"):
        fam.forward(params, None, cfg=cfg, inputs_embeds=jnp.asarray(rows[0]))


def _examples(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(8, 24))
        out.append(
            {
                "input_ids": rng.integers(0, CFG.vocab_size, k).astype(np.int32),
                "loss_mask": np.r_[np.zeros(3, np.int32), np.ones(k - 3, np.int32)],
            }
        )
    return out


def _config(tmp_path, name):
    return SFTConfig(
        learning_rate=1e-2,
        batch_size=2,
        grad_accum_steps=2,
        max_seq_length=32,
        max_steps=4,
        remat_policy="full",
        ops=Ops.all("xla"),
        progress_bar=False,
        output_dir=str(tmp_path / name),
        save_steps=0,
    )


def test_training_with_the_table_on_the_host_matches_the_device(tmp_path):
    data = _examples(24, 1)
    params = llama.init_params(CFG, jax.random.key(0), std=0.1)
    table = np.asarray(params["model"]["embed_tokens"]["weight"])

    def train(p, name):
        lora, lcfg = L.get_peft_model(p, CFG, r=4, lora_alpha=8, target_modules="all-linear")
        lora = jax.tree.map(jnp.ones_like, lora)  # B != 0: the first steps move every adapter
        trainer = SFTTrainer(p, CFG, data, _config(tmp_path, name), lora=lora, lora_config=lcfg)
        return trainer, trainer.train()

    dev_trainer, dev = train(params, "device")
    hosted = host_embed.embed_to_host(dict(params), CFG)
    assert params["model"]["embed_tokens"]["weight"].is_deleted()  # the device copy is freed
    np.testing.assert_array_equal(host_embed.host_table(hosted), table)
    host_trainer, host = train(hosted, "host")
    assert host_trainer.frozen["model"]["embed_tokens"]["weight"] is None  # never a step argument
    batch = host_trainer.batch(0)
    assert batch["inputs_embeds"].shape == (*batch["input_ids"].shape, CFG.hidden_size)
    assert "inputs_embeds" not in dev_trainer.batch(0)
    np.testing.assert_allclose(host.losses, dev.losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(host.trainable), jax.tree.leaves(dev.trainable), strict=True):
        assert _rel(a, b) < 1e-5
    moved = max(float(jnp.max(jnp.abs(a - 1.0))) for a in jax.tree.leaves(dev.trainable))
    assert moved > 1e-3  # the comparison is of runs whose adapters moved


def test_refusals(tmp_path):
    tied = llama.LlamaConfig(**{**CFG.__dict__, "tie_word_embeddings": True})
    params = llama.init_params(tied, jax.random.key(0), std=0.1)
    with pytest.raises(ValueError, match="ties its input embedding to the LM head"):
        host_embed.embed_to_host(params, tied)
    untied = host_embed.embed_to_host(llama.init_params(CFG, jax.random.key(0)), CFG)
    with pytest.raises(ValueError, match="full fine-tuning trains the input embedding"):
        cfg = SFTConfig(full_finetune=True, max_steps=1, output_dir=str(tmp_path / "ft"))
        SFTTrainer(untied, CFG, _examples(4, 0), cfg)
    with pytest.raises(ValueError, match="token id 61 is outside the embedding table of 61 rows"):
        host_embed.gather(host_embed.host_table(untied), np.array([[0, 61]]))
    with pytest.raises(ValueError, match="token id -1 is outside"):
        host_embed.gather(host_embed.host_table(untied), np.array([-1, 3]))
    from fastjax.rl import GRPOTrainer

    with pytest.raises(ValueError, match="GRPO generates with the embedding on the device"):
        GRPOTrainer(untied, CFG, [{"prompt": "x"}], [lambda **kw: [0.0]])


def test_from_pretrained_embed_on_host(tiny_llama_dir):
    ckpt, _ = tiny_llama_dir(seed=4)
    on_device, cfg, _ = fastjax.from_pretrained(ckpt, dtype=jnp.float32)
    hosted, _, _ = fastjax.from_pretrained(ckpt, dtype=jnp.float32, embed_on_host=True)
    table = host_embed.host_table(hosted)
    assert isinstance(table, np.ndarray) and table.dtype == np.float32
    np.testing.assert_array_equal(table, np.asarray(on_device["model"]["embed_tokens"]["weight"]))
    tied_ckpt, _ = tiny_llama_dir(seed=5, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tie_word_embeddings=True"):
        fastjax.from_pretrained(tied_ckpt, embed_on_host=True)
