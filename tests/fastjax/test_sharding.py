"""Multi-device training through ``SFTTrainer`` on 8 forced CPU devices.

The same config on 1 device and on 8 (data=2 x fsdp=4, fsdp=8, and fsdp=8 with the input embedding
in host memory) gives the same per-step losses and the same final adapter; an NF4 base shards and trains like it does on one device; a full
fine-tune (params and Adam moments FSDP-sharded) checkpointed on 8 devices resumes on 1 device
through ``resume=True`` and continues with the losses of an uninterrupted 1-device run. The device
count is fixed at JAX start-up: the 8-device runs share one subprocess, the 1-device runs another.
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

# Tolerances, stated once (fp32 everywhere): the 8-device reductions sum in another order.
FP32_ATOL, FP32_RTOL = 2e-5, 2e-5

SCRIPT = textwrap.dedent("""
    import json, shutil, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from fastjax import host_embed, lora as L, quant
    from fastjax.models import llama
    from fastjax.trainer import SFTConfig, SFTTrainer

    mode, out = sys.argv[1], sys.argv[2]
    # big enough that every linear has >= 2**14 elements (the smallest leaf the FSDP rule shards)
    cfg = llama.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    params = llama.init_params(cfg, jax.random.key(0), std=0.1)
    rng = np.random.default_rng(1)
    examples = []
    for _ in range(48):
        k = int(rng.integers(6, 30)); p = int(rng.integers(1, k - 2))
        examples.append({"input_ids": rng.integers(0, cfg.vocab_size, k).astype(np.int32),
                         "loss_mask": np.r_[np.zeros(p, np.int32), np.ones(k - p, np.int32)]})
    lora, lora_cfg = L.get_peft_model(params, cfg, r=4, lora_alpha=8, target_modules="all-linear",
                                      seed=2)
    for i, path in enumerate(L.adapter_paths(lora)):  # non-zero B: every factor gets a gradient
        node = lora["model"]["layers"][path[2]][path[3]]
        node["lora_B"] = 0.05 * jax.random.normal(jax.random.key(10 + i), node["lora_B"].shape)

    def config(name, **kw):
        base = dict(max_steps=4, batch_size=8, grad_accum_steps=2, max_seq_length=32,
                    learning_rate=1e-2, warmup_steps=1, weight_decay=0.01, max_grad_norm=1.0,
                    remat_policy="none", progress_bar=False, tensorboard=False, plot=False,
                    save_final=False, output_dir=f"{out}/{name}")
        return SFTConfig(**{**base, **kw})

    def flat(tree, head=None):  # head: the first values of each leaf only (full fine-tunes)
        return {jax.tree_util.keystr(p): np.asarray(v).ravel()[:head].tolist()
                for p, v in jax.tree_util.tree_leaves_with_path(tree)}

    def spec(x):  # the PartitionSpec as a JSON list ([] = replicated), "single" off a mesh
        return list(x.sharding.spec) if hasattr(x.sharding, "spec") else "single"

    def run(name, p, lr=lora, **kw):
        full = kw.get("full_finetune", False)
        if full:  # full fine-tuning donates the params it trains
            p = jax.tree.map(jnp.copy, p)
            before = jax.tree.map(np.asarray, p)
        trainer = SFTTrainer(p, cfg, examples, config(name, **kw), lora=None if full else lr,
                             lora_config=None if full else lora_cfg)
        res = trainer.train()
        q = (res.trainable if full else trainer.frozen)["model"]["layers"]["self_attn"]["q_proj"]
        w = q["weight"]
        w = getattr(w, "packed", w)
        leaf = jax.tree.leaves(res.trainable)[0]
        before = before if full else lr
        moved = max(float(jnp.abs(a - b).max())
                    for a, b in zip(jax.tree.leaves(res.trainable), jax.tree.leaves(before)))
        return {"losses": res.losses, "steps": [h["step"] for h in res.history],
                "trainable": flat(res.trainable, 64 if full else None), "moved": moved,
                "q_spec": spec(w), "q_devices": len(w.sharding.device_set),
                "trainable_spec": spec(leaf)}

    qparams = quant.quantize_params(params)
    res = {"devices": len(jax.devices())}
    if mode == "multi":
        res["d2f4"] = run("d2f4", params, mesh_data=2, mesh_fsdp=4)
        res["f8"] = run("f8", params, num_devices=8)
        hosted = host_embed.embed_to_host(jax.tree.map(jnp.copy, params), cfg)
        res["host"] = run("host", hosted, num_devices=8)  # the embedding rows sent with the batch
        res["nf4"] = run("nf4", qparams, num_devices=8, max_steps=3)
        res["full"] = run("full", params, num_devices=8, mesh_data=2, full_finetune=True,
                          learning_rate=1e-3, save_steps=2)
    else:
        res["ref"] = run("ref", params)
        res["nf4"] = run("nf4", qparams, max_steps=3)
        res["full"] = run("full_ref", params, full_finetune=True, learning_rate=1e-3)
        # the 8-device full fine-tune, as if killed after its step-2 checkpoint: resume on 1 device
        shutil.copytree(f"{out}/full", f"{out}/resumed")
        shutil.rmtree(f"{out}/resumed/checkpoints/4")
        res["resumed"] = run("resumed", params, num_devices=1, full_finetune=True,
                             learning_rate=1e-3, save_steps=2, resume=True)
    print(json.dumps(res))
