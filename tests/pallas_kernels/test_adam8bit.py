"""The fused 8-bit Adam step (``pallas_kernels/adam8bit.py``) against its reference, and inside adamw_8bit."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fastjax import optim
from fastjax.pallas_kernels import _common
from fastjax.pallas_kernels import adam8bit as A
from fastjax.quant import DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED, blockwise_quantize_8bit

# u: relative L2 error per output dtype (bf16: the rounding of the output). Codes: the two sides may round
# a moment 1 ulp apart (FMA contraction differs between fusions), which moves a value across a midpoint
# only where it sits within that ulp of it: at most CODE_FRACTION of the codes, and by one index.
TOL = {jnp.float32: 1e-6, jnp.bfloat16: 8e-3}
CODE_FRACTION = 1e-3
KW = dict(b1=0.9, b2=0.999, eps=1e-8)


def _key(*tags) -> jax.Array:
    return jax.random.key(zlib.crc32(repr(tags).encode()))


def _moments(key, nb: int):
    """Quantized moments from values spread over 6 decades, as a trained state has."""
    k1, k2, k3 = jax.random.split(key, 3)
    scale = 10.0 ** jax.random.uniform(k3, (nb, 1), minval=-7, maxval=-1)
    m = jax.random.normal(k1, (nb * A.BLOCK,)) * jnp.repeat(scale[:, 0], A.BLOCK)
    v = jnp.square(jax.random.normal(k2, (nb * A.BLOCK,))) * jnp.repeat(scale[:, 0], A.BLOCK) ** 2
    mc, ma = blockwise_quantize_8bit(m, DYNAMIC_MAP_SIGNED, A.BLOCK)
    vc, va = blockwise_quantize_8bit(v, DYNAMIC_MAP_UNSIGNED, A.BLOCK)
    return mc.reshape(nb, A.BLOCK), ma, vc.reshape(nb, A.BLOCK), va


def _scalars(t: int):
    b1, b2 = KW["b1"], KW["b2"]
    return jnp.array([1 - b1**t, 1 - b2**t, 1 - b1 ** (t + 1)], jnp.float32)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _assert_codes_close(got, want):
    got, want = np.asarray(got).astype(int), np.asarray(want).astype(int)
    assert np.abs(got - want).max(initial=0) <= 1
    assert (got != want).mean() <= CODE_FRACTION, (got != want).mean()


def _assert_step_matches(out, ref, dtype):
    u, mc, ma, vc, va = out
    u_r, mc_r, ma_r, vc_r, va_r = ref
    assert u.dtype == u_r.dtype == dtype and mc.dtype == vc.dtype == jnp.uint8
    assert _rel(u, u_r) <= TOL[dtype]
    for codes, codes_r in ((mc, mc_r), (vc, vc_r)):
        _assert_codes_close(codes, codes_r)
    for absmax, absmax_r in ((ma, ma_r), (va, va_r)):
        np.testing.assert_allclose(np.asarray(absmax), np.asarray(absmax_r), rtol=1e-6, atol=0)
    assert np.isfinite(np.asarray(u, np.float32)).all()


@pytest.mark.parametrize(
    "nb,dtype,nesterov,eps_root,t",
    [
        (1, jnp.float32, False, 0.0, 1),
        (16, jnp.bfloat16, True, 1e-12, 7),
        (37, jnp.float32, True, 1e-12, 7),
        (37, jnp.bfloat16, False, 0.0, 2),
    ],
)
def test_kernel_matches_reference(nb, dtype, nesterov, eps_root, t, run_fast):
    """Block counts of one block, one whole tile and a partial last tile (37 = 2 x 16 + 5), each dtype
    and each update form (plain, Nesterov with eps_root) at a partial tile."""
    key = _key("step", nb, str(dtype), nesterov, t)
    g = (jax.random.normal(key, (nb, A.BLOCK)) * 1e-3).astype(dtype)
    mc, ma, vc, va = _moments(jax.random.fold_in(key, 1), nb)
    kw = dict(KW, nesterov=nesterov, eps_root=eps_root)
    args = (g, mc, ma, vc, va, _scalars(t))
    ref = A.adam8bit_update_reference(*args, **kw)
    out = run_fast(lambda *a: A.adam8bit_update(*a, impl="pallas", interpret=True, **kw), *args)
    _assert_step_matches(out, ref, dtype)


def test_first_step_from_zero_moments_and_zero_gradients_stay_defined(run_fast):
    """Zero moments (a fresh state) with a gradient block of all zeros: that block keeps absmax 0 and
    the code of 0.0, its direction is 0, and no NaN appears anywhere."""
    nb = 5
    g = jax.random.normal(_key("zero"), (nb, A.BLOCK)).at[2].set(0.0)
    zc, za = jnp.zeros((nb, A.BLOCK), jnp.uint8), jnp.zeros((nb,), jnp.float32)
    zero_s = int(np.argmin(np.abs(DYNAMIC_MAP_SIGNED)))
    zero_u = int(np.argmin(np.abs(DYNAMIC_MAP_UNSIGNED)))
    args = (g, zc + zero_s, za, zc + zero_u, za, _scalars(1))
    out = run_fast(lambda *a: A.adam8bit_update(*a, impl="pallas", interpret=True, **KW), *args)
    u, mc, ma, vc, va = out
    _assert_step_matches(out, A.adam8bit_update_reference(*args, **KW), jnp.float32)
    assert float(ma[2]) == 0.0 and float(va[2]) == 0.0
    assert (np.asarray(mc[2]) == zero_s).all() and (np.asarray(vc[2]) == zero_u).all()
    assert not np.asarray(u[2]).any()
    # the first step from zero moments is sign(g) * (1 - tiny): Adam's bias correction
    np.testing.assert_allclose(np.asarray(u[0]), np.sign(np.asarray(g[0])), rtol=1e-3)


def test_bad_shapes_and_impl_are_clear_errors():
    nb = 3
    g = jnp.zeros((nb, A.BLOCK))
    c, a, s = jnp.zeros((nb, A.BLOCK), jnp.uint8), jnp.zeros((nb,), jnp.float32), _scalars(1)
    with pytest.raises(ValueError, match=r"v_codes is int32\[3, 256\], expected uint8\[3, 256\]"):
        A.adam8bit_update(g, c, a, c.astype(jnp.int32), a, s, **KW)
    with pytest.raises(ValueError, match=r"m_absmax is float32\[4\]"):
        A.adam8bit_update(g, c, jnp.zeros((4,)), c, a, s, **KW)
    with pytest.raises(ValueError, match=r"g is float32\[3, 128\]"):
        A.adam8bit_update(jnp.zeros((nb, 128)), c, a, c, a, s, **KW)
    with pytest.raises(ValueError, match="impl='triton'"):
        A.adam8bit_update(g, c, a, c, a, s, impl="triton", **KW)
    with pytest.raises(ValueError, match="power of 2"):
        A.BlockSizes(block_rows=12)
    assert A.pick_block_sizes(1).block_rows == 1 and A.pick_block_sizes(3).block_rows == 4
    assert A.pick_block_sizes(10**6) == A.BlockSizes()  # the measured default for a large leaf


def _tree(key):
    """Quantized leaves with padding (4097, 72 x 130 values) and without, plus fp32-moment leaves."""
    shapes = {"w": (64, 256), "odd": (4097,), "mat": (72, 130), "bias": (130,)}
    keys = jax.random.split(key, len(shapes))
    return {n: jax.random.normal(k, s) * 0.1 for (n, s), k in zip(shapes.items(), keys)}


@pytest.mark.parametrize("nesterov", [False, True])
def test_adamw_8bit_pallas_equals_xla_over_steps(nesterov):
    """Five steps of adamw_8bit with each impl from the same start: the same state layout, codes within
    one index, and parameters within 1e-5 (relative L2 per leaf: a code one index apart moves its one
    parameter by a fraction of the learning rate in the steps after)."""
    params = _tree(_key("tree"))
    opts = {
        impl: optim.adamw_8bit(1e-2, nesterov=nesterov, impl=impl, interpret=True)
        for impl in ("pallas", "xla")
    }
    runs = {}
    for impl, opt in opts.items():
        p, st = params, opt.init(params)

        @jax.jit
        def step(p, st, i, opt=opt):
            g = jax.tree.map(lambda x: jnp.sin(x * (3.0 + i)) + 0.01 * x, p)
            u, st = opt.update(g, st, p)
            return optax.apply_updates(p, u), st

        for i in range(5):
            p, st = step(p, st, float(i))
        runs[impl] = (p, st)
    (p_k, st_k), (p_x, st_x) = runs["pallas"], runs["xla"]
    assert jax.tree.structure(st_k) == jax.tree.structure(st_x)
    for a, b in zip(jax.tree.leaves(p_k), jax.tree.leaves(p_x)):
        assert _rel(a, b) <= 1e-5
    adam_k, adam_x = st_k[0], st_x[0]
    for name in ("w", "odd", "mat"):
        for mom in ("mu", "nu"):
            qk, qx = getattr(adam_k, mom)[name], getattr(adam_x, mom)[name]
            assert isinstance(qk, optim.QuantizedMoment)
            _assert_codes_close(qk.codes, qx.codes)
    # the padding of "odd" (4097 -> 17 blocks) keeps the code of 0.0
    zero_s = int(np.argmin(np.abs(DYNAMIC_MAP_SIGNED)))
    assert (np.asarray(adam_k.mu["odd"].codes).reshape(-1)[4097:] == zero_s).all()
    assert not isinstance(adam_k.mu["bias"], optim.QuantizedMoment)


def test_impl_is_checked_and_auto_follows_the_kernels_setting(monkeypatch):
    with pytest.raises(ValueError, match="impl='fused'"):
        optim.adamw_8bit(1e-3, impl="fused")
    monkeypatch.delenv("FASTJAX_KERNELS", raising=False)
    monkeypatch.setattr(optim, "on_gpu", lambda: False)
    assert optim._resolve_impl("auto") == "xla"
    monkeypatch.setattr(optim, "on_gpu", lambda: True)
    assert optim._resolve_impl("auto") == "pallas"
    monkeypatch.setenv("FASTJAX_KERNELS", "xla")
    assert optim._resolve_impl("auto") == "xla"
    monkeypatch.setenv("FASTJAX_KERNELS", "pallas")
    assert optim._resolve_impl("auto") == "pallas" and optim._resolve_impl("xla") == "xla"
    monkeypatch.setenv("FASTJAX_KERNELS", "triton")
    with pytest.raises(ValueError, match="FASTJAX_KERNELS='triton'"):
        optim.adamw_8bit(1e-3)


def test_pallas_path_really_runs(lower_for_cuda):
    """The kernel lowers through Pallas' Triton backend (one launch per quantized leaf), and the
    interpret switch removes the launches."""
    params = _tree(_key("lower"))
    opt = optim.adamw_8bit(1e-3, impl="pallas")
    state = opt.init(params)

    def step():  # a new function per lowering: jit would reuse the first trace
        return lambda p, st: opt.update(p, st, p)

    assert lower_for_cuda(step(), params, state) == 3
    assert lower_for_cuda(step(), params, state, interpret="1") == 0


def test_interpret_switch_takes_effect(monkeypatch):
    if _common.on_gpu():
        pytest.skip("on a GPU interpret=0 compiles the kernel")
    nb = 2
    g = jax.random.normal(_key("env"), (nb, A.BLOCK))
    mc, ma, vc, va = _moments(_key("env", 1), nb)
    args = (g, mc, ma, vc, va, _scalars(3))
    monkeypatch.setenv(_common.ENV_INTERPRET, "0")  # compiled Triton cannot run on a CPU
    with pytest.raises(Exception, match="interpret"):
        jax.block_until_ready(A.adam8bit_update(*args, **KW))
    monkeypatch.setenv(_common.ENV_INTERPRET, "1")
    u = A.adam8bit_update(*args, **KW)[0]
    assert _rel(u, A.adam8bit_update_reference(*args, **KW)[0]) <= TOL[jnp.float32]


@pytest.mark.gpu
def test_compiled_kernel_matches_reference_gpu():
    """On a GPU: the compiled kernel against the reference (Triton contracts into FMAs and may use
    another division; the same code tolerance holds)."""
    if not _common.on_gpu():
        pytest.skip("needs a GPU")
    nb = 4099
    key = _key("gpu")
    g = (jax.random.normal(key, (nb, A.BLOCK)) * 1e-3).astype(jnp.bfloat16)
    mc, ma, vc, va = _moments(jax.random.fold_in(key, 1), nb)
    args = (g, mc, ma, vc, va, _scalars(11))
    out = jax.jit(lambda *a: A.adam8bit_update(*a, impl="pallas", interpret=False, **KW))(*args)
    _assert_step_matches(out, A.adam8bit_update_reference(*args, **KW), jnp.bfloat16)
