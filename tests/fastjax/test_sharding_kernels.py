"""The Pallas kernels run per shard under ``shard_map`` when the trainer has a mesh.

On 8 forced CPU devices (data=2 x fsdp=4), a tiny Llama trained through ``SFTTrainer`` with
``Ops.all("pallas")`` (interpret mode) gives the per-step losses and the final adapter (LoRA, frozen
FSDP-sharded head) and the final params (full fine-tune: the head and the norm scales are trained,
so their per-shard gradients must be summed over the mesh) of the same run on one device with
``Ops.all("xla")``. The traced step proves the kernels ran: every ``pallas_call`` of the step sits
inside a ``shard_map``, and every kernel of the forward and backward is there. Each op is also
checked alone (forward and ``jax.vjp`` with a random cotangent) against its XLA reference on the
mesh, with segment ids, windows, softcaps, weights and every cross-entropy reduction. The device
count is fixed at JAX start-up: the 8-device work shares one subprocess, the 1-device runs another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

# Tolerances, stated once (fp32 everywhere): the sharded step sums in another order, and the
# kernels' online softmax / blockwise logsumexp differ from the references in rounding only.
FP32_ATOL, FP32_RTOL = 2e-5, 2e-5
OP_REL_TOL = 1e-5  # per op: max|sharded kernel - reference| / max|reference|

SCRIPT = textwrap.dedent("""
    import collections, json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_default_matmul_precision", "highest")
    from fastjax import lora as L, sharding
    from fastjax.models import llama, ops as O
    from fastjax.trainer import SFTConfig, SFTTrainer

    mode, out = sys.argv[1], sys.argv[2]
    # 1 layer, short rows (interpret mode is slow); embed/lm_head [256, 64] and the MLP [256, 64]
    # have 2**14 elements, the smallest leaf the FSDP rule shards: the head is FSDP-sharded.
    cfg = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            rope_theta=100.0)
    params = llama.init_params(cfg, jax.random.key(0), std=0.2)
    rng = np.random.default_rng(1)
    examples = []
    for _ in range(40):  # packed rows: several segments per row, padding at the end
        k = int(rng.integers(4, 11)); p = int(rng.integers(1, k - 1))
        examples.append({"input_ids": rng.integers(0, cfg.vocab_size, k).astype(np.int32),
                         "loss_mask": np.r_[np.zeros(p, np.int32), np.ones(k - p, np.int32)]})
    lora, lora_cfg = L.get_peft_model(params, cfg, r=4, lora_alpha=8, target_modules="all-linear",
                                      seed=2)
    for i, path in enumerate(L.adapter_paths(lora)):  # non-zero B: every factor gets a gradient
        node = lora["model"]["layers"][path[2]][path[3]]
        node["lora_B"] = 0.1 * jax.random.normal(jax.random.key(10 + i), node["lora_B"].shape)
    mesh_kw = {"mesh_data": 2, "mesh_fsdp": 4} if mode == "multi" else {}
    ops = O.Ops.all("pallas") if mode == "multi" else O.Ops.all("xla")

    def flat(tree):
        return {jax.tree_util.keystr(p): np.asarray(v).ravel().tolist()
                for p, v in jax.tree_util.tree_leaves_with_path(tree)}

    def kernels(trainer, res):
        # (kernel name, inside a shard_map) -> call sites in the traced step
        counts = collections.Counter()

        def walk(jaxpr, inside):
            for eqn in jaxpr.eqns:
                if eqn.primitive.name == "pallas_call":
                    name = eqn.params.get("name") or eqn.params["name_and_src_info"]
                    counts[str(name).split()[0], inside] += 1
                    assert eqn.params["interpret"], "FASTJAX_PALLAS_INTERPRET=1 did not reach"
                    continue
                sub_inside = inside or eqn.primitive.name == "shard_map"
                for value in eqn.params.values():
                    for sub in value if isinstance(value, (tuple, list)) else (value,):
                        if hasattr(sub, "eqns"):
                            walk(sub, sub_inside)
                        elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                            walk(sub.jaxpr, sub_inside)

        batch = trainer.place_batch(trainer.batch(0))
        jaxpr = jax.make_jaxpr(trainer.step_fn)(res.trainable, res.opt_state, trainer.frozen,
                                                batch, jnp.int32(0), trainer.key)
        walk(jaxpr.jaxpr, False)
        return [[name, inside, n] for (name, inside), n in sorted(counts.items())]

    def run(name, full=False, **kw):
        base = dict(max_steps=3, batch_size=8, grad_accum_steps=1, max_seq_length=16,
                    learning_rate=1e-2, warmup_steps=1, max_grad_norm=1.0, remat_policy="full",
                    progress_bar=False, tensorboard=False, plot=False, save_final=False,
                    output_dir=f"{out}/{name}", ops=ops, full_finetune=full)
        c = SFTConfig(**{**base, **mesh_kw, **kw})
        p = jax.tree.map(jnp.copy, params) if full else params  # full fine-tuning donates
        trainer = SFTTrainer(p, cfg, examples, c, lora=None if full else lora,
                             lora_config=None if full else lora_cfg)
        res = trainer.train()
        before = params if full else lora
        moved = max(float(jnp.abs(a - b).max())
                    for a, b in zip(jax.tree.leaves(res.trainable), jax.tree.leaves(before)))
        head = (res.trainable if full else trainer.frozen)["lm_head"]["weight"]
        return {"losses": res.losses, "grad_norms": [h["grad_norm"] for h in res.history],
                "trainable": flat(res.trainable), "moved": moved,
                "head_spec": [str(a) for a in getattr(head.sharding, "spec", ["single"])],
                "kernels": kernels(trainer, res), "ops_mesh": trainer.ops.mesh is not None}

    def op_errors():
        # each op on the mesh (sharded kernels) vs its XLA reference: forward and vjp
        sharded = sharding.partitionable_ops(ops, sharding.make_mesh(8, data=2, fsdp=4))
        r = np.random.default_rng(3)
        a = lambda *s: jnp.asarray(r.standard_normal(s, np.float32))
        B, T, H, KV, D, F, V = 8, 7, 4, 2, 16, 24, 37
        seg = jnp.asarray(np.sort(r.integers(0, 3, (B, T)), axis=1), jnp.int32)
        pos = jnp.asarray(r.integers(0, T, (B, T)), jnp.int32)
        inv = O.rope_inv_freq(D, 100.0, None)
        lab = r.integers(0, V, (B * T,))
        lab = jnp.asarray(np.where(r.random(B * T) < 0.3, -100, lab), jnp.int32)
        wts, w_frozen = a(B * T), a(V, F)
        cases = {
            "rms_norm": (lambda o, x, w: O.rms_norm(x, w, eps=1e-6, ops=o), (a(B, T, F), a(F))),
            "rms_norm_residual": (lambda o, x, y, w: O.rms_norm_residual(
                x, y, w, eps=1e-6, offset=1.0, ops=o), (a(B, T, F), a(B, T, F), a(F))),
            "rope": (lambda o, q, k: O.rope(q, k, pos, inv, attention_scaling=0.9, ops=o),
                     (a(B, T, H, D), a(B, T, KV, D))),
            "glu": (lambda o, g, u: O.glu(g, u, activation="gelu_tanh", ops=o),
                    (a(B, T, F), a(B, T, F))),
            "glu_rows_not_split": (lambda o, g, u: O.glu(g, u, activation="silu", ops=o),
                                   (a(1, T, F), a(1, T, F))),  # 1 row: runs the reference
            "attention": (lambda o, q, k, v: O.attention(q, k, v, segment_ids=seg, window=4,
                                                         softcap=3.0, ops=o),
                          (a(B, T, H, D), a(B, T, KV, D), a(B, T, KV, D))),
            "attention_no_segments": (lambda o, q, k, v: O.attention(q, k, v, ops=o),
                                      (a(B, T, H, D), a(B, T, KV, D), a(B, T, KV, D))),
            "ce_mean_weighted": (lambda o, h, w: O.cross_entropy(
                h, w, lab, weights=wts, softcap=5.0, z_loss=1e-3, ops=o), (a(B * T, F), a(V, F))),
            "ce_sum_rows": (lambda o, h, w: O.cross_entropy(
                h, w, lab.reshape(B, T), reduction="sum", ops=o), (a(B, T, F), a(V, F))),
            "ce_none": (lambda o, h, w: O.cross_entropy(h, w, lab, reduction="none", ops=o),
                        (a(B * T, F), a(V, F))),
            "ce_frozen_head": (lambda o, h: O.cross_entropy(
                h, w_frozen, lab, reduction="sum", head_trainable=False, ops=o), (a(B * T, F),)),
        }
        def fwd_bwd(o, f, args):  # (leaves of (f(*args), vjp(random cotangent)), shard_maps)
            shape = jax.eval_shape(lambda *xs: f(o, *xs), *args)
            ct = jax.tree.map(lambda t: jnp.asarray(r.standard_normal(t.shape, np.float32)), shape)

            def fb(*xs):
                y, vjp = jax.vjp(lambda *b: f(o, *b), *xs)
                return y, vjp(ct)

            text = str(jax.make_jaxpr(fb)(*args))
            return jax.tree.leaves(jax.jit(fb)(*args)), text.count("shard_map")

        errors = {}
        for name, (f, args) in cases.items():
            state = r.bit_generator.state  # one cotangent for both implementations
            got, n_got = fwd_bwd(sharded, f, args)
            r.bit_generator.state = state
            want, n_want = fwd_bwd(O.Ops.all("xla"), f, args)
            rel = max(float(jnp.abs(g - w).max() / max(float(jnp.abs(w).max()), 1e-30))
                      for g, w in zip(got, want))
            errors[name] = {"rel": rel, "shard_maps": n_got, "reference_shard_maps": n_want}
        return errors

    res = {"devices": len(jax.devices())}
    res["lora"] = run("lora")
    # plain SGD, no clipping: the update is the gradient itself (Adam would hide a scale error)
    res["full"] = run("full", full=True, max_steps=2, optimizer=optax.sgd(0.5), max_grad_norm=None,
                      remat_policy="none")
    if mode == "multi":
        res["ops"] = op_errors()
    print(json.dumps(res))
