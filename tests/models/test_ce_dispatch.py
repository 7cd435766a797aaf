"""Which cross-entropy implementation ``ops.cross_entropy`` runs under ``auto``: on a GPU a frozen head
(LoRA, QLoRA) takes ``xla_fused_grad``, a trained head the Pallas kernel; an explicit choice is kept."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastjax.models import ops as O
from fastjax.pallas_kernels import cross_entropy as k


@pytest.fixture
def seen(monkeypatch):
    """Record the ``impl`` each call hands the kernel module, and run the reference instead."""
    calls = []

    def fake(hidden, head, labels, *, impl, **kw):
        calls.append(impl)
        kw.pop("interpret")
        kw.pop("head_trainable")
        return k.cross_entropy_reference(hidden, head, labels, **kw)

    monkeypatch.setattr(k, "cross_entropy", fake)
    return calls


@pytest.mark.parametrize(
    ("on_gpu", "setting", "head_trainable", "want"),
    [
        (True, "auto", False, "xla_fused_grad"),
        (True, "auto", True, "pallas"),
        (True, "pallas", False, "pallas"),
        (True, "xla_chunked", False, "xla_chunked"),
        (False, "auto", False, "xla"),
        (False, "auto", True, "xla"),
    ],
)
def test_auto_picks_by_head(monkeypatch, seen, on_gpu, setting, head_trainable, want):
    monkeypatch.setattr(O._common, "on_gpu", lambda: on_gpu)
    ops = O.Ops(cross_entropy=setting)
    h = jax.random.normal(jax.random.key(0), (9, 8))
    w = jax.random.normal(jax.random.key(1), (13, 8))
    lab = jnp.arange(9) % 13
    loss = O.cross_entropy(h, w, lab, head_trainable=head_trainable, ops=ops)
    assert seen == [want]
    np.testing.assert_allclose(loss, k.cross_entropy_reference(h, w, lab), rtol=1e-6)
