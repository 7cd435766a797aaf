"""Qwen3 (dense) family: Llama's layer with a per-head RMSNorm on q and k (``q_norm``/``k_norm``, weight
``[head_dim]``, applied before RoPE), an explicit ``head_dim`` (128) and no q/k/v bias (``attention_bias``
adds one to q/k/v/o, as in transformers). Sliding-window fields behave as in ``qwen2.py``.
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
from fastjax.models.qwen2 import QwenWindows


@dataclasses.dataclass(frozen=True)
class Qwen3Config(QwenWindows, HFConfig):
    """HF ``Qwen3Config`` fields (defaults as in transformers). Frozen and hashable."""

    MODEL_TYPE = "qwen3"
    ARCHITECTURE = "Qwen3ForCausalLM"

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: Any = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: Any = None
    pad_token_id: int | None = None
    model_type: str = "qwen3"

    def arch(self) -> Arch:
        L = self.num_hidden_layers
        kinds, index = kinds_from_windows(self.layer_windows(), (self.rope_spec(),) * L)
        return Arch(
            kinds=kinds,
            layer_kind=index,
            sm_scale=self.head_dim**-0.5,
            qk_norm=True,
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
        )


class Qwen3ForCausalLM(CausalLM):
    """A thin Flax (linen) module over ``forward`` (see ``decoder.CausalLM``)."""
