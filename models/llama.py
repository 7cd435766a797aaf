"""Llama family (Llama 2/3/3.x, SmolLM2, ...): ``LlamaConfig`` + the shared decoder.

The network, the parameter layout and every function are in ``models/decoder.py``, re-exported here (the
family function set listed in ``models/registry.py``). Parameters are a nested dict whose paths are HF
safetensors names with the layer index moved to a leading stacked axis (``docs/ARCHITECTURE.md``):
``params["model"]["layers"]["self_attn"]["q_proj"]["weight"]`` has shape ``[L, out, in]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastjax.models.config import Arch, HFConfig, kinds_from_windows
from fastjax.models.config import freeze as _freeze  # noqa: F401  (kept for importers)
from fastjax.models.config import thaw as _thaw  # noqa: F401
from fastjax.models.decoder import (  # noqa: F401  (the family function set)
    LAYER_PREFIX,
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
from fastjax.models.decoding import cached_attention_reference, forward_cached, init_cache  # noqa: F401

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(HFConfig):
    """HF ``LlamaConfig`` fields (names as in ``config.json``). Frozen and hashable."""

    MODEL_TYPE = "llama"
    ARCHITECTURE = "LlamaForCausalLM"
    ROPE_TYPES = SUPPORTED_ROPE_TYPES

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None  # frozen dict (tuple of items); read with .rope_scaling_dict
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: Any = None  # int or tuple of ints
    pad_token_id: int | None = None
    model_type: str = "llama"

    def arch(self) -> Arch:
        L = self.num_hidden_layers
        kinds, index = kinds_from_windows((None,) * L, (self.rope_spec(),) * L)
        return Arch(
            kinds=kinds,
            layer_kind=index,
            sm_scale=self.head_dim**-0.5,
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
        )


class LlamaForCausalLM(CausalLM):
    """A thin Flax (linen) module over ``forward`` (see ``decoder.CausalLM``)."""
