"""A built-in, generated arithmetic word-problem set in GSM8K's format, plus GSM8K helpers.

Rows look like GSM8K's: ``{"question": str, "answer": str, "template": str}`` where the answer is
a short chain of thought with calculator annotations and a final ``#### <number>`` line:

    question: "Tom has 12 apples. He buys 7 more. How many apples does Tom have now?"
    answer:   "Tom has 12 + 7 = <<12+7=19>>19 apples now.\\n#### 19"

Numbers appear in the question in the order the template's formula uses them (see ``TEMPLATES``),
so answers can be recomputed from the question alone. Every answer is a non-negative integer.
Generation uses ``random.Random(seed)`` (stable across Python versions) and is deterministic; the
train and test splits come from different seeds and the test split excludes train questions.

``gsm8k_answer(text)`` extracts the final answer for exact-match accuracy, ``load_gsm8k(path)`` reads
the real GSM8K JSONL (``question`` / ``answer``); train on either with
``fastjax.data.tokenize_dataset(rows, tok, fields=GSM8K_FIELDS, separator="\\n")``.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Collection, Sequence
from decimal import Decimal, InvalidOperation

from fastjax.data import GSM8K_FIELDS, load_rows

__all__ = [
    "GSM8K_FIELDS",
    "TEMPLATES",
    "arith_splits",
    "generate_arith_problems",
    "gsm8k_answer",
    "load_gsm8k",
]

_NAMES = (
    ("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Maria", "She"), ("Liam", "He"),
    ("Sofia", "She"), ("Omar", "He"), ("Chloe", "She"), ("Ravi", "He"), ("Emma", "She"),
    ("Jamal", "He"), ("Yuki", "She"), ("Lucas", "He"), ("Nadia", "She"), ("Diego", "He"),
    ("Grace", "She"),
)  # fmt: skip
_ITEMS = (
    "apples", "marbles", "stickers", "pencils", "cookies", "books", "cards", "shells", "stamps",
    "balloons", "crayons", "oranges", "beads", "toy cars",
)  # fmt: skip
_CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("basket", "baskets"))
_THINGS = (("notebook", "notebooks"), ("sandwich", "sandwiches"), ("ticket", "tickets"),
           ("pen", "pens"), ("toy", "toys"))  # fmt: skip
_BILLS = (10, 20, 50, 100)


def _add(r: random.Random, name: str, he: str, friend: str, item: str) -> tuple[str, str, int]:
    a, b = r.randint(2, 99), r.randint(2, 99)
    c = a + b
    q = f"{name} has {a} {item}. {he} buys {b} more. How many {item} does {name} have now?"
    return q, f"{name} has {a} + {b} = <<{a}+{b}={c}>>{c} {item} now.", c


def _subtract(r: random.Random, name: str, he: str, friend: str, item: str) -> tuple[str, str, int]:
    a = r.randint(10, 99)
    b = r.randint(2, a - 1)
    c = a - b
    q = (
        f"{name} had {a} {item}. {he} gave {b} of them to {friend}. "
        f"How many {item} does {name} have left?"
    )
    return q, f"{name} has {a} - {b} = <<{a}-{b}={c}>>{c} {item} left.", c


def _multiply(r: random.Random, name: str, he: str, friend: str, item: str) -> tuple[str, str, int]:
    a, b = r.randint(2, 12), r.randint(2, 12)
    box, boxes = r.choice(_CONTAINERS)
    c = a * b
    q = (
        f"{name} buys {a} {boxes} of {item}. Each {box} holds {b} {item}. "
        f"How many {item} does {name} buy in total?"
    )
    return q, f"{name} buys {a} x {b} = <<{a}*{b}={c}>>{c} {item} in total.", c


def _divide(r: random.Random, name: str, he: str, friend: str, item: str) -> tuple[str, str, int]:
    a, b = r.randint(2, 12), r.randint(2, 9)
    c = a * b
    q = (
        f"{name} has {c} {item} and shares them equally among {b} friends. "
        f"How many {item} does each friend get?"
    )
    return q, f"Each friend gets {c} / {b} = <<{c}/{b}={a}>>{a} {item}.", a


def _add_subtract(
    r: random.Random, name: str, he: str, friend: str, item: str
) -> tuple[str, str, int]:
    a, b = r.randint(5, 60), r.randint(2, 40)
    s = a + b
    d = r.randint(2, s - 1)
    c = s - d
    q = (
        f"{name} has {a} {item}. {he} buys {b} more and then gives {d} to {friend}. "
        f"How many {item} does {name} have now?"
    )
    cot = (
        f"After buying, {name} has {a} + {b} = <<{a}+{b}={s}>>{s} {item}.\n"
        f"After giving {d} away, {name} has {s} - {d} = <<{s}-{d}={c}>>{c} {item}."
    )
    return q, cot, c


def _multiply_add(
    r: random.Random, name: str, he: str, friend: str, item: str
) -> tuple[str, str, int]:
    a, b, d = r.randint(2, 9), r.randint(2, 12), r.randint(2, 30)
    box, boxes = r.choice(_CONTAINERS)
    p = a * b
    c = p + d
    q = (
        f"{name} buys {a} {boxes} of {item} with {b} {item} in each {box}. "
        f"{he} already had {d} {item}. How many {item} does {name} have now?"
    )
    cot = (
        f"The {boxes} hold {a} x {b} = <<{a}*{b}={p}>>{p} {item}.\n"
        f"{name} has {p} + {d} = <<{p}+{d}={c}>>{c} {item} now."
    )
    return q, cot, c


def _change(r: random.Random, name: str, he: str, friend: str, item: str) -> tuple[str, str, int]:
    price, count = r.randint(2, 9), r.randint(2, 6)
    thing, things = r.choice(_THINGS)
    total = price * count
    bill = next(b for b in _BILLS if b > total)
    c = bill - total
    q = (
        f"A {thing} costs ${price}. {name} buys {count} {things} and pays with a ${bill} bill. "
        f"How much change does {name} get?"
    )
    cot = (
        f"The {things} cost {count} x ${price} = $<<{count}*{price}={total}>>{total}.\n"
        f"{name} gets ${bill} - ${total} = $<<{bill}-{total}={c}>>{c} in change."
    )
    return q, cot, c


# name -> (generator, formula over the question's integers in order). Two-step templates chain
# two operations; the formulas are what the tests recompute answers with.
TEMPLATES: dict[str, tuple[Callable, Callable[..., int]]] = {
    "add": (_add, lambda a, b: a + b),
    "subtract": (_subtract, lambda a, b: a - b),
    "multiply": (_multiply, lambda a, b: a * b),
    "divide": (_divide, lambda c, b: c // b),
    "add_subtract": (_add_subtract, lambda a, b, d: a + b - d),
    "multiply_add": (_multiply_add, lambda a, b, d: a * b + d),
    "change": (_change, lambda price, count, bill: bill - price * count),
}


def generate_arith_problems(
    num_examples: int,
    *,
    seed: int,
    templates: Sequence[str] | None = None,
    exclude: Collection[str] = (),
) -> list[dict[str, str]]:
    """``num_examples`` distinct problems ``{"question", "answer", "template"}``, deterministic in
    ``seed``; questions in ``exclude`` are skipped (used to keep test out of train)."""
    names = list(TEMPLATES) if templates is None else list(templates)
    unknown = sorted(set(names) - set(TEMPLATES))
    if unknown or not names:
        raise ValueError(f"unknown templates {unknown or names}; choose from {list(TEMPLATES)}")
    if num_examples < 0:
        raise ValueError(f"{num_examples=} must be >= 0")
    r = random.Random(seed)
    seen = set(exclude)
    rows: list[dict[str, str]] = []
    attempts = 0
    while len(rows) < num_examples:
        attempts += 1
        if attempts > 100 * num_examples + 1000:
            raise ValueError(f"could not draw {num_examples} distinct problems from {names}")
        template = r.choice(names)
        (name, he), item = r.choice(_NAMES), r.choice(_ITEMS)
        friend = r.choice([n for n, _ in _NAMES if n != name])
        question, cot, result = TEMPLATES[template][0](r, name, he, friend, item)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"question": question, "answer": f"{cot}\n#### {result}", "template": template})
    return rows


def arith_splits(
    num_train: int = 2000, num_test: int = 200, *, train_seed: int = 0, test_seed: int = 1
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and test splits from different seeds; no test question appears in train."""
    if train_seed == test_seed:
        raise ValueError(f"{train_seed=} and {test_seed=} must differ")
    train = generate_arith_problems(num_train, seed=train_seed)
    test = generate_arith_problems(
        num_test, seed=test_seed, exclude={row["question"] for row in train}
    )
    return train, test


