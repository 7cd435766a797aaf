"""Mistral family (Mistral 7B v0.1/v0.3, Nemo, Small): Llama's layer with an optional sliding window.

``sliding_window`` (HF semantics: a query sees itself and the ``window - 1`` tokens before it) applies to
every layer; ``null`` means full causal attention (Mistral 7B v0.2+). Everything else is
``models/decoder.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastjax.models.config import Arch, HFConfig, kinds_from_windows
from fastjax.models.decoder import (  # noqa: F401  (the family function set)
    CausalLM,
    final_logit_softcap,
    flops_per_token,
    forward,
    init_params,
    layer_param_shapes,
    linear_modules,
    lm_head,
    param_shapes,
    stack_layers,
    unstack_layers,
)
from fastjax.models.decoding import forward_cached, init_cache  # noqa: F401


@dataclasses.dataclass(frozen=True)
class MistralConfig(HFConfig):
    """HF ``MistralConfig`` fields (defaults as in transformers). Frozen and hashable."""

    MODEL_TYPE = "mistral"
    ARCHITECTURE = "MistralForCausalLM"

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    max_position_embeddings: int = 4096 * 32
    tie_word_embeddings: bool = False
    sliding_window: int | None = 4096  # transformers' default when config.json omits it
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: Any = 2
    pad_token_id: int | None = None
    model_type: str = "mistral"

    def arch(self) -> Arch:
        L = self.num_hidden_layers
        kinds, index = kinds_from_windows(self.layer_windows(), (self.rope_spec(),) * L)
        return Arch(kinds=kinds, layer_kind=index, sm_scale=self.head_dim**-0.5)


class MistralForCausalLM(CausalLM):
    """A thin Flax (linen) module over ``forward`` (see ``decoder.CausalLM``)."""
