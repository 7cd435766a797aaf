"""fastjax: fast, lean LoRA / QLoRA / full fine-tuning of Hugging Face LLMs on one GPU, in JAX.

Public API (imported lazily so ``import fastjax`` stays fast and light)::

    params, cfg, tokenizer = fastjax.from_pretrained("path/to/hf_checkpoint_or.gguf")
    fastjax.generate(params, cfg, [tokenizer.encode("Hi")], max_new_tokens=32)
    fastjax.save_pretrained(params, cfg, tokenizer, "out_dir")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "from_pretrained": "fastjax.loading",
    "save_pretrained": "fastjax.loading",
    "CheckpointError": "fastjax.loading",
    "embed_to_host": "fastjax.host_embed",
    "from_gguf": "fastjax.gguf_io",
    "smollm2_gguf_path": "fastjax.gguf_io",
    "save_gguf": "fastjax.gguf_io",
    "Tokenizer": "fastjax.tokenizer",
    "generate": "fastjax.generation",
    "get_peft_model": "fastjax.lora",
    "LoraConfig": "fastjax.lora",
    "merge_lora": "fastjax.lora",
    "unmerge_lora": "fastjax.lora",
    "SFTConfig": "fastjax.trainer",
    "SFTTrainer": "fastjax.trainer",
    "train": "fastjax.trainer",
    "adamw_8bit": "fastjax.optim",
    "save_pretrained_merged": "fastjax.export",
    "save_adapter": "fastjax.export",
    "load_adapter": "fastjax.export",
    "Ops": "fastjax.models.ops",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
