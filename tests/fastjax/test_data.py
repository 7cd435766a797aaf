"""Tests for fastjax.data / fastjax.packing / fastjax.arith_data (CPU, no hub, a few seconds).

Tolerances: everything here is integer layout, compared exactly; padding fractions to 1e-12.
Random cases draw fresh lengths / tokens / masks from a per-case seed (never constant inputs).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from fastjax.arith_data import (
    GSM8K_FIELDS,
    TEMPLATES,
    arith_splits,
    generate_arith_problems,
    gsm8k_answer,
    load_gsm8k,
)
from fastjax.data import (
    IGNORE_INDEX,
    DataLoader,
    build_dataloader,
    detect_format,
    load_rows,
    tokenize_dataset,
)
from fastjax.packing import assemble_rows, plan_rows
from fastjax.tokenizer import Tokenizer

FRACTION_TOL = 1e-12
# shared/ lies beside the checkout (in CI too: a copy beside the clone)
GSM8K_DIR = str(Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k")
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same rendering, with transformers' {% generation %} blocks around the assistant's output.
CHATML_GENERATION = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
SYSTEM = "You are terse and helpful."
USER_1 = "What colour is the sky on a clear day?"
ASSISTANT_1 = "The sky is blue."
USER_2 = "And grass in spring?"
ASSISTANT_2 = "Grass is green."


@pytest.fixture(scope="module")
def tok():
    arith, _ = arith_splits(40, 1)
    corpus = [SYSTEM, USER_1, ASSISTANT_1, USER_2, ASSISTANT_2, "system user assistant"]
    corpus += [row["question"] + "\n" + row["answer"] for row in arith]
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    backend.train_from_iterator(corpus, trainer)
    return Tokenizer(backend, chat_template=CHATML, bos_token="<s>", eos_token="</s>",
                     pad_token="<pad>", add_bos_token=True)  # fmt: skip


def _targets(batch, row=0):
    """Runs of consecutive trained targets in one row, as lists of token ids."""
    labels = batch["labels"][row]
    runs, run = [], []
    for label in labels:
        if label != IGNORE_INDEX:
            run.append(int(label))
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


def _random_examples(rng, n, max_len):
    out = []
    for _ in range(n):
        length = int(rng.integers(2, max_len + 1))
        mask = rng.integers(0, 2, length)
        mask[-1] = 1  # at least one target
        out.append({"input_ids": rng.integers(3, 30_000, length), "loss_mask": mask})
    return out


def _check_invariants(batch, examples, rows, t):
    """Every batch row equals its segments laid end to end; labels never cross a segment."""
    ids, labels = batch["input_ids"], batch["labels"]
    pos, seg = batch["positions"], batch["segment_ids"]
    for key in ("input_ids", "labels", "positions", "segment_ids"):
        assert batch[key].dtype == np.int32 and batch[key].shape == (len(rows), t), key
    for r, row in enumerate(rows):
        offset = 0
        for s, index in enumerate(row, start=1):
            x, m = (
                np.asarray(examples[index]["input_ids"]),
                np.asarray(examples[index]["loss_mask"]),
            )
            x, m = x[:t], m[:t]
            w = slice(offset, offset + len(x))
            np.testing.assert_array_equal(ids[r, w], x)
            np.testing.assert_array_equal(seg[r, w], s)
            np.testing.assert_array_equal(pos[r, w], np.arange(len(x)))
            want = np.array([x[i + 1] if m[i + 1] else -100 for i in range(len(x) - 1)] + [-100])
            np.testing.assert_array_equal(labels[r, w], want)
            offset += len(x)
        np.testing.assert_array_equal(seg[r, offset:], 0)
        np.testing.assert_array_equal(labels[r, offset:], -100)
    # The same property stated without the layout: a target always sits in the next slot of the
    # same segment.
    b, i = np.nonzero(labels != IGNORE_INDEX)
    assert np.all(i + 1 < t)
    assert np.all(seg[b, i] != 0) and np.all(seg[b, i + 1] == seg[b, i])
    np.testing.assert_array_equal(labels[b, i], ids[b, i + 1])


# ------------------------------------------------------------------------------ packing layout
HAND_EXAMPLES = [
    {"input_ids": [11, 12, 13], "loss_mask": [0, 1, 1]},
    {"input_ids": [21, 22], "loss_mask": [1, 1]},
    {"input_ids": [31, 32, 33, 34], "loss_mask": [0, 0, 1, 1]},
]


def test_packing_hand_made_layout():
    loader = DataLoader(HAND_EXAMPLES, 2, 0, max_seq_length=6, shuffle=False, pad_id=7)
    # Best-fit decreasing: [31..34] opens row 0, [11..13] does not fit there and opens row 1,
    # [21, 22] fits row 0 exactly.
    assert loader.rows == [[2, 1], [0]]
    batch = loader.batch_at(0)
    np.testing.assert_array_equal(
        batch["input_ids"], [[31, 32, 33, 34, 21, 22], [11, 12, 13, 7, 7, 7]]
    )
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(
        batch["labels"], [[-100, 33, 34, -100, 22, -100], [12, 13, -100, -100, -100, -100]]
    )
    stats = loader.stats
    assert (stats.num_sequences, stats.num_rows, stats.num_tokens) == (3, 2, 9)
    assert stats.truncated == 0 and stats.dropped == 0
    assert abs(stats.padding_fraction - 3 / 12) < FRACTION_TOL


def test_padded_mode_one_sequence_per_row():
    loader = DataLoader(HAND_EXAMPLES, 3, 0, max_seq_length=6, packing=False, shuffle=False)
    assert loader.rows == [[0], [1], [2]]
    batch = loader.batch_at(0)
    np.testing.assert_array_equal(batch["segment_ids"].sum(1), [3, 2, 4])
    np.testing.assert_array_equal(batch["labels"][2], [-100, 33, 34, -100, -100, -100])
    assert abs(loader.stats.padding_fraction - (1 - 9 / 18)) < FRACTION_TOL


@pytest.mark.parametrize("case", range(6))
def test_packing_random_invariants(case):
    rng = np.random.default_rng(1000 + case)
    t = int(rng.integers(17, 97))
    examples = _random_examples(rng, int(rng.integers(5, 60)), t)
    lengths = [len(e["input_ids"]) for e in examples]
    rows = plan_rows(lengths, t)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert all(sum(lengths[i] for i in row) <= t for row in rows)
    # BFD never leaves two rows that could have been merged.
    fills = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(fills) < 2 or fills[0] + fills[1] > t
    pairs = [(np.asarray(e["input_ids"], np.int32), np.asarray(e["loss_mask"])) for e in examples]
    _check_invariants(assemble_rows(pairs, rows, t), examples, rows, t)
    padded = DataLoader(examples, 4, case, max_seq_length=t, packing=False)
    packed = DataLoader(examples, 4, case, max_seq_length=t)
    assert packed.stats.padding_fraction < padded.stats.padding_fraction
    # the segment bound attention may rely on: no batch row holds more segments than it says
    most = max(
        len(set(row.tolist()) - {0})
        for step in range(packed.steps_per_epoch)
        for row in packed.batch_at(step)["segment_ids"]
    )
    assert packed.max_segments == most and padded.max_segments == 1
    assert abs(packed.stats.padding_fraction - (1 - sum(lengths) / (len(rows) * t))) < 1e-12


def test_loader_batches_satisfy_invariants():
    rng = np.random.default_rng(7)
    examples = _random_examples(rng, 37, 24)
    loader = DataLoader(examples, 3, 5, max_seq_length=32)
    for step in range(loader.steps_per_epoch):
        epoch, i = divmod(step, loader.steps_per_epoch)
        picked = loader.epoch_order(epoch)[i * 3 : (i + 1) * 3]
        rows = [loader.rows[j] for j in picked]
        batch = loader.batch_at(step)
        _check_invariants({k: v[: len(rows)] for k, v in batch.items()}, examples, rows, 32)
        assert np.all(batch["segment_ids"][len(rows) :] == 0)  # filler rows of the last batch


def test_truncation_is_counted_and_warned(caplog):
    rng = np.random.default_rng(3)
    examples = _random_examples(rng, 5, 8)
    long = {"input_ids": rng.integers(3, 999, 13), "loss_mask": np.ones(13, int)}
    with caplog.at_level(logging.WARNING, logger="fastjax.packing"):
        loader = DataLoader([*examples, long], 6, 0, max_seq_length=10, shuffle=False)
    assert loader.stats.truncated == 1
    assert "1 of 6 sequences are longer than max_seq_length=10" in caplog.text
    r = loader.rows.index([5])  # a full row holds nothing else
    batch = loader.batch_at(0)
    np.testing.assert_array_equal(batch["input_ids"][r], long["input_ids"][:10])
    np.testing.assert_array_equal(batch["labels"][r], [*long["input_ids"][1:10], IGNORE_INDEX])


def test_untrained_sequences_are_dropped(caplog):
    examples = [*HAND_EXAMPLES, {"input_ids": [5, 6, 7], "loss_mask": [1, 0, 0]}]
    with caplog.at_level(logging.WARNING, logger="fastjax.packing"):
        loader = DataLoader(examples, 1, 0, max_seq_length=6)
    assert loader.stats.dropped == 1 and loader.stats.num_sequences == 3
    assert "no token to train on" in caplog.text
    with pytest.raises(ValueError, match="none of the 1 examples"):
        DataLoader(examples[3:], 1, 0, max_seq_length=6)


# ------------------------------------------------------------------------------ shuffling, resume
def test_shuffle_is_deterministic_by_seed_and_epoch():
    examples = _random_examples(np.random.default_rng(11), 50, 8)
    a = DataLoader(examples, 4, 123, max_seq_length=8, packing=False)
    b = DataLoader(examples, 4, 123, max_seq_length=8, packing=False)
    c = DataLoader(examples, 4, 124, max_seq_length=8, packing=False)
    for step in (0, 5, 13, 29):
        for key, value in a.batch_at(step).items():
            np.testing.assert_array_equal(value, b.batch_at(step)[key])
    assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(a.epoch_order(epoch)), np.arange(50))
    # Each epoch shows each example once (the 2 filler rows of the last batch are empty).
    firsts = [a.batch_at(s)["input_ids"][:, 0] for s in range(a.steps_per_epoch)]
    starts = np.concatenate(firsts)[:50]
    assert sorted(starts.tolist()) == sorted(int(e["input_ids"][0]) for e in examples)


@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_mid_epoch_equals_uninterrupted(drop_last):
    examples = _random_examples(np.random.default_rng(21), 29, 12)

    def make():
        return DataLoader(examples, 3, 9, max_seq_length=16, drop_last=drop_last, num_epochs=3)

    full = list(make().batches())
    ref = make()
    assert len(full) == ref.total_steps == 3 * ref.steps_per_epoch
    for start in (0, 1, ref.steps_per_epoch - 1, ref.steps_per_epoch + 2, len(full) - 1):
        resumed = list(make().batches(start_step=start))
        assert len(resumed) == len(full) - start
        for got, want in zip(resumed, full[start:], strict=True):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    # Checkpoint / restore through state().
    first = make()
    it = first.batches()
    for _ in range(ref.steps_per_epoch + 1):
        next(it)
    state = json.loads(json.dumps(first.state()))
    assert state["step"] == ref.steps_per_epoch + 1 and state["epoch"] == 1
    second = make()
    second.load_state(state)
    nxt = next(iter(second))
    np.testing.assert_array_equal(nxt["input_ids"], full[state["step"]]["input_ids"])
    assert second.step == state["step"] + 1
    other = DataLoader(examples, 3, 10, max_seq_length=16)
    with pytest.raises(ValueError, match="seed"):
        other.load_state(state)


# ------------------------------------------------------------------------------ tokenizing
@pytest.mark.parametrize("template", [CHATML, CHATML_GENERATION], ids=["turns", "generation"])
def test_chat_response_only_masking(tok, template):
    tok = Tokenizer(tok.backend, chat_template=template, bos_token="<s>", eos_token="</s>")
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": USER_1},
        {"role": "assistant", "content": ASSISTANT_1},
        {"role": "user", "content": USER_2},
        {"role": "assistant", "content": ASSISTANT_2},
    ]
    examples = tokenize_dataset([{"messages": messages}], tok)
    ids, _ = tok.apply_chat_template_with_assistant_mask(messages)
    np.testing.assert_array_equal(examples[0]["input_ids"], ids)
    assert tok.decode(ids) == tok.apply_chat_template(messages)
    batch = DataLoader(examples, 1, 0, max_seq_length=256).batch_at(0)
    runs = [tok.decode(run) for run in _targets(batch)]
    assert len(runs) == 2, runs
    for run, content in zip(runs, [ASSISTANT_1, ASSISTANT_2], strict=True):
        assert run == content + "<|im_end|>", run  # reply + end-of-turn, no header, no "\n"
    trained = "".join(runs)
    for text in (SYSTEM, USER_1, USER_2, "<|im_start|>", "user", "system"):
        assert text not in trained
    everything = tokenize_dataset([{"messages": messages}], tok, train_on_responses_only=False)
    assert everything[0]["loss_mask"].all()


def test_prompt_completion_masking(tok):
    row = {"prompt": "What is 2+3?", "completion": " The answer is 5."}
    (example,) = tokenize_dataset([row], tok)
    prompt_ids = tok.encode(row["prompt"])
    completion_ids = tok.encode(row["completion"], add_special_tokens=False)
    assert prompt_ids[0] == tok.bos_token_id
    want = [*prompt_ids, *completion_ids, tok.eos_token_id]
    np.testing.assert_array_equal(example["input_ids"], want)
    np.testing.assert_array_equal(
        example["loss_mask"], [0] * len(prompt_ids) + [1] * (len(completion_ids) + 1)
    )
    batch = DataLoader([example], 1, 0, max_seq_length=64).batch_at(0)
    (run,) = _targets(batch)
    assert tok.decode(run) == row["completion"] + "</s>"
    (full,) = tokenize_dataset([row], tok, train_on_responses_only=False)
    assert full["loss_mask"].all()


def test_text_format_appends_eos(tok):
    (example,) = tokenize_dataset([{"text": "hello there"}], tok)
    assert example["input_ids"][0] == tok.bos_token_id
    assert example["input_ids"][-1] == tok.eos_token_id and example["loss_mask"].all()
    with pytest.raises(ValueError, match="no response part"):
        tokenize_dataset([{"text": "x"}], tok, train_on_responses_only=True)


def test_gsm8k_fields_and_formatting_func(tok):
    rows = generate_arith_problems(4, seed=5)
    examples = tokenize_dataset(rows, tok, fields=GSM8K_FIELDS, separator="\n")
    batch = DataLoader(examples, 4, 0, max_seq_length=128, packing=False, shuffle=False).batch_at(0)
    for r, row in enumerate(rows):
        (run,) = _targets(batch, r)
        assert tok.decode(run) == row["answer"] + "</s>"

    def as_chat(row):
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": row["answer"]}]}  # fmt: skip

    chat = tokenize_dataset(rows, tok, formatting_func=as_chat)
    batch = DataLoader(chat, 4, 0, max_seq_length=160, packing=False, shuffle=False).batch_at(0)
    assert tok.decode(_targets(batch, 1)[0]).startswith(rows[1]["answer"] + "<|im_end|>")
    text = tokenize_dataset(rows, tok, formatting_func=lambda r: r["question"])
    assert text[0]["loss_mask"].all()


def test_sources_jsonl_list_and_dataset_like(tmp_path, tok):
    rows = [{"text": f"row number {i}"} for i in range(3)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")

    class DatasetLike:  # what a datasets.Dataset looks like to load_rows
        column_names = ("text",)

        def __iter__(self):
            return iter([dict(r) for r in rows])

    assert load_rows(path) == load_rows(str(path)) == load_rows(DatasetLike()) == rows
    a = tokenize_dataset(path, tok)
    b = tokenize_dataset(DatasetLike(), tok)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: invalid JSON"):
        load_rows(path)


def test_clear_errors(tmp_path, tok):
    with pytest.raises(ValueError, match="dataset is empty"):
        tokenize_dataset([], tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="dataset is empty"):
        load_rows(empty)
    with pytest.raises(ValueError, match="dataset is empty"):
        DataLoader([], 2, 0, max_seq_length=8)
    with pytest.raises(ValueError, match=r"unknown dataset format.*\['body', 'title'\]"):
        tokenize_dataset([{"title": "a", "body": "b"}], tok)
    with pytest.raises(ValueError, match="fields="):
        detect_format(["question", "answer"])
    rows = [{"prompt": "a", "completion": "b"}] * 2 + [{"prompt": "c"}]
    with pytest.raises(ValueError, match="row 2 is missing field 'completion'"):
        tokenize_dataset(rows, tok)
    qa = [{"question": "q", "answer": "a"}, {"question": "q2"}]
    with pytest.raises(
        ValueError, match=r"row 1 is missing field 'answer' \(mapped to 'completion'"
    ):
        tokenize_dataset(qa, tok, fields=GSM8K_FIELDS)
    bad_chat = [{"messages": [{"role": "user", "content": "hi"}, {"content": "x"}]}]
    with pytest.raises(ValueError, match="row 0: message 1 needs 'role'"):
        tokenize_dataset(bad_chat, tok)
    with pytest.raises(ValueError, match="unknown format="):
        tokenize_dataset([{"text": "a"}], tok, format="sharegpt")
    with pytest.raises(ValueError, match="only"):
        tokenize_dataset([{"text": "a"}], tok, fields={"question": "q"})


def test_build_dataloader_end_to_end(tok):
    rows, _ = arith_splits(60, 1)
    kwargs = {"batch_size": 4, "max_seq_length": 256, "fields": GSM8K_FIELDS, "separator": "\n"}
    packed = build_dataloader(rows, tok, seed=1, **kwargs)
    padded = build_dataloader(rows, tok, seed=1, packing=False, **kwargs)
    assert packed.stats.num_sequences == padded.stats.num_sequences == 60
    assert packed.stats.padding_fraction < padded.stats.padding_fraction
    lower_bound = -(-packed.stats.num_tokens // 256)  # rows if nothing were wasted
    assert packed.num_rows <= 11 * lower_bound // 9 + 1 < padded.num_rows  # FFD-family bound
    batch = next(iter(packed))
    assert set(batch) == {"input_ids", "labels", "positions", "segment_ids"}
    assert batch["input_ids"].shape == (4, 256) and batch["segment_ids"].max() > 1
    assert packed.step == 1


# ------------------------------------------------------------------------------ arithmetic set
def test_arith_answers_are_correct():
    rows = generate_arith_problems(300, seed=17)
    assert {row["template"] for row in rows} == set(TEMPLATES)
    for row in rows:
        numbers = [int(x) for x in re.findall(r"\d+", row["question"])]
        want = TEMPLATES[row["template"]][1](*numbers)
        assert want >= 0
        assert row["answer"].endswith(f"\n#### {want}")
        assert gsm8k_answer(row["answer"]) == str(want)
        steps = re.findall(r"<<(\d+)([-+*/])(\d+)=(\d+)>>\4", row["answer"])
        assert steps and len(steps) == row["answer"].count("<<")
        for a, op, b, c in steps:
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c, row["answer"]


def test_arith_determinism_and_splits():
    assert generate_arith_problems(50, seed=3) == generate_arith_problems(50, seed=3)
    assert generate_arith_problems(50, seed=3) != generate_arith_problems(50, seed=4)
    train, test = arith_splits(500, 100)
    assert len(train) == 500 and len(test) == 100
    assert len({r["question"] for r in train}) == 500
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    with pytest.raises(ValueError, match="unknown templates"):
        generate_arith_problems(3, seed=0, templates=["power"])


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
        ("so he pays 1,000 + 234 = <<1000+234=1234>>1,234\n#### 1,234", "1234"),
        ("#### -3", "-3"),
        ("#### 18.00", "18"),
        ("#### $1,234.50 dollars", "1234.5"),
        ("The answer is -5.", "-5"),
        ("It costs $3.50 in total", "3.5"),
        ("first 3, then 4, so 12 apples", "12"),
        ("#### 6\nextra text 99", "6"),
        ("the answer is 0.25", "0.25"),
        ("no number at all", None),
        ("####", None),
    ],
)
def test_gsm8k_answer(text, want):
    assert gsm8k_answer(text) == want


def test_load_gsm8k(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": "a\n#### 4"}) + "\n")
    assert load_gsm8k(path) == [{"question": "q?", "answer": "a\n#### 4"}]
    path.write_text(json.dumps({"question": "q?"}) + "\n")
    with pytest.raises(ValueError, match="row 0 is missing field 'answer'"):
        load_gsm8k(path)


def test_real_gsm8k_if_present():
    import os

    path = os.path.join(GSM8K_DIR, "test.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    rows = load_gsm8k(path)
    assert len(rows) > 1000
    for row in rows:
        final = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert gsm8k_answer(row["answer"]) == final
