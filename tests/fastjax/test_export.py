"""fastjax.export: merged HF checkpoints, PEFT adapters both ways, QLoRA merges, atomic writes, CLI.

The oracle is transformers / peft on a tiny random fp32 Llama built here. Every adapter has random
NONZERO ``lora_B`` (and the tests check that the adapter moves the logits far beyond the tolerance),
so a wrong key, a transposed factor or a wrong scale fails.
"""

from __future__ import annotations

import argparse
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastjax.models import llama
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import fastjax
from fastjax import export, lora
from fastjax.tokenizer import Tokenizer

import torch
import transformers
import peft

# Tolerances, stated once. Logits are compared as max |a - b| (logits here are O(1)).
FP32_LOGITS_ATOL = 1e-4  # fastjax vs transformers/peft, everything in fp32
# A 16-bit merged weight is the exact (fp64) merge rounded once: within half an ulp, i.e. relative
# 2^-8 (bf16) or 2^-11 (fp16), plus fp32 noise; fp16 subnormals (< 2^-14) have half-spacing 2^-25.
HALF_ULP_REL = {"bf16": 2.0**-8 * 1.01, "fp16": 2.0**-11 * 1.01}
HALF_ULP_ABS = {"bf16": 0.0, "fp16": 2.0**-25 * 1.01}
FP32_EPS = 2.0**-24  # the fp32 merge rounds W + s*BA before the cast: 2^-24 * (|W| + |s*BA|) more
# QLoRA: merged fp32 vs the NF4 + adapter model is the same function up to fp32 rounding.
QLORA_FP32_ATOL = 1e-4
# Merged bf16 vs the NF4 + adapter model: only the bf16 rounding of the merged weights differs.
# Measured on this model (max |logits| ~3.1): 1.5e-2 with fp32 activations, 4.7e-2 with everything
# in bf16 (the adapter model's own bf16-vs-fp32 compute noise is 3.1e-2); bounds have ~3x headroom.
QLORA_BF16_WEIGHTS_ATOL = 5e-2
QLORA_BF16_ALL_ATOL = 1.5e-1
GGUF_F16_REL = 1e-2  # max |diff| / max |logits| of an f16 GGUF export

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345 + 678 = 13023",
    "def f(x):\n    return x ** 2",
    "naïve café 日本語 🤗",
]


def _tiny_tokenizer() -> Tokenizer:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS * 3, trainer)
    return Tokenizer(backend, bos_token="<|endoftext|>", eos_token="<|im_end|>")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random fp32 HF Llama (every linear's in-dim a multiple of 64, for NF4) + tokenizer."""
    tok = _tiny_tokenizer()
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok) + 7,
        max_position_embeddings=128,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    d = tmp_path_factory.mktemp("base")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    params, cfg, loaded_tok = fastjax.from_pretrained(d, dtype=jnp.float32)
    return dict(dir=d, model=model, params=params, cfg=cfg, tok=loaded_tok)


_forward = jax.jit(llama.forward, static_argnames=("cfg",))


def _fj_logits(params, cfg, ids, adapters=None, scale=1.0) -> np.ndarray:
    return np.asarray(
        _forward(params, jnp.asarray(ids, jnp.int32), cfg=cfg, lora=adapters, lora_scale=scale)
    )


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


def _ids(cfg, seed, shape=(2, 13)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape)


def _random_adapters(
    params,
    cfg,
    *,
    seed,
    r=4,
    lora_alpha=8,
    use_rslora=False,
    target_modules=lora.LoraConfig.target_modules,
    std=0.1,
):
    """An adapter tree shaped as ``lora.get_peft_model`` makes it, with random factors (B nonzero).

    Drawn with numpy (no per-shape XLA compile); the tree spec is get_peft_model's (eval_shape)."""
    config = lora.LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=target_modules, use_rslora=use_rslora, seed=seed
    )
    spec = jax.eval_shape(lambda: lora.get_peft_model(params, cfg, config=config)[0])
    rng = np.random.default_rng(1000 + seed)
    ad = jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype), spec)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(ad))
    return ad, config


