"""Training data: rows in, fixed-shape numpy batches out.

Pipeline: ``load_rows`` (JSONL path, list of dicts, or an HF ``datasets.Dataset``) ->
``tokenize_dataset`` (one of three formats, auto-detected) -> ``DataLoader`` (packing, deterministic
shuffling, resumable iteration). ``build_dataloader`` chains the three.

Formats (``format="auto"`` picks by the keys of the first row, in this order):
  ``chat``               ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the
                         tokenizer's chat template; with ``train_on_responses_only`` only tokens of
                         assistant turns are targets (``apply_chat_template_with_assistant_mask``).
  ``prompt_completion``  ``{"prompt": str, "completion": str}`` -> prompt ids + completion ids + eos;
                         with ``train_on_responses_only`` the prompt tokens are not targets.
  ``text``               ``{"text": str}`` -> ids + eos, every token a target.
Other column names map onto these with ``fields`` (GSM8K: ``fields=GSM8K_FIELDS``), or a
``formatting_func(row) -> str | dict`` builds the row (a str becomes ``{"text": str}``).

A tokenized example is ``{"input_ids": int32 [n], "loss_mask": int32 [n]}``, ``loss_mask[i] == 1``
when token ``i`` is a target. Batches are ``{"input_ids", "labels", "positions", "segment_ids"}``,
int32 ``[B, T]``, with PRE-SHIFTED labels; ``fastjax.packing`` documents the layout.

Shuffling: the packed rows are permuted every epoch by ``np.random.default_rng([seed, epoch])``, so
batch ``step`` is a pure function of ``(dataset, seed, step)``; ``DataLoader.batches(start_step=k)``
yields exactly what an uninterrupted run yields from step ``k`` on, across epoch boundaries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from fastjax.packing import (
    IGNORE_INDEX,
    PackingStats,
    assemble_rows,
    packing_stats,
    plan_rows,
    truncate_examples,
)

__all__ = [
    "FORMATS",
    "GSM8K_FIELDS",
    "IGNORE_INDEX",
    "DataLoader",
    "PackingStats",
    "build_dataloader",
    "detect_format",
    "load_rows",
    "tokenize_dataset",
    "tokenize_example",
]

logger = logging.getLogger(__name__)

Format = Literal["text", "prompt_completion", "chat"]
FORMATS: tuple[str, ...] = ("chat", "prompt_completion", "text")  # auto-detection order
_REQUIRED: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
_CANONICAL = ("text", "prompt", "completion", "messages")
GSM8K_FIELDS: dict[str, str] = {"prompt": "question", "completion": "answer"}


# ----------------------------------------------------------------------------------------- rows
def load_rows(source: str | os.PathLike | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Reads rows from a JSONL file path, a list of dicts, or an HF ``datasets.Dataset``.

    Raises ``ValueError`` on an empty dataset, a malformed JSONL line (naming file and line) or a row
    that is not a dict (naming its index).
    """
    if isinstance(source, (str, os.PathLike)):
        rows = _read_jsonl(os.fspath(source))
        where = os.fspath(source)
    else:
        if isinstance(source, Mapping):
            raise TypeError(
                f"got a {type(source).__name__} with keys {sorted(map(str, source))[:8]}; pass a "
                "list of row dicts, a JSONL path or a datasets.Dataset (for a DatasetDict, pick a "
                "split such as ds['train'])"
            )
        if isinstance(getattr(source, "column_names", None), Mapping):
            raise TypeError(
                f"got a DatasetDict with splits {list(source.column_names)}; pick one, e.g. "
                "ds['train']"
            )
        rows = [row if isinstance(row, dict) else _as_dict(row, i) for i, row in enumerate(source)]
        where = type(source).__name__
    if not rows:
        raise ValueError(f"dataset is empty: 0 rows in {where}")
    return rows


def _as_dict(row: Any, index: int) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise TypeError(f"row {index} is a {type(row).__name__}, expected a dict of fields")
    return dict(row)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e
            if not isinstance(row, dict):
                raise TypeError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    return rows


