"""The study's report: results.md tables and the summary numbers they show."""

from __future__ import annotations

import os
import pathlib
import platform
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments.priors.text import HEADLINE_TEXT_NORMS, as_trained, text_key
from normjax import registry

# The headline's CIFAR norms: batch statistics, per-sample, per-sample + prior.
HEADLINE_CIFAR_NORMS = ("batch", "layer", "group", "prior")


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return float("nan"), float("nan"), 0
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return float(v.mean()), std, len(v)


def fmt(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std' of ``values`` times ``scale``; '—' when there are none."""
    mean, std, n = mean_std(values)
    if not n:
        return "—"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def seed_values(per_seed: dict[Any, Any], *keys: str) -> list[float]:
    """``per_seed[seed][keys[0]][keys[1]]...`` of every seed that has it."""
    out = []
    for record in per_seed.values():
        for key in keys:
            record = record.get(key) if isinstance(record, dict) else None
        if record is not None:
            out.append(float(record))
    return out


def is_per_sample(norm: str) -> bool:
    """Whether the registry lists ``norm`` as using the sample's statistics only."""
    return registry.entry(norm).statistics.per_sample


def probe_columns(config: ml_collections.ConfigDict) -> list[str]:
    """The statistics sources of part 1, in table order."""
    sizes = [f"batch {s}" for s in config.probe_batch_sizes]
    return ["running", "precise", *sizes, "class-homogeneous", "class-skewed"]


def text_cell(per_seed: dict[Any, Any]) -> str:
    """'running (batch's causal statistics)' bits per byte, mean ± std."""
    running = fmt(seed_values(per_seed, "val_bits_per_byte"), 1, 3)
    batch = fmt(seed_values(per_seed, "val_bits_per_byte_batch"), 1, 3)
    return f"{running} ({batch})"


def machine() -> str:
    """CPU model and cores, JAX's devices and version."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    device = jax.devices()[0]
    return (
        f"{cpu}, {os.cpu_count()} CPU cores; JAX {jax.__version__} on "
        f"{jax.device_count()} {device.platform} device(s) ({device.device_kind})"
    )


def headline_rows(results: dict[str, Any], config: ml_collections.ConfigDict) -> list:
    """(model, norm, large-batch values, small-batch values) for the headline."""
    rows = []
    large = max(config.sweep_batch_sizes)
    small = config.headline_small_batch
    for norm in HEADLINE_CIFAR_NORMS:
        by_size = {int(k): v for k, v in results["sweep"].get(norm, {}).items()}
        rows.append(
            (
                "CIFAR-10 test accuracy (%)",
                norm,
                seed_values(by_size.get(large, {}), "running"),
                seed_values(by_size.get(small, {}), "running"),
                100.0,
            )
        )
    for norm in HEADLINE_TEXT_NORMS:
        big = results["text"].get(text_key("tokenizer", norm, "byte", {}), {})
        little = results["text"].get(
            text_key(
                "small batch",
                norm,
                "byte",
                {"batch_size": config.text_small_batch_size},
            ),
            {},
        )
        rows.append(
            (
                "text bits per byte (byte tokens; statistics as in training)",
                norm,
                seed_values(big, as_trained(norm)),
                seed_values(little, as_trained(norm)),
                1.0,
            )
        )
    return rows


def write_markdown(
    results: dict[str, Any], config: ml_collections.ConfigDict, path: pathlib.Path
) -> None:
    h = results["header"]
    lines = [
        "# The priors study: per-sample vs batch statistics",
        "",
        f"- command: `{h['command']}` (in parts: the same command with "
        "`--config.parts=probe,stats`, `sweep`, `text`; every call rebuilds these "
        "tables and plots from the finished runs)",
        f"- date: {h['date']}",
        f"- machine: {h['machine']}",
        f"- seeds: {h['seeds']}; every cell is mean ± std over the seeds that "
        "finished (n in the last column where it varies).",
        *(
            [
                "- finished runs: "
                + ", ".join(f"{k} {v}" for k, v in h["finished_runs"].items())
            ]
            if "finished_runs" in h
            else []
        ),
        "",
        "## 1. Test accuracy (%) by statistics source (CIFAR-10)",
        "",
    ]
    columns = probe_columns(config)
    lines.append("| norm | kind | " + " | ".join(columns) + " | n |")
    lines.append("| --- | --- |" + " --- |" * (len(columns) + 1))
    for norm in config.probe_norms:
        per_seed = results["probe"].get(norm, {})
        cells = [fmt(seed_values(per_seed, c, "accuracy"), 100) for c in columns]
        kind = registry.entry(norm).statistics
        lines.append(
            f"| {norm} | {kind} | " + " | ".join(cells) + f" | {len(per_seed)} |"
        )
    lines += [
        "",
        "Largest logit change against running statistics, per-sample norms (must be "
        "float32 rounding):",
        "",
    ]
    for norm in config.probe_norms:
        per_seed = results["probe"].get(norm, {})
        if per_seed and is_per_sample(norm):
            worst = max(
                (max(r["max_logit_change"] for r in record.values()))
                for record in per_seed.values()
            )
            lines.append(f"- {norm}: {worst:.2e}")
    lines += ["", "## 2. Class information in per-sample input statistics", ""]
    lines.append(
        "Test accuracy (%) of a logistic regression on each sample's per-channel "
        "mean and std of a norm layer's input (chance: 10 %)."
    )
    lines.append("")
    layers = sorted(
        {
            layer
            for per in results["stats"].values()
            for r in per.values()
            for layer in r
        },
        key=lambda s: (s == "all layers", s),
    )
    if layers:
        lines.append("| norm | " + " | ".join(layers) + " |")
        lines.append("| --- |" + " --- |" * len(layers))
        for norm in config.probe_norms:
            per_seed = results["stats"].get(norm, {})
            if per_seed:
                cells = [fmt(seed_values(per_seed, layer), 100, 1) for layer in layers]
                lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    lines += ["", "## 3-4. Batch-size sweep: running (precise) statistics", ""]
    sizes = list(config.sweep_batch_sizes)
    lines.append("| norm | " + " | ".join(f"B={s}" for s in sizes) + " |")
    lines.append("| --- |" + " --- |" * len(sizes))
    for norm in config.sweep_norms:
        by_size = {int(k): v for k, v in results["sweep"].get(norm, {}).items()}
        cells = [
            f"{fmt(seed_values(by_size.get(s, {}), 'running'), 100, 1)} "
            f"({fmt(seed_values(by_size.get(s, {}), 'precise'), 100, 1)})"
            for s in sizes
        ]
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    lines += ["", "Precise minus running (accuracy points):", ""]
    lines.append("| norm | " + " | ".join(f"B={s}" for s in sizes) + " |")
    lines.append("| --- |" + " --- |" * len(sizes))
    for norm in config.sweep_norms:
        by_size = {int(k): v for k, v in results["sweep"].get(norm, {}).items()}
        cells = []
        for s in sizes:
            gaps = [r["precise"] - r["running"] for r in by_size.get(s, {}).values()]
            cells.append(fmt(gaps, 100, 1))
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    lines += ["", "## 5. Text: validation bits per byte", ""]
    lines.append(
        "Evaluated with running statistics, and (in brackets) with each "
        f"evaluation batch's own causal statistics ({config.text.eval_batch_size} "
        "windows), as batch norm and bln normalize in training; power norm "
        "divides by its running quadratic mean in training too, so its running "
        "value is the as-trained one; per-sample norms read the same in both."
    )
    lines.append("")
    toks = list(config.text_tokenizers)
    lines.append("| norm | " + " | ".join(toks) + " |")
    lines.append("| --- |" + " --- |" * len(toks))
    for variant in config.text_norms:
        cells = []
        for t in toks:
            per_seed = results["text"].get(text_key("tokenizer", variant, t, {}), {})
            cells.append(text_cell(per_seed))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Context-length sweep (byte tokens), running (batch's causal) statistics:",
        "",
    ]
    lengths = list(config.context_lengths)
    lines.append("| norm | " + " | ".join(f"L={n}" for n in lengths) + " |")
    lines.append("| --- |" + " --- |" * len(lengths))
    for variant in config.context_norms:
        cells = []
        for n in lengths:
            per_seed = results["text"].get(
                text_key("context", variant, "byte", {"max_len": n}), {}
            )
            cells.append(text_cell(per_seed))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "## 6. Headline: does the global prior close the gap?", ""]
    large, small = max(config.sweep_batch_sizes), config.headline_small_batch
    lines.append(
        f"| measure | norm | large batch (CIFAR B={large}, text "
        f"B={config.text.batch_size}) | small batch (CIFAR B={small}, text "
        f"B={config.text_small_batch_size}) |"
    )
    lines.append("| --- | --- | --- | --- |")
    for measure, norm, big, little, scale in headline_rows(results, config):
        digits = 1 if scale == 100.0 else 3
        lines.append(
            f"| {measure} | {norm} | {fmt(big, scale, digits)} | "
            f"{fmt(little, scale, digits)} |"
        )
    path.write_text("\n".join(lines) + "\n")