def _assert_adapter_matters(with_adapter, without, atol):
    assert np.abs(with_adapter - without).max() > 100 * atol, "the adapter must move the logits"


def _assert_rounded_once(got, w, delta, dtype):
    """``got`` is the 16-bit rounding of ``w + delta`` (fp64 inputs), as an fp32 merge makes it."""
    want = w + delta
    bound = (
        HALF_ULP_REL[dtype] * np.abs(want)
        + HALF_ULP_ABS[dtype]
        + FP32_EPS * (np.abs(w) + np.abs(delta))
    )
    np.testing.assert_array_less(np.abs(got - want), bound)


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ----------------------------------------------------------------------------------------------
# Merged checkpoint


def test_merged_checkpoint_loads_in_transformers_with_lora_logits(base, tmp_path):
    params, cfg, tok = base["params"], base["cfg"], base["tok"]
    ad, config = _random_adapters(params, cfg, seed=1)
    ids = _ids(cfg, 1)
    want = _fj_logits(params, cfg, ids, ad, lora.lora_scale(config))
    _assert_adapter_matters(want, _fj_logits(params, cfg, ids), FP32_LOGITS_ATOL)

    out = export.save_pretrained_merged(
        params,
        ad,
        cfg,
        tok,
        tmp_path / "merged",
        lora_config=config,
        dtype="fp32",
        max_shard_size=60_000,
    )
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
    } <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 2
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    np.testing.assert_allclose(_hf_logits(merged, ids), want, atol=FP32_LOGITS_ATOL, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_merged_16bit_is_the_fp32_merge_rounded_once(base, tmp_path, dtype):
    params, cfg = base["params"], base["cfg"]
    ad, config = _random_adapters(
        params, cfg, seed=2, target_modules=("q_proj", "down_proj"), use_rslora=True
    )
    out = export.save_pretrained_merged(
        params, ad, cfg, None, tmp_path / dtype, lora_config=config, dtype=dtype
    )
    conf = json.loads((out / "config.json").read_text())
    assert (
        conf.get("torch_dtype", conf.get("dtype")) == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    )
    got, _, _ = fastjax.from_pretrained(out, dtype=jnp.float32)
    s = lora.lora_scale(config)
    assert s == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    for group, name in (("self_attn", "q_proj"), ("mlp", "down_proj"), ("mlp", "up_proj")):
        w = np.asarray(params["model"]["layers"][group][name]["weight"], np.float64)
        node = ad["model"]["layers"][group].get(name)
        delta = (
            0.0
            if node is None
            else s
            * np.einsum(
                "lor,lri->loi",
                np.asarray(node["lora_B"], np.float64),
                np.asarray(node["lora_A"], np.float64),
            )
        )
        m = np.asarray(got["model"]["layers"][group][name]["weight"], np.float64)
        _assert_rounded_once(m, w, delta, dtype)
    norm = np.asarray(got["model"]["norm"]["weight"])
    np.testing.assert_array_equal(norm, np.asarray(params["model"]["norm"]["weight"]))


def test_reexport_replaces_the_whole_directory(base, tmp_path):
    params, cfg = base["params"], base["cfg"]
    ad, config = _random_adapters(params, cfg, seed=3)
    out = tmp_path / "out"
    total = sum(int(np.prod(s)) * 4 for s in llama.param_shapes(cfg).values())
    export.save_pretrained_merged(
        params, ad, cfg, None, out, lora_config=config, dtype="fp32", max_shard_size=total // 3 + 1
    )
    first = sorted(p.name for p in out.iterdir())
    assert len([n for n in first if n.startswith("model-")]) >= 3, first
    export.save_pretrained_merged(params, ad, cfg, None, out, lora_config=config, dtype="fp32")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name != "out"], (
        "temporary directories left behind"
    )
    ids = _ids(cfg, 3)
    reloaded, _, _ = fastjax.from_pretrained(out, dtype=jnp.float32)
    np.testing.assert_allclose(
        _fj_logits(reloaded, cfg, ids),
        _fj_logits(params, cfg, ids, ad, lora.lora_scale(config)),
        atol=FP32_LOGITS_ATOL,
        rtol=0,
    )


