"""NF4 quantization: tables, bitsandbytes layout (vs a numpy re-implementation of bnb's quantize_4bit),
round-trip and double-quantization error bounds, stacked slicing, bnb state round trip, quantize_params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastjax import quant
from fastjax.quant import DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED, NF4_CODE

# Tolerances, stated once. Bit-exact fields are compared with equality.
TOL = {
    "absmax2_rtol": 1e-6,  # fp32 reductions in a different order
    "offset_rtol": 1e-5,  # mean over up to 10^3 values, different summation order
    "near_tie": 1e-6,  # a code may differ from bnb's argmin only this close to a decision midpoint
}

# Published values of bitsandbytes' signed dynamic map (index: value), from its 256-entry table.
BNB_DYNAMIC_SIGNED_SPOTS = {
    0: -0.992968738079071,
    1: -0.9789062738418579,
    64: -0.09859374910593033,
    100: -0.0074687497690320015,
    104: -0.0052187503315508366,
    126: -5.500000384017767e-07,
    127: 0.0,
    128: 5.500000384017767e-07,
    190: 0.09859374910593033,
    254: 0.992968738079071,
    255: 1.0,
}


_quantize = jax.jit(quant.quantize_nf4, static_argnames=("block_size", "double_quant"))
_dequantize = jax.jit(quant.dequantize_nf4, static_argnums=1)


def _rng(seed):
    return np.random.default_rng(seed)


def bnb_quantize_4bit_numpy(w: np.ndarray):
    """Straightforward numpy version of bitsandbytes' quantize_4bit(nf4, blocksize 64,
    compress_statistics=True): flat row-major blocks, x * (1/absmax), nearest NF4 entry (argmin), pairs packed
    first-high; absmax - mean quantized in blocks of 256 with the signed dynamic map."""
    flat = w.astype(np.float32).reshape(-1)
    blocks = flat.reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1)
    scaled = blocks * (np.float32(1) / absmax)[:, None]
    codes = np.abs(scaled[..., None] - NF4_CODE).argmin(-1).astype(np.uint8).reshape(-1)
    weight = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)
    offset = absmax.mean(dtype=np.float32)
    centered = absmax - offset
    n = centered.size
    padded = np.zeros(-(-n // 256) * 256, np.float32)
    padded[:n] = centered
    b2 = padded.reshape(-1, 256)
    absmax2 = np.abs(b2).max(axis=1)
    s2 = b2 * (np.float32(1) / absmax2)[:, None]
    q = np.abs(s2[..., None] - DYNAMIC_MAP_SIGNED).argmin(-1).astype(np.uint8).reshape(-1)[:n]
    return {
        "weight": weight,
        "codes": codes,
        "scaled": scaled.reshape(-1),
        "absmax_q": q,
        "absmax2": absmax2,
        "offset": offset,
        "absmax": absmax,
        "s2": s2.reshape(-1)[:n],
    }


def _assert_codes_match(ours, ref, values, code):
    """Codes equal except where the value sits within TOL['near_tie'] of a decision midpoint."""
    mids = (code[:-1].astype(np.float64) + code[1:]) / 2
    diff = np.nonzero(ours != ref)[0]
    for i in diff:
        assert np.min(np.abs(mids - values[i])) < TOL["near_tie"], (i, ours[i], ref[i], values[i])


def test_nf4_table_facts():
    assert NF4_CODE.shape == (16,) and NF4_CODE.dtype == np.float32
    assert np.all(np.diff(NF4_CODE) > 0)
    assert NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    np.testing.assert_allclose(
        NF4_CODE[[1, 8, 14]],
        [-0.6961928009986877, 0.07958029955625534, 0.7229568362236023],
        rtol=0,
        atol=0,
    )


def test_dynamic_maps():
    for m in (DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED):
        assert m.shape == (256,) and m.dtype == np.float32 and np.all(np.diff(m) >= 0)
        assert m[-1] == 1.0
    for i, v in BNB_DYNAMIC_SIGNED_SPOTS.items():
        np.testing.assert_allclose(
            DYNAMIC_MAP_SIGNED[i], v, rtol=2e-7, atol=0, err_msg=f"index {i}"
        )
    assert DYNAMIC_MAP_UNSIGNED[0] == 0.0 and np.all(DYNAMIC_MAP_UNSIGNED >= 0)
    np.testing.assert_allclose(DYNAMIC_MAP_UNSIGNED[1:3], [3.25e-7, 7.75e-7], rtol=1e-6)
    assert len(np.unique(DYNAMIC_MAP_UNSIGNED)) == 256 and len(np.unique(DYNAMIC_MAP_SIGNED)) == 256


@pytest.mark.parametrize("shape", [(96, 192), (64, 320), (2, 64)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layout_matches_bnb_numpy(shape, dtype):
    w = jnp.asarray(_rng(sum(shape)).standard_normal(shape) * 0.03, dtype)
    t = _quantize(w)
    st = quant.to_bnb_state(t)
    ref = bnb_quantize_4bit_numpy(np.asarray(w, np.float32))
    codes = np.empty(w.size, np.uint8)
    codes[0::2], codes[1::2] = st["weight"].reshape(-1) >> 4, st["weight"].reshape(-1) & 0xF
    _assert_codes_match(codes, ref["codes"], ref["scaled"], NF4_CODE)
    _assert_codes_match(st["absmax"], ref["absmax_q"], ref["s2"], DYNAMIC_MAP_SIGNED)
    assert st["weight"].shape == (w.size // 2, 1) and st["weight"].dtype == np.uint8
    np.testing.assert_allclose(st["nested_absmax"], ref["absmax2"], rtol=TOL["absmax2_rtol"])
    np.testing.assert_allclose(st["nested_offset"], ref["offset"], rtol=TOL["offset_rtol"])
    assert st["shape"] == shape and st["blocksize"] == 64 and st["nested_blocksize"] == 256
    assert st["dtype"] == jnp.dtype(dtype).name and st["quant_type"] == "nf4"
    # Our own layout: row i high nibble, row i + out/2 low nibble.
    packed = np.asarray(t.packed)
    c2 = codes.reshape(shape)
    np.testing.assert_array_equal(packed >> 4, c2[: shape[0] // 2])
    np.testing.assert_array_equal(packed & 0xF, c2[shape[0] // 2 :])


def test_roundtrip_error_within_nf4_bounds():
    rng = _rng(1)
    w = jnp.asarray(rng.standard_normal((3, 128, 256)) * 0.02, jnp.float32)
    t = _quantize(w, double_quant=False)
    d = np.asarray(_dequantize(t, jnp.float32))
    wn = np.asarray(w)
    blocks = wn.reshape(3, 128, 4, 64)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    # Exact: nearest NF4 value times the block absmax.
    scaled = blocks / absmax
    nearest = NF4_CODE[np.abs(scaled[..., None] - NF4_CODE).argmin(-1)]
    np.testing.assert_allclose(d.reshape(blocks.shape), nearest * absmax, rtol=1e-6, atol=1e-9)
    # Bound: half the widest NF4 gap per element; Gaussian relative RMS error ~0.09 (QLoRA's NF4).
    half_gap = np.max(np.diff(NF4_CODE)) / 2
    assert np.all(np.abs(d.reshape(blocks.shape) - blocks) <= half_gap * absmax + 1e-7)
    rel = np.linalg.norm(d - wn) / np.linalg.norm(wn)
    assert 0.07 < rel < 0.11, rel
    # Double quantization adds little on top.
    d2 = np.asarray(_quantize(w).dequantize(jnp.float32))
    rel2 = np.linalg.norm(d2 - wn) / np.linalg.norm(wn)
    assert rel <= rel2 < rel * 1.02, (rel, rel2)


def test_double_quant_absmax_error_bound():
    rng = _rng(2)
    w = jnp.asarray(
        rng.standard_normal((2, 160, 448)) * rng.uniform(0.005, 0.05, (2, 160, 1)), jnp.float32
    )
    t = _quantize(w)
    true = np.abs(np.asarray(w).reshape(2, 160, 7, 64)).max(-1)
    rec = np.asarray(t.absmax_f32())
    n = 160 * 7
    blk = np.arange(n) // 256
    bound = np.max(np.diff(DYNAMIC_MAP_SIGNED)) / 2
    for layer in range(2):
        a2 = np.asarray(t.absmax2[layer])[blk]
        err = np.abs(rec[layer].reshape(-1) - true[layer].reshape(-1))
        assert np.all(err <= bound * a2 + 1e-7), float(np.max(err / a2))
        assert np.mean(err / true[layer].reshape(-1)) < 1e-2
    assert t.absmax.dtype == jnp.uint8 and t.absmax2.shape == (2, -(-n // 256))
    assert t.offset.shape == (2,)


def test_stacked_slicing_and_scan():
    rng = _rng(3)
    w = jnp.asarray(rng.standard_normal((4, 64, 128)), jnp.bfloat16)
    t = _quantize(w)
    assert t.shape == (4, 64, 128) and t.batch_shape == (4,) and t.dtype == jnp.bfloat16
    for i in (0, 3):
        ti = jax.tree.map(lambda a, i=i: a[i], t)
        one = _quantize(w[i])
        assert ti.shape == (64, 128)
        for a, b in zip(jax.tree.leaves(ti), jax.tree.leaves(one)):
            np.testing.assert_allclose(
                np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6
            )

    def body(c, layer_t):
        return c + jnp.sum(layer_t.dequantize(jnp.float32)), layer_t.shape[0]

    total, outs = jax.lax.scan(body, jnp.float32(0), t)
    np.testing.assert_allclose(total, jnp.sum(t.dequantize(jnp.float32)), rtol=1e-5)
    assert outs.tolist() == [64] * 4


@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_state_roundtrip(double_quant):
    w = jnp.asarray(_rng(4).standard_normal((96, 128)), jnp.float32)
    t = _quantize(w, double_quant=double_quant)
    st = quant.to_bnb_state(t)
    assert ("nested_absmax" in st) == double_quant
    t2 = quant.from_bnb_state(st)
    assert t2.dtype == t.dtype and t2.shape == t.shape and t2.double_quant == double_quant
    for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(t2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bad = dict(st, quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        quant.from_bnb_state(bad)
    with pytest.raises(ValueError, match="batch dims"):
        quant.to_bnb_state(_quantize(jnp.ones((2, 4, 64))))


def test_zero_block_and_errors():
    w = jnp.zeros((4, 128)).at[0, 70].set(1.5)
    d = quant.dequantize_nf4(_quantize(w), jnp.float32)
    assert bool(jnp.all(jnp.isfinite(d)))
    np.testing.assert_allclose(
        d, w, atol=1e-2
    )  # one nonzero -> exactly NF4 1.0 * absmax (+absmax dq)
    with pytest.raises(ValueError, match="multiple of block_size"):
        _quantize(jnp.ones((4, 96)))
    with pytest.raises(ValueError, match="even"):
        _quantize(jnp.ones((3, 64)))
    with pytest.raises(ValueError, match="quant_type"):
        quant.QuantConfig(quant_type="fp4")


def _tiny_params(rng):
    L, D, F, V = 2, 128, 192, 50
    f = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.02, jnp.bfloat16)
    return {
        "model": {
            "embed_tokens": {"weight": f(V, D)},
            "layers": {
                "self_attn": {"q_proj": {"weight": f(L, D, D)}, "o_proj": {"weight": f(L, D, D)}},
                "mlp": {"down_proj": {"weight": f(L, D, F)}},
                "input_layernorm": {"weight": f(L, D)},
            },
            "norm": {"weight": f(D)},
        },
        "lm_head": {"weight": f(V, D)},
    }


def test_quantize_params_tree():
    params = _tiny_params(_rng(5))
    q = quant.quantize_params(
        params, quant.QuantConfig(skip_modules=("lm_head", "embed_tokens", "o_proj"))
    )
    lay = q["model"]["layers"]
    qp = lay["self_attn"]["q_proj"]["weight"]
    assert isinstance(qp, quant.NF4Tensor) and qp.shape == (2, 128, 128)
    assert isinstance(lay["mlp"]["down_proj"]["weight"], quant.NF4Tensor)
    assert lay["mlp"]["down_proj"]["weight"].shape == (2, 128, 192)
    for keep in (
        lay["self_attn"]["o_proj"]["weight"],
        lay["input_layernorm"]["weight"],
        q["model"]["embed_tokens"]["weight"],
        q["lm_head"]["weight"],
        q["model"]["norm"]["weight"],
    ):
        assert isinstance(keep, jax.Array)
    assert q["lm_head"]["weight"] is params["lm_head"]["weight"]
    one = _quantize(params["model"]["layers"]["self_attn"]["q_proj"]["weight"][1])
    np.testing.assert_array_equal(np.asarray(qp.packed[1]), np.asarray(one.packed))
    np.testing.assert_allclose(
        np.asarray(qp.dequantize(jnp.float32)[1]),
        np.asarray(one.dequantize(jnp.float32)),
        rtol=1e-6,
    )


def test_quantize_params_donate_frees_source():
    params = _tiny_params(_rng(6))
    src = params["model"]["layers"]["self_attn"]["q_proj"]["weight"]
    quant.quantize_params(params, donate=True)
    assert src.is_deleted()
    assert not params["model"]["embed_tokens"]["weight"].is_deleted()


def test_from_pretrained_load_in_4bit_quantizes_on_load(tiny_llama_dir):
    """``from_pretrained(load_in_4bit=True)`` quantizes each decoder linear as it is read: the result is
    bit-identical to quantizing the dense load, ``skip_modules`` stay dense, and so do the embeddings,
    norms and head."""
    import fastjax

    ckpt, _ = tiny_llama_dir(
        seed=7, tie_word_embeddings=False, intermediate_size=128
    )  # in % 64 == 0
    qc = quant.QuantConfig(skip_modules=("lm_head", "embed_tokens", "o_proj"))
    q4, cfg, _ = fastjax.from_pretrained(
        ckpt, dtype=jnp.float32, load_in_4bit=True, quant_config=qc
    )
    dense, _, _ = fastjax.from_pretrained(ckpt, dtype=jnp.float32)
    want = quant.quantize_params(dense, qc)
    assert jax.tree.structure(q4) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(q4), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lay = q4["model"]["layers"]
    for module in ("q_proj", "k_proj", "v_proj"):
        assert isinstance(lay["self_attn"][module]["weight"], quant.NF4Tensor), module
    for module in ("gate_proj", "up_proj", "down_proj"):
        assert isinstance(lay["mlp"][module]["weight"], quant.NF4Tensor), module
    for keep in (
        lay["self_attn"]["o_proj"]["weight"],
        q4["lm_head"]["weight"],
        q4["model"]["embed_tokens"]["weight"],
        lay["input_layernorm"]["weight"],
    ):
        assert isinstance(keep, jax.Array)
