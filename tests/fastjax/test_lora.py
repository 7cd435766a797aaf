"""fastjax.lora: the adapter tree spec, target_modules resolution, B=0 == base, merged == unmerged,
PEFT files (round trip, and transformers + peft computing the same logits), QLoRA (NF4) weights,
fused modules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastjax.models import llama

from fastjax import lora as L

# Tolerances, stated once: (atol, rtol) per dtype.
TOL = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (2e-2, 2e-2)}

# Odd sizes on purpose: D=40, head_dim=10, F=72, V=61, 3 layers.
CFG = llama.LlamaConfig(
    vocab_size=61,
    hidden_size=40,
    intermediate_size=72,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA_MODULES = {
    ("self_attn", "q_proj"): (40, 40),
    ("self_attn", "k_proj"): (20, 40),
    ("self_attn", "v_proj"): (20, 40),
    ("self_attn", "o_proj"): (40, 40),
    ("mlp", "gate_proj"): (72, 40),
    ("mlp", "up_proj"): (72, 40),
    ("mlp", "down_proj"): (40, 72),
}


def _params(seed: int, cfg=CFG, dtype=jnp.float32):
    return llama.init_params(cfg, jax.random.key(seed), dtype=dtype, std=0.1)


def _ids(seed: int, shape=(2, 11), vocab=CFG.vocab_size):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


def _random_b(lora, seed: int, std: float = 0.05):
    """Adapters with non-zero B (a trained-looking adapter); layers where A == 0 (unselected) stay
    zero."""
    out = jax.tree.map(lambda x: x, lora)
    for i, path in enumerate(L.adapter_paths(lora)):
        node = out
        for k in path:
            node = node[k]
        selected = (jnp.abs(node["lora_A"]).sum(axis=(1, 2)) > 0)[:, None, None]
        noise = std * jax.random.normal(
            jax.random.fold_in(jax.random.key(seed), i), node["lora_B"].shape
        )
        node["lora_B"] = jnp.where(selected, noise, 0.0)
    return out


def test_tree_spec_all_linear():
    params = _params(0)
    lora, config = L.get_peft_model(
        params, CFG, r=5, lora_alpha=10, target_modules="all-linear", seed=3
    )
    paths = {
        tuple(str(k.key) for k in p): (leaf.shape, leaf.dtype)
        for p, leaf in jax.tree_util.tree_leaves_with_path(lora)
    }
    expected = {}
    for (block, name), (out_dim, in_dim) in LLAMA_MODULES.items():
        expected[("model", "layers", block, name, "lora_A")] = ((3, 5, in_dim), jnp.float32)
        expected[("model", "layers", block, name, "lora_B")] = ((3, out_dim, 5), jnp.float32)
    assert paths == expected
    assert config == L.LoraConfig(r=5, lora_alpha=10, target_modules="all-linear", seed=3)
    assert L.lora_scale(config) == 2.0
    for (block, name), (_, in_dim) in LLAMA_MODULES.items():
        a = np.asarray(lora["model"]["layers"][block][name]["lora_A"])
        bound = 1 / math.sqrt(in_dim)
        assert (
            np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
        )  # kaiming-uniform(a=sqrt(5))
        assert abs(a.std() - bound / math.sqrt(3)) < 0.2 * bound
        assert not np.any(np.asarray(lora["model"]["layers"][block][name]["lora_B"]))
    assert (
        len({float(a[0, 0, 0]) for a in jax.tree.leaves(lora) if a.shape[1] == 5}) > 1
    )  # per-module keys
    # deterministic in the seed, different across seeds
    again, _ = L.get_peft_model(
        params, CFG, r=5, lora_alpha=10, target_modules="all-linear", seed=3
    )
    other, _ = L.get_peft_model(
        params, CFG, r=5, lora_alpha=10, target_modules="all-linear", seed=4
    )
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(lora), jax.tree.leaves(again)))
    assert not np.array_equal(jax.tree.leaves(lora)[0], jax.tree.leaves(other)[0])
    rs = L.LoraConfig(r=4, lora_alpha=8, use_rslora=True)
    assert L.lora_scale(rs) == 4.0


@pytest.mark.parametrize(
    "target, modules",
    [
        (("q_proj", "v_proj"), {("self_attn", "q_proj"), ("self_attn", "v_proj")}),
        ("q_proj", {("self_attn", "q_proj")}),
        ("q_proj,down_proj", {("self_attn", "q_proj"), ("mlp", "down_proj")}),
        (["mlp.up_proj"], {("mlp", "up_proj")}),
        (r"model\.layers\.\d+\.mlp\.(gate|up)_proj", {("mlp", "gate_proj"), ("mlp", "up_proj")}),
    ],
)
def test_target_module_forms(target, modules):
    lora, config = L.get_peft_model(_params(1), CFG, r=2, target_modules=target)
    assert {p[2:] for p in L.adapter_paths(lora)} == modules
    assert L.layer_masks(lora, config) is None


def test_layer_subset_regex_zero_outside_selection_and_zero_grads():
    params = _params(2)
    regex = r"model\.layers\.(0|2)\.self_attn\.(q|v)_proj"
    lora, config = L.get_peft_model(params, CFG, r=3, target_modules=regex)
    masks = L.layer_masks(lora, config)
    assert masks is not None
    for path in L.adapter_paths(lora):
        node = lora["model"]["layers"]["self_attn"][path[-1]]
        assert not np.any(np.asarray(node["lora_A"][1])) and np.any(np.asarray(node["lora_A"][0]))
    trained = _random_b(lora, 5)
    ids = _ids(3)

    def f(lo):
        return llama.forward(
            params, ids, cfg=CFG, lora=lo, lora_scale=L.lora_scale(config), return_hidden=True
        )

    out, vjp = jax.vjp(f, trained)
    (grads,) = vjp(jax.random.normal(jax.random.key(4), out.shape))
    for leaf in jax.tree.leaves(grads):
        assert not np.any(np.asarray(leaf[1])), "a layer outside the regex got a gradient"
        assert np.any(np.asarray(leaf[0])) and np.any(np.asarray(leaf[2]))
    assert L.num_trainable_params(lora, config) == 2 * 2 * (3 * 40 + 3 * 40) - 2 * (40 - 20) * 3
    peft = L.to_peft_state_dict(trained, CFG, config)
    assert sorted(peft) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{m}.{w}.weight"
        for i in (0, 2)
        for m in ("q_proj", "v_proj")
        for w in ("lora_A", "lora_B")
    )
    back = L.from_peft_state_dict(peft, CFG, config)
    for x, y in zip(jax.tree.leaves(trained), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "target", [("q_proj", "nope_proj"), r"model\.layers\.\d+\.attn\.q", "lm_head"]
)
def test_unknown_target_module_is_a_clear_error(target):
    with pytest.raises(ValueError, match="available.*q_proj"):
        L.get_peft_model(_params(0), CFG, target_modules=target)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="r=0"):
        L.LoraConfig(r=0)
    with pytest.raises(ValueError, match="not a valid regex"):
        L.LoraConfig(target_modules="model.layers.(")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zero_b_equals_base_model(dtype):
    params = _params(5, dtype=dtype)
    lora, config = L.get_peft_model(params, CFG, r=4, target_modules="all-linear")
    ids = _ids(6)
    base = llama.forward(params, ids, cfg=CFG)
    adapted = llama.forward(params, ids, cfg=CFG, lora=lora, lora_scale=L.lora_scale(config))
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_equals_unmerged(rslora):
    params = _params(7)
    lora, config = L.get_peft_model(
        params, CFG, r=6, lora_alpha=12, use_rslora=rslora, target_modules="all-linear"
    )
    lora = _random_b(lora, 8)
    scale = L.lora_scale(config)
    ids = _ids(9)
    unmerged = llama.forward(params, ids, cfg=CFG, lora=lora, lora_scale=scale)
    merged_params = L.merge_lora(params, lora, CFG, config)
    merged = llama.forward(merged_params, ids, cfg=CFG)
    base = llama.forward(params, ids, cfg=CFG)
    atol, rtol = TOL[jnp.float32]
    assert float(jnp.abs(unmerged - base).max()) > 1e-2  # the adapter really changes the model
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=atol, rtol=rtol)
    restored = L.unmerge_lora(merged_params, lora, CFG, scale)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)
    # the input tree is not mutated
    assert (
        params["model"]["layers"]["self_attn"]["q_proj"]["weight"]
        is not merged_params["model"]["layers"]["self_attn"]["q_proj"]["weight"]
    )


def test_fused_modules_of_other_families():
    """Any stacked [L, out, in] linear under model.layers is a module: fused qkv / gate_up
    included."""
    k = iter(jax.random.split(jax.random.key(0), 8))
    L_, D = 2, 24
    params = {
        "model": {
            "embed_tokens": {"weight": jax.random.normal(next(k), (50, D))},
            "layers": {
                "input_layernorm": {"weight": jnp.ones((L_, D))},
                "self_attn": {
                    "qkv_proj": {"weight": jax.random.normal(next(k), (L_, 72, D))},
                    "o_proj": {"weight": jax.random.normal(next(k), (L_, D, D))},
                },
                "mlp": {
                    "gate_up_proj": {"weight": jax.random.normal(next(k), (L_, 96, D))},
                    "down_proj": {"weight": jax.random.normal(next(k), (L_, D, 48))},
                },
            },
        },
        "lm_head": {"weight": jax.random.normal(next(k), (50, D))},
    }
    lora, _ = L.get_peft_model(params, None, r=3, target_modules="all-linear")
    shapes = {
        p[2:]: (
            lora["model"]["layers"][p[2]][p[3]]["lora_A"].shape,
            lora["model"]["layers"][p[2]][p[3]]["lora_B"].shape,
        )
        for p in L.adapter_paths(lora)
    }
    assert shapes == {
        ("self_attn", "qkv_proj"): ((2, 3, 24), (2, 72, 3)),
        ("self_attn", "o_proj"): ((2, 3, 24), (2, 24, 3)),
        ("mlp", "gate_up_proj"): ((2, 3, 24), (2, 96, 3)),
        ("mlp", "down_proj"): ((2, 3, 48), (2, 24, 3)),
    }
    lora2, _ = L.get_peft_model(params, None, r=3, target_modules=["qkv_proj"])
    assert [p[-1] for p in L.adapter_paths(lora2)] == ["qkv_proj"]


def test_nf4_weights():
    from fastjax import quant

    cfg = llama.LlamaConfig(
        vocab_size=61,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    params = quant.quantize_params(_params(11, cfg))
    lora, config = L.get_peft_model(params, cfg, r=4, target_modules=("q_proj", "down_proj"))
    assert lora["model"]["layers"]["mlp"]["down_proj"]["lora_A"].shape == (2, 4, 128)
    lora = _random_b(lora, 12)
    merged = L.merge_lora(params, lora, cfg, config)
    w = merged["model"]["layers"]["self_attn"]["q_proj"]["weight"]
    assert isinstance(w, jax.Array) and w.shape == (2, 64, 64)
    assert isinstance(merged["model"]["layers"]["self_attn"]["k_proj"]["weight"], quant.NF4Tensor)
    deq = params["model"]["layers"]["self_attn"]["q_proj"]["weight"].dequantize(jnp.float32)
    node = lora["model"]["layers"]["self_attn"]["q_proj"]
    want = deq + L.lora_scale(config) * jnp.einsum("lor,lri->loi", node["lora_B"], node["lora_A"])
    np.testing.assert_allclose(
        np.asarray(w, np.float32), np.asarray(want), **dict(zip(("atol", "rtol"), TOL[jnp.float32]))
    )
    with pytest.raises(TypeError, match="unmerge"):
        L.unmerge_lora(params, lora, cfg, config)


def test_peft_files_load_in_transformers_peft(tmp_path):
    import torch
    import transformers
    import peft
    from fastjax.loading import save_pretrained

    params = _params(13)
    regex = r"model\.layers\.(0|2)\.(self_attn\.(q|k|v|o)_proj|mlp\.down_proj)"
    for target in ("all-linear", regex):
        lora, config = L.get_peft_model(
            params, CFG, r=4, lora_alpha=6, target_modules=target, seed=1
        )
        lora = _random_b(lora, 14)
        save_pretrained(params, CFG, None, tmp_path / "base")
        L.save_peft_adapter(lora, CFG, config, str(tmp_path / "adapter"))
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", dtype=torch.float32
        )
        model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        ids = _ids(15)
        with torch.no_grad():
            ref = model(torch.tensor(np.asarray(ids))).logits.numpy()
        ours = llama.forward(params, ids, cfg=CFG, lora=lora, lora_scale=L.lora_scale(config))
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
        loaded, loaded_config = L.load_peft_adapter(str(tmp_path / "adapter"), CFG)
        for x, y in zip(jax.tree.leaves(lora), jax.tree.leaves(loaded)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert L.lora_scale(loaded_config) == L.lora_scale(config)