class _FailingTokenizer:
    """Writes part of its files, then fails: the last step of an export."""

    def save_pretrained(self, directory):
        (directory / "tokenizer.json").write_text("{")
        raise OSError("simulated disk full while writing the tokenizer")


def test_failed_export_leaves_the_previous_export_intact(base, tmp_path):
    params, cfg, tok = base["params"], base["cfg"], base["tok"]
    ad, config = _random_adapters(params, cfg, seed=4)
    out = tmp_path / "out"
    export.save_pretrained_merged(
        params, ad, cfg, tok, out, lora_config=config, dtype="bf16", max_shard_size=60_000
    )
    before = _snapshot(out)

    # 1. Failure after every shard, the index and config.json were written.
    with pytest.raises(OSError, match="simulated disk full"):
        export.save_pretrained_merged(
            params, ad, cfg, _FailingTokenizer(), out, lora_config=config, dtype="fp32"
        )
    assert _snapshot(out) == before
    # 2. Failure converting a tensor in the middle (layer 0's down_proj cannot become an array).
    broken = copy.copy(params)
    broken["model"] = dict(params["model"], layers=dict(params["model"]["layers"]))
    broken["model"]["layers"]["mlp"] = {
        **params["model"]["layers"]["mlp"],
        "down_proj": {"weight": np.full((2, 64, 128), "x")},
    }
    with pytest.raises(TypeError):
        export.save_pretrained_merged(broken, None, cfg, tok, out, dtype="fp32")
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "temporary directories left behind"


# ----------------------------------------------------------------------------------------------
# PEFT adapters


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_peft_loads_our_adapter(base, tmp_path, use_rslora):
    params, cfg = base["params"], base["cfg"]
    ad, config = _random_adapters(params, cfg, seed=5, r=4, lora_alpha=16, use_rslora=use_rslora)
    ids = _ids(cfg, 5)
    want = _fj_logits(params, cfg, ids, ad, lora.lora_scale(config))
    _assert_adapter_matters(want, _fj_logits(params, cfg, ids), FP32_LOGITS_ATOL)

    out = export.save_adapter(
        ad, config, cfg, tmp_path / "adapter", base_model_name_or_path=str(base["dir"])
    )
    conf = json.loads((out / "adapter_config.json").read_text())
    assert (
        conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["bias"] == "none"
    )
    assert (conf["r"], conf["lora_alpha"], conf["use_rslora"]) == (4, 16, use_rslora)
    assert sorted(conf["target_modules"]) == sorted(lora.LoraConfig.target_modules)
    assert conf["base_model_name_or_path"] == str(base["dir"]) and conf["fan_in_fan_out"] is False
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), framework="np") as f:
        a = f.get_tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight")
        assert len(list(f.keys())) == 2 * 7 * cfg.num_hidden_layers
    np.testing.assert_array_equal(
        a, np.asarray(ad["model"]["layers"]["self_attn"]["q_proj"]["lora_A"][1])
    )
    np.testing.assert_array_equal(
        b, np.asarray(ad["model"]["layers"]["mlp"]["up_proj"]["lora_B"][0])
    )

    model = peft.PeftModel.from_pretrained(copy.deepcopy(base["model"]), out).eval()
    np.testing.assert_allclose(_hf_logits(model, ids), want, atol=FP32_LOGITS_ATOL, rtol=0)

    ad2, config2 = export.load_adapter(out, cfg)
    assert lora.lora_scale(config2) == lora.lora_scale(config)
    assert (config2.r, config2.lora_alpha, config2.use_rslora) == (4, 16, use_rslora)
    jax.tree.map(np.testing.assert_array_equal, ad2, ad)


