"""The model really runs the Pallas kernels, and they give the XLA model's numbers.

On a tiny random Llama and a tiny random Gemma 2 (sandwich norms, GeGLU, softcaps, alternating
sliding/global layers under ``lax.switch``), forward logits and the vjp (random cotangent) w.r.t.
the params and a LoRA tree are compared between ``Ops.all("pallas", interpret=True)`` and
``Ops.all("xla")``. The traced program is inspected to prove which kernels run where: every residual
add that feeds a norm is a ``rms_norm_residual`` kernel (the one after attention, and without remat
the one closing each layer, fused with the next layer's input norm), and lowering for CUDA turns
each kernel into a Triton call. KV-cache prefill shares the layer scan and is checked the same way.
Last, env ``FASTJAX_KERNELS`` reaches ``Ops`` (read when ``Ops()`` is built, i.e. at call time).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastjax.models import decoder, decoding, registry
from fastjax.models import ops as O
from fastjax.pallas_kernels import _common

# Relative error max|pallas - xla| / max|xla| per output, stated once (fp32 end to end).
TOL = {"float32": 1e-5}

# Interpret-mode kernels become large XLA while-loops; the optimizer is most of their compile time
# (same settings as tests/pallas_kernels/conftest.py's run_fast).
FAST_XLA = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

_TINY = dict(
    hidden_size=64,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=37,
    max_position_embeddings=64,
)
MODELS = {
    "llama": dict(_TINY, model_type="llama", rope_theta=500.0),
    "gemma2": dict(
        _TINY,
        model_type="gemma2",
        head_dim=16,
        sliding_window=5,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0,
    ),
}
ACTIVATION = {"llama": "silu", "gemma2": "gelu_tanh"}
T = 13  # row 1 packs sequences of 6 and 5 tokens, then 2 padding tokens


def _random(rng: np.random.Generator, name: str, shape, gemma: bool) -> np.ndarray:
    """A weight at a scale where the network is far from linear (HF's init is std 0.02)."""
    r = rng.standard_normal(shape, np.float32)
    if "norm" in name:
        return 0.3 * r if gemma else 1.0 + 0.3 * r
    if "embed_tokens" in name:
        return 0.2 * r if gemma else r
    return r * shape[-1] ** -0.5


def _case(name: str):
    """(cfg, params, lora, ids, positions, segment_ids, logits cotangent) for a tiny random model,
    drawn with numpy (fresh per model; no per-shape compiles)."""
    cfg = registry.config_from_hf(MODELS[name])
    gemma = name.startswith("gemma")
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    flat = {n: _random(rng, n, shape, gemma) for n, shape in decoder.param_shapes(cfg).items()}
    params = jax.tree.map(jnp.asarray, decoder.stack_layers(flat, cfg.num_hidden_layers))
    L, r = cfg.num_hidden_layers, 3
    lora: dict = {}
    for path, (n_in, n_out) in decoder.linear_modules(cfg).items():
        module, proj = path.split(".")
        lora.setdefault(module, {})[proj] = {
            "lora_A": jnp.asarray(_random(rng, path, (L, r, n_in), gemma)),
            "lora_B": jnp.asarray(_random(rng, path, (L, n_out, r), gemma)),
        }
    lora = {"model": {"layers": lora}}
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, T)), jnp.int32)
    lens = (6, 5)
    pad = T - sum(lens)
    packed_positions = np.concatenate([np.arange(n) for n in lens] + [np.zeros(pad)])
    positions = jnp.asarray([np.arange(T), packed_positions], jnp.int32)
    segment_ids = jnp.asarray(
        [
            np.ones(T),
            np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)] + [np.zeros(pad)]),
        ],
        jnp.int32,
    )
    ct = jnp.asarray(rng.standard_normal((2, T, cfg.vocab_size), np.float32))
    return cfg, params, lora, ids, positions, segment_ids, ct


def _fwd_bwd(case, ops: O.Ops, remat_policy: str):
    """``(params, lora) -> (logits, (d params, d lora))`` for the random cotangent."""
    cfg, _, _, ids, positions, segment_ids, ct = case

    def forward(params, lora):
        return decoder.forward(
            params,
            ids,
            cfg=cfg,
            positions=positions,
            segment_ids=segment_ids,
            lora=lora,
            lora_scale=0.5,
            remat_policy=remat_policy,
            ops=ops,
        )

    def fwd_bwd(params, lora):
        logits, vjp = jax.vjp(forward, params, lora)
        return logits, vjp(ct)

    return forward, fwd_bwd


