"""Multi-device training on CPU: 8 forced host devices vs 1 device give the same step; checkpoints written on
8 devices restore on 1. Each case runs in a subprocess, because the device count is fixed at JAX start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FP32_TOL = 2e-5  # reduction order differs between 1 and 8 devices

STEP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_default_matmul_precision", "highest")
    from fastjax import lora as lora_lib, sharding
    from fastjax.models import registry
    from fastjax.trainer import make_loss_fn, make_train_step

    cfg = registry.config_from_hf(dict(model_type="llama", vocab_size=96, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    fam = registry.family_of(cfg)
    params = fam.init_params(cfg, jax.random.key(0), jnp.float32)
    lora, lcfg = lora_lib.get_peft_model(params, cfg, r=4, lora_alpha=8, target_modules="all-linear")
    # nonzero B so the step moves every adapter
    lora = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), lora)
    rng = np.random.default_rng(0)
    B, T = 8, 24
    ids = rng.integers(0, cfg.vocab_size, (1, B, T)).astype(np.int32)
    seg = np.ones((1, B, T), np.int32); seg[..., T // 2:] = 2
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None, None].repeat(B, 1).astype(np.int32)
    labels = np.concatenate([ids[..., 1:], np.full((1, B, 1), -100)], -1).astype(np.int32)
    labels[..., T // 2 - 1] = -100
    batch = dict(input_ids=ids, labels=labels, positions=pos, segment_ids=seg)
    loss_sum = make_loss_fn(cfg, full_finetune=False, lora_scale=lora_lib.lora_scale(lcfg), lora_dropout=0.0,
                            remat_policy="full", ops=__import__("fastjax").Ops.all("xla"))
    schedule = optax.constant_schedule(1e-2)
    opt = optax.adamw(schedule)
    n = int(sys.argv[1])
    if n > 1:
        mesh = sharding.make_mesh(n)
        params = sharding.shard_params(params, mesh, min_shard_elements=1)
        lora = jax.device_put(lora, sharding.replicated(lora, mesh))
        batch = sharding.shard_batch(batch, mesh, axis=1)
        wq = params["model"]["layers"]["self_attn"]["q_proj"]["weight"]
        assert len(wq.sharding.device_set) == n and not wq.sharding.is_fully_replicated, wq.sharding
    else:
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
    opt_state = opt.init(lora)
    step = make_train_step(loss_sum, opt, schedule)
    lora, opt_state, m = step(lora, opt_state, params, batch, jnp.int32(0), jax.random.key(0))
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v).tolist()
            for p, v in jax.tree_util.tree_leaves_with_path(lora)}
    print(json.dumps({"loss": float(m["loss"]), "devices": len(jax.devices()), "lora": flat}))
""")

CKPT_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from fastjax import sharding
    from fastjax.checkpoint import Checkpointer
    mode, path = sys.argv[1], sys.argv[2]
    tree = {"lora_A": jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16),
            "w": jnp.arange(16 * 32, dtype=jnp.float32).reshape(16, 32) / 7}
    ckpt = Checkpointer(path)
    if mode == "save":
        mesh = sharding.make_mesh(8)
        placed = jax.device_put(tree, sharding.param_shardings(tree, mesh, min_shard_elements=1))
        assert not placed["w"].sharding.is_fully_replicated
        ckpt.save(3, {"trainable": placed}, {"step": 3})
        print(json.dumps({"devices": len(jax.devices())}))
    else:
        state, meta = ckpt.restore(3, {"trainable": tree})
        same = all(bool(jnp.array_equal(state["trainable"][k], tree[k])) for k in tree)
        print(json.dumps({"devices": len(jax.devices()), "same": same, "step": meta["step"]}))
""")


def _run(script: str, args: list[str], devices: int, tmp_path: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    path = tmp_path / "script.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path):
    one = _run(STEP_SCRIPT, ["1"], 1, tmp_path)
    eight = _run(STEP_SCRIPT, ["8"], 8, tmp_path)
    assert (one["devices"], eight["devices"]) == (1, 8)
    assert abs(one["loss"] - eight["loss"]) <= FP32_TOL * abs(one["loss"])
    assert one["lora"].keys() == eight["lora"].keys()
    import numpy as np

    for name in one["lora"]:
        np.testing.assert_allclose(eight["lora"][name], one["lora"][name], atol=FP32_TOL, rtol=FP32_TOL,
                                   err_msg=name)


def test_checkpoint_from_eight_devices_restores_on_one(tmp_path):
    saved = _run(CKPT_SCRIPT, ["save", str(tmp_path / "ckpt")], 8, tmp_path)
    restored = _run(CKPT_SCRIPT, ["restore", str(tmp_path / "ckpt")], 1, tmp_path)
    assert saved["devices"] == 8 and restored == {"devices": 1, "same": True, "step": 3}


def test_mesh_rules():
    import jax
    from jax.sharding import PartitionSpec as P

    from fastjax import sharding

    mesh = sharding.make_mesh(1)
    assert mesh.axis_names == ("data", "fsdp")
    assert sharding._fsdp_spec((32, 4096, 1024), 8, 1, stacked=True) == P(None, "fsdp", None)
    assert sharding._fsdp_spec((4096,), 8, 2**14, stacked=False) == P()  # too small: replicated
    assert sharding._fsdp_spec((3, 7), 8, 1, stacked=False) == P()  # nothing divisible
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh(len(jax.devices()) + 1)
