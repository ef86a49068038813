"""TensorBoard event files: CRC32C test vectors, and files decoded by the real protobuf runtime.

The decoding side is independent of the hand-written encoder: the Event/Summary schema is declared here as a
FileDescriptorProto and parsed by `google.protobuf`; record CRCs are checked with a bitwise CRC32C written
here. If TensorBoard itself is importable the file is also read with its EventAccumulator.
"""

import math
import os
import random
import struct

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from mgjax.train.tensorboard import EventWriter, crc32c


def _event_class():
    """Event and Summary as in tensorflow/core/util/event.proto and framework/summary.proto (used fields only)."""
    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="mgjax_test_event.proto", package="mgjax_test", syntax="proto3")
    value = descriptor_pb2.DescriptorProto(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL, oneof_index=0)
    value.oneof_decl.add(name="value")
    summary = fd.message_type.add(name="Summary")
    summary.nested_type.append(value)
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                      type_name=".mgjax_test.Summary.Value")
    event = fd.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL, oneof_index=0)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL, oneof_index=0,
                    type_name=".mgjax_test.Summary")
    event.oneof_decl.add(name="what")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mgjax_test.Event"))


Event = _event_class()


def _reference_crc32c(data: bytes) -> int:
    """Bit-at-a-time CRC32C: slow, but shares nothing with the table-driven one under test."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _reference_crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def _read_events(path):
    """Parses TFRecord framing, checking both CRCs of every record, and returns the decoded Events."""
    raw, events, pos = path.read_bytes(), [], 0
    while pos < len(raw):
        header = raw[pos:pos + 8]
        (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack("<I", raw[pos + 8:pos + 12])
        assert length_crc == _masked(header)
        data = raw[pos + 12:pos + 12 + length]
        assert len(data) == length
        (data_crc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
        assert data_crc == _masked(data)
        event = Event()
        event.ParseFromString(data)
        events.append(event)
        pos += 16 + length
    assert pos == len(raw)
    return events


def test_crc32c_published_vectors():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    rng = random.Random(0)
    for n in (1, 7, 100):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert crc32c(data) == _reference_crc32c(data)


def test_scalars_decode_with_protobuf(tmp_path):
    logdir = tmp_path / "tb"
    with EventWriter(logdir) as writer:
        writer.scalars(0, {"loss": 2.5, "lr": 1e-4}, wall_time=1000.25)
        writer.scalars(7, {"loss": np.float32(1.125), "grad_norm": 0.1})
        writer.scalars(2**40, {"train/loss": -3.0, "big": 1e40})
    (path,) = logdir.iterdir()
    assert path == writer.path and path.name.startswith("events.out.tfevents.")
    assert writer._file.closed

    first, *events = _read_events(path)
    assert first.WhichOneof("what") == "file_version" and first.file_version == "brain.Event:2"
    assert first.wall_time > 1e9
    assert [e.step for e in events] == [0, 7, 2**40]
    assert all(e.WhichOneof("what") == "summary" for e in events)
    assert events[0].wall_time == 1000.25 and events[1].wall_time >= first.wall_time
    got = [{v.tag: v.simple_value for v in e.summary.value} for e in events]
    assert [list(g) for g in got] == [["loss", "lr"], ["loss", "grad_norm"], ["train/loss", "big"]]
    assert got[0] == {"loss": 2.5, "lr": pytest.approx(1e-4, rel=1e-7)}
    assert got[0]["lr"] == np.float32(1e-4) and got[1]["grad_norm"] == np.float32(0.1)
    assert got[2]["train/loss"] == -3.0 and math.isinf(got[2]["big"])


def test_each_writer_gets_its_own_file_and_flushes(tmp_path):
    first, second = EventWriter(tmp_path), EventWriter(tmp_path)
    first.scalars(1, {"a": 1.0})
    # Flushed per call: another reader sees the record while the writer is still open (as after a kill).
    assert [e.step for e in _read_events(first.path)[1:]] == [1]
    second.scalars(2, {"a": 2.0})
    first.close()
    second.close()
    assert first.path != second.path and sorted(os.listdir(tmp_path)) == sorted([first.path.name, second.path.name])
    assert [e.summary.value[0].simple_value for e in _read_events(second.path)[1:]] == [2.0]
