"""fastjax.remat: every preset computes the same forward and the same gradients as ``none`` (it only
changes what the backward pass keeps), for LoRA adapters and for full-parameter gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastjax.models import llama
from fastjax.models.ops import Ops

from fastjax import lora as L
from fastjax import remat

# Tolerances, stated once: (atol, rtol) per dtype.
TOL = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (2e-2, 2e-2)}

CFG = llama.LlamaConfig(
    vocab_size=41,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
OPS = Ops.all("xla")


def _setup(seed: int):
    params = llama.init_params(CFG, jax.random.key(seed), std=0.1)
    lora, config = L.get_peft_model(params, CFG, r=3, target_modules="all-linear", seed=seed)
    for i, path in enumerate(L.adapter_paths(lora)):
        node = lora["model"]["layers"][path[2]][path[3]]
        node["lora_B"] = 0.1 * jax.random.normal(
            jax.random.fold_in(jax.random.key(seed), i), node["lora_B"].shape
        )
    ids = jax.random.randint(jax.random.key(seed + 1), (2, 13), 0, CFG.vocab_size)
    segments = jnp.array([[1] * 6 + [2] * 7, [1] * 10 + [0] * 3], jnp.int32)
    positions = jnp.array([list(range(6)) + list(range(7)), list(range(10)) + [0] * 3], jnp.int32)
    cot = jax.random.normal(jax.random.key(seed + 2), (2, 13, CFG.hidden_size))
    return params, lora, L.lora_scale(config), ids, segments, positions, cot


@functools.cache  # the "none" reference is computed once for all presets
def _grads(policy: str, seed: int):
    params, lora, scale, ids, segments, positions, cot = _setup(seed)

    @jax.jit
    def run(params, lora):
        def f(params, lora):
            return llama.forward(
                params,
                ids,
                cfg=CFG,
                positions=positions,
                segment_ids=segments,
                lora=lora,
                lora_scale=scale,
                remat_policy=policy,
                ops=OPS,
                return_hidden=True,
            )

        out, vjp = jax.vjp(f, params, lora)
        return out, vjp(cot)

    return run(params, lora)


@pytest.mark.parametrize("policy", [p for p in remat.PRESETS if p != "none"])
def test_preset_gradients_equal_none(policy):
    seed = 0
    out_ref, (gp_ref, gl_ref) = _grads("none", seed)
    out, (gp, gl) = _grads(policy, seed)
    atol, rtol = TOL[jnp.float32]
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), atol=atol, rtol=rtol)
    for ref, got in ((gl_ref, gl), (gp_ref, gp)):
        for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=atol, rtol=rtol)
    assert float(jnp.abs(jax.tree.leaves(gl)[0]).max()) > 0


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown remat_policy 'everything'.*save_qkv_attn"):
        remat.policy("everything")
