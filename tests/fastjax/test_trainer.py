"""fastjax.trainer: accumulation == one big batch, packing == separate rows, convergence and
outputs, NaN stop keeping the last good checkpoint, resume after SIGKILL == uninterrupted, data
errors, full fine-tuning, layer-subset adapters staying zero, the pure-numpy loss-curve PNG."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fastjax.models import llama
from fastjax.models.ops import Ops

from fastjax import lora as L
from fastjax.logging_utils import read_metrics, write_loss_curve
from fastjax.packing import assemble_rows
from fastjax.trainer import (
    NonFiniteLossError,
    SFTConfig,
    SFTTrainer,
    decay_mask,
    make_loss_fn,
    make_optimizer,
    make_schedule,
    make_train_step,
    train,
)

# Tolerances, stated once: (atol, rtol) per dtype.
TOL = {jnp.float32: (1e-6, 1e-5), jnp.bfloat16: (2e-2, 2e-2)}

CFG = llama.LlamaConfig(
    vocab_size=53,
    hidden_size=32,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
OPS = Ops.all("xla")


def _params(seed=0, cfg=CFG):
    return llama.init_params(cfg, jax.random.key(seed), std=0.1)


def _examples(n, seed, *, lo=6, hi=20, vocab=CFG.vocab_size):
    """Random examples with a prompt part (loss_mask 0) and a response part (1)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(lo, hi))
        p = int(rng.integers(1, k - 2))
        out.append(
            {
                "input_ids": rng.integers(0, vocab, k).astype(np.int32),
                "loss_mask": np.r_[np.zeros(p, np.int32), np.ones(k - p, np.int32)],
            }
        )
    return out


