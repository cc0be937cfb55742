#!/usr/bin/env python3
"""Record TensorBoard's own encoding of fixed events (tests/fixtures/tensorboard/events.bin).

The events, in order, built with tensorboard's protocol buffers and framed by its RecordWriter:
  1. wall time 1700000000.5, step 0, file_version "brain.Event:2"
  2. wall time 1700000001.25, step 3, session_log {status: START}
  3. wall time 1700000002.0, step 3, summary {reward_mean: 0.25, loss: -1.5, big: 123456.789}
  4. wall time 1700000003.0, step 4294967296, summary {reward_mean: 0.5}
tests/tensorboard_test.ts writes the same events with train/tensorboard.ts and expects the same bytes.

Usage: python scripts/make_tensorboard_fixture.py  (tensorboard as pinned in scripts/requirements-fixtures.txt)
"""
import io
import pathlib

import tensorboard
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tensorboard" / "events.bin"


def scalars(values):
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values])


events = [
    event_pb2.Event(wall_time=1700000000.5, file_version="brain.Event:2"),
    event_pb2.Event(wall_time=1700000001.25, step=3, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)),
    event_pb2.Event(wall_time=1700000002.0, step=3,
                    summary=scalars([("reward_mean", 0.25), ("loss", -1.5), ("big", 123456.789)])),
    event_pb2.Event(wall_time=1700000003.0, step=2**32, summary=scalars([("reward_mean", 0.5)])),
]
buf = io.BytesIO()
writer = RecordWriter(buf)
for e in events:
    writer.write(e.SerializeToString())
OUT.parent.mkdir(parents=True, exist_ok=True)
OUT.write_bytes(buf.getvalue())
print(f"wrote {OUT} ({len(buf.getvalue())} bytes) with tensorboard {tensorboard.__version__}")
