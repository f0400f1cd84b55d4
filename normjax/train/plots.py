"""Training curves as PNG, from metrics.jsonl."""

from __future__ import annotations

import json
import os
import pathlib


def plot_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Loss and accuracy (train and test) against step, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [
        json.loads(line)
        for line in pathlib.Path(metrics_path).read_text().splitlines()
        if line.strip()
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = {"loss": axes[0], "accuracy": axes[1]}
    for split, style in (("train", "-"), ("test", "o-")):
        rows = [r for r in records if r["split"] == split]
        for key in sorted({k for r in rows for k in r}):
            for kind, ax in panels.items():
                if kind in key:
                    points = [(r["step"], r[key]) for r in rows if key in r]
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, style, label=f"{split}: {key}")
    for ax, title in zip(axes, ("loss", "accuracy"), strict=True):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