""")


def _run(mode: str, devices: int, out: Path) -> dict:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        FASTJAX_PALLAS_INTERPRET="1",
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
    )
    env.pop("FASTJAX_KERNELS", None)
    script = out / f"script_{mode}.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), mode, str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding_kernels")
    multi, single = _run("multi", 8, out), _run("single", 1, out)
    assert (multi["devices"], single["devices"]) == (8, 1)
    return multi, single


def _close(got, want, what):
    np.testing.assert_allclose(got, want, atol=FP32_ATOL, rtol=FP32_RTOL, err_msg=what)


# Every kernel a training step of the tiny Llama runs, forward and backward.
STEP_KERNELS = {
    "rms_norm_fwd",
    "rms_norm_bwd",
    "rms_norm_residual_fwd",
    "rms_norm_residual_bwd",
    "rope_fwd",
    "rope_bwd",
    "glu_silu_fwd",
    "glu_silu_bwd",
    "fastjax_attention_fwd",
    "fastjax_attention_dq",
    "fastjax_attention_dkdv",
    "cross_entropy_lse",
    "cross_entropy_dlogits",
}


@pytest.mark.parametrize("run", ["lora", "full"])
def test_sharded_pallas_step_trains_like_one_device_xla(runs, run):
    multi, single = runs
    got, want = multi[run], single[run]
    assert got["ops_mesh"] and not want["ops_mesh"]
    assert "fsdp" in got["head_spec"], got["head_spec"]  # the head really is FSDP-sharded
    assert len(got["losses"]) == len(want["losses"]) == (3 if run == "lora" else 2)
    _close(got["losses"], want["losses"], f"{run} losses")
    _close(got["grad_norms"], want["grad_norms"], f"{run} gradient norms")
    assert got["trainable"].keys() == want["trainable"].keys()
    assert any("lm_head" in k for k in want["trainable"]) == (run == "full")
    for name in want["trainable"]:
        _close(got["trainable"][name], want["trainable"][name], f"{run}: {name}")
    assert want["moved"] > 20 * FP32_ATOL  # training really moved the trained tree


@pytest.mark.parametrize("run", ["lora", "full"])
def test_every_kernel_runs_inside_shard_map(runs, run):
    multi, single = runs
    kernels = multi[run]["kernels"]
    outside = [k for k in kernels if not k[1]]
    assert not outside, f"pallas_calls outside any shard_map: {outside}"
    assert {name for name, _, _ in kernels} == STEP_KERNELS, kernels
    assert single[run]["kernels"] == []  # the XLA reference run has no kernel at all


def test_each_op_on_the_mesh_matches_its_reference(runs):
    multi, _ = runs
    errors = multi["ops"]
    assert len(errors) == 11
    for name, e in errors.items():
        # the forward's shard_map and its transpose; none around the references, nor around rows
        # that do not split over the mesh (they run the XLA reference)
        want = 0 if name == "glu_rows_not_split" else 2
        assert e["shard_maps"] == want and e["reference_shard_maps"] == 0, (name, e)
        assert e["rel"] < OP_REL_TOL, (name, e)


def test_partitionable_ops_keeps_kernels():
    from fastjax.models.ops import Ops

    from fastjax import sharding

    ops = Ops(cross_entropy="pallas", attention="cudnn", rms_norm="pallas", linear="pallas")
    assert sharding.partitionable_ops(ops, sharding.make_mesh(1)) is ops  # one device: unchanged
    assert sharding.partitionable_ops(ops, None) is ops
    mesh = types.SimpleNamespace(size=8)  # only .size is read
    moved = sharding.partitionable_ops(ops, mesh)
    assert moved.mesh is mesh
    assert (moved.cross_entropy, moved.attention, moved.rms_norm) == ("pallas", "cudnn", "pallas")
    assert moved.linear == "xla"  # the NF4 Pallas linear is not shard_mapped
    assert sharding.partitionable_ops(Ops.all("xla"), mesh).linear == "xla"