""")


def _run(mode: str, devices: int, out: Path) -> dict:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
    )
    script = out / "script.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), mode, str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    multi = _run("multi", 8, out)  # first: the 1-device process resumes its checkpoint
    single = _run("single", 1, out)
    assert (multi["devices"], single["devices"]) == (8, 1)
    return multi, single


def _close(got, want, what):
    np.testing.assert_allclose(got, want, atol=FP32_ATOL, rtol=FP32_RTOL, err_msg=what)


def _same_tree(got: dict, want: dict, what: str):
    assert got.keys() == want.keys()
    for name in want:
        _close(got[name], want[name], f"{what}: {name}")


@pytest.mark.parametrize("mesh", ["d2f4", "f8", "host"])
def test_eight_devices_train_like_one(runs, mesh):
    multi, single = runs
    got, want = multi[mesh], single["ref"]
    assert got["q_devices"] == 8 and "fsdp" in got["q_spec"], got  # the base really is sharded
    assert not any(got["trainable_spec"])  # adapters replicated
    assert want["q_spec"] == "single"
    assert len(want["losses"]) == 4
    _close(got["losses"], want["losses"], f"{mesh} losses")
    _same_tree(got["trainable"], want["trainable"], f"{mesh} adapter")
    assert want["moved"] > 1e-3  # training really changed the adapter (>> the tolerance)


def test_nf4_base_shards_and_trains(runs):
    multi, single = runs
    got, want = multi["nf4"], single["nf4"]
    assert got["q_devices"] == 8 and "fsdp" in got["q_spec"], got  # packed NF4 codes sharded
    assert all(np.isfinite(got["losses"])) and len(got["losses"]) == 3
    _close(got["losses"], want["losses"], "nf4 losses")
    _same_tree(got["trainable"], want["trainable"], "nf4 adapter")


def test_eight_device_checkpoint_resumes_on_one_device(runs):
    multi, single = runs
    saved, resumed, ref = multi["full"], single["resumed"], single["full"]
    assert saved["q_devices"] == 8 and "fsdp" in saved["q_spec"], saved  # params sharded
    assert not any(resumed["q_spec"]) and resumed["q_devices"] == 1
    assert resumed["steps"] == [1, 2, 3, 4]  # steps 1-2 from the 8-device run, 3-4 on 1 device
    _close(saved["losses"], ref["losses"], "8-device full fine-tune losses")
    _close(resumed["losses"], ref["losses"], "resumed losses")
    _same_tree(saved["trainable"], ref["trainable"], "8-device full fine-tune params")
    _same_tree(resumed["trainable"], ref["trainable"], "resumed params")
    assert ref["moved"] > 1e-4


def test_mesh_rules():
    import jax
    from jax.sharding import PartitionSpec as P

    from fastjax import sharding
    from fastjax.models.ops import Ops

    mesh = sharding.make_mesh(1)
    assert mesh.axis_names == ("data", "fsdp")
    assert sharding._fsdp_spec((32, 4096, 1024), 8, 1, stacked=True) == P(None, "fsdp", None)
    assert sharding._fsdp_spec((32,), 8, 1, stacked=True) == P()  # never the scanned layer axis
    assert sharding._fsdp_spec((4096,), 8, 2**14, stacked=False) == P()  # too small: replicated
    assert sharding._fsdp_spec((3, 7), 8, 1, stacked=False) == P()  # nothing divisible
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh(len(jax.devices()) + 1)
    assert sharding.resolve_mesh() is None
    assert sharding.resolve_mesh(num_devices=1).shape == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match="disagrees"):
        sharding.resolve_mesh(mesh, num_devices=2)
    ops = Ops(cross_entropy="pallas", attention="cudnn", rms_norm="pallas")
    assert sharding.partitionable_ops(ops, mesh) is ops  # one device: kernels stay
    several = types.SimpleNamespace(size=2)
    moved = sharding.partitionable_ops(ops, several)  # kernels stay, shard_mapped over the mesh
    assert (moved.cross_entropy, moved.attention, moved.rms_norm) == ("pallas", "cudnn", "pallas")
    assert moved.mesh is several
