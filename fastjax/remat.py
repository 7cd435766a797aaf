"""Named rematerialization presets built on ``jax.checkpoint`` policies and ``checkpoint_name``.

The model names its activations (``models/decoder.py``): ``layer_input`` (the residual stream entering a layer),
``qkv`` (q, k, v after projection and RoPE), ``attn_out`` (attention output before ``o_proj``), ``mlp_up``
(gate and up projections), ``mlp_out`` (down projection). A preset decides what the backward pass keeps:

| preset | keeps | recomputes | memory per layer (T tokens) |
|---|---|---|---|
| ``none`` | everything XLA wants | nothing | largest |
| ``full`` | only the layer input (scan carry) | the whole layer | ~T·D |
| ``save_qkv_attn`` | q, k, v and the attention output | norms, MLP | ~T·(Dq + 2·Dkv + Dq) |
| ``save_dots`` | every projection output (no batch dims) | elementwise ops | ~T·(4·D + 3·F) |
| ``offload_layer_input`` | layer input, moved to pinned host memory | the whole layer | ~0 on device |

``offload_layer_input`` is the JAX form of Unsloth's offloaded gradient checkpointing: the scan carry that
``full`` would keep in HBM for every layer is copied to pinned host memory during the forward pass and back
during the backward pass. On backends without a pinned host memory space (CPU) it degrades to ``full``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax

PRESETS = ("none", "full", "save_qkv_attn", "save_dots", "offload_layer_input")


def _has_pinned_host() -> bool:
    try:
        kinds = jax.devices()[0].addressable_memories()
    except Exception:  # older runtimes without memory spaces
        return False
    return any(m.kind == "pinned_host" for m in kinds) and jax.default_backend() == "gpu"


def _check(name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown remat_policy {name!r}; choose one of {PRESETS}")


def policy(name: str):
    """The ``jax.checkpoint`` policy for a preset name (``None`` for ``none``: no checkpointing)."""
    _check(name)
    cp = jax.checkpoint_policies
    if name == "none":
        return None
    if name == "full":
        return cp.nothing_saveable
    if name == "save_qkv_attn":
        return cp.save_only_these_names("qkv", "attn_out")
    if name == "save_dots":
        return cp.dots_with_no_batch_dims_saveable
    if name == "offload_layer_input":
        if not _has_pinned_host():
            return cp.nothing_saveable
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=["layer_input"],
            offload_src="device",
            offload_dst="pinned_host",
        )
    raise AssertionError(f"preset {name!r} has no policy")  # PRESETS and the branches disagree


# Off for host offload. The offloaded Llama-3-8B QLoRA step (4 x 2048, embedding on the host, H200,
# 2026-12-02, one invocation, each in its own process): XLA's default (command buffers on) 11,104
# tokens/s; XLA_FLAGS=--xla_gpu_enable_command_buffer= 11,387 and 11,393; the per-step options below
# 11,438. All peaked at 7.42 GiB. XLA reads XLA_FLAGS once, when jax starts its backend:
# ``command_buffers_off_in_env`` is the switch for a fresh process (the CLI uses it).
COMMAND_BUFFER_FLAG = "--xla_gpu_enable_command_buffer="
# The same per compiled step, for a process whose backend is already up (the Trainer's): measured
# above as fast as the XLA_FLAGS switch. The empty list alone was not enough in an earlier call, so
# the graph-size floor is there too (no graph smaller than 10^9 operations).
NO_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": "", "xla_gpu_graph_min_graph_size": 10**9}


def _user_set_command_buffers() -> bool:
    return "xla_gpu_enable_command_buffer" in os.environ.get("XLA_FLAGS", "")


def command_buffers_off_in_env(name: str) -> bool:
    """For an offloading preset, append ``COMMAND_BUFFER_FLAG`` to ``XLA_FLAGS``; call it before
    anything starts a jax backend (``jax.devices()``, the first array). Returns whether it added the
    flag: not for other presets, nor when ``XLA_FLAGS`` already names command buffers (the user's
    choice wins). The flag is harmless on CPU, where the preset degrades to ``full``."""
    _check(name)
    if name != "offload_layer_input" or _user_set_command_buffers():
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (flags + " " + COMMAND_BUFFER_FLAG).strip()
    return True


def compiler_options(name: str) -> dict[str, str | int] | None:
    """XLA options for a step compiled under preset ``name`` (``jax.jit(compiler_options=)``):
    command buffers off when the preset really offloads to pinned host memory, else ``None``. A
    command-buffer setting already in ``XLA_FLAGS`` (the user's, or ``command_buffers_off_in_env``'s)
    wins."""
    _check(name)
    if _user_set_command_buffers():
        return None
    if name == "offload_layer_input" and _has_pinned_host():
        return dict(NO_COMMAND_BUFFERS)
    return None


def wrap(body: Callable, name: str, *, in_scan: bool = True) -> Callable:
    """Wrap a layer body ``(carry, xs) -> (carry, ys)`` with the preset's checkpoint policy.

    ``in_scan=False`` for a body called in a Python loop: there XLA's common-subexpression pass would
    merge the backward's recomputation with the forward and keep every activation (an unrolled
    Llama-3-8B step under ``full`` peaked at 59.05 GiB on the H200, the same as ``none``), so the
    checkpoint keeps its CSE barrier. Inside ``lax.scan`` the barrier is not needed and costs speed."""
    pol = policy(name)
    if name == "none":
        return body
    return jax.checkpoint(body, policy=pol, prevent_cse=not in_scan)
