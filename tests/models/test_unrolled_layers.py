"""``forward(..., scan_layers=False)``: the layers as a Python loop equal the scanned model (logits and
LoRA gradients, fp32, under remat presets, with Gemma 2's alternating local/global layers), and the
program really has no layer loop: the scan's stacked activation buffers are gone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastjax import lora as L
from fastjax.models import decoder, gemma2, llama

TOL = 1e-5  # fp32, relative to the largest value
LLAMA = llama.LlamaConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
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
    assert _rel(got, want) < TOL
    for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gw), strict=True):
        assert _rel(a, b) < TOL
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
