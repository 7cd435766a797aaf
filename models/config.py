"""Config machinery shared by the decoder families: HF ``config.json`` in/out, validation, and ``Arch``.

Every family config (``LlamaConfig``, ``MistralConfig``, ...) is a frozen dataclass with HF field names that
mixes in ``HFConfig`` for parsing (``from_hf``: transformers 4 ``rope_theta``/``rope_scaling`` and
transformers 5 ``rope_parameters`` styles), writing (``to_hf``) and validation, and describes its network
with ``arch()``: an ``Arch``, the static facts ``models/decoder.py`` runs on (norm style, biases, fused
projections, activation, softcaps, and the per-layer *kinds*: attention window + RoPE table).

Layer kinds: a model whose layers differ (Gemma 2's alternating sliding/global layers, Gemma 3's 5:1
pattern with its own RoPE base for local layers, Qwen2's ``max_window_layers``) lists each distinct
``LayerKind`` once in ``Arch.kinds`` and maps layer i to ``Arch.layer_kind[i]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

BASE_ROPE_TYPES = ("default", "linear", "llama3")
SLIDING, FULL = "sliding_attention", "full_attention"


def freeze(value: Any) -> Any:
    """Dicts/lists -> sorted tuples so the config stays hashable (it is a static jit argument)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Inverse of ``freeze`` for dicts (tuples of (str, value) pairs); lists come back as lists."""
    if (
        isinstance(value, tuple)
        and value
        and all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], str) for i in value)
    ):
        return {k: thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def rope_type_of(scaling: Mapping | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


# --------------------------------------------------------------------------------------------------------------
# The static description of a network
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """One RoPE table: ``rotary_dim`` leading dims of each head rotate (HF's ``partial_rotary_factor``)."""

    rotary_dim: int
    theta: float
    scaling: Any = None  # frozen dict, None for plain RoPE
    original_max_position_embeddings: int | None = None  # longrope: above it, long factors
    max_position_embeddings: int | None = None  # longrope: default factor = max / original

    @property
    def rope_type(self) -> str:
        return rope_type_of(thaw(self.scaling))

    def inv_freqs(self):
        """``(inv_freq, long_inv_freq | None, attention_scaling)``; ``long_inv_freq`` is longrope's table for
        sequences longer than ``original_max_position_embeddings`` (HF switches on ``max(position) + 1``)."""
        from fastjax.models import ops as O

        scaling = thaw(self.scaling)
        if self.rope_type != "longrope":
            return O.rope_inv_freq(self.rotary_dim, self.theta, scaling), None, 1.0
        # transformers' _compute_longrope_parameters
        original = self.original_max_position_embeddings
        factor = scaling.get("factor") or self.max_position_embeddings / original
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            )
        exponent = np.arange(0, self.rotary_dim, 2, dtype=np.float64) / self.rotary_dim
        base = self.theta**exponent

        def table(factors):
            return (1.0 / (np.asarray(factors, np.float64) * base)).astype(np.float32)

        return table(scaling["short_factor"]), table(scaling["long_factor"]), float(attention)


@dataclasses.dataclass(frozen=True)
class LayerKind:
    window: int | None  # HF sliding_window: a query sees itself and the window - 1 keys before it
    rope: RopeSpec


@dataclasses.dataclass(frozen=True)
class Arch:
    """What ``models/decoder.py`` needs to know about a family, beyond the sizes."""

    kinds: tuple[LayerKind, ...]
    layer_kind: tuple[int, ...]  # per layer: index into kinds
    sm_scale: float
    norm_offset: float = 0.0  # 1.0: Gemma's (1 + w) RMSNorm
    sandwich_norms: bool = (
        False  # Gemma 2/3: norms after attention/MLP too (pre/post_feedforward_layernorm)
    )
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim of q and k before RoPE
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused_qkv: bool = False  # Phi-3: self_attn.qkv_proj = [q; k; v]
    fused_gate_up: bool = False  # Phi-3: mlp.gate_up_proj = [gate; up]
    activation: str = "silu"  # or "gelu_tanh" (GeGLU)
    embed_scale: float | None = None  # Gemma: sqrt(hidden_size), applied in the activation dtype
    attn_softcap: float | None = None
    final_softcap: float | None = None