# ------------------------------------------------------------------------------------ GSM8K
_NUMBER = re.compile(r"(-?)\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def _canonical_number(sign: str, digits: str) -> str | None:
    try:
        value = Decimal(digits.replace(",", ""))
    except InvalidOperation:
        return None
    if sign:
        value = -value
    if value == value.to_integral_value():
        return str(int(value))  # "72.00" -> "72", "-0" -> "0"
    return format(value.normalize(), "f")  # "0.50" -> "0.5"


def gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style solution as a canonical number string, or None.

    Takes the first number after ``####`` if present, else the last number in the text. Commas and
    a ``$`` are dropped, negatives and decimals kept, trailing zeros removed: ``"#### 1,000"`` ->
    ``"1000"``, ``"... is -3.50 dollars"`` -> ``"-3.5"``. Compare the results with ``==``.
    """
    _, marker, after = text.partition("####")
    if marker:
        match = _NUMBER.search(after)
        return _canonical_number(*match.groups()) if match else None
    matches = _NUMBER.findall(text)
    return _canonical_number(*matches[-1]) if matches else None


def load_gsm8k(path: str | os.PathLike) -> list[dict[str, str]]:
    """Reads GSM8K JSONL (``{"question", "answer"}`` per line) into a list of those dicts."""
    rows = load_rows(path)
    out = []
    for i, row in enumerate(rows):
        for key in ("question", "answer"):
            if key not in row:
                raise ValueError(
                    f"{os.fspath(path)}: row {i} is missing field {key!r}; it has keys {sorted(row)}"
                )
            if not isinstance(row[key], str):
                raise TypeError(f"{os.fspath(path)}: row {i}: {key!r} must be a str")
        out.append({"question": row["question"], "answer": row["answer"]})
    return out
