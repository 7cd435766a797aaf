"""fastjax.tb_events and MetricsLogger's tensorboard output, checked with tensorboard's own readers:
CRC-32C against published vectors and tensorboard's independent table, Event bytes parsed by
protobuf, scalars read back by EventAccumulator (awkward steps, values and tags), corrupt records
rejected, a SIGKILLed writer's records kept, metrics.jsonl == event file, resume purging."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors as tb_errors
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as tb_pywrap

from fastjax import tb_events
from fastjax.logging_utils import MetricsLogger, read_metrics
from fastjax.tb_events import EventFileWriter, crc32c, encode_event, encode_record, masked_crc32c

# Tolerances: none. simple_value is float32 on disk, so read-back values must equal
# np.float32(written value) exactly; steps (int64) and wall times (double) exactly.

# CRC-32C check values: the CRC catalogue's "check" and RFC 3720 (iSCSI) appendix B.4.
CRC32C_VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]

STEPS = [0, 1, 7, 2**31 - 1, 2**31, 2**31 + 5, 2**40 + 3, 2**62]
TAGS = ["train/loss", "train/learning_rate", "verlust/δ-λ ✓", "损失/总"]


def accumulate(logdir: Path) -> EventAccumulator:
    return EventAccumulator(str(logdir)).Reload()


def only_event_file(logdir: Path) -> Path:
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    return files[0]


def read_raw_records(path: Path) -> tuple[list[bytes], Exception | None]:
    """Records tensorboard's stub reader returns, and the error that stopped it (None at EOF)."""
    reader = tb_pywrap.PyRecordReader_New(str(path).encode())
    out = []
    while True:
        try:
            reader.GetNext()
        except tb_errors.OutOfRangeError:
            return out, None
        except tb_errors.DataLossError as e:
            return out, e
        out.append(reader.record())


# --------------------------------------------------------------------------------------------------
# CRC-32C and framing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), CRC32C_VECTORS)
def test_crc32c_known_vectors(data: bytes, expected: int):
    assert crc32c(data) == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crc32c_matches_tensorboard_table_and_continues(seed: int):
    rng = np.random.default_rng(seed)
    for n in (1, 3, 8, 127, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == tb_pywrap.crc32c(data)
        assert masked_crc32c(data) == tb_pywrap.masked_crc32c(data)
        cut = int(rng.integers(0, n + 1))
        assert crc32c(data[cut:], crc32c(data[:cut])) == crc32c(data)


def test_record_framing_layout():
    data = b"some event bytes \x00\xff"
    rec = encode_record(data)
    assert len(rec) == 8 + 4 + len(data) + 4
    assert int.from_bytes(rec[:8], "little") == len(data)
    assert int.from_bytes(rec[8:12], "little") == masked_crc32c(rec[:8])
    assert rec[12:-4] == data
    assert int.from_bytes(rec[-4:], "little") == masked_crc32c(data)


# --------------------------------------------------------------------------------------------------
# Event protos
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 1, 300, -1, -(2**40), 2**31 + 1, 2**63 - 1, -(2**63)])
def test_event_bytes_parse_with_protobuf(step: int):
    rng = np.random.default_rng(abs(step) % 2**32)
    scalars = {tag: float(rng.normal() * 10.0 ** rng.integers(-20, 20)) for tag in TAGS}
    scalars["neg"] = -abs(float(rng.normal())) - 1e-3
    wall_time = 1.7e9 + float(rng.random())
    ev = event_pb2.Event.FromString(encode_event(wall_time=wall_time, step=step, scalars=scalars))
    assert ev.wall_time == wall_time
    assert ev.step == step
    assert not ev.HasField("file_version") and not ev.HasField("session_log")
    assert [v.tag for v in ev.summary.value] == list(scalars)
    assert [v.simple_value for v in ev.summary.value] == [np.float32(x) for x in scalars.values()]

    head = event_pb2.Event.FromString(
        encode_event(wall_time=wall_time, file_version=tb_events.FILE_VERSION)
    )
    assert head.file_version == "brain.Event:2" and not head.HasField("summary")
    start = event_pb2.Event.FromString(
        encode_event(wall_time=wall_time, step=step, session_start=True)
    )
    assert start.step == step and start.session_log.status == event_pb2.SessionLog.START


def test_event_special_values_and_errors():
    scalars = {"big": 1e40, "-big": -1e300, "nan": math.nan, "inf": -math.inf, "tiny": 1e-46}
    ev = event_pb2.Event.FromString(encode_event(wall_time=0.0, step=3, scalars=scalars))
    got = [v.simple_value for v in ev.summary.value]
    assert got[:2] == [math.inf, -math.inf] and math.isnan(got[2]) and got[3] == -math.inf
    assert got[4] == 0.0
    with pytest.raises(ValueError, match="int64"):
        encode_event(wall_time=0.0, step=2**63)
    with pytest.raises(ValueError, match="tags"):
        encode_event(wall_time=0.0, scalars={"": 1.0})


# --------------------------------------------------------------------------------------------------
# Files read by tensorboard
# --------------------------------------------------------------------------------------------------