def test_rslora_scale_round_trips(base, tmp_path):
    params, cfg = base["params"], base["cfg"]
    ad, config = _random_adapters(params, cfg, seed=6, r=16, lora_alpha=8, use_rslora=True)
    out = export.save_adapter(ad, config, cfg, tmp_path / "a")
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is True
    _, config2 = export.load_adapter(out, cfg)
    assert lora.lora_scale(config2) == pytest.approx(8 / 4) != 8 / 16
    assert config2.use_rslora and config2.r == 16 and config2.lora_alpha == 8


# Every case adapts all seven linears with r=4, so the fastjax forward compiles once for the file.
PEFT_MADE = [
    dict(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    dict(
        r=4,
        lora_alpha=8,
        target_modules=list(lora.LoraConfig.target_modules),
        layers_to_transform=[1],
    ),
]


@pytest.mark.parametrize("kwargs", PEFT_MADE, ids=["rslora", "layers_to_transform"])
def test_adapter_made_by_peft_loads_into_fastjax(base, tmp_path, kwargs):
    params, cfg = base["params"], base["cfg"]
    torch.manual_seed(7)
    peft_cfg = peft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **kwargs)
    model = peft.get_peft_model(copy.deepcopy(base["model"]), peft_cfg).eval()
    model.save_pretrained(tmp_path / "peft")
    ids = _ids(cfg, 7)
    want = _hf_logits(model, ids)
    _assert_adapter_matters(want, _fj_logits(params, cfg, ids), FP32_LOGITS_ATOL)

    ad, config = export.load_adapter(tmp_path / "peft", cfg)
    got = _fj_logits(params, cfg, ids, ad, lora.lora_scale(config))
    np.testing.assert_allclose(got, want, atol=FP32_LOGITS_ATOL, rtol=0)

    # Saving it back gives PEFT exactly the tensors it made, and the same model.
    out = export.save_adapter(ad, config, cfg, tmp_path / "again")
    from safetensors.numpy import load_file

    mine, theirs = (
        load_file(str(out / "adapter_model.safetensors")),
        load_file(str(tmp_path / "peft" / "adapter_model.safetensors")),
    )
    assert sorted(mine) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(mine[k], theirs[k])
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base["model"]), out).eval()
    np.testing.assert_allclose(_hf_logits(reloaded, ids), want, atol=FP32_LOGITS_ATOL, rtol=0)


UNSUPPORTED = [
    ("use_dora", True),
    ("modules_to_save", ["lm_head"]),
    ("rank_pattern", {"q_proj": 8}),
    ("alpha_pattern", {"q_proj": 32}),
    ("bias", "all"),
    ("fan_in_fan_out", True),
    ("peft_type", "IA3"),
    ("layer_replication", [[0, 1]]),
    ("lora_bias", True),
    ("some_future_option", {"enabled": True}),
]


@pytest.mark.parametrize("field,value", UNSUPPORTED, ids=[f for f, _ in UNSUPPORTED])
def test_load_adapter_rejects_unsupported_peft_features(base, tmp_path, field, value):
    params, cfg = base["params"], base["cfg"]
    ad, config = _random_adapters(params, cfg, seed=8, target_modules=("q_proj",))
    out = export.save_adapter(ad, config, cfg, tmp_path / "a")
    path = out / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(export.AdapterError, match=field):
        export.load_adapter(out, cfg)


def test_load_adapter_reads_16bit_factors(base, tmp_path):
    """PEFT saves factors in the model's dtype (bf16 for most fine-tunes): they load as fp32."""
    from safetensors.torch import load_file, save_file

    params, cfg = base["params"], base["cfg"]
    ad, config = _random_adapters(params, cfg, seed=12, target_modules=("v_proj",))
    out = export.save_adapter(ad, config, cfg, tmp_path / "a")
    weights = str(out / "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights)
    ad2, _ = export.load_adapter(out, cfg)
    want = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), ad)
    assert jax.tree.map(lambda x: x.dtype, ad2) == jax.tree.map(lambda x: x.dtype, ad)
    jax.tree.map(np.testing.assert_array_equal, ad2, want)


