"""Row layout for training batches: padding-free packing and the padded baseline.

A tokenized example is a dict ``{"input_ids": [n], "loss_mask": [n]}`` where ``loss_mask[i] == 1``
means token ``i`` is a training *target* (it is predicted from tokens ``< i``). Examples are laid out
in rows of ``T = max_seq_length`` tokens; a batch stacks ``B`` rows:

    input_ids    int32 [B, T]  tokens of segments 1..k back to back, then ``pad_id``
    segment_ids  int32 [B, T]  1, 2, ..., k per segment within the row; 0 on padding
    positions    int32 [B, T]  0..n-1 inside each segment (restart at every segment); 0 on padding
    labels       int32 [B, T]  PRE-SHIFTED targets, see below

Labels are pre-shifted so that the loss at position ``t`` compares ``logits[t]`` with ``labels[t]``
directly (the trainer and the cross-entropy kernel rely on this):

    labels[t] = input_ids[t + 1]  if t + 1 is in the same segment as t and loss_mask[t + 1] == 1
              = -100              otherwise (last token of every segment, masked targets, padding)

So no prediction ever crosses a segment boundary, and attention must only be masked by segment.

Packing algorithm: best-fit decreasing (BFD), a member of the first-fit-decreasing family with the
same 11/9 OPT + 1 bound, run once over the whole dataset. Why not greedy packing in shuffled order:
  * BFD leaves less padding (sorted-decreasing packing of short-tailed length distributions such as
    GSM8K is typically within a few percent of zero padding; greedy in random order wastes the tail
    of most rows).
  * The number of rows is fixed for the whole run, so ``step -> (epoch, position)`` is plain
    arithmetic: resuming from a step needs no replay of earlier epochs' packings.
  * It needs no seed at all, and ties are broken by example index, so it is deterministic. The rows
    (not their contents) are reshuffled every epoch by ``(seed, epoch)`` in ``fastjax.data``.
The cost: the same examples share a row every epoch. With segment-masked attention they never see
each other, so this only affects which examples land in the same batch.

Sequences longer than a row are truncated to ``T`` (keeping the start), counted, and reported with a
warning; sequences with no target left (empty, or all-prompt after truncation) are dropped, counted
and reported too, since they would only add padding-like work.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
BATCH_KEYS = ("input_ids", "labels", "positions", "segment_ids")


@dataclasses.dataclass(frozen=True)
class PackingStats:
    """What laying the dataset out in rows cost.

    ``padding_fraction`` is the share of the ``num_rows * max_seq_length`` token slots holding no real
    token (it does not count the all-padding rows that may fill a last partial batch).
    """

    num_sequences: int  # sequences laid out (after dropping the ones with no target)
    num_rows: int
    num_tokens: int  # real tokens laid out (after truncation)
    max_seq_length: int
    padding_fraction: float
    truncated: int  # sequences longer than max_seq_length, cut to max_seq_length
    dropped: int  # sequences dropped because no token in them is a target


def as_example(example: Any, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Validates one tokenized example; returns ``(input_ids int32 [n], loss_mask int32 [n])``."""
    try:
        ids = np.asarray(example["input_ids"], dtype=np.int32)
        mask = np.asarray(example["loss_mask"], dtype=np.int32)
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"tokenized example {index} must be a dict with 'input_ids' and 'loss_mask', "
            f"got {type(example).__name__}: {e}"
        ) from e
    if ids.ndim != 1 or ids.shape != mask.shape:
        raise ValueError(
            f"tokenized example {index}: {ids.shape=} and {mask.shape=} must be equal and 1-D"
        )
    return ids, mask


def plan_rows(
    lengths: Sequence[int], max_seq_length: int, *, packing: bool = True
) -> list[list[int]]:
    """Assigns examples (by index into ``lengths``) to rows of ``max_seq_length`` tokens.

    ``packing=True``: best-fit decreasing, segments of a row listed in placement order.
    ``packing=False``: one example per row, in dataset order. Every length must be in
    ``1..max_seq_length`` (truncate first).
    """
    if max_seq_length <= 0:
        raise ValueError(f"{max_seq_length=} must be positive")
    for i, n in enumerate(lengths):
        if not 0 < n <= max_seq_length:
            raise ValueError(f"example {i} has length {n}, outside 1..{max_seq_length=}")
    if not packing:
        return [[i] for i in range(len(lengths))]

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free_caps: list[int] = []  # sorted distinct remaining capacities held by >= 1 row
    rows_by_cap: dict[int, collections.deque[int]] = {}  # remaining capacity -> rows, oldest first
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free_caps, n)  # tightest capacity that still fits: best fit
        if k < len(free_caps):
            cap = free_caps[k]
            bucket = rows_by_cap[cap]
            r = bucket.popleft()
            if not bucket:
                del rows_by_cap[cap]
                free_caps.pop(k)
        else:
            r, cap = len(rows), max_seq_length
            rows.append([])
        rows[r].append(i)
        left = cap - n
        if left > 0:
            if left not in rows_by_cap:
                rows_by_cap[left] = collections.deque()
                bisect.insort(free_caps, left)
            rows_by_cap[left].append(r)
    return rows


