"""Gemma 2 family: (1 + w) RMSNorms before *and* after attention and MLP, GeGLU (tanh), the embedding
scaled by sqrt(hidden_size) in the activation dtype, attention-score and final-logit tanh softcaps,
``sm_scale = query_pre_attn_scalar ** -0.5``, and alternating sliding/global layers.

Layer pattern: ``layer_types`` when config.json has it, else transformers' rule (even layers
``sliding_attention``, odd layers ``full_attention``). The per-layer window is dispatched by
``lax.switch`` inside the scanned layer (``models/decoder.py`` says why). ``final_logit_softcapping`` is
applied by ``forward`` to the logits; losses computed from ``return_hidden=True`` take it from
``final_logit_softcap(cfg)``. ``use_bidirectional_attention`` (the encoder variant) is not supported.
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

GELU_TANH = ("gelu_pytorch_tanh",)


@dataclasses.dataclass(frozen=True)
class Gemma2Config(HFConfig):
    """HF ``Gemma2Config`` fields (defaults as in transformers). Frozen and hashable."""

    MODEL_TYPE = "gemma2"
    ARCHITECTURE = "Gemma2ForCausalLM"
    ACT_FIELD = "hidden_activation"
    ACTIVATIONS = GELU_TANH

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: Any = None
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0
    use_bidirectional_attention: bool | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    bos_token_id: int | None = 2
    eos_token_id: Any = 1
    pad_token_id: int | None = 0
    model_type: str = "gemma2"

    def _normalize(self) -> None:
        if self.layer_types is None:  # transformers 5.17: sliding if (i + 1) % 2 else full
            self._set(
                "layer_types",
                tuple(SLIDING if (i + 1) % 2 else FULL for i in range(self.num_hidden_layers)),
            )

    def _validate(self) -> None:
        validate_gemma(self)

    def arch(self) -> Arch:
        return gemma_arch(
            self,
            (self.rope_spec(),) * self.num_hidden_layers,
            attn_softcap=self.attn_logit_softcapping,
        )


def validate_gemma(cfg) -> None:
    if cfg.use_bidirectional_attention:
        raise cfg._error(
            "use_bidirectional_attention", "bidirectional (encoder) Gemma is not supported"
        )
    for name in ("final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar"):
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise cfg._error(name, "expected a positive number or null")


def gemma_arch(cfg, ropes, *, attn_softcap) -> Arch:
    kinds, index = kinds_from_windows(cfg.layer_windows(), ropes)
    return Arch(
        kinds=kinds,
        layer_kind=index,
        sm_scale=float(cfg.query_pre_attn_scalar) ** -0.5,
        norm_offset=1.0,
        sandwich_norms=True,
        qk_norm=cfg.MODEL_TYPE == "gemma3_text",
        qkv_bias=cfg.attention_bias,
        o_bias=cfg.attention_bias,
        activation="gelu_tanh",
        embed_scale=cfg.hidden_size**0.5,
        attn_softcap=attn_softcap,
        final_softcap=cfg.final_logit_softcapping,
    )


class Gemma2ForCausalLM(CausalLM):
    """A thin Flax (linen) module over ``forward`` (see ``decoder.CausalLM``)."""
