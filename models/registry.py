"""model_type -> family module. Each family module provides a config class with ``from_hf``/``to_hf``,
``forward``, ``forward_cached``, ``init_cache``, ``init_params``, ``param_shapes``, ``stack_layers``,
``unstack_layers``, ``lm_head``."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

# model_type -> (module, config class name)
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("fastjax.models.llama", "LlamaConfig"),
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family(model_type: str) -> ModuleType:
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported architecture model_type={model_type!r}; fastjax supports: "
                         f"{', '.join(supported_model_types())}")
    return importlib.import_module(FAMILIES[model_type][0])


def config_from_hf(config: Mapping[str, Any]):
    """An HF ``config.json`` dict -> the family's frozen config (clear error for unknown families)."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError("config.json has no 'model_type'; cannot tell the architecture")
    module = family(model_type)
    return getattr(module, FAMILIES[model_type][1]).from_hf(config)


def family_of(cfg) -> ModuleType:
    return family(cfg.model_type)
