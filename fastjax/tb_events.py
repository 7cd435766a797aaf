"""TensorBoard event files written directly: TFRecord framing around hand-encoded ``Event`` protos.

fastjax keeps its runtime dependencies fixed (no TensorFlow, tensorboardX or protobuf), and scalars
are all it logs, so the few bytes TensorBoard reads are written here.

File: ``<logdir>/events.out.tfevents.<int unix time>.<hostname>``, opened for appending (two writers
started in the same second on one host share a file, whole records each) and flushed after every
record, so a killed run keeps everything it logged.

Record framing (TFRecord), all little-endian::

    uint64 length | uint32 masked_crc32c(length bytes) | data[length] | uint32 masked_crc32c(data)

``crc32c`` is CRC-32/Castagnoli (reflected polynomial 0x82F63B78, init and final xor 0xFFFFFFFF),
table-driven in pure Python; ``masked = rotate_right(crc, 15) + 0xA282EAD8 (mod 2**32)``.
Records are ~100 bytes, so the byte loop costs microseconds per step.

The protos (field number, wire type), from tensorboard's ``event.proto`` / ``summary.proto``::

    Event      { double wall_time = 1 (I64); int64 step = 2 (VARINT); string file_version = 3 (LEN);
                 Summary summary = 5 (LEN); SessionLog session_log = 7 (LEN) }
    Summary    { repeated Value value = 1 (LEN) }
    Value      { string tag = 1 (LEN); float simple_value = 2 (I32) }
    SessionLog { enum SessionStatus status = 1 (VARINT; START = 1) }

The first record of each writer is ``Event{wall_time, file_version: "brain.Event:2"}``. With file
version 2, TensorBoard drops previously read events with ``step >= s`` when it meets a
``SessionLog.START`` at step ``s``; ``add_session_start`` writes one so a resumed run's redone steps
replace the old ones instead of doubling them.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "EventFileWriter",
    "crc32c",
    "encode_event",
    "encode_record",
    "masked_crc32c",
]

FILE_VERSION = "brain.Event:2"
_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reversed
_MASK32 = 0xFFFFFFFF
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_SESSION_START = 1  # SessionLog.SessionStatus.START


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_CRC32C_POLY if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C of ``data``; pass a previous result as ``crc`` to continue over concatenated data."""
    table = _CRC32C_TABLE
    crc ^= _MASK32
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ _MASK32


def masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum: CRC-32C rotated right by 15 bits plus 0xA282EAD8, modulo 2**32."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & _MASK32


def encode_record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


# --------------------------------------------------------------------------------------------------
# Protobuf wire format, just the pieces Event needs
# --------------------------------------------------------------------------------------------------

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 negatives are sent as their 64-bit two's complement (10 bytes)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # finite but beyond float32 range: what a float32 cast gives
        return struct.pack("<f", math.copysign(math.inf, value))


def _scalar_summary(scalars: Mapping[str, float]) -> bytes:
    out = bytearray()
    for tag, value in scalars.items():
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"tensorboard tags must be non-empty str, got {tag=!r}")
        value_msg = _len_field(1, tag.encode("utf-8")) + _key(2, _I32) + _float32(float(value))
        out += _len_field(1, value_msg)
    return bytes(out)


def encode_event(
    *,
    wall_time: float,
    step: int = 0,
    file_version: str | None = None,
    scalars: Mapping[str, float] | None = None,
    session_start: bool = False,
) -> bytes:
    """A serialized ``Event``: ``scalars`` (tag -> value) become one ``Summary`` of
    ``simple_value``s (stored as float32); ``session_start`` adds ``SessionLog{status: START}``."""
    step = int(step)
    if not _INT64_MIN <= step <= _INT64_MAX:
        raise ValueError(f"{step=} does not fit Event.step (int64)")
    out = bytearray(_key(1, _I64) + struct.pack("<d", float(wall_time)))
    if step:  # proto3 leaves zero defaults out
        out += _key(2, _VARINT) + _varint(step)
    if file_version is not None:
        out += _len_field(3, file_version.encode("utf-8"))
    if scalars:
        out += _len_field(5, _scalar_summary(scalars))
    if session_start:
        out += _len_field(7, _key(1, _VARINT) + _varint(_SESSION_START))
    return bytes(out)


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


class EventFileWriter:
    """Appends scalar events to ``<logdir>/events.out.tfevents.<time>.<host>``, flushing every
    record. Use as a context manager or call ``close()``."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.path = self.logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        # kept open across steps; one write() and one flush() per record
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._write(encode_event(wall_time=time.time(), file_version=FILE_VERSION))

    def _write(self, event: bytes) -> None:
        if self._file is None:
            raise ValueError(f"EventFileWriter for {self.path} is closed")
        self._file.write(encode_record(event))
        self._file.flush()

    def add_scalars(
        self, scalars: Mapping[str, float], step: int, *, wall_time: float | None = None
    ) -> None:
        """One event holding every ``tag -> value`` of ``scalars`` at ``step``."""
        if scalars:
            self._write(
                encode_event(
                    wall_time=time.time() if wall_time is None else wall_time,
                    step=step,
                    scalars=scalars,
                )
            )

    def add_scalar(
        self, tag: str, value: float, step: int, *, wall_time: float | None = None
    ) -> None:
        self.add_scalars({tag: value}, step, wall_time=wall_time)

    def add_session_start(self, step: int, *, wall_time: float | None = None) -> None:
        """Mark a (re)start at ``step``: TensorBoard discards already-read events with
        ``step >= step``, the ones a resumed run writes again."""
        self._write(
            encode_event(
                wall_time=time.time() if wall_time is None else wall_time,
                step=step,
                session_start=True,
            )
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EventFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