def _pallas_calls(fn, *args) -> tuple[collections.Counter, set]:
    """Pallas kernels in ``fn``'s traced program: (kernel name -> call sites, interpret flags seen).

    Walks every sub-program (scan, switch branches, remat, jit, custom_vjp), not kernel bodies.
    """
    counts: collections.Counter = collections.Counter()
    interpret: set = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                name = eqn.params.get("name") or eqn.params["name_and_src_info"]
                counts[str(name).split()[0]] += 1
                interpret.add(bool(eqn.params["interpret"]))
                continue
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return counts, interpret


def _kernels(name: str) -> set[str]:
    """Every kernel a training step of the model runs (forward and backward)."""
    act = ACTIVATION[name]
    return {
        "rms_norm_fwd",
        "rms_norm_bwd",
        "rms_norm_residual_fwd",
        "rms_norm_residual_bwd",
        "rope_fwd",
        "rope_bwd",
        f"glu_{act}_fwd",
        f"glu_{act}_bwd",
        "fastjax_attention_fwd",
        "fastjax_attention_dq",
        "fastjax_attention_dkdv",
    }


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


@pytest.mark.parametrize(
    "name,remat_policy", [("llama", "none"), ("gemma2", "none"), ("llama", "full")]
)
def test_pallas_model_matches_xla(name, remat_policy):
    case = _case(name)
    cfg, params, lora = case[:3]
    sandwich = cfg.arch().sandwich_norms
    pallas_fwd, pallas = _fwd_bwd(case, O.Ops.all("pallas", interpret=True), remat_policy)
    _, xla = _fwd_bwd(case, O.Ops.all("xla"), remat_policy)

    # Norm call sites of the forward: without remat both residual adds of a layer are fused (the
    # closing one with the next input norm); the plain norms left are the first input norm (with
    # remat: each layer's input norm and the final norm) and Gemma's two post-norms on the branches.
    fused = 2 if remat_policy == "none" else 1
    counts, interpret = _pallas_calls(pallas_fwd, params, lora)
    assert counts["rms_norm_residual_fwd"] == fused, counts
    assert counts["rms_norm_fwd"] == 3 - fused + 2 * sandwich, counts
    assert interpret == {True}
    counts, _ = _pallas_calls(pallas, params, lora)
    assert set(counts) == _kernels(name), counts
    assert _pallas_calls(xla, params, lora)[0] == collections.Counter()

    got, want = (
        jax.jit(f).lower(params, lora).compile(compiler_options=FAST_XLA)(params, lora)
        for f in (pallas, xla)
    )
    tol = TOL["float32"]
    assert _rel(got[0], want[0]) < tol, "logits"
    assert np.abs(np.asarray(want[0])).max() > 1.0  # far from a degenerate (all-small) output
    flat_got = jax.tree_util.tree_leaves_with_path(got[1])
    flat_want = jax.tree.leaves(want[1])
    assert len(flat_got) == len(flat_want) > 10
    for (path, g), w in zip(flat_got, flat_want):
        assert np.abs(np.asarray(w)).max() > 0, jax.tree_util.keystr(path)
        assert _rel(g, w) < tol, jax.tree_util.keystr(path)


def test_cached_decoding_pallas_matches_xla():
    """KV-cache prefill of 7 tokens into a 9-slot cache (shared layer scan, fused norms)."""
    cfg, params, lora = _case("gemma2")[:3]
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 7)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    kv_valid = jnp.arange(9)[None, :].repeat(2, 0) < 7

    def prefill(ops):
        def f(params, lora):
            cache = decoding.init_cache(cfg, 2, 9, jnp.float32)
            return decoding.forward_cached(
                params,
                ids,
                cache,
                cfg=cfg,
                positions=positions,
                cache_index=jnp.int32(0),
                kv_valid=kv_valid,
                lora=lora,
                ops=ops,
            )

        return f

    pallas, xla = prefill(O.Ops.all("pallas", interpret=True)), prefill(O.Ops.all("xla"))
    counts, _ = _pallas_calls(pallas, params, lora)
    assert counts["rms_norm_residual_fwd"] == 2 and counts["rms_norm_fwd"] == 3, counts
    got, want = (
        jax.jit(f).lower(params, lora).compile(compiler_options=FAST_XLA)(params, lora)
        for f in (pallas, xla)
    )
    assert _rel(got[0], want[0]) < TOL["float32"], "last logits"
    for key in ("k", "v"):
        assert _rel(got[1][key], want[1][key]) < TOL["float32"], key


