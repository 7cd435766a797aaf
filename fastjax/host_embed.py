"""The input embedding table in host memory: about 1 GiB of device memory back for LoRA and QLoRA
on 7-24B models.

A frozen, untied input embedding is only ever read by one lookup of the batch's token ids, so it
does not need to sit on the device: the trainer gathers the batch's rows on the host (NumPy, while
the device runs the previous step) and sends the ``[A, B, T, D]`` rows with the batch instead. The
model takes them as ``inputs_embeds`` (``models.decoder.forward``) and scales them as a lookup is.
The table costs vocab x hidden x 2 bytes in bf16: 1.00 GiB for Llama-3-8B, 1.04 for Qwen2.5-7B,
1.25 for Mistral-Small-24B; a batch of 4 x 2048 tokens of Llama-3-8B sends 64 MiB a step instead.

It is not for every model: a tied embedding is also the LM head, read by every step's logits, and
full fine-tuning trains it; both keep the table on the device (``embed_to_host`` and the trainer
refuse them with a message saying so).

    params, cfg, tok = fastjax.from_pretrained(path, load_in_4bit=True, embed_on_host=True)
    # or, for params already on the device (frees the device copy):
    params = embed_to_host(params, cfg)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def check_untied(cfg) -> None:
    if getattr(cfg, "tie_word_embeddings", False):
        raise ValueError(
            "embed_on_host: this model ties its input embedding to the LM head "
            "(tie_word_embeddings=True), and the head is read on the device by every step; "
            "keep the embedding on the device"
        )


def host_table(params: Mapping) -> np.ndarray | None:
    """The embedding table when it lives on the host (a NumPy array), else None."""
    table = params.get("model", {}).get("embed_tokens", {}).get("weight")
    return table if isinstance(table, np.ndarray) else None


def embed_to_host(params: Mapping, cfg) -> dict:
    """``params`` with the input embedding table moved to host memory (a NumPy array of the same
    dtype); the device buffer is freed, so any other reference to that device array becomes unusable.
    The returned tree trains with ``SFTTrainer`` like the original (LoRA and QLoRA)."""
    check_untied(cfg)
    model = dict(params["model"])
    table = model["embed_tokens"]["weight"]
    if not isinstance(table, np.ndarray):
        host = np.asarray(jax.device_get(table))
        if isinstance(table, jax.Array):
            table.delete()
        table = host
    model["embed_tokens"] = dict(model["embed_tokens"], weight=table)
    return dict(params, model=model)


def without_table(params: Mapping) -> dict:
    """``params`` with the embedding table left out (None), for a step that takes ``inputs_embeds``."""
    model = dict(params["model"])
    model["embed_tokens"] = dict(model["embed_tokens"], weight=None)
    return dict(params, model=model)


def gather(table: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
    """Rows of ``table`` ``[V, D]`` for ``input_ids`` of any shape -> ``[*ids.shape, D]``."""
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        bad = int(ids.max() if ids.max() >= table.shape[0] else ids.min())
        raise ValueError(f"token id {bad} is outside the embedding table of {table.shape[0]} rows")
    return np.take(table, ids, axis=0)


def check_trainable(params: Mapping, cfg, *, full_finetune: bool) -> np.ndarray | None:
    """The host table of ``params`` (None when the table is on the device), after checking that this
    training run can leave it there."""
    table = host_table(params)
    if table is None:
        return None
    check_untied(cfg)
    if full_finetune:
        raise ValueError(
            "embed_on_host: full fine-tuning trains the input embedding, so it must be on the "
            "device; load without embed_on_host (it is for LoRA and QLoRA)"
        )
    return table


def describe(table: Any) -> str:
    """``"V x D dtype (GiB)"``: the table, for the trainer's log line."""
    return f"{table.shape[0]} x {table.shape[1]} {table.dtype} ({table.nbytes / 2**30:.2f} GiB)"