def write_random_run(logdir: Path, seed: int) -> dict[str, list[tuple[int, float]]]:
    """Random scalars on every tag at STEPS (a random subset of tags per step); returns what was
    written, tag -> [(step, value)]."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[tuple[int, float]]] = {t: [] for t in TAGS}
    with EventFileWriter(logdir) as w:
        for step in STEPS:
            tags = [t for t in TAGS if rng.random() < 0.7] or TAGS[:1]
            values = {t: float(rng.normal() * 10.0 ** rng.integers(-6, 6)) for t in tags}
            values[tags[0]] = -abs(values[tags[0]])  # every step has a negative value
            w.add_scalars(values, step)
            for t, v in values.items():
                written[t].append((step, v))
    return {t: pts for t, pts in written.items() if pts}


@pytest.mark.parametrize("seed", [10, 11])
def test_event_accumulator_reads_back_scalars(tmp_path: Path, seed: int):
    written = write_random_run(tmp_path, seed)
    path = only_event_file(tmp_path)
    host = path.name.split(".", 4)[4]
    assert path.name.startswith("events.out.tfevents.") and host
    assert abs(int(path.name.split(".")[3]) - time.time()) < 600

    acc = accumulate(tmp_path)
    assert acc.file_version == 2.0
    assert sorted(acc.Tags()["scalars"]) == sorted(written)
    for tag, pts in written.items():
        events = acc.Scalars(tag)
        assert len(events) == len(pts)
        assert [e.step for e in events] == [s for s, _ in pts]
        assert [e.value for e in events] == [float(np.float32(v)) for _, v in pts]


def test_record_reader_accepts_every_crc(tmp_path: Path):
    write_random_run(tmp_path, seed=12)
    records, err = read_raw_records(only_event_file(tmp_path))
    assert err is None
    assert len(records) == 1 + len(STEPS)  # file_version record + one per step
    first = event_pb2.Event.FromString(records[0])
    assert first.file_version == "brain.Event:2"
    assert [event_pb2.Event.FromString(r).step for r in records[1:]] == STEPS


@pytest.mark.parametrize("where", ["length", "length_crc", "data", "data_crc"])
def test_flipped_byte_is_reported_as_corruption(tmp_path: Path, where: str):
    write_random_run(tmp_path, seed=13)
    path = only_event_file(tmp_path)
    blob = bytearray(path.read_bytes())
    records, _ = read_raw_records(path)
    bad = 4  # corrupt record 4 (the event of STEPS[3])
    start = sum(8 + 4 + len(r) + 4 for r in records[:bad])
    n = len(records[bad])
    offset = {
        "length": start + 1,
        "length_crc": start + 9,
        "data": start + 12 + n // 2,
        "data_crc": start + 12 + n + 2,
    }[where]
    blob[offset] ^= 0x10
    path.write_bytes(bytes(blob))

    got, err = read_raw_records(path)
    assert isinstance(err, tb_errors.DataLossError)
    kind = "header crc32" if where.startswith("length") else "event crc32"
    assert kind in str(err)
    assert got == records[:bad]
    # the event loader stops at the bad record: only the steps before it remain
    acc = accumulate(tmp_path)
    steps = sorted({e.step for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)})
    assert steps == STEPS[: bad - 1]


def test_sigkilled_writer_keeps_logged_records(tmp_path: Path):
    n_steps = 5
    script = textwrap.dedent(f"""
        import os, signal
        from fastjax.tb_events import EventFileWriter
        w = EventFileWriter({str(tmp_path)!r})
        for step in range({n_steps}):
            w.add_scalar("train/loss", 1.5 - 0.25 * step, step)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    events = accumulate(tmp_path).Scalars("train/loss")
    assert [(e.step, e.value) for e in events] == [(s, 1.5 - 0.25 * s) for s in range(n_steps)]

    # a record torn mid-write (killed inside write()) costs only that record
    path = only_event_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-7])
    assert [e.step for e in accumulate(tmp_path).Scalars("train/loss")] == list(range(n_steps - 1))


# --------------------------------------------------------------------------------------------------
# MetricsLogger
# --------------------------------------------------------------------------------------------------


def random_records(rng: np.random.Generator, steps: range) -> list[dict]:
    return [
        {
            "step": s,
            "loss": float(rng.normal() + 3.0),
            "learning_rate": float(rng.random() * 1e-3),
            "grad_norm": -float(rng.random()),
            "tokens": int(rng.integers(1, 2**40)),
            "stage": "warmup",
        }
        for s in steps
    ]


def tb_view(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = accumulate(output_dir / "tensorboard")
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def jsonl_view(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in read_metrics(output_dir / "metrics.jsonl"):
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                out.setdefault(f"train/{k}", []).append((r["step"], float(np.float32(v))))
    return out


def test_metrics_logger_jsonl_and_events_agree(tmp_path: Path):
    rng = np.random.default_rng(20)
    logger = MetricsLogger(tmp_path, tensorboard=True)
    assert logger.truncate_after(0) == []
    for rec in random_records(rng, range(1, 12)):
        logger.log(rec)
    logger.close()
    view = tb_view(tmp_path)
    assert sorted(view) == ["train/grad_norm", "train/learning_rate", "train/loss", "train/tokens"]
    assert view == jsonl_view(tmp_path)
    assert [s for s, _ in view["train/loss"]] == list(range(1, 12))


def test_metrics_logger_resume_replaces_redone_steps(tmp_path: Path):
    rng = np.random.default_rng(21)
    first = MetricsLogger(tmp_path)
    first.truncate_after(0)
    for rec in random_records(rng, range(1, 9)):
        first.log(rec)
    del first  # a killed run never closes; every record is already flushed
    second = MetricsLogger(tmp_path)
    kept = second.truncate_after(4)
    assert [r["step"] for r in kept] == [1, 2, 3, 4]
    for rec in random_records(rng, range(5, 11)):  # redone 5..8 with new values, then 9..10
        second.log(rec)
    second.close()
    view = tb_view(tmp_path)
    assert [s for s, _ in view["train/loss"]] == list(range(1, 11))
    assert view == jsonl_view(tmp_path)


def test_metrics_logger_without_tensorboard(tmp_path: Path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log({"step": 1, "loss": 2.5})
    logger.close()
    assert not (tmp_path / "tensorboard").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.5}
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