def _cuda_kernel_names(fn, *args, monkeypatch) -> collections.Counter:
    """Triton kernels (name -> custom calls) of ``fn`` lowered for CUDA with interpret mode off:
    each ``pallas_call`` goes through Pallas' Triton lowering on this CPU machine (the check of
    tests/pallas_kernels/conftest.py's ``lower_for_cuda``, with kernel names)."""
    from jax._src.lib import version as jaxlib_version

    if jaxlib_version > (0, 10, 2) and not _common.on_gpu():
        pytest.skip("this jaxlib compiles Triton during lowering; needs a GPU")
    monkeypatch.setenv(_common.ENV_INTERPRET, "0")
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = [
        line
        for line in text.splitlines()
        if "custom_call @__gpu$xla.gpu.triton" in line or "triton_kernel_call" in line
    ]
    names = (m.group(1) for line in calls for m in re.finditer(r'name = "(\w+)"', line))
    return collections.Counter(names)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_kernel_lowers_to_triton(name, monkeypatch):
    """With interpret mode off (the GPU path), every kernel of the training step is a Triton call;
    the XLA ops have none."""
    case = _case(name)
    params, lora = case[1:3]
    _, pallas = _fwd_bwd(case, O.Ops.all("pallas"), "none")
    assert set(_cuda_kernel_names(pallas, params, lora, monkeypatch=monkeypatch)) == _kernels(name)
    _, xla = _fwd_bwd(case, O.Ops.all("xla"), "none")
    assert not _cuda_kernel_names(xla, params, lora, monkeypatch=monkeypatch)


# --------------------------------------------------------------------------------------------------
# FASTJAX_KERNELS
# --------------------------------------------------------------------------------------------------

OPS = ("rms_norm", "rope", "glu", "attention", "linear", "cross_entropy")


def test_env_sets_every_op_default(monkeypatch):
    """The env is read when ``Ops()`` is built (a dataclass default factory): per call."""
    for value in ("xla", "pallas"):
        monkeypatch.setenv(O.ENV_KERNELS, value)
        assert {op: O.Ops().resolve(op) for op in OPS} == dict.fromkeys(OPS, value)
    monkeypatch.setenv(O.ENV_KERNELS, "pallas")
    assert O.Ops(rms_norm="xla").resolve("rms_norm") == "xla"  # an explicit field wins
    monkeypatch.setenv(O.ENV_KERNELS, " XLA ")
    assert O.Ops().rms_norm == "xla"
    monkeypatch.delenv(O.ENV_KERNELS)
    assert O.Ops() == O.Ops.all("auto")
    if not _common.on_gpu():
        assert O.Ops().resolve("rms_norm") == "xla"
    monkeypatch.setenv(O.ENV_KERNELS, "triton")
    with pytest.raises(ValueError, match=r"FASTJAX_KERNELS='triton'.*auto.*pallas.*xla"):
        O.Ops()


_CHILD = """
import collections, json, jax, jax.numpy as jnp
from fastjax.models import decoder, decoding, registry
cfg = registry.config_from_hf(json.loads({cfg!r}))
params = decoder.init_params(cfg, jax.random.key(0))
ids = jnp.ones((1, 7), jnp.int32)
text = str(jax.make_jaxpr(lambda p: decoder.forward(p, ids, cfg=cfg))(params))  # no ops= argument
names = [ln.split("=", 1)[1].strip() for ln in text.splitlines() if ln.strip().startswith("name=")]
print(json.dumps({{"pallas_calls": text.count("pallas_call["), "names": sorted(set(names))}}))
"""


@pytest.mark.parametrize("value", ["xla", "pallas"])
def test_env_reaches_forward_in_a_fresh_process(value):
    """``FASTJAX_KERNELS`` set before Python starts reaches ``decoder.forward``'s ``Ops()``."""
    env = dict(os.environ, FASTJAX_KERNELS=value, JAX_PLATFORMS="cpu")
    code = _CHILD.format(cfg=json.dumps(MODELS["llama"]))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if value == "xla":
        assert report["pallas_calls"] == 0, report
    else:
        assert {
            "rms_norm_residual_fwd",
            "rms_norm_fwd",
            "rope_fwd",
            "glu_silu_fwd",
            "fastjax_attention_fwd",
        } <= set(report["names"]), report


def test_auto_on_a_gpu_follows_the_measurements(monkeypatch):
    """On a GPU, ``auto`` takes the kernel except where a measured XLA form won end to end (NF4 linears,
    the GLU); attention stays ``auto`` for its own per-call table."""
    monkeypatch.delenv(O.ENV_KERNELS, raising=False)
    monkeypatch.setattr(O._common, "on_gpu", lambda: True)
    assert {op: O.Ops().resolve(op) for op in OPS} == {
        "rms_norm": "pallas",
        "rope": "pallas",
        "glu": "xla_recompute",
        "attention": "auto",
        "linear": "xla",
        "cross_entropy": "pallas",
    }
    assert O.Ops(glu="pallas").resolve("glu") == "pallas"  # an explicit field wins
