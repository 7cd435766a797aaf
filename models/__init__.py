"""Functional model definitions (installed as ``fastjax.models``): one module per architecture family."""

from fastjax.models.ops import Ops
from fastjax.models.registry import config_from_hf, family, family_of, supported_model_types

__all__ = ["Ops", "config_from_hf", "family", "family_of", "supported_model_types"]
