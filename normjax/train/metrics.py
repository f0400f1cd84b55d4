"""Metrics as JSON lines (the source of truth, read on resume), mirrored into
TensorBoard event files for live curves, and a progress bar."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
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

    With ``tensorboard`` every numeric metric is also written as a TensorBoard
    scalar ``split/name`` at its step into ``WORKDIR/tensorboard/`` (through
    tensorboardX: neither TensorFlow nor PyTorch needed), flushed at once, so
    ``tensorboard --logdir runs/`` shows a run's curves while it trains.

    On resume from a checkpoint at step s, ``truncate_after(s)`` drops the lines
    logged after s by the interrupted run, so the file reads as one run; the
    event files are then rewritten from the kept lines, so the curves always
    equal ``metrics.jsonl``. With several processes (hosts) only process 0
    writes; every process may read.
    """

    _writers_opened = 0  # event writers opened by this process (file suffixes)

    def __init__(
        self, workdir: str | os.PathLike, *, tensorboard: bool = False
    ) -> None:
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.events_dir = self.path.parent / "tensorboard"
        self.tensorboard = tensorboard
        self._writer: Any = None
        if tensorboard:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                raise ImportError(
                    "tensorboard=True needs tensorboardX (pip install tensorboardX, "
                    "included in normjax[train]); or turn it off with "
                    "--config.tensorboard=False."
                ) from None

    def _events(self) -> Any:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            # Event files are named by the second they open in: a writer opened
            # again within that second (a close, then the final evaluation's
            # write) would reopen, and truncate, the same file. A suffix per
            # writer keeps them apart.
            MetricsLog._writers_opened += 1
            suffix = f".{os.getpid()}.{MetricsLog._writers_opened}"
            self._writer = SummaryWriter(
                logdir=str(self.events_dir), filename_suffix=suffix
            )
        return self._writer

    def _mirror(self, record: dict[str, Any]) -> None:
        writer = self._events()
        for key, value in record.items():
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if key in ("step", "split") or not numeric:
                continue
            writer.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def write(self, step: int, split: str, **metrics: Any) -> dict[str, Any]:
        record = {"step": int(step), "split": split}
        record.update({k: _plain(v) for k, v in metrics.items()})
        if jax.process_index() != 0:
            return record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard:
            self._mirror(record)
            self._events().flush()
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
        if self.tensorboard:  # the event files, rebuilt from the kept lines
            self.close()
            shutil.rmtree(self.events_dir, ignore_errors=True)
            for record in kept:
                self._mirror(record)
            self._events().flush()

    def close(self) -> None:
        """Closes the event file (a later write opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def progress_bar(total: int, initial: int, disable: bool = False) -> Any:
    """A tqdm bar over training steps (quiet when ``disable``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disable, unit="step", ncols=100)
