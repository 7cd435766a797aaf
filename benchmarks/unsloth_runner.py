"""Unsloth as a benchmark system: its carried wheels in a private site dir, one step per process.

Unsloth is not installed on the GPU machine and nothing can be downloaded there, so its wheels are
carried with the repository (``../shared/ANCHORS.md`` lists them: unsloth, unsloth-zoo,
bitsandbytes, trl, datasets, dill, multiprocess; ``--no-deps``, about 50 MB). The parent
(``train_step.py``, ``max_context.py``) calls :func:`prepare_site` once: ``pip install --no-index
--no-deps --target SITE`` of every wheel in ``--unsloth-dir`` (a folder of ``*.whl``, or one holding
``.whl-b/``, or an already-installed site dir), then runs this file as a child with
``PYTHONPATH=SITE`` and :data:`OFFLINE_ENV`::

    python3 benchmarks/unsloth_runner.py --shape llama-3-8b --batch 4 --seq 2048 \
        [--qlora] [--cap-gib 24]

The child loads the random bf16 checkpoint that ``torch_systems.py --make-checkpoint`` writes
(Unsloth only loads from a directory, and always loads a tokenizer from it: the checkpoint has a
word-level one with the model's vocabulary), with
``FastLanguageModel.from_pretrained(load_in_4bit=--qlora, load_in_16bit=not --qlora)``, LoRA r=16
alpha=16 on all seven projections, ``use_gradient_checkpointing="unsloth"``, fused AdamW, the
forward under bf16 autocast (what ``Trainer(bf16=True)`` does), the same token ids as every other
system, ``--warmup`` + ``--steps`` timed steps. One JSON row, same fields as the other systems;
``skipped`` when Unsloth or a GPU is absent, ``oom`` when a capped step ran out of memory.

Offline: Unsloth, transformers, huggingface_hub and datasets check the network at import and load
time; :data:`OFFLINE_ENV` (set before any of them is imported, values already in the environment
win) turns that off, stops Unsloth's usage statistics and keeps its compiled-kernel cache out of the
work tree.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402

DEFAULT_SITE = Path(os.environ.get("FASTJAX_UNSLOTH_SITE", "/tmp/fastjax-bench/unsloth-site"))
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_ENABLE_HF_TRANSFER": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache",  # else ./unsloth_compiled_cache
    "PYTHONUNBUFFERED": "1",
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- parent: the site dir
def find_wheels(folder: Path) -> list[Path]:
    for d in (folder, folder / ".whl-b", folder / "wheels"):
        wheels = sorted(d.glob("*.whl")) if d.is_dir() else []
        if wheels:
            return wheels
    return []


def prepare_site(
    unsloth_dir: str | os.PathLike | None,
    site: str | os.PathLike = DEFAULT_SITE,
    *,
    timeout: float = 300,
) -> tuple[Path | None, str | None]:
    """``(site_dir, None)`` with Unsloth installed there, or ``(None, why not)``.

    Installs only when the site dir's stamp does not list exactly these wheels, so repeated calls
    are cheap. A folder that already holds an ``unsloth/`` package is used as it is.
    """
    if not unsloth_dir:
        return None, (
            "no --unsloth-dir given: Unsloth's wheels were not carried "
            "(../shared/ANCHORS.md says which wheels and how)"
        )
    folder = Path(unsloth_dir)
    if not folder.is_dir():
        return None, f"--unsloth-dir {folder} is not a directory (not carried to this machine?)"
    if (folder / "unsloth" / "__init__.py").exists():
        return folder, None
    wheels = find_wheels(folder)
    names = [w.name for w in wheels]
    if not any(n.lower().startswith("unsloth-") for n in names):
        return None, f"no unsloth-*.whl in {folder} (found: {names or 'no wheels'})"
    site = Path(site)
    stamp = site / ".fastjax-installed"
    if stamp.exists() and stamp.read_text().split() == names:
        return site, None
    site.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(site),
        *map(str, wheels),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"pip install of {len(wheels)} wheels timed out after {timeout:.0f}s"
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        return None, f"pip install into {site} failed (rc={proc.returncode}): {tail[-800:]}"
    stamp.write_text("\n".join(names) + "\n")
    return site, None


def child_env(site: str | os.PathLike) -> dict:
    """Environment for a child that imports from ``site``: it goes first on ``PYTHONPATH``."""
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return dict(OFFLINE_ENV, PYTHONPATH=path)


# ----------------------------------------------------------------------------------- child: one run
def _attention_backend() -> str:
    """Which attention Unsloth's Llama forward can use here: flash-attn, xformers, else PyTorch
    SDPA."""
    for name in ("flash_attn", "xformers"):
        if importlib.util.find_spec(name) is not None:
            return name
    return "sdpa"


def bench(
    shape_name: str,
    batch: int,
    seq: int,
    *,
    qlora: bool,
    steps: int,
    warmup: int,
    cap_gib: float | None,
    ckpt_root: str,
) -> dict:
    from benchmarks import torch_systems
    from benchmarks.shapes import get

    shape = get(shape_name)
    system = "unsloth-qlora" if qlora else "unsloth-lora"
    cell = dict(shape=shape_name, batch=batch, seq=seq, cap_gib=cap_gib)
    base = dict(system=system, **cell)
    packages = harness.UNSLOTH_PACKAGES
    if importlib.util.find_spec("unsloth") is None:
        return harness.skipped(
            system,
            "unsloth not importable (not on PYTHONPATH: was --unsloth-dir carried and installed?)",
            packages=packages,
            **cell,
        )
    import torch

    if not torch.cuda.is_available():
        return harness.skipped(
            system, "no CUDA device (torch.cuda.is_available() is False)", packages=packages, **cell
        )
    # Before Unsloth starts: a child process writes the checkpoint (its GPU memory is freed).
    ckpt = torch_systems.ensure_checkpoint(shape_name, ckpt_root)
    if cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))
    try:
        import unsloth  # Unsloth patches transformers / peft / trl: it goes first
        from unsloth import FastLanguageModel
    except Exception as e:
        return harness.record(
            packages=packages,
            **base,
            error=f"import unsloth failed: {type(e).__name__}: {str(e)[:800]}",
        )
    ids = torch.from_numpy(harness.token_batch(shape.vocab_size, batch, seq)).long().cuda()
    try:
        t0 = time.perf_counter()
        model, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(ckpt),
            max_seq_length=seq,
            dtype=torch.bfloat16,
            load_in_4bit=qlora,
            load_in_16bit=not qlora,
            fix_tokenizer=False,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=16,
            target_modules=TARGETS,
            lora_alpha=16,
            lora_dropout=0,
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=0,
            max_seq_length=seq,
        )
        FastLanguageModel.for_training(model)
        load_s = time.perf_counter() - t0
        params = [p for p in model.parameters() if p.requires_grad]
        dt, loss = harness.time_torch_steps(
            model,
            ids,
            warmup=warmup,
            steps=steps,
            autocast=torch.autocast("cuda", dtype=torch.bfloat16),
        )
    except torch.OutOfMemoryError as e:
        return harness.record(
            packages=packages, **base, ok=False, oom=True, error=f"OutOfMemoryError: {str(e)[:300]}"
        )
    return harness.record(
        packages=packages,
        **base,
        ok=True,
        tokens_per_s=round(batch * seq / dt),
        step_s=round(dt, 4),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        loss=loss,
        load_s=round(load_s, 1),
        warmup=warmup,
        steps=steps,
        model_flops=harness.train_flops(shape, batch, seq),
        attention=_attention_backend(),
        grad_ckpt="unsloth",
        autocast="bf16",
        quant="nf4 (bitsandbytes)" if qlora else None,
        n_trainable=sum(p.numel() for p in params),
        lora_dtype=str(params[0].dtype).split(".")[-1],
        unsloth_version=getattr(unsloth, "__version__", None),
    )


def main() -> None:
    # before transformers / huggingface_hub / datasets are imported
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--qlora", action="store_true", help="NF4 base (load_in_4bit)")
    ap.add_argument("--cap-gib", type=float, default=None, help="torch per-process memory cap, GiB")
    ap.add_argument("--checkpoint-root", default=None, help="where the random checkpoints live")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: at least one timed step")
    from benchmarks import torch_systems

    row = bench(
        args.shape,
        args.batch,
        args.seq,
        qlora=args.qlora,
        steps=args.steps,
        warmup=args.warmup,
        cap_gib=args.cap_gib,
        ckpt_root=args.checkpoint_root or torch_systems.CHECKPOINT_ROOT,
    )
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
