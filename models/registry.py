"""model_type -> family module.

Each family module provides a frozen config class with ``from_hf``/``to_hf``/``arch()`` and the family
function set (implemented once, in ``models/decoder.py`` and ``decoding.py``): ``forward``, ``forward_cached``,
``init_cache``, ``init_params``, ``param_shapes``, ``layer_param_shapes``, ``stack_layers``,
``unstack_layers``, ``lm_head``, ``flops_per_token``, ``linear_modules`` (per-layer linear module path ->
``(in_features, out_features)``, for LoRA ``target_modules`` / ``all-linear``) and ``final_logit_softcap``
(the softcap a loss over ``forward(..., return_hidden=True)`` must apply, or None).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

# model_type -> (module, config class name)
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("fastjax.models.llama", "LlamaConfig"),
    "mistral": ("fastjax.models.mistral", "MistralConfig"),
    "qwen2": ("fastjax.models.qwen2", "Qwen2Config"),
    "qwen3": ("fastjax.models.qwen3", "Qwen3Config"),
    "gemma2": ("fastjax.models.gemma2", "Gemma2Config"),
    "gemma3_text": ("fastjax.models.gemma3", "Gemma3TextConfig"),
    "phi3": ("fastjax.models.phi3", "Phi3Config"),
}

# Known model types that need more than a config class: say what to do instead.
_NOT_SUPPORTED = {
    "gemma3": "it is the multimodal Gemma3ForConditionalGeneration; fastjax supports the text-only "
    "model_type 'gemma3_text' (Gemma3ForCausalLM checkpoints such as gemma-3-1b or gemma-3-270m)",
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family(model_type: str) -> ModuleType:
    if model_type not in FAMILIES:
        why = f" ({_NOT_SUPPORTED[model_type]})" if model_type in _NOT_SUPPORTED else ""
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}{why}; fastjax supports: "
            f"{', '.join(supported_model_types())}"
        )
    return importlib.import_module(FAMILIES[model_type][0])


def config_class(model_type: str) -> type:
    return getattr(family(model_type), FAMILIES[model_type][1])


def config_from_hf(config: Mapping[str, Any]):
    """An HF ``config.json`` dict -> the family's frozen config (clear error for unknown families)."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError("config.json has no 'model_type'; cannot tell the architecture")
    return config_class(model_type).from_hf(config)


def family_of(cfg) -> ModuleType:
    return family(cfg.model_type)
