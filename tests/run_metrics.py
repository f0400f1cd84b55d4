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
