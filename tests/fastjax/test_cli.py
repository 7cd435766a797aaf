"""fastjax.cli: ``--help`` documents every option; a tiny ``fastjax train`` run on a random model
directory (char-level tokenizer, chat template) writes metrics, checkpoint and a PEFT adapter that
``fastjax generate`` loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from fastjax.models import llama
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from fastjax import cli
from fastjax.loading import save_pretrained
from fastjax.logging_utils import read_metrics
from fastjax.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TRAIN_OPTIONS = (
    "--model",
    "--dtype",
    "--load-in-4bit",
    "--data",
    "--split",
    "--num-arith",
    "--max-seq-length",
    "--no-packing",
    "--no-truncation",
    "--lora-r",
    "--lora-alpha",
    "--lora-dropout",
    "--target-modules",
    "--use-rslora",
    "--full-finetune",
    "--steps",
    "--epochs",
    "--batch-size",
    "--grad-accum",
    "--lr",
    "--lr-scheduler",
    "--warmup-steps",
    "--weight-decay",
    "--max-grad-norm",
    "--optimizer",
    "--remat",
    "--mlp-chunk-size",
    "--unroll-layers",
    "--embed-on-host",
    "--kernels",
    "--seed",
    "--output-dir",
    "--save-steps",
    "--logging-steps",
    "--resume",
    "--no-progress",
)


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_option(capsys):
    top = _help(["--help"], capsys)
    for command in ("train", "generate", "chat", "export"):
        assert command in top
    text = _help(["train", "--help"], capsys)
    for option in TRAIN_OPTIONS:
        assert option in text, option
    parser = cli.build_parser()
    for name in ("train", "generate", "chat"):  # every option has a help text
        sub = parser._subparsers._group_actions[0].choices[name]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.option_strings)
    gen = _help(["generate", "--help"], capsys)
    for option in ("--adapter", "--prompt", "--chat", "--max-new-tokens", "--temperature"):
        assert option in gen


def test_console_script_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "fastjax.cli", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0 and "--lora-r" in out.stdout


def test_offload_turns_command_buffers_off_before_jax_starts():
    """``train --remat offload_layer_input`` sets the XLA_FLAGS switch while no jax backend exists
    yet (XLA reads the variable only when the first one starts), and only for that preset."""
    probe = """
import json, os, sys
from jax._src import xla_bridge
from fastjax import cli, remat
seen = {}
real = remat.command_buffers_off_in_env
def spy(name):
    seen["started"] = xla_bridge.backends_are_initialized()
    seen["added"] = real(name)
    seen["flags"] = os.environ.get("XLA_FLAGS", "")
    raise SystemExit(0)
remat.command_buffers_off_in_env = spy
try:
    cli.main(["train", "--remat", sys.argv[1]])
except SystemExit:
    pass
print(json.dumps(seen))
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    for preset, added in (("offload_layer_input", True), ("full", False)):
        out = subprocess.run(
            [sys.executable, "-c", probe, preset],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            env=env,
        )
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen["started"] is False and seen["added"] is added
        assert ("--xla_gpu_enable_command_buffer=" in seen["flags"]) is added


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = Tokenizer(
        backend, chat_template=CHATML, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    cfg = llama.LlamaConfig(
        vocab_size=len(vocab) + 3,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<pad>"],
    )
    params = llama.init_params(cfg, jax.random.key(0), std=0.1)
    out = tmp_path_factory.mktemp("model")
    save_pretrained(params, cfg, tok, out / "tiny")
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(30):
        a, b = (int(x) for x in rng.integers(1, 50, 2))
        rows.append(
            {"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
        )
    (out / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_tiny_train_then_generate(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        str(model_dir / "tiny"),
        "--data",
        str(model_dir / "qa.jsonl"),
        "--dtype",
        "fp32",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--max-seq-length",
        "96",
        "--system-prompt",
        "",
        "--lora-r",
        "4",
        "--target-modules",
        "q_proj,v_proj",
        "--lr",
        "1e-2",
        "--remat",
        "none",
        "--kernels",
        "xla",
        "--save-steps",
        "2",
        "--output-dir",
        str(out),
        "--no-progress",
        "--embed-on-host",  # the untied table stays in host memory; rows go with each batch
    ]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert (out / "checkpoints" / "4").is_dir() and (out / "loss_curve.png").is_file()
    # resuming a finished run trains nothing more and keeps the history
    assert cli.main(argv + ["--resume"]) == 0
    capsys.readouterr()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (
        cli.main(
            [
                "chat",
                "--model",
                str(model_dir / "tiny"),
                "--adapter",
                str(out / "adapter"),
                "--prompt",
                "What is 2 + 3?",
                "--prompt",
                "Hi",
                "--max-new-tokens",
                "5",
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2


def test_cli_errors(model_dir, tmp_path):
    with pytest.raises(ValueError, match="available"):
        cli.main(
            [
                "train",
                "--model",
                str(model_dir / "tiny"),
                "--data",
                str(model_dir / "qa.jsonl"),
                "--target-modules",
                "nope_proj",
                "--steps",
                "1",
                "--output-dir",
                str(tmp_path),
            ]
        )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises((ValueError, SystemExit), match="empty"):
        cli.main(
            [
                "train",
                "--model",
                str(model_dir / "tiny"),
                "--data",
                str(empty),
                "--steps",
                "1",
                "--output-dir",
                str(tmp_path),
            ]
        )
