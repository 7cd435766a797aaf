"""HF checkpoints in and out: ``from_pretrained`` and ``save_pretrained``.

Loading reads ``model.safetensors`` or the shards named by ``model.safetensors.index.json`` one tensor at a
time (host memory peaks at about one tensor, never the model twice), checks every name and shape against the
architecture, casts to ``dtype`` on the way to the device and, with ``load_in_4bit``, quantizes each decoder
linear to NF4 as soon as it arrives, so the 16-bit model is never resident on the device.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fastjax import host_embed
from fastjax._io import atomic_dir, write_json
from fastjax.models import registry

log = logging.getLogger("fastjax")

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# Tensors some checkpoints carry that no fastjax model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing/corrupt shard, missing key, wrong shape."""


def _resolve_dir(path_or_repo_id: str | os.PathLike) -> Path:
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint directory or a .gguf file")
        return path
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise CheckpointError(f"{repo_id}: no such directory, and not a hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
            )
        )
    except Exception as e:  # offline, unknown repo, auth
        raise CheckpointError(
            f"could not download {repo_id!r} from the hub ({type(e).__name__}: {e}). If this machine is "
            f"offline, download the checkpoint elsewhere and pass its local directory instead."
        ) from e


def load_config(ckpt_dir: str | os.PathLike):
    """The family config of a checkpoint directory (reads ``config.json``)."""
    path = Path(ckpt_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} not found: not an HF checkpoint directory")
    return registry.config_from_hf(json.loads(path.read_text()))