def test_load_adapter_rejects_bad_files(base, tmp_path):
    from safetensors.numpy import load_file, save_file

    params, cfg = base["params"], base["cfg"]
    ad, config = _random_adapters(params, cfg, seed=9, target_modules=("q_proj", "up_proj"))
    out = export.save_adapter(ad, config, cfg, tmp_path / "a")
    weights = out / "adapter_model.safetensors"
    good = load_file(str(weights))

    conf = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**conf, "r": 8}))
    with pytest.raises(export.AdapterError, match=r"_proj: lora_A .* expected .*r=8"):
        export.load_adapter(out, cfg)
    (out / "adapter_config.json").write_text(json.dumps(conf))

    save_file(
        {**good, "base_model.model.lm_head.weight": np.ones((3, 3), np.float32)}, str(weights)
    )
    with pytest.raises(export.AdapterError, match="lm_head"):
        export.load_adapter(out, cfg)
    half = {k: v for k, v in good.items() if "up_proj.lora_B" not in k}
    save_file(half, str(weights))
    with pytest.raises(export.AdapterError, match="up_proj"):
        export.load_adapter(out, cfg)
    weights.rename(out / "adapter_model.bin")
    with pytest.raises(export.AdapterError, match="safe_serialization"):
        export.load_adapter(out, cfg)
    with pytest.raises(export.AdapterError, match=r"adapter_config\.json"):
        export.load_adapter(tmp_path, cfg)


# ----------------------------------------------------------------------------------------------
# QLoRA -> merged 16-bit


