"""Fused NF4 + LoRA linear: forward and vjp of the Pallas kernels (interpret mode on CPU, compiled on GPU)
against the reference, the reference against float64 numpy, constraints, the interpret switch, and the
Triton lowering of both kernels (lowered for CUDA without a GPU)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastjax.pallas_kernels import _common
from fastjax.pallas_kernels import nf4_lora as k

from fastjax import quant

# Relative Frobenius error of the kernel vs the reference, per dtype (stated once).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
TOL_REF_VS_F64 = 1e-5  # the fp32 reference against float64 numpy

ON_GPU = _common.on_gpu()
_quantize = jax.jit(quant.quantize_nf4, static_argnames=("block_size", "double_quant"))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _case(seed, lead, n_in, out, r, dtype, bias):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (*lead, n_in), jnp.float32).astype(dtype)
    w = _quantize(jax.random.normal(ks[1], (out, n_in), jnp.float32) * 0.05)
    a = b = None
    if r:
        a = (jax.random.normal(ks[2], (r, n_in)) * 0.1).astype(dtype)
        b = (jax.random.normal(ks[3], (out, r)) * 0.1).astype(dtype)
    bvec = jax.random.normal(ks[4], (out,)).astype(dtype) if bias else None
    ct = jax.random.normal(ks[5], (*lead, out), jnp.float32).astype(dtype)
    return x, w, a, b, bvec, ct


def _fwd_vjp(impl, w, scale, bs, x, a, b, bias, ct):
    """jit(forward + vjp) w.r.t. every differentiable input that is present."""
    diff = {"x": x, "a": a, "b": b, "bias": bias}
    diff = {n: v for n, v in diff.items() if v is not None}

    def f(d):
        return k.nf4_lora_linear(
            d["x"],
            w,
            d.get("a"),
            d.get("b"),
            lora_scale=scale,
            bias=d.get("bias"),
            impl=impl,
            block_sizes=bs,
        )

    @jax.jit
    def run(d, ct):
        y, vjp = jax.vjp(f, d)
        return y, vjp(ct)[0]

    return run(diff, ct)


# (name, lead dims of x, in, out, rank, dtype, bias, block sizes: None = picker, or overrides, lookup)
CASES = [
    ("odd_f32_select", (17,), 192, 320, 8, jnp.float32, True, None, "select"),
    ("odd_bf16_gather", (17,), 192, 320, 8, jnp.bfloat16, False, None, "gather"),
    (
        "splitk_bf16",
        (5,),
        192,
        320,
        16,
        jnp.bfloat16,
        True,
        {"bm": 16, "bn": 16, "split_k": 3},
        "gather",
    ),
    ("nolora_f32_lead", (2, 9), 192, 64, 0, jnp.float32, True, None, "select"),
    (
        "big_tiles_bf16",
        (130,),
        256,
        64,
        4,
        jnp.bfloat16,
        False,
        {"bm": 128, "bn": 32, "bwd_bm": 64, "bwd_bn": 16, "bwd_bk": 128},
        "gather",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_matches_reference(case):
    name, lead, n_in, out, r, dtype, bias, overrides, lookup = case
    x, w, a, b, bvec, ct = _case(hash(name) % 1000, lead, n_in, out, r, dtype, bias)
    m = int(np.prod(lead))
    bs = k.pick_block_sizes(m, out, n_in)
    bs = dataclasses.replace(bs, lookup=lookup, **(overrides or {}))
    y, g = _fwd_vjp("pallas", w, 0.7, bs, x, a, b, bvec, ct)
    y_ref, g_ref = _fwd_vjp("reference", w, 0.7, None, x, a, b, bvec, ct)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (*lead, out)
    assert _rel(y, y_ref) < tol, ("y", _rel(y, y_ref))
    assert set(g) == set(g_ref)
    for n in g:
        assert g[n].shape == g_ref[n].shape and g[n].dtype == g_ref[n].dtype, n
        assert _rel(g[n], g_ref[n]) < tol, (n, _rel(g[n], g_ref[n]))


def test_reference_matches_float64():
    x, w, a, b, bvec, _ = _case(7, (11,), 128, 96, 4, jnp.float32, True)
    y = jax.jit(
        lambda *args: k.nf4_lora_linear(*args, lora_scale=0.5, bias=bvec, impl="reference")
    )(x, w, a, b)
    wd = np.asarray(jax.jit(quant.dequantize_nf4, static_argnums=1)(w, jnp.float32), np.float64)
    xn, an, bn = (np.asarray(v, np.float64) for v in (x, a, b))
    want = xn @ wd.T + 0.5 * (xn @ an.T) @ bn.T + np.asarray(bvec, np.float64)
    assert _rel(y, want) < TOL_REF_VS_F64


@pytest.mark.parametrize(
    "case",
    [
        ("decode_f32_lora_bias", (1, 8), 192, 320, 8, jnp.float32, True),
        ("decode_bf16_base_only", (16,), 256, 128, 0, jnp.bfloat16, False),
    ],
    ids=lambda c: c[0],
)
def test_pallas_fwd_is_fused_forward_with_xla_backward(case):
    """impl="pallas_fwd" (what decode-sized NF4 linears run on a GPU): forward and vjp equal the
    reference, and the vjp program holds one pallas_call (the forward), where "pallas" holds two."""
    name, lead, n_in, out, r, dtype, bias = case
    x, w, a, b, bvec, ct = _case(hash(name) % 1000 + 90, lead, n_in, out, r, dtype, bias)
    y, g = _fwd_vjp("pallas_fwd", w, 0.7, None, x, a, b, bvec, ct)
    y_ref, g_ref = _fwd_vjp("reference", w, 0.7, None, x, a, b, bvec, ct)
    assert y.dtype == dtype and _rel(y, y_ref) < TOL[dtype], ("y", _rel(y, y_ref))
    assert set(g) == set(g_ref)
    for n in g:
        assert g[n].dtype == g_ref[n].dtype and _rel(g[n], g_ref[n]) < TOL[dtype], n

    def n_pallas_calls(impl):
        def f(x, ct):
            y, vjp = jax.vjp(lambda x: k.nf4_lora_linear(x, w, a, b, bias=bvec, impl=impl), x)
            return y, vjp(ct)

        return str(jax.make_jaxpr(f)(x, ct)).count("pallas_call")

    assert (n_pallas_calls("pallas_fwd"), n_pallas_calls("pallas")) == (1, 2)


XLA_CASES = [
    # name, lead, in, out, r, dtype, bias
    ("fp32-lora-bias-odd-rows", (3, 41), 192, 96, 8, jnp.float32, True),
    ("bf16-lora", (123,), 128, 160, 16, jnp.bfloat16, False),
    ("bf16-base-only-bias", (17,), 256, 64, 0, jnp.bfloat16, True),
    ("fp32-out-not-mult-of-32", (5,), 64, 48, 4, jnp.float32, False),
]


@pytest.mark.parametrize("case", XLA_CASES, ids=[c[0] for c in XLA_CASES])
def test_xla_impl_matches_reference(case):
    """impl="xla" (x.dtype results, re-dequantizing backward) against the plain-autodiff reference:
    forward and vjp with a random cotangent. bf16 rounds each matmul result once more than the
    reference does (same tolerance as the kernels)."""
    name, lead, n_in, out, r, dtype, bias = case
    x, w, a, b, bvec, ct = _case(hash(name) % 1000 + 50, lead, n_in, out, r, dtype, bias)
    y, g = _fwd_vjp("xla", w, 0.7, None, x, a, b, bvec, ct)
    y_ref, g_ref = _fwd_vjp("reference", w, 0.7, None, x, a, b, bvec, ct)
    assert y.dtype == dtype and y.shape == (*lead, out)
    assert _rel(y, y_ref) < TOL[dtype], ("y", _rel(y, y_ref))
    assert set(g) == set(g_ref)
    for n in g:
        assert g[n].shape == g_ref[n].shape and g[n].dtype == g_ref[n].dtype, n
        assert _rel(g[n], g_ref[n]) < TOL[dtype], (n, _rel(g[n], g_ref[n]))


def test_xla_impl_keeps_no_bf16_weight_and_no_fp32_result():
    """What makes impl="xla" the training path: the vjp's residuals hold no dequantized [out, in]
    weight (the reference's autodiff keeps one per layer), and no op of the bf16 forward produces an
    fp32 [T, out] array (the reference's dot does)."""
    x, w, a, b, _, _ = _case(9, (64,), 128, 96, 8, jnp.bfloat16, False)

    def residual_shapes(impl):
        _, vjp = jax.vjp(lambda x, a, b: k.nf4_lora_linear(x, w, a, b, impl=impl), x, a, b)
        return {(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(vjp)}

    assert ((96, 128), jnp.dtype(jnp.bfloat16)) in residual_shapes("reference")  # can fail
    assert not any(s == (96, 128) for s, _ in residual_shapes("xla"))

    def fp32_results(impl):
        jaxpr = jax.make_jaxpr(lambda x: k.nf4_lora_linear(x, w, a, b, impl=impl))(x)
        return [
            v.aval.shape
            for e in jaxpr.eqns
            for v in e.outvars
            if v.aval.dtype == jnp.float32 and v.aval.shape == (64, 96)
        ]

    assert fp32_results("reference")
    assert not fp32_results("xla")


def test_lora_zero_b_is_base_and_w_gets_no_gradient():
    x, w, a, b, _, ct = _case(8, (9,), 128, 64, 4, jnp.float32, False)
    b0 = jnp.zeros_like(b)
    y0 = jax.jit(lambda x, w, a, b: k.nf4_lora_linear(x, w, a, b, lora_scale=3.0))(x, w, a, b0)
    y_base = jax.jit(k.nf4_lora_linear)(x, w)
    np.testing.assert_allclose(y0, y_base, rtol=1e-6, atol=1e-6)
    gw = jax.jit(jax.grad(lambda t: jnp.vdot(k.nf4_lora_linear(x, t, a, b), ct), allow_int=True))(w)
    for leaf in jax.tree.leaves(gw):
        assert not np.any(np.asarray(leaf, np.float32)) if leaf.dtype != jax.dtypes.float0 else True


def test_constraints_raise_clear_errors():
    x = jnp.ones((3, 128))
    w = _quantize(jax.random.normal(jax.random.key(0), (48, 128)))
    assert not k.supports_pallas(w)
    with pytest.raises(ValueError, match="out % 32"):
        k.nf4_lora_linear(x, w)
    k.nf4_lora_linear(x, w, impl="xla")  # the XLA paths take any even out
    k.nf4_lora_linear(x, w, impl="reference")
    w64 = _quantize(jax.random.normal(jax.random.key(1), (64, 128)))
    with pytest.raises(ValueError, match="does not end in"):
        k.nf4_lora_linear(jnp.ones((3, 64)), w64)
    with pytest.raises(ValueError, match="batch dims"):
        k.nf4_lora_linear(x, _quantize(jnp.ones((2, 64, 128))))
    with pytest.raises(ValueError, match="both lora_a and lora_b"):
        k.nf4_lora_linear(x, w64, jnp.ones((4, 128)))
    with pytest.raises(ValueError, match="A \\[r, 128\\]"):
        k.nf4_lora_linear(x, w64, jnp.ones((4, 128)), jnp.ones((64, 5)))
    with pytest.raises(ValueError, match="block_size"):
        k.nf4_lora_linear(x, _quantize(jnp.ones((64, 128)), block_size=128))
    with pytest.raises(ValueError, match="impl"):
        k.nf4_lora_linear(x, w64, impl="cuda")
    with pytest.raises(ValueError, match="lookup"):
        k.BlockSizes(lookup="table")


@pytest.mark.skipif(ON_GPU, reason="on a GPU both settings run")
def test_interpret_switch_takes_effect(monkeypatch):
    x = jax.random.normal(jax.random.key(2), (4, 128))
    w = _quantize(jax.random.normal(jax.random.key(3), (64, 128)))
    monkeypatch.setenv(_common.ENV_INTERPRET, "1")
    k.nf4_lora_linear(x, w)
    monkeypatch.setenv(_common.ENV_INTERPRET, "0")
    # Compiled Triton cannot run on a CPU: an error here means the switch reached pallas_call.
    with pytest.raises(Exception):  # noqa: B017 - the exact type depends on the jaxlib build
        jax.block_until_ready(k.nf4_lora_linear(x, w))


@pytest.mark.parametrize(("lookup", "t"), [("gather", 256), ("select", 256), ("select", 1)])
def test_triton_lowering_for_cuda(lookup, t):
    """Both kernels lower to Triton IR (the GPU path) for the picker's tiles, without a GPU."""
    n_in, out, r = 256, 256, 16
    bs = dataclasses.replace(k.pick_block_sizes(t, out, n_in), lookup=lookup)
    w = jax.eval_shape(quant.quantize_nf4, jax.ShapeDtypeStruct((out, n_in), jnp.bfloat16))
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)

    def f(x, w, a, b, ct):
        y, vjp = jax.vjp(
            lambda x, a, b: k.nf4_lora_linear(x, w, a, b, block_sizes=bs, interpret=False), x, a, b
        )
        return y, vjp(ct)

    try:
        lowered = (
            jax.jit(f)
            .trace(sd(t, n_in), w, sd(r, n_in), sd(out, r), sd(t, out))
            .lower(lowering_platforms=("cuda",))
        )
    except Exception as e:  # pragma: no cover - depends on the jaxlib build
        if "Triton" in str(e) or "triton" in str(e):
            raise
        pytest.skip(f"cross-lowering for cuda unavailable here: {type(e).__name__}")
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # forward kernel + dx kernel


def test_picker_fp32_caps_the_row_tile():
    """fp32 x holds twice the bytes per row: at most 128-row tiles and QBLOCK-deep dx steps."""
    b16, b32 = (k.pick_block_sizes(2048, 28672, 4096, dt) for dt in (jnp.bfloat16, jnp.float32))
    assert (b16.bm, b16.bwd_bm) == (256, 256)
    assert (b32.bm, b32.bwd_bm, b32.bwd_bk) == (128, 128, k.QBLOCK)
    assert (b32.bn, b32.bwd_bn) == (b16.bn, b16.bwd_bn)
    assert k.pick_block_sizes(300, 768, 1024, jnp.float32).bm == 128
    assert k.pick_block_sizes(16, 768, 1024, jnp.float32) == k.pick_block_sizes(16, 768, 1024)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("t", [1, 16, 300, 1100])
def test_compiled_gpu_matches_reference(t, dtype):
    x, w, a, b, _, ct = _case(t, (t,), 1024, 768, 16, dtype, False)
    y, g = _fwd_vjp("pallas", w, 2.0, None, x, a, b, None, ct)
    y_ref, g_ref = _fwd_vjp("xla", w, 2.0, None, x, a, b, None, ct)
    assert _rel(y, y_ref) < TOL[dtype]
    for n in g:
        assert _rel(g[n], g_ref[n]) < TOL[dtype], n