# -------------------------------------------------------------------------------------- formats
def detect_format(keys: Iterable[str]) -> Format:
    """Picks the format from a row's keys: ``messages`` -> chat, ``prompt`` + ``completion`` ->
    prompt_completion, ``text`` -> text. Raises ``ValueError`` naming the keys otherwise."""
    keys = set(keys)
    for fmt in FORMATS:
        if all(k in keys for k in _REQUIRED[fmt]):
            return fmt  # type: ignore[return-value]
    hint = ""
    if {"question", "answer"} <= keys:
        hint = f" (GSM8K-style rows: pass fields={GSM8K_FIELDS})"
    raise ValueError(
        f"unknown dataset format: rows have keys {sorted(keys)}; expected 'messages' (chat), "
        f"'prompt' + 'completion', or 'text'{hint}. Map other names with "
        "fields={'prompt': 'question', ...} or pass formatting_func"
    )


def _map_fields(row: Mapping[str, Any], fields: Mapping[str, str] | None) -> Mapping[str, Any]:
    if not fields:
        return row
    mapped = dict(row)
    for canonical, column in fields.items():
        if column in row:
            mapped[canonical] = row[column]
    return mapped


def _check_fields(fields: Mapping[str, str] | None) -> None:
    bad = sorted(set(fields or ()) - set(_CANONICAL))
    if bad:
        raise ValueError(
            f"fields maps {bad}, but only {list(_CANONICAL)} can be mapped (e.g. "
            "fields={'prompt': 'question', 'completion': 'answer'})"
        )


def _field(row: Mapping[str, Any], name: str, index: int, fields: Mapping[str, str] | None) -> Any:
    if name not in row:
        column = (fields or {}).get(name, name)
        source = f"'{column}' (mapped to '{name}')" if column != name else f"'{name}'"
        raise ValueError(f"row {index} is missing field {source}; it has keys {sorted(row)}")
    return row[name]


def _str_field(row: Mapping[str, Any], name: str, index: int, fields) -> str:
    value = _field(row, name, index, fields)
    if not isinstance(value, str):
        raise TypeError(f"row {index}: field '{name}' must be a str, got {type(value).__name__}")
    return value


def _messages(row: Mapping[str, Any], index: int, fields) -> list[Mapping[str, Any]]:
    messages = _field(row, "messages", index, fields)
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(f"row {index}: 'messages' must be a non-empty list of {{role, content}}")
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            got = sorted(message) if isinstance(message, Mapping) else type(message).__name__
            raise ValueError(f"row {index}: message {j} needs 'role' and 'content', got {got}")
    return list(messages)


