"""Fused linear + cross-entropy: every impl against the full-logits reference, forward and jax.vjp
(random cotangents); ignored tokens, huge logits, softcap, z_loss, weights, reductions, memory bound.

Errors are relative L2 norms against ``cross_entropy_reference`` on the same inputs.
"""

from __future__ import annotations

import zlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from fastjax.pallas_kernels import _common
from fastjax.pallas_kernels import cross_entropy as C

from benchmarks.shapes import TEST_SHAPES

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # relative L2 error, per input dtype
# impl="xla" *is* cross_entropy_reference (full logits): comparing it with itself would test nothing.
# "xla_fused_grad" with a trained head runs the xla_chunked backward; "-frozen" is its own path (d_hidden
# in the forward), where d_head is zero by contract.
IMPLS = [
    "pallas",
    "xla_chunked",
    "xla_fused_grad",
    "xla_fused_grad-frozen",
    pytest.param("pallas-gpu", marks=pytest.mark.gpu),
    pytest.param("pallas-gpu-frozen", marks=pytest.mark.gpu),
]
CHUNKED = ["pallas", "xla_chunked", "xla_fused_grad-frozen"]
# Small tiles: several vocab splits, a partial last vocab tile, K not a multiple of block_k, three full
# backward chunks plus a remainder chunk, several token chunks.
SMALL = C.BlockSizes(
    block_t=32, block_v=64, block_k=32, vocab_splits=3, bwd_vocab_chunk=128, token_chunk=32
)


def _key(*tag) -> jax.Array:
    return jax.random.key(zlib.crc32(repr(tag).encode()))


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _impl_kwargs(impl: str) -> dict:
    if impl.startswith("pallas-gpu"):
        frozen = {"head_trainable": False} if impl.endswith("-frozen") else {}
        return {"impl": "pallas", "interpret": False, **frozen}
    if impl == "xla_fused_grad-frozen":
        return {"impl": "xla_fused_grad", "head_trainable": False}
    return {"impl": impl, "interpret": True} if impl == "pallas" else {"impl": impl}


def _inputs(tag, lead, d, v, dtype, ignore_frac=0.2):
    ks = jax.random.split(_key(*tag), 5)
    hidden = jax.random.normal(ks[0], (*lead, d), jnp.float32).astype(dtype)
    head = (jax.random.normal(ks[1], (v, d), jnp.float32) * 0.3).astype(dtype)
    labels = jax.random.randint(ks[2], lead, 0, v)
    labels = jnp.where(jax.random.uniform(ks[3], lead) < ignore_frac, -100, labels)
    weights = jax.random.uniform(ks[4], lead, jnp.float32, -0.5, 2.0)  # signed, like RL advantages
    return hidden, head, labels, weights


