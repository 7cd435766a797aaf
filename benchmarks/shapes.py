"""The one registry of real model shapes, used by tests and benchmarks alike.

Values are the published HF ``config.json`` fields of each model. ``TEST_SHAPES`` are odd-sized small shapes
for CPU tests (sizes chosen to not be multiples of any block size).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    # Further published config.json fields the family needs (softcaps, layer pattern, RoPE scaling, ...),
    # as (key, value) pairs with dicts frozen to pairs too, so the shape stays hashable.
    extra: tuple = ()

    def hf_config(self, **overrides) -> dict:
        """A minimal HF ``config.json`` dict for these shapes (random-weight benchmarks)."""
        d = asdict(self)
        d.pop("name")
        d.pop("extra")
        d.update(max_position_embeddings=131072, rms_norm_eps=1e-5)
        d.update({k: _thaw(v) for k, v in self.extra})
        d.update(overrides)
        return d

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def n_params(self) -> int:
        """Dense parameter count (embeddings, head unless tied, projections, norms; q/k/v biases and the
        extra norms of Qwen2/Qwen3/Gemma are under 0.1% and not counted)."""
        D, F, L, V = (
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.vocab_size,
        )
        per_layer = D * self.q_dim + 2 * D * self.kv_dim + self.q_dim * D + 3 * D * F + 2 * D
        return V * D * (1 if self.tie_word_embeddings else 2) + L * per_layer + D


def _thaw(value):
    if (
        isinstance(value, tuple)
        and value
        and all(isinstance(i, tuple) and len(i) == 2 for i in value)
    ):
        return {k: _thaw(v) for k, v in value}
    return list(value) if isinstance(value, tuple) else value


_GEMMA2 = (
    ("query_pre_attn_scalar", 256),
    ("attn_logit_softcapping", 50.0),
    ("final_logit_softcapping", 30.0),
    ("hidden_activation", "gelu_pytorch_tanh"),
)
_GEMMA3 = (
    ("query_pre_attn_scalar", 256),
    ("rope_local_base_freq", 10000.0),
    ("sliding_window_pattern", 6),
    ("hidden_activation", "gelu_pytorch_tanh"),
)


SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in [
        ModelShape("llama-3.2-1b", "llama", 2048, 8192, 16, 32, 8, 64, 128256, 500000.0, True),
        ModelShape("llama-3-8b", "llama", 4096, 14336, 32, 32, 8, 128, 128256, 500000.0, False),
        ModelShape("qwen2.5-7b", "qwen2", 3584, 18944, 28, 28, 4, 128, 152064, 1000000.0, False),
        ModelShape(
            "gemma-2-9b",
            "gemma2",
            3584,
            14336,
            42,
            16,
            8,
            256,
            256000,
            10000.0,
            True,
            4096,
            _GEMMA2,
        ),
        ModelShape(
            "mistral-small-24b", "mistral", 5120, 32768, 40, 32, 8, 128, 131072, 100000000.0, False
        ),
        ModelShape("smollm2-135m", "llama", 576, 1536, 30, 9, 3, 64, 49152, 100000.0, True),
        # Published HF config.json values (issue 8 families).
        ModelShape(
            "mistral-7b-v0.1", "mistral", 4096, 14336, 32, 32, 8, 128, 32000, 10000.0, False, 4096
        ),
        ModelShape(
            "mistral-7b-v0.3", "mistral", 4096, 14336, 32, 32, 8, 128, 32768, 1000000.0, False
        ),
        ModelShape("qwen2.5-0.5b", "qwen2", 896, 4864, 24, 14, 2, 64, 151936, 1000000.0, True),
        ModelShape("qwen3-8b", "qwen3", 4096, 12288, 36, 32, 8, 128, 151936, 1000000.0, False),
        ModelShape(
            "gemma-2-2b", "gemma2", 2304, 9216, 26, 8, 4, 256, 256000, 10000.0, True, 4096, _GEMMA2
        ),
        ModelShape(
            "gemma-3-1b",
            "gemma3_text",
            1152,
            6912,
            26,
            4,
            1,
            256,
            262144,
            1000000.0,
            True,
            512,
            _GEMMA3,
        ),
        ModelShape(
            "gemma-3-4b-text",
            "gemma3_text",
            2560,
            10240,
            34,
            8,
            4,
            256,
            262208,
            1000000.0,
            True,
            1024,
            _GEMMA3 + (("rope_scaling", (("factor", 8.0), ("rope_type", "linear"))),),
        ),
        ModelShape(
            "phi-3-mini-4k", "phi3", 3072, 8192, 32, 32, 32, 96, 32064, 10000.0, False, 2047
        ),
    ]
}

# Odd small shapes for CPU tests: (tokens, hidden, vocab) triples and head layouts.
TEST_SHAPES = {
    "tokens": [1, 17, 123],
    "hidden": [72, 128],
    "vocab": [503, 32003 // 8],  # 32003 itself is used by one CE test; these keep CPU time low
    "heads": [(4, 4), (4, 1), (8, 2)],  # (q heads, kv heads)
    "head_dim": [64, 128, 256],
}


def get(name: str) -> ModelShape:
    try:
        return SHAPES[name]
    except KeyError:
        raise KeyError(f"unknown shape {name!r}; known: {sorted(SHAPES)}") from None