# ----------------------------------------------------------------------------------- tokenizing
def tokenize_example(
    row: Mapping[str, Any],
    tokenizer: Any,
    *,
    format: Format,
    train_on_responses_only: bool = True,
    separator: str = "",
    index: int = 0,
    fields: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Tokenizes one (already field-mapped) row; returns ``{"input_ids", "loss_mask"}`` int32 [n].

    ``tokenizer`` is a ``fastjax.tokenizer.Tokenizer`` or anything with the same ``encode``,
    ``apply_chat_template_with_assistant_mask`` and ``eos_token_id`` (``encode_batch`` is used when
    present). ``index`` and ``fields`` only make error messages name the row and original column.

    text: ``encode(text) + [eos]`` (the tokenizer adds its usual bos). prompt_completion:
    ``encode(prompt + separator)`` without a trailing eos, then ``encode(completion,
    add_special_tokens=False) + [eos]``; the two are encoded separately so the prompt/completion
    boundary is exact. chat: ``apply_chat_template_with_assistant_mask(messages)``.
    """
    (example,) = _tokenize_rows(
        [row],
        tokenizer,
        format=format,
        train_on_responses_only=train_on_responses_only,
        separator=separator,
        fields=fields,
        first_index=index,
    )
    return example


def _encode_many(tokenizer: Any, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    encode_batch = getattr(tokenizer, "encode_batch", None)
    if encode_batch is not None and len(texts) > 1:  # the Rust tokenizer encodes in parallel
        return [list(ids) for ids in encode_batch(texts, add_special_tokens=add_special_tokens)]
    return [list(tokenizer.encode(t, add_special_tokens=add_special_tokens)) for t in texts]


def _tokenize_rows(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    format: str,
    train_on_responses_only: bool,
    separator: str,
    fields: Mapping[str, str] | None,
    first_index: int = 0,
) -> list[dict[str, np.ndarray]]:
    eos = tokenizer.eos_token_id
    indices = range(first_index, first_index + len(rows))
    pairs: list[tuple[list[int], list[int]]] = []
    if format == "text":
        texts = [_str_field(row, "text", i, fields) for row, i in zip(rows, indices, strict=True)]
        for ids in _encode_many(tokenizer, texts, add_special_tokens=True):
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            pairs.append((ids, [1] * len(ids)))
    elif format == "prompt_completion":
        prompts, completions = [], []
        for row, i in zip(rows, indices, strict=True):
            prompts.append(_str_field(row, "prompt", i, fields) + separator)
            completions.append(_str_field(row, "completion", i, fields))
        prompt_mask = 0 if train_on_responses_only else 1
        for prompt_ids, completion_ids in zip(
            _encode_many(tokenizer, prompts, add_special_tokens=True),
            _encode_many(tokenizer, completions, add_special_tokens=False),
            strict=True,
        ):
            # The prompt keeps the tokenizer's usual special prefix (bos) but never a trailing eos.
            if eos is not None and prompt_ids and prompt_ids[-1] == eos:
                prompt_ids.pop()
            if eos is not None:
                completion_ids.append(eos)
            mask = [prompt_mask] * len(prompt_ids) + [1] * len(completion_ids)
            pairs.append((prompt_ids + completion_ids, mask))
    elif format == "chat":
        for row, i in zip(rows, indices, strict=True):
            messages = _messages(row, i, fields)
            ids, mask = tokenizer.apply_chat_template_with_assistant_mask(messages)
            ids, mask = list(ids), list(mask)
            if len(ids) != len(mask):
                raise ValueError(
                    f"row {i}: the tokenizer's assistant mask has {len(mask)} entries for "
                    f"{len(ids)} tokens"
                )
            pairs.append((ids, mask if train_on_responses_only else [1] * len(ids)))
    else:
        raise ValueError(f"unknown {format=}; expected one of {FORMATS}")
    return [
        {"input_ids": np.asarray(ids, dtype=np.int32), "loss_mask": np.asarray(m, dtype=np.int32)}
        for ids, m in pairs
    ]


def tokenize_dataset(
    source: str | os.PathLike | Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    format: Format | Literal["auto"] = "auto",
    fields: Mapping[str, str] | None = None,
    formatting_func: Callable[[Mapping[str, Any]], str | Mapping[str, Any]] | None = None,
    train_on_responses_only: bool | None = None,
    separator: str = "",
) -> list[dict[str, np.ndarray]]:
    """Loads and tokenizes a dataset; returns one ``{"input_ids", "loss_mask"}`` dict per row.

    Args:
      source: JSONL path, list of dicts, or ``datasets.Dataset``.
      format: ``"auto"`` (detect from the first row's keys) or one of ``FORMATS``.
      fields: canonical name -> column, e.g. ``{"prompt": "question", "completion": "answer"}``.
      formatting_func: ``row -> str | dict`` applied to every raw row instead of ``fields``; a str is
        treated as ``{"text": str}``.
      train_on_responses_only: mask prompt / non-assistant tokens out of the loss. ``None`` means True
        for prompt_completion and chat; True is an error for text (there is no response part).
      separator: text appended to the prompt before the completion (e.g. ``"\\n"`` for GSM8K).
    """
    if fields and formatting_func is not None:
        raise ValueError("pass either fields or formatting_func, not both")
    _check_fields(fields)
    rows = load_rows(source)
    if formatting_func is not None:
        rows = [_formatted(formatting_func, row, i) for i, row in enumerate(rows)]
    rows = [_map_fields(row, fields) for row in rows]

    if format == "auto":
        format = detect_format(rows[0].keys())
    elif format not in FORMATS:
        raise ValueError(f"unknown {format=}; expected 'auto' or one of {FORMATS}")
    if train_on_responses_only is None:
        train_on_responses_only = format != "text"
    elif train_on_responses_only and format == "text":
        raise ValueError(
            "train_on_responses_only=True needs a prompt/completion or chat dataset; plain text "
            "has no response part"
        )
    examples = _tokenize_rows(
        rows,
        tokenizer,
        format=format,
        train_on_responses_only=train_on_responses_only,
        separator=separator,
        fields=fields,
    )
    logger.info(
        "tokenized %d %s rows: %d tokens", len(examples), format,
        sum(len(e["input_ids"]) for e in examples),
    )  # fmt: skip
    return examples


def _formatted(func: Callable, row: Mapping[str, Any], index: int) -> Mapping[str, Any]:
    out = func(row)
    if isinstance(out, str):
        return {"text": out}
    if not isinstance(out, Mapping):
        raise TypeError(
            f"row {index}: formatting_func returned a {type(out).__name__}; expected a str or dict"
        )
    return out


# ------------------------------------------------------------------------------------- batching
class DataLoader:
    """Deterministic, resumable batches of packed (or padded) rows.

    ``examples`` are tokenized examples (``{"input_ids", "loss_mask"}``). The row layout is computed
    once (``fastjax.packing``); each epoch visits every row once in the order
    ``np.random.default_rng([seed, epoch]).permutation(num_rows)``. Batch ``step`` covers rows
    ``[i * batch_size, (i + 1) * batch_size)`` of epoch ``step // steps_per_epoch``, ``i`` the
    remainder. A last partial batch is filled with all-padding rows (``drop_last=False``) or skipped.

    Padded mode (``packing=False``) puts one example per row, padded to ``max_seq_length``: one fixed
    shape means one compilation of the train step, and it is the baseline the padding fraction of
    packing is compared against.

    Checkpointing: ``state()`` is a small JSON-able dict; ``load_state(state)`` (or
    ``batches(start_step=state["step"])``) continues exactly where the run stopped.
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        batch_size: int,
        seed: int = 0,
        *,
        max_seq_length: int,
        packing: bool = True,
        shuffle: bool = True,
        drop_last: bool = False,
        num_epochs: int | None = None,
        pad_id: int = 0,
    ):
        if batch_size <= 0:
            raise ValueError(f"{batch_size=} must be positive")
        if max_seq_length <= 1:
            raise ValueError(f"{max_seq_length=} must be at least 2")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"{num_epochs=} must be positive or None (endless)")
        if len(examples) == 0:
            raise ValueError("dataset is empty: DataLoader got 0 examples")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.max_seq_length = max_seq_length
        self.packing = packing
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.pad_id = pad_id

        kept, truncated, dropped = truncate_examples(examples, max_seq_length)
        if not kept:
            raise ValueError(
                f"none of the {len(examples)} examples has a token to train on (every loss_mask is "
                "0 after truncation): check train_on_responses_only and max_seq_length"
            )
        self._examples = kept
        lengths = [len(ids) for ids, _ in kept]
        self.rows = plan_rows(lengths, max_seq_length, packing=packing)
        self.stats: PackingStats = packing_stats(
            self.rows, lengths, max_seq_length, truncated=truncated, dropped=dropped
        )
        num_rows = len(self.rows)
        self.steps_per_epoch = num_rows // batch_size if drop_last else -(-num_rows // batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"drop_last=True with {num_rows} rows and {batch_size=} leaves no batch; lower "
                "batch_size or set drop_last=False"
            )
        self.step = 0
        self._fingerprint = _fingerprint(kept, max_seq_length, packing)
        self._order_cache: tuple[int, np.ndarray] | None = None
        logger.info(
            "%s %d sequences into %d rows of %d tokens: %.1f%% padding, %d truncated, %d dropped; "
            "%d steps per epoch of %d rows",
            "packed" if packing else "padded", self.stats.num_sequences, num_rows, max_seq_length,
            100 * self.stats.padding_fraction, truncated, dropped, self.steps_per_epoch, batch_size,
        )  # fmt: skip

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def max_segments(self) -> int:
        """The most segments any row holds (1 when unpacked): a static bound the attention op can
        use for cuDNN's packed layout (``models.ops.Ops.max_segments``)."""
        return max(len(row) for row in self.rows)

    @property
    def epoch(self) -> int:
        """The epoch the next batch (``self.step``) belongs to."""
        return self.step // self.steps_per_epoch

    @property
    def total_steps(self) -> int | None:
        """Steps in ``num_epochs`` epochs, or None when the loader is endless."""
        return None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row indices in the order epoch ``epoch`` visits them (int64 [num_rows])."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        else:
            order = np.arange(self.num_rows)
        self._order_cache = (epoch, order)
        return order

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """The batch of global step ``step`` (int32 ``[batch_size, max_seq_length]`` arrays)."""
        if step < 0:
            raise ValueError(f"{step=} must be >= 0")
        if self.total_steps is not None and step >= self.total_steps:
            raise IndexError(f"{step=} is past the last step ({self.total_steps} in all)")
        epoch, i = divmod(step, self.steps_per_epoch)
        picked = self.epoch_order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        return assemble_rows(
            self._examples,
            [self.rows[j] for j in picked],
            self.max_seq_length,
            num_rows=self.batch_size,
            pad_id=self.pad_id,
        )

    def batches(self, start_step: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yields batches from ``start_step`` (default: ``self.step``) to the end (or forever).

        ``self.step`` is advanced as each batch is handed out, so ``state()`` taken after the train
        step on a batch resumes with the next one.
        """
        step = self.step if start_step is None else int(start_step)
        if step < 0:
            raise ValueError(f"{start_step=} must be >= 0")
        while self.total_steps is None or step < self.total_steps:
            batch = self.batch_at(step)
            step += 1
            self.step = step
            yield batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.batches()

    def state(self) -> dict[str, Any]:
        """JSON-able checkpoint state; ``step`` is the next step to be handed out."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_rows": self.num_rows,
            "fingerprint": self._fingerprint,
        }

    def load_state(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Restores ``step``; with ``strict`` refuses a state from another dataset/seed/layout."""
        if strict:
            mine = self.state()
            for key in ("seed", "batch_size", "num_rows", "fingerprint"):
                if key in state and state[key] != mine[key]:
                    raise ValueError(
                        f"data state does not match this DataLoader: {key}={state[key]!r} in the "
                        f"checkpoint, {mine[key]!r} here (pass strict=False to resume anyway)"
                    )
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"state step={step} must be >= 0")
        self.step = step


def _fingerprint(examples: Sequence[tuple[np.ndarray, np.ndarray]], t: int, packing: bool) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{t}:{int(packing)}:{len(examples)}".encode())
    for ids, mask in examples:
        h.update(np.int64(len(ids)).tobytes())
        h.update(ids.tobytes())
        h.update(mask.astype(np.int8).tobytes())
    return h.hexdigest()


def build_dataloader(
    source: str | os.PathLike | Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    batch_size: int,
    max_seq_length: int,
    seed: int = 0,
    packing: bool = True,
    format: Format | Literal["auto"] = "auto",
    fields: Mapping[str, str] | None = None,
    formatting_func: Callable[[Mapping[str, Any]], str | Mapping[str, Any]] | None = None,
    train_on_responses_only: bool | None = None,
    separator: str = "",
    shuffle: bool = True,
    drop_last: bool = False,
    num_epochs: int | None = None,
) -> DataLoader:
    """``tokenize_dataset`` + ``DataLoader`` in one call; padding uses the tokenizer's pad id
    (else eos, else 0): it is never attended to nor trained on."""
    examples = tokenize_dataset(
        source,
        tokenizer,
        format=format,
        fields=fields,
        formatting_func=formatting_func,
        train_on_responses_only=train_on_responses_only,
        separator=separator,
    )
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return DataLoader(
        examples,
        batch_size,
        seed,
        max_seq_length=max_seq_length,
        packing=packing,
        shuffle=shuffle,
        drop_last=drop_last,
        num_epochs=num_epochs,
        pad_id=pad_id,
    )