def test_qlora_merge_equals_dequantized_base_plus_lora(base, tmp_path):
    import fastjax.quant as quant

    params, cfg = base["params"], base["cfg"]
    # A QLoRA run: the 16-bit checkpoint loaded with load_in_4bit (decoder linears NF4, rest bf16).
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    q16 = quant.quantize_params(params16, quant.QuantConfig())
    assert isinstance(q16["model"]["layers"]["mlp"]["down_proj"]["weight"], quant.NF4Tensor)
    ad, config = _random_adapters(params, cfg, seed=10)
    s = lora.lora_scale(config)
    dequantize = jax.jit(quant.dequantize_nf4, static_argnums=1)

    out16 = export.save_pretrained_merged(q16, ad, cfg, None, tmp_path / "bf16", lora_config=config)
    out32 = export.save_pretrained_merged(
        q16, ad, cfg, None, tmp_path / "fp32", lora_config=config, dtype="fp32"
    )
    m16, _, _ = fastjax.from_pretrained(out16, dtype=jnp.float32)
    m32, _, _ = fastjax.from_pretrained(out32, dtype=jnp.float32)
    for group, name in (("self_attn", "k_proj"), ("mlp", "down_proj")):
        node = ad["model"]["layers"][group][name]
        delta = s * np.einsum(
            "lor,lri->loi",
            np.asarray(node["lora_B"], np.float64),
            np.asarray(node["lora_A"], np.float64),
        )
        nf4 = q16["model"]["layers"][group][name]["weight"]
        w = np.asarray(dequantize(nf4, jnp.float32), np.float64)
        got16 = np.asarray(m16["model"]["layers"][group][name]["weight"], np.float64)
        got32 = np.asarray(m32["model"]["layers"][group][name]["weight"], np.float64)
        _assert_rounded_once(got16, w, delta, "bf16")
        np.testing.assert_allclose(got32, w + delta, atol=1e-6, rtol=1e-6)
        # Merging onto the 16-bit W instead of dequant(NF4(W)) would be far off.
        orig = np.asarray(params16["model"]["layers"][group][name]["weight"], np.float64) + delta
        assert np.abs(got32 - orig).max() > 100 * 1e-6

    # Logits: what QLoRA training computed (NF4 + adapter) vs the merged checkpoints.
    ids = _ids(cfg, 10, (2, 17))
    q16_fp32_acts = jax.tree.map(
        lambda x: x if isinstance(x, quant.NF4Tensor) else x.astype(jnp.float32),
        q16,
        is_leaf=lambda x: isinstance(x, quant.NF4Tensor),
    )
    adapter_model = _fj_logits(q16_fp32_acts, cfg, ids, ad, s)
    _assert_adapter_matters(adapter_model, _fj_logits(params, cfg, ids), QLORA_FP32_ATOL)
    d32 = np.abs(_fj_logits(m32, cfg, ids) - adapter_model).max()
    d16 = np.abs(_fj_logits(m16, cfg, ids) - adapter_model).max()
    # bf16 end to end: NF4 + adapter with bf16 compute vs the merged bf16 checkpoint run in bf16.
    adapter_bf16 = _fj_logits(q16, cfg, ids, ad, s)
    m16_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), m16)
    d16b = np.abs(_fj_logits(m16_bf16, cfg, ids) - adapter_bf16).max()
    # For scale: bf16 compute noise of the adapter model itself, and the error of merging onto the
    # original weights instead of dequant(NF4(W)) (what a merge that ignores QLoRA would ship).
    noise = np.abs(adapter_bf16 - adapter_model).max()
    wrong = np.abs(_fj_logits(lora.merge_lora(params, ad, cfg, s), cfg, ids) - adapter_model).max()
    print(
        f"\nQLoRA merge, max|logits|={np.abs(adapter_model).max():.3f}, max|logits - NF4+LoRA|: "
        f"merged fp32 {d32:.2e}; merged bf16 (fp32 acts) {d16:.2e}; merged bf16 run in bf16 vs "
        f"NF4+LoRA in bf16 {d16b:.2e}; [NF4+LoRA bf16 vs fp32 compute {noise:.2e}; merged onto "
        f"the unquantized W {wrong:.2e}]"
    )
    assert d16 < wrong / 2, "merging onto dequant(NF4(W)) must beat merging onto W"
    assert d32 < QLORA_FP32_ATOL
    assert d16 < QLORA_BF16_WEIGHTS_ATOL
    assert d16b < QLORA_BF16_ALL_ATOL


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_export_end_to_end(base, tmp_path):
    params, cfg = base["params"], base["cfg"]
    ad, config = _random_adapters(params, cfg, seed=11, lora_alpha=4)
    adapter_dir = export.save_adapter(ad, config, cfg, tmp_path / "trained")
    ids = _ids(cfg, 11)
    want = _fj_logits(params, cfg, ids, ad, lora.lora_scale(config))
    parser = argparse.ArgumentParser(prog="fastjax")
    export.add_export_parser(parser.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = parser.parse_args(
            ["export", "--model", str(base["dir"]), "--adapter", str(adapter_dir), *argv]
        )
        assert args.func(args) == 0

    run("--format", "merged", "--dtype", "fp32", "--out", str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    np.testing.assert_allclose(_hf_logits(merged, ids), want, atol=FP32_LOGITS_ATOL, rtol=0)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    run("--format", "adapter", "--out", str(tmp_path / "adapter"))
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(base["dir"])
    ad2, config2 = export.load_adapter(tmp_path / "adapter", cfg)
    jax.tree.map(np.testing.assert_array_equal, ad2, ad)
    assert lora.lora_scale(config2) == lora.lora_scale(config)

    # The same handler through the real entry point (fastjax.cli registers add_export_parser).
    from fastjax import cli

    assert (
        cli.main(
            [
                "export",
                "--model",
                str(base["dir"]),
                "--adapter",
                str(adapter_dir),
                "--format",
                "gguf",
                "--quant",
                "f16",
                "--out",
                str(tmp_path / "gguf"),
            ]
        )
        == 0
    )
    path = tmp_path / "gguf" / "model-f16.gguf"
    params3, cfg3, _ = fastjax.from_pretrained(path, dtype=jnp.float32)
    same = dict(bos_token_id=None, pad_token_id=None)
    assert cfg3.to_hf() | same == cfg.to_hf() | same
    got = _fj_logits(params3, cfg, ids)
    assert np.abs(got - want).max() / np.abs(want).max() < GGUF_F16_REL
    # and transformers' own GGUF reader on the merged-adapter file gives the LoRA model's logits
    hf_gguf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    got_hf = _hf_logits(hf_gguf, ids)
    assert np.abs(got_hf - want).max() / np.abs(want).max() < GGUF_F16_REL
