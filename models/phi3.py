"""Phi-3 family (Phi-3/3.5-mini, Phi-4-mini; model_type ``phi3``): Llama's layer with fused projections.

``self_attn.qkv_proj`` (``[q; k; v]`` rows) and ``mlp.gate_up_proj`` (``[gate; up]`` rows) stay fused in
the params, as in the HF checkpoint, so save/load round-trips and LoRA targets them as PEFT does
(``all-linear`` = qkv_proj, o_proj, gate_up_proj, down_proj). ``sliding_window`` applies to every layer
(Phi-3-mini-4k: 2047).

RoPE: ``longrope`` (Phi-3-mini-128k, Phi-3.5: ``short_factor``/``long_factor``; the legacy names ``su`` and
``yarn`` mean longrope, as in transformers) is implemented as transformers does it: the long factors are used
for a sequence whose ``max(position) + 1 > original_max_position_embeddings``, and cos/sin are scaled by
``attention_factor`` (default ``sqrt(1 + ln(s) / ln(original))`` with ``s = max_position_embeddings /
original_max_position_embeddings``). One deliberate difference: transformers takes that max over the whole
batch of a call, fastjax per sequence (per packed segment, per row when decoding), so a sequence's result
equals transformers running it alone. ``partial_rotary_factor`` rotates only the leading dims of each head.
Other rope types are rejected, as transformers' Phi-3 config does. Residual/embedding dropout
(``resid_pdrop``, ``embd_pdrop``) is not applied (LoRA dropout is separate).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastjax.models.config import Arch, HFConfig, kinds_from_windows, rope_type_of
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
class Phi3Config(HFConfig):
    """HF ``Phi3Config`` fields (defaults as in transformers). Frozen and hashable."""

    MODEL_TYPE = "phi3"
    ARCHITECTURE = "Phi3ForCausalLM"
    ROPE_TYPES = ("default", "longrope")

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: Any = 32000
    pad_token_id: int | None = 32000
    model_type: str = "phi3"

    def _validate(self) -> None:
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise self._error("partial_rotary_factor", "expected a number in (0, 1]")
        rotary = int(self.head_dim * self.partial_rotary_factor)
        if rotary % 2:
            raise self._error("partial_rotary_factor", f"gives an odd rotary dim {rotary}")
        scaling = self.rope_scaling_dict
        if rope_type_of(scaling) == "longrope":
            for name in ("short_factor", "long_factor"):
                factors = scaling.get(name)
                if factors is None or len(factors) != rotary // 2:
                    raise ValueError(
                        f"Phi3Config.rope_scaling[{name!r}]: expected {rotary // 2} numbers "
                        f"(rotary dim / 2), got {factors!r}"
                    )

    @classmethod
    def _from_hf_dict(cls, d: dict) -> dict:
        scaling = d.get("rope_scaling")
        if scaling is not None:
            scaling = dict(scaling)
            if rope_type_of(scaling) in ("su", "yarn"):  # transformers' legacy names for longrope
                scaling["rope_type"] = "longrope"
            # transformers gives the top-level field priority over a copy inside the rope dict
            scaling.pop("original_max_position_embeddings", None)
            d["rope_scaling"] = scaling
        return d

    def arch(self) -> Arch:
        L = self.num_hidden_layers
        kinds, index = kinds_from_windows(self.layer_windows(), (self.rope_spec(),) * L)
        return Arch(
            kinds=kinds,
            layer_kind=index,
            sm_scale=self.head_dim**-0.5,
            fused_qkv=True,
            fused_gate_up=True,
        )


class Phi3ForCausalLM(CausalLM):
    """A thin Flax (linen) module over ``forward`` (see ``decoder.CausalLM``)."""
