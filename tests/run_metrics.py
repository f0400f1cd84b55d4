"""Reading a training run's metrics.jsonl in the experiment tests."""

import json


def train_rows(workdir):
    """The train rows of ``workdir/metrics.jsonl`` without the (timing-dependent)
    throughput, for comparing a resumed run with an uninterrupted one."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return [
        {k: v for k, v in r.items() if k != "examples_per_second"}
        for r in rows
        if r["split"] == "train"
    ]


def tensorboard_scalars(logdir):
    """{(tag, step): value} of every scalar in the event files under ``logdir``,
    read with tensorboardX's own protobuf (TFRecord framing: length, its CRC,
    the Event, its CRC) — no TensorFlow needed."""
    import pathlib
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for path in sorted(pathlib.Path(logdir).glob("**/events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                out[(value.tag, event.step)] = value.simple_value
    return out


def jsonl_scalars(workdir):
    """{(split/name, step): value} of the numeric metrics in metrics.jsonl."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    out = {}
    for row in map(json.loads, lines):
        for key, value in row.items():
            if key in ("step", "split") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                out[(f"{row['split']}/{key}", row["step"])] = value
    return out
