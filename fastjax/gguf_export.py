"""GGUF export (issue 7): the fastjax param tree of a Llama-architecture model -> a GGUF file that
llama.cpp (and transformers' `gguf_file=` loader) reads, written with `gguf.GGUFWriter` (no llama.cpp).

What goes in (the inverse of `fastjax.gguf_io`'s import; layouts and names are documented there):
  * `llama.*` hyperparameters, `general.file_type`, quantization version; linear rope scaling as
    `rope.scaling.*`, Llama-3 rope scaling as the `rope_freqs` tensor (as convert_hf_to_gguf does).
  * Tensors under llama.cpp names; q/k rows permuted to llama.cpp's interleaved order. 1-D tensors
    (norms, biases) stay F32 as llama.cpp expects; 2-D weights take the requested type. Tied models
    write no `output.weight` (llama.cpp then reuses `token_embd`).
  * The tokenizer as `gpt2` (byte-level BPE): tokens (padded with `[PAD{i}]` UNUSED entries up to the
    model's vocab_size), token types (NORMAL / CONTROL for special added tokens / USER_DEFINED for
    other added tokens), merges, bos/eos/unk/pad ids, add_bos/add_eos, the chat template(s), and the
    llama.cpp pre-tokenizer name inferred from the tokenizer's pre-tokenizer.

The file is written to a temporary name beside `path` and moved into place with os.replace.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from fastjax.gguf_io import (
    SUPPORTED_ARCHITECTURES,
    _gguf_name,
    _llama3_rope_factors,
    _permute_qk,
    _pre_name,
)
from fastjax.tokenizer import Tokenizer

QUANT_TYPES = ("f16", "q8_0", "q4_0")


def _tensor_type(name: str, shape: tuple[int, ...], quant: str, tied: bool) -> Any:
    """GGML type for one tensor: 1-D tensors (norms, biases) stay F32 as in llama.cpp; 2-D tensors
    take `quant`, except that for q4_0 the output head (the embedding when tied) is kept in Q8_0,
    as llama-quantize keeps it above 4 bits; rows not a multiple of the 32-wide block use F16."""
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2:
        return T.F32
    qtype = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
    is_head = name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight")
    if qtype == T.Q4_0 and is_head:
        qtype = T.Q8_0
    if qtype != T.F16 and shape[-1] % 32:
        warnings.warn(
            f"{name}: row length {shape[-1]} is not a multiple of 32; writing F16", stacklevel=3
        )
        qtype = T.F16
    return qtype


def _vocab_for_export(
    tokenizer: Tokenizer, vocab_size: int
) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE tokenizer, padded to `vocab_size`."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise NotImplementedError(
            f"GGUF export supports byte-level BPE tokenizers only; this one is {model.get('type')} "
            f"with decoder {(spec.get('decoder') or {}).get('type')}"
        )
    id_to_token = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    if len(id_to_token) > vocab_size:
        raise ValueError(
            f"tokenizer has {len(id_to_token)} tokens but the model's vocab_size={vocab_size}"
        )
    added = {t.content: t.special for t in tokenizer.backend.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = id_to_token.get(i)
        if tok is None:  # rows the embedding has beyond the tokenizer (convert_hf_to_gguf's rule)
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        else:
            tokens.append(tok)
            types.append(1 if tok not in added else (3 if added[tok] else 4))  # NORMAL/CONTROL/USER
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _write_metadata(
    writer: Any, cfg: Any, tokenizer: Tokenizer | None, quant: str, tokenizer_pre: str | None
) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType, RopeScalingType

    file_type = {
        "f16": LlamaFileType.MOSTLY_F16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
        "q4_0": LlamaFileType.MOSTLY_Q4_0,
    }[quant]
    writer.add_type("model")
    writer.add_name("fastjax export")
    writer.add_file_type(file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    scaling = cfg.rope_scaling_dict or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if tokenizer is None:
        return
    tokens, types, merges = _vocab_for_export(tokenizer, cfg.vocab_size)
    pre = tokenizer_pre or _pre_name(tokenizer.backend)
    if pre is None:
        raise ValueError(
            "cannot tell which llama.cpp pre-tokenizer matches this tokenizer's "
            "pre_tokenizer; pass tokenizer_pre= (e.g. 'gpt2', 'smollm', 'llama-bpe')"
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.token_to_id(tokenizer.pad_token)),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tokenizer.add_bos_token)
    writer.add_add_eos_token(tokenizer.add_eos_token)
    if tokenizer.chat_templates:
        if list(tokenizer.chat_templates) == ["default"]:
            writer.add_chat_template(tokenizer.chat_templates["default"])
        else:
            writer.add_chat_template(
                [{"name": k, "template": v} for k, v in tokenizer.chat_templates.items()]
            )


def save_gguf(
    params: Mapping,
    cfg: Any,
    tokenizer: Tokenizer | None,
    path: str | os.PathLike[str],
    *,
    quant: str = "f16",
    tokenizer_pre: str | None = None,
) -> pathlib.Path:
    """Writes a llama.cpp-loadable GGUF of a Llama-architecture model, atomically.

    `quant`: "f16", "q8_0" or "q4_0" for 2-D weights (see `_tensor_type` for the exceptions);
    1-D tensors stay F32. Tied models write no `output.weight`. The tokenizer (byte-level BPE) goes
    in as `gpt2` with the llama.cpp pre-tokenizer name inferred from its pre-tokenizer or given as
    `tokenizer_pre`. Returns the path.
    """
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter
    from gguf.quants import quantize

    from fastjax.loading import flat_from_params

    if quant not in QUANT_TYPES:
        raise ValueError(f"save_gguf: quant={quant!r}; choose one of {QUANT_TYPES}")
    if cfg.model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"save_gguf: model_type={cfg.model_type!r}; GGUF export supports "
            f"{SUPPORTED_ARCHITECTURES}"
        )
    if cfg.mlp_bias:
        raise NotImplementedError("save_gguf: llama.cpp's llama architecture has no MLP biases")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = GGUFWriter(tmp, arch="llama")
        _write_metadata(writer, cfg, tokenizer, quant, tokenizer_pre)
        scaling = cfg.rope_scaling_dict or {}
        if scaling.get("rope_type", scaling.get("type")) == "llama3":
            factors = _llama3_rope_factors(cfg.head_dim, cfg.rope_theta, scaling)
            writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))
        for name, value in flat_from_params(params, cfg).items():
            if not isinstance(value, (jax.Array, np.ndarray)):
                raise TypeError(
                    f"save_gguf: {name} is a {type(value).__name__}; dequantize "
                    "(fastjax.export) before exporting"
                )
            w = np.asarray(jax.device_get(value), dtype=np.float32)
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                w = _permute_qk(w, cfg.num_attention_heads)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                w = _permute_qk(w, cfg.num_key_value_heads)
            qtype = _tensor_type(name, w.shape, quant, cfg.tie_word_embeddings)
            if qtype in (T.F32, T.F16):
                writer.add_tensor(_gguf_name(name), quantize(w, qtype))
            else:
                writer.add_tensor(_gguf_name(name), quantize(w, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
