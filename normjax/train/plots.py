"""Training curves as PNG, from metrics.jsonl."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np


def plot_curves(
    metrics_path: str | os.PathLike,
    out_path: str | os.PathLike,
    panels: Sequence[str] = ("loss", "accuracy"),
) -> None:
    """One panel per name in ``panels`` (default loss and accuracy), each with
    every train and test metric whose key contains that name, against step."""
    # Figures without pyplot: no global backend switched, nothing left open.
    from matplotlib.figure import Figure

    records = [
        json.loads(line)
        for line in pathlib.Path(metrics_path).read_text().splitlines()
        if line.strip()
    ]
    fig = Figure(figsize=(5 * len(panels), 4))
    axes = fig.subplots(1, len(panels))
    axes = list(np.atleast_1d(axes))
    for split, style in (("train", "-"), ("test", "o-")):
        rows = [r for r in records if r["split"] == split]
        for key in sorted({k for r in rows for k in r}):
            for kind, ax in zip(panels, axes, strict=True):
                if kind in key:
                    points = [(r["step"], r[key]) for r in rows if key in r]
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, style, label=f"{split}: {key}")
    for ax, title in zip(axes, panels, strict=True):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