# --------------------------------------------------------------------------------------------------------------
# HF config.json <-> frozen config
# --------------------------------------------------------------------------------------------------------------

_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


class HFConfig:
    """Mixin for the family config dataclasses: HF parsing/writing and the shared validation.

    A family sets ``MODEL_TYPE``, ``ARCHITECTURE`` (the ``*ForCausalLM`` class name), ``ACTIVATIONS`` (the
    accepted values of its activation field ``ACT_FIELD``) and ``ROPE_TYPES``, and implements ``arch()``.
    """

    MODEL_TYPE: ClassVar[str] = ""
    ARCHITECTURE: ClassVar[str] = ""
    ACT_FIELD: ClassVar[str] = "hidden_act"
    ACTIVATIONS: ClassVar[tuple[str, ...]] = ("silu",)
    ROPE_TYPES: ClassVar[tuple[str, ...]] = BASE_ROPE_TYPES

    # ----- construction -----------------------------------------------------------------------------------

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen dataclass

    def _error(self, name: str, message: str) -> ValueError:
        return ValueError(f"{type(self).__name__}.{name}={getattr(self, name, None)!r}: {message}")

    def __post_init__(self):
        if getattr(self, "num_key_value_heads", None) is None:
            self._set("num_key_value_heads", self.num_attention_heads)
        if getattr(self, "head_dim", None) is None:
            self._set("head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("rope_scaling", "layer_types"):
            value = getattr(self, name, None)
            if isinstance(value, (Mapping, list)):
                self._set(name, freeze(value))
        if isinstance(self.eos_token_id, list):
            self._set("eos_token_id", tuple(self.eos_token_id))
        self._normalize()
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise self._error(name, "expected a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{type(self).__name__}: num_attention_heads={self.num_attention_heads} is not a "
                f"multiple of num_key_value_heads={self.num_key_value_heads}"
            )
        act = getattr(self, self.ACT_FIELD)
        if act not in self.ACTIVATIONS:
            raise self._error(self.ACT_FIELD, f"only {self.ACTIVATIONS} supported")
        rope_type = rope_type_of(self.rope_scaling_dict)
        if rope_type not in self.ROPE_TYPES:
            raise ValueError(
                f"{type(self).__name__}.rope_scaling: unsupported rope type {rope_type!r}; "
                f"supported: {self.ROPE_TYPES}"
            )
        layer_types = getattr(self, "layer_types", None)
        if layer_types is not None:
            if len(layer_types) != self.num_hidden_layers:
                raise self._error(
                    "layer_types", f"needs num_hidden_layers={self.num_hidden_layers} entries"
                )
            bad = sorted(set(layer_types) - {SLIDING, FULL})
            if bad:
                raise self._error(
                    "layer_types", f"unknown layer type {bad[0]!r}; known: {(SLIDING, FULL)}"
                )
        window = getattr(self, "sliding_window", None)
        if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
            raise self._error("sliding_window", "expected a positive integer or null")
        self._validate()

    def _normalize(self) -> None:
        """Family hook: fill derived fields (e.g. default ``layer_types``) before validation."""

    def _validate(self) -> None:
        """Family hook: family-specific checks (raise ``ValueError`` naming the field)."""

    # ----- properties every family has ----------------------------------------------------------------

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else thaw(self.rope_scaling)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def arch(self) -> Arch:
        raise NotImplementedError

    def rope_spec(self, theta: float | None = None, scaling: Any = "cfg") -> RopeSpec:
        """The config's RoPE table (``theta``/``scaling`` override it, e.g. Gemma 3's local layers)."""
        scaling = self.rope_scaling if scaling == "cfg" else freeze(scaling)
        factor = getattr(self, "partial_rotary_factor", 1.0) or 1.0
        return RopeSpec(
            rotary_dim=int(self.head_dim * factor),
            theta=float(self.rope_theta if theta is None else theta),
            scaling=scaling,
            original_max_position_embeddings=self._original_max_positions(),
            max_position_embeddings=self.max_position_embeddings,
        )

    def _original_max_positions(self) -> int | None:
        field = getattr(self, "original_max_position_embeddings", None)
        if (
            field is not None
        ):  # Phi-3 keeps it outside rope_scaling, and HF gives the field priority
            return field
        scaling = self.rope_scaling_dict or {}
        return scaling.get("original_max_position_embeddings", self.max_position_embeddings)

    def layer_windows(self) -> tuple[int | None, ...]:
        """Per-layer attention window (None = global), from ``layer_types`` when the family has it."""
        window = getattr(self, "sliding_window", None)
        layer_types = getattr(self, "layer_types", None)
        if layer_types is None:
            return (window,) * self.num_hidden_layers
        return tuple(window if t == SLIDING else None for t in layer_types)

    # ----- HF dict in/out -------------------------------------------------------------------------------

    @classmethod
    def _from_hf_dict(cls, d: dict) -> dict:
        """Family hook: rewrite the (already rope-normalized) HF dict before field filtering."""
        return d

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]):
        """From an HF ``config.json`` dict (transformers 4 ``rope_theta``/``rope_scaling`` or 5
        ``rope_parameters`` style). Unknown keys are ignored."""
        model_type = config.get("model_type", cls.MODEL_TYPE)
        if model_type != cls.MODEL_TYPE:
            raise ValueError(
                f"{cls.__name__}.from_hf: model_type={model_type!r} is not {cls.MODEL_TYPE!r}"
            )
        d = dict(config)
        d["model_type"] = cls.MODEL_TYPE
        rope_params = d.pop("rope_parameters", None)
        if rope_params and not (set(rope_params) & {SLIDING, FULL}):
            d.update(_split_rope(rope_params, d))
        elif rope_params:
            d["rope_parameters"] = rope_params  # per layer type (Gemma 3): the family hook reads it
        if d.get("rope_scaling") is not None:
            rs = dict(d["rope_scaling"])
            if "partial_rotary_factor" in rs:
                d.setdefault("partial_rotary_factor", rs.pop("partial_rotary_factor"))
            rope_type = rope_type_of(
                rs
            )  # one spelling: "rope_type" (transformers 4 also wrote "type")
            rs = {k: v for k, v in rs.items() if k != "type"} | {"rope_type": rope_type}
            d["rope_scaling"] = None if rope_type == "default" else rs
        d = cls._from_hf_dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf(self) -> dict:
        """An HF ``config.json`` dict that transformers loads as ``ARCHITECTURE``."""
        d = {f.name: thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["rope_scaling"] = self.rope_scaling_dict
        d["eos_token_id"] = (
            list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        )
        d["architectures"] = [self.ARCHITECTURE]
        return d


def _split_rope(rope_params: Mapping, d: Mapping) -> dict:
    """transformers 5 ``rope_parameters`` -> ``rope_theta`` (+ ``rope_scaling`` unless default)."""
    rp = dict(rope_params)
    out: dict = {}
    theta = rp.pop("rope_theta", None)
    if theta is not None and "rope_theta" not in d:
        out["rope_theta"] = theta
    if "partial_rotary_factor" in rp:
        factor = rp.pop("partial_rotary_factor")
        if "partial_rotary_factor" not in d:
            out["partial_rotary_factor"] = factor
    if rope_type_of(rp) != "default" and d.get("rope_scaling") is None:
        out["rope_scaling"] = rp
    return out


def kinds_from_windows(
    windows: tuple[int | None, ...], ropes: tuple[RopeSpec, ...]
) -> tuple[tuple[LayerKind, ...], tuple[int, ...]]:
    """Per-layer (window, rope) -> (distinct kinds in first-seen order, per-layer kind index)."""
    kinds: list[LayerKind] = []
    index: list[int] = []
    for window, rope in zip(windows, ropes, strict=True):
        kind = LayerKind(window, rope)
        if kind not in kinds:
            kinds.append(kind)
        index.append(kinds.index(kind))
    return tuple(kinds), tuple(index)