def _weight_map(ckpt: Path) -> dict[str, str]:
    index = ckpt / SAFETENSORS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map'")
        return dict(weight_map)
    single = ckpt / SAFETENSORS_SINGLE
    if not single.exists():
        raise CheckpointError(f"{ckpt}: neither {SAFETENSORS_INDEX} nor {SAFETENSORS_SINGLE} found")
    from safetensors import safe_open

    try:
        with safe_open(str(single), framework="numpy") as f:
            return {name: SAFETENSORS_SINGLE for name in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{single}: corrupt or truncated safetensors file ({e})") from e


def _iter_tensors(ckpt: Path, weight_map: Mapping[str, str], wanted: set[str]):
    """Yield (name, numpy array) file by file, tensor by tensor."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        if name in wanted:
            by_file.setdefault(fname, []).append(name)
    for fname, names in sorted(by_file.items()):
        fpath = ckpt / fname
        if not fpath.exists():
            raise CheckpointError(
                f"shard {fpath} (holding {names[0]} and {len(names) - 1} more) is missing"
            )
        try:
            handle = safe_open(str(fpath), framework="numpy")
        except Exception as e:
            raise CheckpointError(
                f"shard {fpath}: corrupt or truncated safetensors file ({e})"
            ) from e
        with handle as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(
                        f"{name}: the index names {fname} but that shard lacks it"
                    )
                try:
                    yield name, f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{name} in {fpath}: cannot read tensor ({e})") from e


def _is_quantizable(name: str, skip_modules: tuple[str, ...]) -> bool:
    if not (name.startswith("model.layers.") and name.endswith("_proj.weight")):
        return False
    module = name.rsplit(".", 2)[-2]
    return module not in skip_modules


def params_from_flat(
    flat: Mapping[str, Any],
    cfg,
    *,
    dtype=jnp.bfloat16,
    source: str | Callable[[str], str] = "checkpoint",
    quantize=None,
) -> dict:
    """HF-named tensors -> the stacked device param tree, validating names and shapes against ``cfg``.

    ``flat`` maps names to arrays (numpy or jax) or is an iterator of ``(name, array)`` pairs (consumed one
    at a time). ``source`` names where the tensors come from in error messages: a string, or a function
    from tensor name to the file holding it. ``quantize(name, array) -> leaf | None`` may replace a tensor
    (NF4 on load).
    """
    fam = registry.family_of(cfg)
    expected = fam.param_shapes(cfg)
    items = flat.items() if isinstance(flat, Mapping) else flat
    where = source if callable(source) else (lambda _name: source)
    seen: set[str] = set()

    def checked():  # validated, cast (and maybe quantized) tensors, one at a time
        for name, value in items:
            if name not in expected:
                continue
            shape = tuple(value.shape)
            if shape != tuple(expected[name]):
                raise CheckpointError(
                    f"{name} in {where(name)}: shape {shape} does not match the config's "
                    f"{tuple(expected[name])}"
                )
            arr = jnp.asarray(
                np.asarray(value) if not isinstance(value, jax.Array) else value, dtype=dtype
            )
            del value
            if quantize is not None:
                q = quantize(name, arr)
                if q is not None:
                    arr = q
            seen.add(name)
            yield name, arr
            del arr  # the stacker holds it now; do not keep a second reference alive

    def missing_error():
        missing = sorted(set(expected) - seen)
        return (
            CheckpointError(
                f"{source if isinstance(source, str) else 'checkpoint'}: missing tensor {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
            if missing
            else None
        )

    # streamed into the stacked buffers: peak device memory is the model plus one tensor
    try:
        tree = fam.stack_layers(checked(), cfg.num_hidden_layers)
    except KeyError as e:
        raise (missing_error() or e) from None
    if (err := missing_error()) is not None:
        raise err
    return tree


def _make_quantizer(quant_config):
    from fastjax import quant

    qc = quant_config or quant.QuantConfig()
    qfn = jax.jit(
        lambda w: quant.quantize_nf4(w, block_size=qc.block_size, double_quant=qc.double_quant)
    )

    def quantize(name, arr):
        return qfn(arr) if _is_quantizable(name, tuple(qc.skip_modules)) else None

    return quantize


def from_pretrained(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype=jnp.bfloat16,
    max_seq_length: int | None = None,
    load_in_4bit: bool = False,
    quant_config=None,
    load_tokenizer: bool = True,
    embed_on_host: bool = False,
):
    """Load an HF checkpoint (directory, hub repo id, or a ``.gguf`` file) -> ``(params, cfg, tokenizer)``.

    ``max_seq_length`` (optional) is checked against the config's ``max_position_embeddings`` (a warning
    when it is longer: RoPE scaling may make that legitimate) and recorded as the tokenizer's
    ``model_max_length``. ``load_in_4bit`` stores every decoder linear as NF4 (QLoRA), quantizing each
    one as it is read, so the 16-bit model is never resident on the device. ``embed_on_host`` keeps the
    (untied) input embedding table in host memory for LoRA / QLoRA training (``fastjax.host_embed``).
    """
    if str(path_or_repo_id).endswith(".gguf"):
        from fastjax.gguf_io import from_gguf

        quantize = _make_quantizer(quant_config) if load_in_4bit else None
        params, cfg, tok = from_gguf(
            path_or_repo_id, dtype=dtype, max_seq_length=max_seq_length, quantize=quantize
        )
        if embed_on_host:
            params = host_embed.embed_to_host(params, cfg)
        return params, cfg, _record_max_seq_length(tok, max_seq_length)
    ckpt = _resolve_dir(path_or_repo_id)
    cfg = load_config(ckpt)
    if embed_on_host:
        host_embed.check_untied(cfg)  # before any tensor is read
    if max_seq_length is not None and max_seq_length > cfg.max_position_embeddings:
        log.warning(
            "max_seq_length=%d exceeds the model's max_position_embeddings=%d",
            max_seq_length,
            cfg.max_position_embeddings,
        )
    weight_map = _weight_map(ckpt)
    expected = registry.family_of(cfg).param_shapes(cfg)
    extra = [
        n
        for n in weight_map
        if n not in expected
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (cfg.tie_word_embeddings and n == "lm_head.weight")
    ]
    if extra:
        log.warning(
            "%s: ignoring %d tensors the %s architecture does not use (e.g. %s)",
            ckpt,
            len(extra),
            cfg.model_type,
            extra[0],
        )
    missing = sorted(set(expected) - set(weight_map))
    if missing:
        listing = SAFETENSORS_INDEX if (ckpt / SAFETENSORS_INDEX).exists() else SAFETENSORS_SINGLE
        raise CheckpointError(
            f"{ckpt / listing}: missing tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    quantize = _make_quantizer(quant_config) if load_in_4bit else None
    params = params_from_flat(
        _iter_tensors(ckpt, weight_map, set(expected)),
        cfg,
        dtype=dtype,
        source=lambda name: str(ckpt / weight_map[name]),
        quantize=quantize,
    )
    if embed_on_host:
        params = host_embed.embed_to_host(params, cfg)
    tokenizer = None
    if load_tokenizer and (ckpt / "tokenizer.json").exists():
        from fastjax.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(ckpt)
    return params, cfg, _record_max_seq_length(tokenizer, max_seq_length)


def _record_max_seq_length(tokenizer, max_seq_length: int | None):
    """``max_seq_length`` becomes the tokenizer's ``model_max_length`` (HF's field for the longest
    sequence the model is used with), so it travels with the tokenizer into training and exports."""
    if tokenizer is not None and max_seq_length is not None:
        if max_seq_length < 1:
            raise ValueError(f"{max_seq_length=} must be positive")
        tokenizer.model_max_length = int(max_seq_length)
    return tokenizer


def flat_from_params(params: Mapping, cfg) -> dict[str, Any]:
    """The stacked param tree -> HF-named tensors (per-layer slices)."""
    return registry.family_of(cfg).unstack_layers(params)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda u: -len(u[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


_DTYPE_NAMES = {
    jnp.dtype(jnp.bfloat16): "bfloat16",
    jnp.dtype(jnp.float16): "float16",
    jnp.dtype(jnp.float32): "float32",
}


def write_safetensors(
    flat: Mapping[str, Any], out: Path, *, max_shard_size: int | str = "5GB", dtype=None
) -> None:
    """Write HF-named tensors as (sharded) safetensors + index into directory ``out``."""
    from safetensors.numpy import save_file

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    total = 0
    for name in sorted(flat):
        value = flat[name]
        arr = jnp.asarray(value if dtype is None else jnp.asarray(value).astype(dtype))
        host = np.asarray(jax.device_get(arr))
        if sizes[-1] and sizes[-1] + host.nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = np.ascontiguousarray(host)
        sizes[-1] += host.nbytes
        total += host.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / SAFETENSORS_SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    write_json(
        out / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def write_config_files(cfg, out: Path, *, dtype_name: str | None) -> None:
    config = cfg.to_hf()
    if dtype_name:
        config["torch_dtype"] = dtype_name
    write_json(out / "config.json", config)
    gen = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": cfg.pad_token_id,
    }
    write_json(out / "generation_config.json", {k: v for k, v in gen.items() if v is not None})


def save_pretrained(
    params: Mapping,
    cfg,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    dtype=None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Save in HF layout (safetensors shards + index, config.json, generation_config.json, tokenizer
    files), atomically: ``out_dir`` is replaced as a whole or not at all. Returns the directory."""
    flat = flat_from_params(params, cfg)
    if any(not isinstance(v, (jax.Array, np.ndarray)) for v in flat.values()):
        raise TypeError(
            "save_pretrained needs 16/32-bit weights; for a quantized model use "
            "fastjax.export.save_pretrained_merged, which dequantizes"
        )
    if dtype is not None:
        dtype_name = _DTYPE_NAMES[jnp.dtype(dtype)]
    else:
        dtype_name = _DTYPE_NAMES.get(jnp.dtype(next(iter(flat.values())).dtype))
    with atomic_dir(out_dir) as tmp:
        write_safetensors(flat, tmp, max_shard_size=max_shard_size, dtype=dtype)
        write_config_files(cfg, tmp, dtype_name=dtype_name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
