"""Training data for ``fastjax.trainer``: whatever ``train`` accepts, as a ``DataLoader``.

``build_loader`` takes a ``fastjax.data.DataLoader`` (checked against ``SFTConfig``: one loader
batch is one micro-batch), a list of tokenized examples (``{"input_ids", "loss_mask"}``), or raw
rows / a JSONL path (tokenized by ``fastjax.data.tokenize_dataset``, which needs a tokenizer), and
returns a loader that packs (or pads) them into rows of ``max_seq_length`` tokens.
``packing_report`` turns the loader's layout statistics into the one line the trainer logs and
writes to ``train_summary.json``. ``fastjax.trainer`` re-exports both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastjax.sft_config import SFTConfig


def _is_tokenized(data: Any) -> bool:
    return (
        isinstance(data, Sequence)
        and not isinstance(data, str)
        and len(data) > 0
        and isinstance(data[0], Mapping)
        and "input_ids" in data[0]
        and "loss_mask" in data[0]
    )


def build_loader(data: Any, config: SFTConfig, tokenizer: Any = None):
    """A ``fastjax.data.DataLoader`` from a loader, tokenized examples, rows or a JSONL path."""
    from fastjax import data as data_lib

    if isinstance(data, data_lib.DataLoader):
        if data.batch_size != config.batch_size:
            raise ValueError(
                f"the DataLoader's batch_size={data.batch_size} differs from "
                f"SFTConfig.batch_size={config.batch_size} (one loader batch is one "
                f"micro-batch)"
            )
        if data.max_seq_length != config.max_seq_length:
            raise ValueError(
                f"the DataLoader's max_seq_length={data.max_seq_length} differs from "
                f"SFTConfig.max_seq_length={config.max_seq_length}"
            )
        return data
    if isinstance(data, Sequence) and not isinstance(data, str) and len(data) == 0:
        raise ValueError("dataset is empty: 0 training examples")
    if _is_tokenized(data):
        examples = list(data)
    else:
        if tokenizer is None:
            raise ValueError(
                "training on raw rows needs a tokenizer (pass tokenizer=...), or pass "
                "tokenized examples {'input_ids', 'loss_mask'} or a "
                "fastjax.data.DataLoader"
            )
        examples = data_lib.tokenize_dataset(data, tokenizer)
    if not config.truncation:
        for i, ex in enumerate(examples):
            n = len(ex["input_ids"])
            if n > config.max_seq_length:
                raise ValueError(
                    f"example {i} has {n} tokens, longer than max_seq_length="
                    f"{config.max_seq_length} (a row); raise max_seq_length or set "
                    "truncation=True to cut it"
                )
    pad_id = 0
    if tokenizer is not None:
        ids = (tokenizer.pad_token_id, tokenizer.eos_token_id)
        pad_id = next((i for i in ids if i is not None), 0)
    return data_lib.DataLoader(
        examples,
        config.batch_size,
        config.seed,
        max_seq_length=config.max_seq_length,
        packing=config.packing,
        num_epochs=None,
        pad_id=pad_id,
    )


def packing_report(stats: Mapping[str, Any]) -> str:
    """One line for the user: ``packed 1234 sequences into 56 rows of 2048 tokens, padding 3.1%,
    2 truncated, 0 dropped``."""
    return (
        f"{'packed' if stats['packing'] else 'padded'} {stats['num_sequences']} sequences into "
        f"{stats['num_rows']} rows of {stats['max_seq_length']} tokens, padding "
        f"{100 * stats['padding_fraction']:.1f}%, {stats['truncated']} truncated, "
        f"{stats['dropped']} dropped"
    )