# (tag, leading shape, D, V, dtype, loss kwargs, block sizes or None for the picker)
CASES = [
    (
        "mean",
        (TEST_SHAPES["tokens"][2],),
        TEST_SHAPES["hidden"][0],
        TEST_SHAPES["vocab"][0],
        jnp.float32,
        {},
        SMALL,
    ),
    (
        "none-softcap-z-w",
        (2, 9),
        TEST_SHAPES["hidden"][1],
        TEST_SHAPES["vocab"][1],
        jnp.bfloat16,
        {"softcap": 5.0, "z_loss": 1e-3, "weights": True, "reduction": "none"},
        None,
    ),
    ("sum-V32003", (123,), 72, 32003, jnp.float32, {"reduction": "sum"}, None),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_cross_entropy_matches_reference(impl, case, run_fast):
    tag, lead, d, v, dtype, kw, bs = case
    hidden, head, labels, weights = _inputs((tag, impl), lead, d, v, dtype)
    kw = dict(kw, weights=weights if kw.get("weights") else None)
    ct_shape = lead if kw.get("reduction") == "none" else ()
    ct = jax.random.normal(_key(tag, impl, "ct"), ct_shape, jnp.float32)

    def fwd_vjp(fn):
        def run(h, w, ct):
            loss, vjp = jax.vjp(fn, h, w)
            return (loss, *vjp(ct))

        return run_fast(run, hidden, head, ct)

    got = fwd_vjp(
        lambda h, w: C.cross_entropy(h, w, labels, block_sizes=bs, **kw, **_impl_kwargs(impl))
    )
    want = fwd_vjp(lambda h, w: C.cross_entropy_reference(h, w, labels, **kw))
    if impl.endswith("-frozen"):
        assert not np.any(np.asarray(got[2])), "a frozen head gets a zero cotangent"
        got, want = got[:2], want[:2]
    for name, g, r in zip(("loss", "d_hidden", "d_head"), got, want):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert _rel(g, r) < TOL[dtype], (name, _rel(g, r))


@pytest.mark.parametrize("impl", CHUNKED)
def test_all_tokens_ignored_gives_zero_loss_and_grads(impl, run_fast):
    hidden, head, _, _ = _inputs(("ignored",), (21,), 40, 203, jnp.float32)
    labels = jnp.full((21,), -100, jnp.int32)
    loss, (dh, dw) = run_fast(
        jax.value_and_grad(
            lambda h, w: C.cross_entropy(
                h, w, labels, z_loss=1e-2, block_sizes=SMALL, **_impl_kwargs(impl)
            ),
            argnums=(0, 1),
        ),
        hidden,
        head,
    )
    assert float(loss) == 0.0
    assert not np.any(np.asarray(dh)) and not np.any(np.asarray(dw))


@pytest.mark.parametrize("impl", CHUNKED)
def test_huge_logit_does_not_overflow(impl, run_fast):
    """A logit of 3e4 (exp overflows fp32 at 89): losses and grads finite and equal the reference."""
    hidden, head, labels, _ = _inputs(("huge",), (21,), 40, 203, jnp.float32, ignore_frac=0.0)
    hidden = hidden.at[3].set(0.0).at[3, 0].set(1000.0)
    head = head.at[7].set(0.0).at[7, 0].set(30.0)  # logit(token 3, vocab 7) = 3e4, the others ~300
    labels = labels.at[3].set(5).at[4].set(7)

    def per_token_and_vjp(fn):
        def run(h, w, ct):
            loss, vjp = jax.vjp(fn, h, w)
            return (loss, *vjp(ct))

        return run_fast(run, hidden, head, jax.random.normal(_key("huge-ct"), (21,)))

    got = per_token_and_vjp(
        lambda h, w: C.cross_entropy(
            h, w, labels, reduction="none", block_sizes=SMALL, **_impl_kwargs(impl)
        )
    )
    want = per_token_and_vjp(lambda h, w: C.cross_entropy_reference(h, w, labels, reduction="none"))
    assert float(got[0][3]) > 2.5e4  # lse ~ 3e4 was really in play
    if impl.endswith("-frozen"):
        got, want = got[:2], want[:2]
    for g, r in zip(got, want):
        assert np.all(np.isfinite(np.asarray(g))) and _rel(g, r) < TOL[jnp.float32]


def test_sum_and_count_accumulates_micro_batches(run_fast):
    """sum(sums) / sum(counts) over two micro-batches == mean over the whole batch, grads included."""
    hidden, head, labels, _ = _inputs(("accum",), (42,), 40, 203, jnp.float32, ignore_frac=0.4)
    kw = {"impl": "xla_chunked", "block_sizes": SMALL}  # the reduction logic is shared by all impls

    def accumulated(h, w):
        s1, c1 = C.cross_entropy_sum_and_count(h[:21], w, labels[:21], **kw)
        s2, c2 = C.cross_entropy_sum_and_count(h[21:], w, labels[21:], **kw)
        assert c1.dtype == jnp.int32
        return (s1 + s2) / (c1 + c2)

    got = run_fast(jax.value_and_grad(accumulated, argnums=(0, 1)), hidden, head)
    want = run_fast(
        jax.value_and_grad(lambda h, w: C.cross_entropy_reference(h, w, labels), argnums=(0, 1)),
        hidden,
        head,
    )
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert _rel(g, r) < TOL[jnp.float32]


@pytest.mark.parametrize("impl", ["pallas", "xla_chunked", "xla_fused_grad"])
def test_frozen_head_skips_d_head(impl, run_fast):
    hidden, head, labels, _ = _inputs(("frozen",), (21,), 40, 203, jnp.float32)
    ct = jax.random.normal(_key("frozen-ct"), (21,))

    def vjp(trainable):
        def run(h, w, ct):
            _, f = jax.vjp(
                lambda h, w: C.cross_entropy(
                    h,
                    w,
                    labels,
                    reduction="none",
                    head_trainable=trainable,
                    block_sizes=SMALL,
                    **_impl_kwargs(impl),
                ),
                h,
                w,
            )
            return f(ct)

        return run_fast(run, hidden, head, ct)

    (dh_frozen, dw_frozen), (dh, dw) = vjp(False), vjp(True)
    assert not np.any(np.asarray(dw_frozen)) and np.any(np.asarray(dw))
    # the same math, except xla_fused_grad's frozen path scales g after the matmul (fp32 rounding)
    rtol = TOL[jnp.float32] if impl == "xla_fused_grad" else 1e-6
    np.testing.assert_allclose(dh_frozen, dh, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("impl", CHUNKED)
def test_memory_bound_no_full_logits(impl):
    """No value anywhere in the fwd+bwd program (nested jaxprs included) has T*V elements."""
    t, d, v = 123, 72, 32003
    hidden, head, labels, _ = _inputs(("mem",), (t,), d, v, jnp.float32)
    bs = C.BlockSizes(bwd_vocab_chunk=4096, token_chunk=16)
    fn = jax.value_and_grad(
        lambda h, w: C.cross_entropy(h, w, labels, block_sizes=bs, **_impl_kwargs(impl)),
        argnums=(0, 1),
    )

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield int(np.prod(getattr(var.aval, "shape", ())))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    biggest = max(sizes(jax.make_jaxpr(fn)(hidden, head).jaxpr))
    assert biggest <= max(t * 4096, v * d), biggest
    full = jax.make_jaxpr(
        jax.grad(lambda h, w: C.cross_entropy_reference(h, w, labels), argnums=(0, 1))
    )(hidden, head).jaxpr
    assert max(sizes(full)) >= t * v  # the check can fail: the reference does build [T, V]


def test_fused_grad_computes_the_logits_once():
    """With a frozen head the fwd+bwd program of ``xla_fused_grad`` has one logits matmul a chunk (two
    for ``xla_chunked``: forward and recompute) and one ``dz @ head``; a trained head falls back; a
    call that is not differentiated computes no gradient matmul at all."""
    hidden, head, labels, _ = _inputs(("once",), (37,), 40, 300, jnp.float32)
    bs = C.BlockSizes(token_chunk=16)

    def dots(impl, trainable, grad=True):
        """(logits matmuls [16, 300], d_hidden matmuls [16, 40]) in the program's jaxpr."""

        def loss(h, w):
            return C.cross_entropy(
                h, w, labels, impl=impl, head_trainable=trainable, block_sizes=bs
            )

        def count(jaxpr):
            n = np.zeros(2, int)
            for eqn in jaxpr.eqns:
                if eqn.primitive.name == "dot_general":
                    shape = tuple(eqn.outvars[0].aval.shape)
                    n += [shape == (16, 300), shape == (16, 40)]
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    n += count(sub)
            return n

        return tuple(count(jax.make_jaxpr(jax.grad(loss) if grad else loss)(hidden, head).jaxpr))

    assert dots("xla_fused_grad", False) == (1, 1)
    assert dots("xla_chunked", False) == (2, 1)
    assert dots("xla_fused_grad", True) == (2, 1)
    assert dots("xla_fused_grad", False, grad=False) == (1, 0)


def test_pallas_path_really_runs(lower_for_cuda):
    """Forward lse kernel + one dlogits kernel per backward chunk shape lower through Pallas' Triton
    backend for CUDA (softcap and z_loss on); the env switch reaches them."""
    hidden, head, labels, _ = _inputs(("sw",), (37,), 40, 300, jnp.float32)
    bs = C.BlockSizes(block_t=32, block_v=64, block_k=32, bwd_vocab_chunk=128)

    def fwd_bwd():  # fresh closure per lowering: jit caches traces per function
        return jax.value_and_grad(
            lambda h, w: C.cross_entropy(h, w, labels, softcap=5.0, z_loss=1e-3, block_sizes=bs),
            argnums=(0, 1),
        )

    assert "pallas_call" in str(jax.make_jaxpr(fwd_bwd())(hidden, head))
    assert lower_for_cuda(fwd_bwd(), hidden, head) == 3  # lse, dlogits (full chunk), remainder
    assert lower_for_cuda(fwd_bwd(), hidden, head, interpret="1") == 0


def test_interpret_switch_takes_effect(monkeypatch, run_fast):
    if _common.on_gpu():
        pytest.skip("on a GPU interpret=0 compiles the kernel")
    hidden, head, labels, _ = _inputs(("env",), (9,), 16, 50, jnp.float32)
    monkeypatch.setenv(_common.ENV_INTERPRET, "0")  # compiled Triton cannot run on a CPU
    with pytest.raises(Exception, match="interpret"):
        run_fast(lambda h, w: C.cross_entropy(h, w, labels, block_sizes=SMALL), hidden, head)
    monkeypatch.setenv(_common.ENV_INTERPRET, "1")
    got = run_fast(lambda h, w: C.cross_entropy(h, w, labels, block_sizes=SMALL), hidden, head)
    assert _rel(got, C.cross_entropy_reference(hidden, head, labels)) < 1e-5


def test_validation_and_picker():
    h, w, lab = jnp.ones((4, 8)), jnp.ones((10, 8)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="impl"):
        C.cross_entropy(h, w, lab, impl="cuda")
    with pytest.raises(ValueError, match="reduction"):
        C.cross_entropy(h, w, lab, reduction="max")
    with pytest.raises(ValueError, match="dtype"):
        C.cross_entropy(h, w.astype(jnp.bfloat16), lab)
    with pytest.raises(ValueError, match="labels"):
        C.cross_entropy(h, w, lab[:3])
    with pytest.raises(ValueError, match="head.shape"):
        C.cross_entropy(h, w[:, :7], lab)
    with pytest.raises(ValueError, match="power of 2"):
        C.BlockSizes(block_v=100)
    for t, v, d in [(16384, 128256, 4096), (4096, 256000, 3584), (123, 32003, 72)]:
        bs = C.pick_block_sizes(t, v, d, jnp.bfloat16)
        assert t * bs.bwd_vocab_chunk * 2 <= 2**28 or bs.bwd_vocab_chunk == 1024
        assert bs.token_chunk * v * 4 <= 2**28 or bs.token_chunk == 16


def test_picker_keeps_fp32_tiles_in_shared_memory():
    """The bf16 pick is the tuned one; fp32 halves block_k so the pipelined operand tiles hold the same
    bytes (the bf16 tiles at fp32 overflowed the H200's shared memory)."""
    for t, v, d in [(16384, 128256, 4096), (123, 32003, 72), (300, 1000, 256)]:
        b16, b32 = (C.pick_block_sizes(t, v, d, dt) for dt in (jnp.bfloat16, jnp.float32))
        assert (b16.block_t, b16.block_v, b16.block_k) == (128, 256, 64)
        assert (b32.block_t, b32.block_v, b32.block_k) == (128, 256, 32)
        smem = [
            C.operand_smem_bytes(b.block_t, b.block_v, b.block_k, b.num_stages, n)
            for b, n in ((b16, 2), (b32, 4))
        ]
        assert smem[0] == smem[1] == C.SMEM_BUDGET
    assert C.pick_block_sizes(5, 64, 16, jnp.float32).block_k == 16  # never below Triton's 16
