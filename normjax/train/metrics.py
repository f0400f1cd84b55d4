"""Metrics as JSON lines, and a progress bar."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import jax


def _plain(value: Any) -> Any:
    """JSON-friendly scalars (NumPy/JAX scalars to float/int; NaN stays NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return float("nan")
    return value


class MetricsLog:
    """Appends ``{"step", "split", ...metrics}`` objects to ``WORKDIR/metrics.jsonl``.

    On resume from a checkpoint at step s, ``truncate_after(s)`` drops the lines
    logged after s by the interrupted run, so the file reads as one run. With
    several processes (hosts) only process 0 writes; every process may read.
    """

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, split: str, **metrics: Any) -> dict[str, Any]:
        record = {"step": int(step), "split": split}
        record.update({k: _plain(v) for k, v in metrics.items()})
        if jax.process_index() != 0:
            return record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open() as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        if jax.process_index() != 0:
            return
        kept = [r for r in self.read() if r["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)


def progress_bar(total: int, initial: int, disable: bool = False) -> Any:
    """A tqdm bar over training steps (quiet when ``disable``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disable, unit="step", ncols=100)
