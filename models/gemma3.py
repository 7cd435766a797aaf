"""Gemma 3 text family (``Gemma3ForCausalLM``, model_type ``gemma3_text``; e.g. gemma-3-1b, 270m).

Gemma 2's layer (``models/gemma2.py``: (1 + w) sandwich norms, GeGLU, scaled embedding) plus (1 + w)
RMSNorms on q and k per head before RoPE, and local/global layers that differ in window *and* RoPE:
``sliding_attention`` layers use ``sliding_window`` and plain RoPE with base ``rope_local_base_freq``;
``full_attention`` layers use ``rope_theta`` and ``rope_scaling`` (e.g. linear x8 on 4B+). Pattern:
``layer_types``, else transformers' ``sliding_window_pattern`` rule (layer i is global when
``(i + 1) % pattern == 0``). transformers 5 writes ``rope_parameters`` per layer type; both forms load.

Softcaps: ``final_logit_softcapping`` is applied when set. ``attn_logit_softcapping`` round-trips but is not
applied, because transformers 5.17's Gemma 3 attention does not apply it either (released configs set it
to null). The multimodal ``gemma3`` checkpoints (``Gemma3ForConditionalGeneration``) are not loadable.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from fastjax.models.config import FULL, SLIDING, Arch, HFConfig, rope_type_of
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
from fastjax.models.gemma2 import GELU_TANH, gemma_arch, validate_gemma

log = logging.getLogger("fastjax")


@dataclasses.dataclass(frozen=True)
class Gemma3TextConfig(HFConfig):
    """HF ``Gemma3TextConfig`` fields (defaults as in transformers). Frozen and hashable."""

    MODEL_TYPE = "gemma3_text"
    ARCHITECTURE = "Gemma3ForCausalLM"
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
    rope_theta: float = 1_000_000.0  # global (full_attention) layers
    rope_local_base_freq: float = 10_000.0  # local (sliding_attention) layers
    rope_scaling: Any = None  # global layers only
    max_position_embeddings: int = 131_072
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 6
    layer_types: Any = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    use_bidirectional_attention: bool | None = False
    hidden_activation: str = "gelu_pytorch_tanh"
    bos_token_id: int | None = 2
    eos_token_id: Any = 1
    pad_token_id: int | None = 0
    model_type: str = "gemma3_text"

    def _normalize(self) -> None:
        if self.layer_types is None:
            n = self.sliding_window_pattern
            self._set(
                "layer_types",
                tuple(SLIDING if (i + 1) % n else FULL for i in range(self.num_hidden_layers)),
            )

    def _validate(self) -> None:
        validate_gemma(self)
        if self.attn_logit_softcapping is not None:
            log.warning(
                "gemma3_text: attn_logit_softcapping=%s is ignored, as transformers does",
                self.attn_logit_softcapping,
            )

    @classmethod
    def _from_hf_dict(cls, d: dict) -> dict:
        per_type = d.pop(
            "rope_parameters", None
        )  # transformers 5: {layer_type: {rope_type, rope_theta}}
        if per_type:
            full, local = dict(per_type.get(FULL) or {}), dict(per_type.get(SLIDING) or {})
            if "rope_theta" in full:
                d.setdefault("rope_theta", full.pop("rope_theta"))
            if "rope_theta" in local:
                d.setdefault("rope_local_base_freq", local.pop("rope_theta"))
            if rope_type_of(local) != "default":
                raise ValueError(
                    f"Gemma3TextConfig: rope scaling on sliding_attention layers "
                    f"({rope_type_of(local)!r}) is not supported"
                )
            if rope_type_of(full) != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = full
        return d

    def arch(self) -> Arch:
        local = self.rope_spec(theta=self.rope_local_base_freq, scaling=None)
        ropes = tuple(local if t == SLIDING else self.rope_spec() for t in self.layer_types)
        return gemma_arch(self, ropes, attn_softcap=None)


class Gemma3ForCausalLM(CausalLM):
    """A thin Flax (linen) module over ``forward`` (see ``decoder.CausalLM``)."""