def _counting_examples(n, seed, vocab=CFG.vocab_size):
    """A learnable task: next token = current + 1 (mod V), random start and length."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k, start = int(rng.integers(8, 24)), int(rng.integers(0, vocab))
        out.append(
            {
                "input_ids": ((start + np.arange(k)) % vocab).astype(np.int32),
                "loss_mask": np.r_[0, np.ones(k - 1, np.int32)],
            }
        )
    return out


def _trained_lora(params, seed, r=4):
    """All-linear adapters with a non-zero B, as after some training."""
    lora, config = L.get_peft_model(
        params, CFG, r=r, lora_alpha=8, target_modules="all-linear", seed=seed
    )
    for i, path in enumerate(L.adapter_paths(lora)):
        node = lora["model"]["layers"][path[2]][path[3]]
        key = jax.random.fold_in(jax.random.key(seed + 100), i)
        node["lora_B"] = 0.05 * jax.random.normal(key, node["lora_B"].shape)
    return lora, config


def _config(tmp_path, **kw):
    base = {
        "learning_rate": 1e-2,
        "batch_size": 2,
        "max_seq_length": 32,
        "remat_policy": "none",
        "ops": OPS,
        "progress_bar": False,
        "output_dir": str(tmp_path / "out"),
        "max_grad_norm": None,
    }
    return SFTConfig(**{**base, **kw})


def _close(a, b, dtype=jnp.float32):
    atol, rtol = TOL[dtype]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


def test_accumulation_equals_one_big_batch():
    params = _params(1)
    lora, config = _trained_lora(params, 2)
    # 4 rows with very different numbers of label tokens: sum/total-count != mean of per-micro means
    rows = assemble_rows(
        [(e["input_ids"], e["loss_mask"]) for e in _examples(4, 3, lo=5, hi=30)],
        [[0], [1], [2], [3]],
        32,
    )
    counts = (rows["labels"] != -100).sum(axis=1)
    assert len(set(counts.tolist())) > 1
    sft = SFTConfig(
        learning_rate=1e-3, weight_decay=0.1, max_grad_norm=1.0, ops=OPS, remat_policy="none"
    )
    schedule = make_schedule(sft, 10)
    opt = make_optimizer(sft, lora, schedule)
    loss_sum = make_loss_fn(
        CFG,
        full_finetune=False,
        lora_scale=L.lora_scale(config),
        lora_dropout=0.0,
        remat_policy="none",
        ops=OPS,
    )
    step = make_train_step(loss_sum, opt, schedule, donate=False)
    big = {k: jnp.asarray(v[None]) for k, v in rows.items()}  # [1, 4, T]
    accum = {k: jnp.asarray(v[:, None]) for k, v in rows.items()}  # [4, 1, T]
    key = jax.random.key(0)
    state = opt.init(lora)
    lora_big, state_big, m_big = step(lora, state, params, big, jnp.int32(3), key)
    lora_acc, state_acc, m_acc = step(lora, state, params, accum, jnp.int32(3), key)
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_acc["grad_norm"]), float(m_big["grad_norm"]), rtol=1e-5)
    assert int(m_acc["num_label_tokens"]) == int(counts.sum())
    _close(lora_acc, lora_big)
    _close(state_acc, state_big)
    pairs = zip(jax.tree.leaves(lora_big), jax.tree.leaves(lora))
    moved = max(float(jnp.abs(a - b).max()) for a, b in pairs)
    assert moved > 1e-4  # the step really updated the adapter
    # the per-micro-batch mean would be a different (wrong) loss
    loss_jit = jax.jit(loss_sum)
    per_row = [
        float(loss_jit(lora, params, {k: jnp.asarray(v[i : i + 1]) for k, v in rows.items()}, None))
        for i in range(4)
    ]
    assert abs(np.mean(np.array(per_row) / counts) - float(m_big["loss"])) > 1e-3


def test_packing_equals_separate_sequences():
    params = _params(4)
    lora, config = _trained_lora(params, 5)
    examples = [(e["input_ids"], e["loss_mask"]) for e in _examples(3, 6, lo=7, hi=12)]
    packed = assemble_rows(examples, [[0, 1, 2]], 40)
    separate = assemble_rows(examples, [[0], [1], [2]], 12)
    loss_sum = make_loss_fn(
        CFG,
        full_finetune=False,
        lora_scale=L.lora_scale(config),
        lora_dropout=0.0,
        remat_policy="none",
        ops=OPS,
    )
    grad = jax.jit(jax.value_and_grad(loss_sum))
    v1, g1 = grad(lora, params, {k: jnp.asarray(v) for k, v in packed.items()}, None)
    v2, g2 = grad(lora, params, {k: jnp.asarray(v) for k, v in separate.items()}, None)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    _close(g1, g2)


def test_convergence_and_outputs(tmp_path):
    params = _params(7)
    frozen_before = jax.tree.map(np.asarray, params)
    lora, config = L.get_peft_model(params, CFG, r=8, lora_alpha=16, target_modules="all-linear")
    res = train(
        params,
        CFG,
        _counting_examples(200, 8),
        _config(
            tmp_path,
            max_steps=20,
            batch_size=4,
            learning_rate=2e-2,
            warmup_steps=2,
            lr_scheduler="cosine",
            save_steps=10,
        ),
        lora=lora,
        lora_config=config,
    )
    losses = res.losses
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
    out = tmp_path / "out"
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 21))
    assert recs[0]["lr"] == 0.0 and recs[2]["lr"] == pytest.approx(2e-2)
    assert {"loss", "grad_norm", "lr", "num_tokens", "num_label_tokens"} <= set(recs[-1])
    assert recs[-1].get("tokens_per_s", 0) > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out / "checkpoints")) == ["10", "20"]
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 20
    for x, y in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, np.asarray(y))  # frozen weights untouched


def _nan_at(count_value):
    """An optax transform whose update turns NaN at optimizer count ``count_value`` (0-based)."""

    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        bad = state.count == count_value
        updates = jax.tree.map(lambda u: jnp.where(bad, jnp.nan, -1e-3 * u), updates)
        return updates, optax.ScaleByScheduleState(count=state.count + 1)

    return optax.GradientTransformation(init, update)


def test_nan_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    params = _params(9)
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*Last good checkpoint: step 2"):
        train(
            params,
            CFG,
            _examples(40, 10),
            _config(tmp_path, max_steps=8, save_steps=2, optimizer=_nan_at(3)),
        )
    ckpts = tmp_path / "out" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["2"]
    assert [r["step"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")] == [1, 2, 3]
    assert not (tmp_path / "out" / "adapter").exists()


def test_data_errors(tmp_path):
    params = _params(0)
    with pytest.raises(ValueError, match="empty"):
        train(params, CFG, [], _config(tmp_path, max_steps=1))
    long = _examples(3, 0) + [
        {"input_ids": np.arange(40, dtype=np.int32) % 53, "loss_mask": np.ones(40, np.int32)}
    ]
    with pytest.raises(ValueError, match="example 3 has 40 tokens, longer than max_seq_length=32"):
        SFTTrainer(params, CFG, long, _config(tmp_path, max_steps=1, truncation=False))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        SFTTrainer(params, CFG, [{"text": "hello"}], _config(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match="lr_scheduler"):
        SFTConfig(lr_scheduler="step")
    with pytest.raises(ValueError, match="remat_policy"):
        SFTConfig(remat_policy="sometimes")
    with pytest.raises(ValueError, match="scan_layers"):
        SFTConfig(scan_layers="no")
    with pytest.raises(ValueError, match="unrolled layers only with 'none'"):
        SFTConfig(scan_layers=False, remat_policy="full")
    assert SFTConfig(scan_layers=False, remat_policy="none").scan_layers is False
    with pytest.raises(ValueError, match="available"):
        L.get_peft_model(params, CFG, target_modules=["qkv"])


def test_full_finetune_and_decay_mask(tmp_path):
    params = _params(11)
    mask = decay_mask(params)
    assert mask["model"]["layers"]["self_attn"]["q_proj"]["weight"] is True
    assert mask["model"]["layers"]["input_layernorm"]["weight"] is False
    assert mask["model"]["norm"]["weight"] is False
    head = np.asarray(params["lm_head"]["weight"])
    res = train(
        params,
        CFG,
        _counting_examples(40, 12),
        _config(tmp_path, max_steps=3, full_finetune=True, weight_decay=0.1, learning_rate=1e-3),
    )
    assert not np.allclose(np.asarray(res.trainable["lm_head"]["weight"]), head)
    assert all(np.isfinite(res.losses))
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    from fastjax import quant

    qcfg = llama.LlamaConfig(
        vocab_size=53,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    qparams = quant.quantize_params(_params(0, qcfg))
    with pytest.raises(ValueError, match="NF4"):
        SFTTrainer(
            qparams, qcfg, _examples(4, 0), _config(tmp_path, max_steps=1, full_finetune=True)
        )


def test_layer_subset_adapters_stay_zero_with_8bit_adamw(tmp_path):
    params = _params(13)
    regex = r"model\.layers\.1\.(self_attn\.q_proj|mlp\.down_proj)"
    lora, config = L.get_peft_model(params, CFG, r=4, target_modules=regex)
    res = train(
        params,
        CFG,
        _counting_examples(40, 14),
        _config(tmp_path, max_steps=3, weight_decay=0.1, optimizer="adamw_8bit", save_final=False),
        lora=lora,
        lora_config=config,
    )
    for path in L.adapter_paths(res.trainable):
        node = res.trainable["model"]["layers"][path[2]][path[3]]
        assert not np.any(np.asarray(node["lora_A"][0]))
        assert not np.any(np.asarray(node["lora_B"][0]))
        assert np.any(np.asarray(node["lora_B"][1]))


def test_loss_curve_png_without_matplotlib(tmp_path):
    steps = np.arange(1, 31)
    losses = 3.0 * np.exp(-steps / 10) + 0.1 * np.random.default_rng(0).random(30)
    path = write_loss_curve(tmp_path / "curve.png", steps, losses, backend="numpy")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    idat = data.index(b"IDAT")
    raw = zlib.decompress(data[idat + 4 : idat + 4 + int.from_bytes(data[idat - 4 : idat], "big")])
    img = (
        np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)[:, 1:].reshape(height, width, 3)
    )
    blue = np.all(img == (31, 119, 180), axis=-1)
    assert blue.sum() > 200  # the curve
    cols = np.nonzero(blue.any(axis=0))[0]
    assert cols.max() - cols.min() > width // 2
    # decreasing loss: the curve starts high (small row index) on the left, ends low on the right
    first_row = np.nonzero(blue[:, cols.min()])[0].mean()
    last_row = np.nonzero(blue[:, cols.max()])[0].mean()
    assert first_row < last_row
    assert np.all(img[height - 40, 45:500] == 0)  # the x axis
    import matplotlib.image as mpl

    assert mpl.imread(str(path)).shape[:2] == (height, width)


_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import jax, numpy as np
    from fastjax import lora as L
    from fastjax.models import llama
    from fastjax.models.ops import Ops
    from fastjax.trainer import SFTConfig, train
    out, mode = sys.argv[1], sys.argv[2]
    cfg = llama.LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=56,
                            num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    params = llama.init_params(cfg, jax.random.key(0), std=0.1)
    rng = np.random.default_rng(0)
    ex = []
    for _ in range(60):
        k = int(rng.integers(6, 20))
        ex.append({"input_ids": rng.integers(0, 53, k).astype(np.int32),
                   "loss_mask": np.r_[np.zeros(2, np.int32), np.ones(k - 2, np.int32)]})
    lora, lora_cfg = L.get_peft_model(params, cfg, r=4, target_modules="all-linear", seed=1)

    def kill(step, record):
        if mode == "kill" and step == 7:  # a checkpoint exists at step 4; steps 5..7 are lost
            os.kill(os.getpid(), signal.SIGKILL)

    config = SFTConfig(max_steps=10, batch_size=2, grad_accum_steps=2, max_seq_length=24,
                       learning_rate=5e-3, warmup_steps=2, weight_decay=0.01, save_steps=4,
                       remat_policy="none", ops=Ops.all("xla"), progress_bar=False,
                       tensorboard=False, plot=False, output_dir=out, resume=mode == "resume")
    train(params, cfg, ex, config, lora=lora, lora_config=lora_cfg, callbacks=[kill])
""")


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def run(out, mode):
        return subprocess.Popen(
            [sys.executable, str(script), str(out), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    ref, killed = run(tmp_path / "ref", "ref"), run(tmp_path / "run", "kill")
    ref_out, killed_out = ref.communicate(timeout=300)[0], killed.communicate(timeout=300)[0]
    assert ref.returncode == 0, ref_out.decode()[-3000:]
    assert killed.returncode == -signal.SIGKILL, killed_out.decode()[-3000:]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["4"]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(
        range(1, 8)
    )
    resumed = run(tmp_path / "run", "resume")
    resumed_out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, resumed_out.decode()[-3000:]
    want = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    got = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 11))
    np.testing.assert_array_equal([r["loss"] for r in got], [r["loss"] for r in want])
    np.testing.assert_array_equal([r["grad_norm"] for r in got], [r["grad_norm"] for r in want])
    from safetensors.numpy import load_file

    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_padding_fraction_is_reported(tmp_path, caplog):
    import logging

    T = 32
    examples = _examples(30, 21, lo=6, hi=20) + [
        {
            "input_ids": np.arange(45, dtype=np.int32) % CFG.vocab_size,
            "loss_mask": np.ones(45, np.int32),
        }
    ]  # longer than a row: truncated to T
    n_tokens = sum(min(len(e["input_ids"]), T) for e in examples)
    with caplog.at_level(logging.WARNING, logger="fastjax"):
        res = train(
            _params(21),
            CFG,
            examples,
            _config(tmp_path, max_steps=2, max_seq_length=T, save_final=False, plot=False),
        )
    stats = res.data_stats
    rows = stats["num_rows"]
    assert -(-n_tokens // T) <= rows < len(examples)  # packed: several sequences per row
    assert stats["num_tokens"] == n_tokens and stats["num_sequences"] == len(examples)
    assert (stats["truncated"], stats["dropped"], stats["packing"]) == (1, 0, True)
    assert stats["padding_fraction"] == pytest.approx(1 - n_tokens / (rows * T))
    line = (
        f"packed {len(examples)} sequences into {rows} rows of {T} tokens, padding "
        f"{100 * (1 - n_tokens / (rows * T)):.1f}%, 1 truncated, 0 dropped"
    )
    assert line in [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    recs = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["data"] == stats and "data" not in recs[1]  # once, on the first line
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["data"] == stats and summary["data_report"] == line
    padded_trainer = SFTTrainer(
        _params(21), CFG, examples, _config(tmp_path, max_seq_length=T, packing=False)
    )
    padded = padded_trainer.data_summary()
    assert (padded["packing"], padded["num_rows"]) == (False, len(examples))
    # the loader's segment bound reaches the attention op (cuDNN's packed layout on a GPU)
    packed_trainer = SFTTrainer(_params(21), CFG, examples, _config(tmp_path, max_seq_length=T))
    assert packed_trainer.ops.max_segments == packed_trainer.loader.max_segments > 1
    assert padded_trainer.ops.max_segments == 1
    assert padded["padding_fraction"] == pytest.approx(1 - n_tokens / (len(examples) * T))
    assert padded["padding_fraction"] > stats["padding_fraction"]