def truncate_examples(
    examples: Sequence[Any], max_seq_length: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int]:
    """Validates, truncates to ``max_seq_length`` and drops examples without a target.

    Returns ``(kept, truncated, dropped)`` with ``kept`` a list of ``(input_ids, loss_mask)``. Logs a
    warning naming the counts when anything was truncated or dropped.
    """
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    truncated = dropped = 0
    longest = 0
    for index, example in enumerate(examples):
        ids, mask = as_example(example, index)
        if len(ids) > max_seq_length:
            truncated += 1
            longest = max(longest, len(ids))
            ids, mask = ids[:max_seq_length], mask[:max_seq_length]
        # loss_mask[0] can never be a target: nothing precedes the first token of a segment.
        if len(ids) < 2 or not mask[1:].any():
            dropped += 1
            continue
        kept.append((ids, mask))
    if truncated:
        logger.warning(
            "%d of %d sequences are longer than max_seq_length=%d (longest %d tokens) and were "
            "truncated to it",
            truncated, len(examples), max_seq_length, longest,
        )  # fmt: skip
    if dropped:
        logger.warning(
            "%d of %d sequences have no token to train on (empty, or fully masked after "
            "truncation) and were dropped",
            dropped, len(examples),
        )  # fmt: skip
    return kept, truncated, dropped


def packing_stats(
    rows: Sequence[Sequence[int]],
    lengths: Sequence[int],
    max_seq_length: int,
    *,
    truncated: int = 0,
    dropped: int = 0,
) -> PackingStats:
    num_tokens = int(sum(lengths))
    slots = len(rows) * max_seq_length
    return PackingStats(
        num_sequences=len(lengths),
        num_rows=len(rows),
        num_tokens=num_tokens,
        max_seq_length=max_seq_length,
        padding_fraction=(1.0 - num_tokens / slots) if slots else 0.0,
        truncated=truncated,
        dropped=dropped,
    )


def segment_labels(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """Pre-shifted labels of one segment: ``labels[t] = input_ids[t+1]`` where that is a target."""
    labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int32)
    labels[:-1] = np.where(loss_mask[1:] != 0, input_ids[1:], IGNORE_INDEX)
    return labels


def assemble_rows(
    examples: Sequence[tuple[np.ndarray, np.ndarray]],
    rows: Sequence[Sequence[int]],
    max_seq_length: int,
    *,
    num_rows: int | None = None,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Builds the batch arrays for ``rows`` (lists of indices into ``examples``).

    ``examples`` holds ``(input_ids, loss_mask)`` pairs no longer than ``max_seq_length``. With
    ``num_rows`` larger than ``len(rows)`` the batch is filled up with all-padding rows (segment 0,
    labels -100), keeping the batch shape fixed for the compiled train step.
    """
    num_rows = len(rows) if num_rows is None else num_rows
    if num_rows < len(rows):
        raise ValueError(f"{num_rows=} is smaller than the {len(rows)} rows given")
    shape = (num_rows, max_seq_length)
    batch = {
        "input_ids": np.full(shape, pad_id, dtype=np.int32),
        "labels": np.full(shape, IGNORE_INDEX, dtype=np.int32),
        "positions": np.zeros(shape, dtype=np.int32),
        "segment_ids": np.zeros(shape, dtype=np.int32),
    }
    for r, row in enumerate(rows):
        offset = 0
        for segment, index in enumerate(row, start=1):
            ids, mask = examples[index]
            n = len(ids)
            if offset + n > max_seq_length:
                raise ValueError(
                    f"row {r} overflows: segments {list(row)} need more than {max_seq_length=}"
                )
            window = slice(offset, offset + n)
            batch["input_ids"][r, window] = ids
            batch["labels"][r, window] = segment_labels(ids, mask)
            batch["positions"][r, window] = np.arange(n, dtype=np.int32)
            batch["segment_ids"][r, window] = segment
            offset += n
    return batch
