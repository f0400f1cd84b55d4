"""The study's plots: sweep.png, probe.png, stats.png, text.png, ablation.png
and ablation_text.png."""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
import numpy as np

from experiments.priors.report import (
    POSITION_SOURCES,
    bucket_order,
    mean_std,
    position_losses,
    probe_columns,
    seed_values,
    trained_and_population,
)
from experiments.priors.text import as_trained, text_key

PLOTS = (
    "sweep.png",
    "probe.png",
    "stats.png",
    "text.png",
    "ablation.png",
    "ablation_text.png",
)


def legend(ax: Any, **kwargs: Any) -> None:
    """A legend when the axes have labelled artists (parts not run yet have none)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def write_plots(
    results: dict[str, Any], config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> None:
    """sweep.png (accuracy vs batch size), probe.png (accuracy by source),
    stats.png (statistics-probe accuracy by layer), text.png (bits per byte)."""
    # Figures without pyplot: no global backend switched, nothing left open.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, source in zip(axes, ("running", "precise"), strict=True):
        for norm in config.sweep_norms:
            by_size = {int(k): v for k, v in results["sweep"].get(norm, {}).items()}
            sizes = sorted(by_size)
            if not sizes:
                continue
            stats = [mean_std(seed_values(by_size[s], source)) for s in sizes]
            ax.errorbar(
                sizes,
                [100 * m for m, _, _ in stats],
                yerr=[100 * s for _, s, _ in stats],
                marker="o",
                capsize=3,
                label=norm,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(f"test accuracy, {source} statistics")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    legend(axes[1], fontsize=8)
    fig.tight_layout()
    fig.savefig(workdir / "sweep.png", dpi=100)

    columns = probe_columns(config)
    fig = Figure(figsize=(11, 4))
    ax = fig.subplots()
    norms = [n for n in config.probe_norms if n in results["probe"]]
    width = 0.8 / max(len(columns), 1)
    for j, column in enumerate(columns):
        means = [
            100 * mean_std(seed_values(results["probe"][n], column, "accuracy"))[0]
            for n in norms
        ]
        ax.bar(np.arange(len(norms)) + j * width, means, width, label=column)
    ax.set_xticks(np.arange(len(norms)) + 0.4 - width / 2, norms)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy by statistics source")
    # Below the bars, one row: inside the axes it would cover them.
    legend(
        ax,
        fontsize=8,
        ncol=len(columns),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
    )
    fig.tight_layout()
    fig.savefig(workdir / "probe.png", dpi=100)

    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    for norm, per_seed in results["stats"].items():
        layers = sorted({layer for r in per_seed.values() for layer in r})
        layers = [layer for layer in layers if layer != "all layers"]
        ax.plot(
            layers,
            [100 * mean_std(seed_values(per_seed, layer))[0] for layer in layers],
            marker="o",
            label=norm,
        )
    ax.axhline(10, color="gray", linestyle="--", label="chance")
    ax.set_ylabel("linear-probe accuracy (%)")
    ax.set_title("class information in per-sample input statistics")
    legend(ax, fontsize=7)
    fig.tight_layout()
    fig.savefig(workdir / "stats.png", dpi=100)

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    toks = list(config.text_tokenizers)
    variants = list(config.text_norms)
    width = 0.8 / max(len(toks), 1)
    for j, tok in enumerate(toks):
        means = [
            mean_std(
                seed_values(
                    results["text"].get(text_key("tokenizer", v, tok, {}), {}),
                    as_trained(v),
                )
            )[0]
            for v in variants
        ]
        axes[0].bar(np.arange(len(variants)) + j * width, means, width, label=tok)
    axes[0].set_xticks(np.arange(len(variants)) + 0.4 - width / 2, variants, fontsize=7)
    # As trained: running statistics can be far off for causal batch norms
    # (results.md has both evaluations).
    axes[0].set_ylabel("validation bits per byte\n(statistics as in training)")
    legend(axes[0])
    for variant in config.context_norms:
        lengths = list(config.context_lengths)
        means = [
            mean_std(
                seed_values(
                    results["text"].get(
                        text_key("context", variant, "byte", {"max_len": n}), {}
                    ),
                    as_trained(variant),
                )
            )[0]
            for n in lengths
        ]
        axes[1].plot(lengths, means, marker="o", label=variant)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("context length (bytes)")
    axes[1].set_ylabel("validation bits per byte (as in training)")
    axes[1].set_title("context-length sweep")
    legend(axes[1])
    fig.tight_layout()
    fig.savefig(workdir / "text.png", dpi=100)
    write_ablation_plot(results, config, workdir / "ablation.png")
    write_ablation_text_plot(results, config, workdir / "ablation_text.png")


def write_ablation_plot(
    results: dict[str, Any], config: ml_collections.ConfigDict, path: pathlib.Path
) -> None:
    """ablation.png: test accuracy per row (mean ± std over seeds) for each
    (budget, batch size), and with each sample's offset erased (hollow)."""
    from matplotlib.figure import Figure

    table = results.get("ablation", {})
    settings = list(table) or ["(no finished runs)"]
    rows = list(config.get("ablation_rows") or ())
    fig = Figure(figsize=(5 * len(settings), 0.35 * len(rows) + 1.5))
    axes = np.atleast_1d(fig.subplots(1, len(settings), sharey=True))
    y = np.arange(len(rows))
    for ax, setting in zip(axes, settings, strict=True):
        per_row = table.get(setting, {})
        for key, style in (("accuracy", "o"), ("accuracy_offset_erased", "s")):
            stats = [mean_std(seed_values(per_row.get(r, {}), key)) for r in rows]
            ax.errorbar(
                [100 * m for m, _, _ in stats],
                y + (0.15 if key != "accuracy" else 0.0),
                xerr=[100 * s for _, s, _ in stats],
                fmt=style,
                mfc="none" if key != "accuracy" else None,
                capsize=2,
                label="test" if key == "accuracy" else "offset erased",
            )
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(y, rows, fontsize=8)
    axes[0].invert_yaxis()
    legend(axes[-1], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_ablation_text_plot(
    results: dict[str, Any], config: ml_collections.ConfigDict, path: pathlib.Path
) -> None:
    """ablation_text.png: validation loss by position bucket at each context
    length, per row of the text ablation (mean ± std over seeds): as trained
    (solid), with population statistics (dashed) where they differ."""
    from matplotlib.figure import Figure

    table = results.get("ablation_text", {})
    lengths = [str(n) for n in sorted(config.context_lengths)] or ["(none)"]
    fig = Figure(figsize=(4.5 * len(lengths), 4))
    axes = np.atleast_1d(fig.subplots(1, len(lengths)))
    for ax, n in zip(axes, lengths, strict=True):
        curves = []
        for i, variant in enumerate(config.get("ablation_text_norms") or ()):
            per_seed = table.get(variant, {}).get(n, {})
            for key in trained_and_population(variant):
                by_bucket = position_losses(per_seed, POSITION_SOURCES[key])
                if by_bucket:
                    curves.append((i, variant, key == as_trained(variant), by_bucket))
        # every curve on the same x: the union of the buckets at this length
        buckets = sorted({b for *_, c in curves for b in c}, key=bucket_order)
        x = {b: k for k, b in enumerate(buckets)}
        for i, variant, trained, by_bucket in curves:
            mine = sorted(by_bucket, key=bucket_order)
            stats = [mean_std(seed_values(by_bucket[b], "loss")) for b in mine]
            ax.errorbar(
                [x[b] for b in mine],
                [m for m, _, _ in stats],
                yerr=[sd for _, sd, _ in stats],
                fmt="o-" if trained else "s--",
                color=f"C{i}",
                mfc=None if trained else "none",
                capsize=2,
                label=variant + ("" if trained else " (population)"),
            )
        ax.set_xticks(np.arange(len(buckets)), buckets, fontsize=8)
        ax.set_title(f"L={n}", fontsize=9)
        ax.set_xlabel("position")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats per byte)")
    labelled = [ax for ax in axes if ax.get_legend_handles_labels()[0]]
    if labelled:
        labelled[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
