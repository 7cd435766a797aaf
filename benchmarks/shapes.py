"""The one registry of real model shapes, used by tests and benchmarks alike.

Values are the published HF ``config.json`` fields of each model. ``TEST_SHAPES`` are odd-sized small shapes
for CPU tests (sizes chosen to not be multiples of any block size).
"""

from __future__ import annotations

from dataclasses import dataclass, asdict


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

    def hf_config(self, **overrides) -> dict:
        """A minimal HF ``config.json`` dict for these shapes (random-weight benchmarks)."""
        d = asdict(self)
        d.pop("name")
        d.update(max_position_embeddings=131072, rms_norm_eps=1e-5)
        d.update(overrides)
        return d

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def n_params(self) -> int:
        """Dense parameter count (embeddings, head unless tied, projections, norms)."""
        D, F, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        per_layer = D * self.q_dim + 2 * D * self.kv_dim + self.q_dim * D + 3 * D * F + 2 * D
        return V * D * (1 if self.tie_word_embeddings else 2) + L * per_layer + D


SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in [
        ModelShape("llama-3.2-1b", "llama", 2048, 8192, 16, 32, 8, 64, 128256, 500000.0, True),
        ModelShape("llama-3-8b", "llama", 4096, 14336, 32, 32, 8, 128, 128256, 500000.0, False),
        ModelShape("qwen2.5-7b", "qwen2", 3584, 18944, 28, 28, 4, 128, 152064, 1000000.0, False),
        ModelShape("gemma-2-9b", "gemma2", 3584, 14336, 42, 16, 8, 256, 256000, 10000.0, True, 4096),
        ModelShape("mistral-small-24b", "mistral", 5120, 32768, 40, 32, 8, 128, 131072, 100000000.0,
                   False),
        ModelShape("smollm2-135m", "llama", 576, 1536, 30, 9, 3, 64, 49152, 100000.0, True),
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
