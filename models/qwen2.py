"""Qwen2 / Qwen2.5 family: Llama's layer with q/k/v biases (no o_proj bias).

Sliding window (``use_sliding_window``, ``sliding_window``, ``max_window_layers``, ``layer_types``) is
supported as transformers implements it: without ``use_sliding_window`` the window is dropped
(``sliding_window`` becomes null, as HF's config does); with it, layers typed ``sliding_attention`` (by
default layers ``i >= max_window_layers``) use the window. Released Qwen2/2.5 checkpoints ship
``use_sliding_window: false``. Small sizes (0.5B-3B) tie the embeddings (``tie_word_embeddings``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastjax.models.config import FULL, SLIDING, Arch, HFConfig, kinds_from_windows
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


class QwenWindows:
    """Qwen2/Qwen3's sliding-window fields, normalized as transformers' config ``__post_init__`` does."""

    def _normalize(self) -> None:
        if not self.use_sliding_window:
            self._set("sliding_window", None)
        if self.layer_types is None:
            self._set(
                "layer_types",
                tuple(
                    SLIDING
                    if self.sliding_window is not None and i >= self.max_window_layers
                    else FULL
                    for i in range(self.num_hidden_layers)
                ),
            )


@dataclasses.dataclass(frozen=True)
class Qwen2Config(QwenWindows, HFConfig):
    """HF ``Qwen2Config`` fields (defaults as in transformers). Frozen and hashable."""

    MODEL_TYPE = "qwen2"
    ARCHITECTURE = "Qwen2ForCausalLM"

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
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: Any = None  # tuple of "sliding_attention" | "full_attention"
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: Any = None
    pad_token_id: int | None = None
    model_type: str = "qwen2"

    def arch(self) -> Arch:
        L = self.num_hidden_layers
        kinds, index = kinds_from_windows(self.layer_windows(), (self.rope_spec(),) * L)
        return Arch(kinds=kinds, layer_kind=index, sm_scale=self.head_dim**-0.5, qkv_bias=True)


class Qwen2ForCausalLM(CausalLM):
    """A thin Flax (linen) module over ``forward`` (see ``decoder.CausalLM``)."""
