"""fastjax.remat: every preset computes the same forward and the same gradients as ``none`` (it only
changes what the backward pass keeps), for LoRA adapters and for full-parameter gradients."""

from __future__ import annotations

import functools
import os

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
    """fp32 at 1e-5 of each array's largest magnitude, at full-precision matmuls (a GPU's TF32 default
    differs by ~1e-3). The H200 (2026-12-02) also sums in another order with and without remat: up to
    4.2e-5 on gradients of magnitude ~20, which an absolute 1e-5 failed and no remat bug comes near."""
    seed = 0
    with jax.default_matmul_precision("highest"):
        _compare(policy, seed)


def _compare(policy, seed):
    out_ref, (gp_ref, gl_ref) = _grads("none", seed)
    out, (gp, gl) = _grads(policy, seed)
    atol, rtol = TOL[jnp.float32]

    def close(got, want):
        want = np.asarray(want)
        scale = max(1.0, float(np.abs(want).max()))  # fp32 sum-order error grows with the summands
        np.testing.assert_allclose(np.asarray(got), want, atol=atol * scale, rtol=rtol)

    close(out, out_ref)
    for ref, got in ((gl_ref, gl), (gp_ref, gp)):
        for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
            close(y, x)
    assert float(jnp.abs(jax.tree.leaves(gl)[0]).max()) > 0


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown remat_policy 'everything'.*save_qkv_attn"):
        remat.policy("everything")


def test_compiler_options_turn_command_buffers_off_only_under_host_offload(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    # on CPU there is no pinned host memory: the preset degrades to ``full`` and needs no options
    if jax.default_backend() == "cpu":
        assert remat.compiler_options("offload_layer_input") is None
    monkeypatch.setattr(remat, "_has_pinned_host", lambda: True)
    assert remat.compiler_options("offload_layer_input") == remat.NO_COMMAND_BUFFERS
    for name in ("none", "full", "save_qkv_attn", "save_dots"):
        assert remat.compiler_options(name) is None
    # the user's own command-buffer flag wins
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=FUSION")
    assert remat.compiler_options("offload_layer_input") is None
    with pytest.raises(ValueError, match="unknown remat_policy 'offload'"):
        remat.compiler_options("offload")


def test_command_buffers_off_in_env(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert not remat.command_buffers_off_in_env("full")
    assert remat.command_buffers_off_in_env("offload_layer_input")
    want = "--xla_force_host_platform_device_count=2 " + remat.COMMAND_BUFFER_FLAG
    assert os.environ["XLA_FLAGS"] == want
    assert not remat.command_buffers_off_in_env("offload_layer_input")  # once is enough
    assert os.environ["XLA_FLAGS"] == want
    # once the flag is in XLA_FLAGS the per-step options step aside
    monkeypatch.setattr(remat, "_has_pinned_host", lambda: True)
    assert remat.compiler_options("offload_layer_input") is None
    monkeypatch.delenv("XLA_FLAGS")
    assert remat.command_buffers_off_in_env("offload_layer_input")
    assert os.environ["XLA_FLAGS"] == remat.COMMAND_BUFFER_FLAG
    with pytest.raises(ValueError, match="unknown remat_policy"):
        remat.command_buffers_off_in_env("offload")


def test_step_is_compiled_with_the_options():
    """``make_train_step(compiler_options=)`` reaches XLA: the options are valid on every backend
    (a debug option), and a bad value is XLA's error, not silently dropped."""
    import optax

    from fastjax.train_step import make_train_step

    loss_sum = lambda t, f, mb, key: jnp.sum((t["w"] * mb["x"]) ** 2)
    opt = optax.sgd(0.1)
    trainable = {"w": jnp.ones(3)}
    batch = {"x": jnp.ones((1, 3)), "labels": jnp.ones((1, 3), jnp.int32)}
    args = (opt.init(trainable), {}, batch, jnp.int32(0), jax.random.key(0))
    good = make_train_step(
        loss_sum,
        opt,
        optax.constant_schedule(0.1),
        donate=False,
        compiler_options=remat.NO_COMMAND_BUFFERS,
    )
    new, _, metrics = good(trainable, *args)
    np.testing.assert_allclose(np.asarray(new["w"]), 1 - 0.1 * 2 * 1 / 3, rtol=1e-6)
    bad = make_train_step(
        loss_sum,
        opt,
        optax.constant_schedule(0.1),
        donate=False,
        compiler_options={"xla_gpu_enable_command_buffer": "NOT_A_COMMAND"},
    )
    with pytest.raises(Exception, match="not a valid enum value"):
        bad(trainable, *args)
