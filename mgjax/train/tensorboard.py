"""A minimal TensorBoard scalar writer: TFRecord-framed `Event` protos encoded by hand.

TensorFlow, TensorBoard and tensorboardX are heavy dependencies for what is a few dozen bytes per step, so
the handful of protobuf fields and the CRC32C framing that TensorBoard reads are written here directly.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path


def _table_entry(n: int) -> int:
    for _ in range(8):
        n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1  # the Castagnoli polynomial, bit-reflected
    return n


_TABLE = [_table_entry(n) for n in range(256)]


def crc32c(data: bytes) -> int:
    """CRC32C, which TFRecord uses rather than zlib's CRC32; pure Python is fast enough for tiny records."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    """TFRecord stores a rotated, offset CRC so that CRCs of data holding CRCs stay well distributed."""
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One protobuf field; length-delimited (wire type 2) payloads get their length prefix here."""
    return _varint(number << 3 | wire_type) + (_varint(len(payload)) if wire_type == 2 else b"") + payload


def _float32(value: float) -> bytes:
    """simple_value is a float32: values past its range become ±inf rather than raising mid-run."""
    try:
        return struct.pack("<f", float(value))
    except OverflowError:
        return struct.pack("<f", float(value) * float("inf"))


class EventWriter:
    """Writes `events.out.tfevents.{time}.{host}` in `logdir`, flushed per call so a killed run keeps its log.

    Each instance writes a new file (a resumed run adds one beside the old; TensorBoard merges a directory's
    files by step); a `.N` suffix is added should another writer have taken the name in the same second.
    """

    def __init__(self, logdir: str | os.PathLike):
        (directory := Path(logdir)).mkdir(parents=True, exist_ok=True)
        base = directory / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        candidates = itertools.chain([base], (base.with_name(f"{base.name}.{n}") for n in itertools.count(1)))
        self.path = next(path for path in candidates if not path.exists())
        self._file = open(self.path, "ab")
        self._write(time.time(), 0, _field(3, 2, b"brain.Event:2"))  # Event.file_version: how readers know the format

    def _write(self, wall_time: float, step: int, rest: bytes) -> None:
        """Frames Event{wall_time=1 (double), step=2 (int64), ...rest} as a TFRecord and flushes it."""
        event = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step & 0xFFFFFFFFFFFFFFFF)) + rest
        length = struct.pack("<Q", len(event))
        self._file.write(length + _masked_crc(length) + event + _masked_crc(event))
        self._file.flush()

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        """Appends one Event whose Summary (field 5) holds a Value{tag=1, simple_value=2} per entry of `values`."""
        summary = b"".join(_field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, _float32(value)))
                           for tag, value in values.items())
        self._write(time.time() if wall_time is None else wall_time, step, _field(5, 2, summary))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
