"""The study's report: results.md tables and the summary numbers they show."""

from __future__ import annotations

import math
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


def population_key(per_seed: dict[Any, Any]) -> str:
    """The population-statistics figure of text runs: precise if they have it,
    else running (runs made before precise statistics were evaluated)."""
    if seed_values(per_seed, "val_bits_per_byte_precise"):
        return "val_bits_per_byte_precise"
    return "val_bits_per_byte"


def text_cell(per_seed: dict[Any, Any]) -> str:
    """'population (leak-free batch statistics)' bits per byte, mean ± std."""
    population = fmt(seed_values(per_seed, population_key(per_seed)), 1, 3)
    batch = fmt(seed_values(per_seed, "val_bits_per_byte_batch"), 1, 3)
    return f"{population} ({batch})"


# Two-sided 95 % quantiles of Student's t with df = 1..30 degrees of freedom.
_T95 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t95(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of
    freedom: tabulated to 30, then the Cornish-Fisher expansion (error < 1e-3)."""
    if df < 1:
        raise ValueError(f"t95 needs df >= 1, got {df}.")
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_difference(
    a: dict[Any, Any], b: dict[Any, Any], key: str
) -> dict[str, Any] | None:
    """``a - b`` seed by seed (the seeds share the data order) over the seeds
    both have: the per-seed differences, their mean and its 95 % t-interval
    (None with fewer than two seeds); None when no seed is shared."""
    diffs = []
    for seed in sorted(set(a) & set(b), key=str):
        va = a[seed].get(key) if isinstance(a[seed], dict) else None
        vb = b[seed].get(key) if isinstance(b[seed], dict) else None
        if va is not None and vb is not None:
            diffs.append(float(va) - float(vb))
    if not diffs:
        return None
    v = np.asarray(diffs)
    mean = float(v.mean())
    if len(v) < 2:
        return {"diffs": diffs, "mean": mean, "interval": None}
    t = t95(len(v) - 1)
    half = t * float(v.std(ddof=1)) / np.sqrt(len(v))
    return {"diffs": diffs, "mean": mean, "interval": (mean - half, mean + half)}


def difference_cell(d: dict[str, Any] | None, digits: int = 3) -> str:
    """'+0.012 [-0.004, +0.028] (per seed +0.010, …)'; 'no difference' when the
    interval includes 0; '—' without data."""
    if d is None:
        return "—"
    seeds = ", ".join(f"{x:+.{digits}f}" for x in d["diffs"])
    if d["interval"] is None:
        return f"{d['mean']:+.{digits}f} (one seed: no interval)"
    lo, hi = d["interval"]
    verdict = " — no difference" if lo <= 0.0 <= hi else ""
    return (
        f"{d['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
        f"{verdict} (per seed {seeds})"
    )


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
        "`--config.parts=probe,stats`, `sweep`, `text`, `ablation_lr`, `ablation`, "
        "`ablation_text`; every call rebuilds these tables and plots from the "
        "finished runs)",
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
    ]
    first_study = len(lines)
    lines += [
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
    sweep_start = len(lines)
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
    text_start = len(lines)
    lines += text_section(results, config)
    headline_start = len(lines)
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
    # A workdir that ran only some parts (e.g. the ablation alone) gets one line
    # for the sections of the parts it has no finished run of, not empty tables.
    blocks = [
        (
            lines[first_study:sweep_start],
            ("probe",),
            "Sections 1-2 (parts probe, stats)",
        ),
        (lines[sweep_start:text_start], ("sweep",), "Sections 3-4 (part sweep)"),
        (lines[text_start:headline_start], ("text",), "Section 5 (part text)"),
        (
            lines[headline_start:],
            ("sweep", "text"),  # its table reads the sweep and the text runs
            "Section 6 (parts sweep, text)",
        ),
    ]
    if not any(_finished(h, part) for part in ("probe", "sweep", "text")):
        blocks = [([], (), "Sections 1-6 (parts probe, stats, sweep, text)")]
    del lines[first_study:]
    for block, parts, label in blocks:
        if parts and any(_finished(h, part) for part in parts):
            lines += block
        else:
            lines += ["", f"{label}: no finished runs in this workdir."]
    if lines[first_study] == "":
        del lines[first_study]
    cifar_ablation = any(_finished(h, p) for p in ("ablation_lr", "ablation"))
    text_ablation = _finished(h, "ablation_text")
    if not cifar_ablation and not text_ablation:
        lines += [
            "",
            "Sections 7-8 (parts ablation_lr, ablation, ablation_text): no "
            "finished runs in this workdir.",
        ]
    else:
        # (a section the configuration has no rows for is empty: no line)
        section = ablation_section(results, config)
        if section and not cifar_ablation:
            section = [
                "",
                "Section 7 (parts ablation_lr, ablation): no finished runs in this "
                "workdir.",
            ]
        lines += section
        section = ablation_text_section(results, config)
        if section and not text_ablation:
            section = [
                "",
                "Section 8 (part ablation_text): no finished runs in this workdir.",
            ]
        lines += section
    path.write_text("\n".join(lines) + "\n")


def split_setting(setting: str) -> tuple[str, int]:
    """An ablation setting ('short b256') as (budget, batch size)."""
    budget, _, batch = setting.partition(" b")
    return budget, int(batch)


def _finished(header: dict[str, Any], part: str) -> bool:
    """Whether ``part`` has a finished run ('n/m' in the header with n > 0; a
    part the header does not list has none planned). Results written before the
    header counted runs: true."""
    if "finished_runs" not in header:
        return True
    count = header["finished_runs"].get(part)
    return count is not None and int(str(count).split("/")[0]) > 0


def _pct_difference(a: dict[Any, Any], b: dict[Any, Any], key: str) -> str:
    """Paired difference a - b of ``key`` in accuracy points, with its 95 %
    interval (``difference_cell``)."""
    return _pct_cell(paired_difference(a, b, key))


def _pct_cell(d: dict[str, Any] | None) -> str:
    """A ``paired_difference`` of accuracies (fractions) as a cell in points."""
    if d is None:
        return "—"
    scaled = {
        "diffs": [100 * x for x in d["diffs"]],
        "mean": 100 * d["mean"],
        "interval": None
        if d["interval"] is None
        else (100 * d["interval"][0], 100 * d["interval"][1]),
    }
    return difference_cell(scaled, 2)


# Differences within an ablation row: (label, key a, key b) for a - b.
WITHIN = (
    ("precise − test", "precise", "accuracy"),
    ("offset erased − test", "accuracy_offset_erased", "accuracy"),
    ("class-hom. − random", "class_homogeneous", "random_batch"),
    ("nuisance-hom. − random", "nuisance_homogeneous", "random_batch"),
    ("class-hom. − nuisance-hom.", "class_homogeneous", "nuisance_homogeneous"),
    ("skewed majority − minority", "skewed_majority", "skewed_minority"),
    ("prior zeroed − test", "accuracy_prior_zeroed", "accuracy"),
)


def _within(per_seed: dict[Any, Any], a: str, b: str) -> str:
    """``a - b`` within each seed's record, in accuracy points, with its 95 %
    interval over seeds ('—' where the records lack the keys)."""
    d = {s: {"d": r[a] - r[b]} for s, r in per_seed.items() if a in r and b in r}
    zero = {s: {"d": 0.0} for s in d}
    return _pct_difference(d, zero, "d") if d else "—"


def ablation_section(
    results: dict[str, Any], config: ml_collections.ConfigDict
) -> list[str]:
    """Section 7: the learning-rate grid, then a table per (budget, batch size)
    with every column, differences against batch norm paired by seed."""
    from experiments.priors.ablation import grid_choice, rows

    rows_of = tuple(config.get("ablation_rows") or ())
    if not rows_of:
        return []
    known = rows(config)
    grid = results.get("ablation_lr", {})
    rates = {float(lr) for lr in config.ablation_learning_rates}
    rates |= {float(lr) for row in grid.values() for lr in row}
    lrs = [f"{lr:g}" for lr in sorted(rates)]
    lines = [
        "",
        "## 7. Ablation: batch norm taken apart (CIFAR-10)",
        "",
        f"Learning rate per row: held-out accuracy (%) on {config.ablation_holdout} "
        f"training images after the short budget "
        f"({min(config.ablation_budgets.values()):g} epochs, batch "
        f"{config.ablation_batch_size}, seed {config.ablation_lr_seed}); the best "
        "is used (scaled linearly with the batch size at the small batch). A row "
        "whose best is at an edge of the grid gets up to "
        f"{config.get('ablation_lr_extend', 0)} more rates past that edge; "
        "'grid edge': still the best at the edge after them.",
        "",
        "| row | " + " | ".join(f"lr {lr}" for lr in lrs) + " | chosen |",
        "| --- |" + " --- |" * (len(lrs) + 1),
    ]
    for name in rows_of:
        per_lr = grid.get(name, {})
        cells = []
        for lr in lrs:
            r = per_lr.get(lr)
            if r is None:
                cells.append("—")
            elif not np.isfinite(r["train_loss"]):
                cells.append("diverged")
            else:
                cells.append(f"{100 * r['holdout_accuracy']:.2f}")
        chosen = None
        needed, best = grid_choice(
            config.ablation_learning_rates,
            {float(k): v for k, v in per_lr.items()},
            config.get("ablation_lr_extend", 0),
        )
        if best is not None:
            edge = " (grid edge)" if best in (needed[0], needed[-1]) else ""
            chosen = f"{best:g}{edge if len(needed) > 1 else ''}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {chosen or '—'} |")
    lines += ablation_headline(
        results.get("ablation", {}), rows_of, known, dict(config.ablation_budgets)
    )
    lines += [
        "",
        "In the tables below: accuracy (%) mean ± std over seeds; Δ vs batch: "
        "minus batch norm, paired by seed, mean [95 % t-interval] (per seed; "
        "'no difference' when the interval holds 0). test: each norm's inference "
        "statistics (the same as one image at a time: the largest logit change "
        "in the last column); precise: statistics recomputed on augmented "
        "training images; offset erased: every sample's per-channel mean and std "
        "replaced by the population's at every norm input (Δ: minus test); "
        "class-/nuisance-homogeneous and skewed (majority / minority classes): "
        "evaluated with each batch's own statistics.",
    ]
    for setting, table in results.get("ablation", {}).items():
        budget, batch = split_setting(setting)
        lines += [
            "",
            f"### {budget} budget ({config.ablation_budgets[budget]:g} epochs), "
            f"batch {batch}",
            "",
            "| row | statistics | gradient | noise | granularity | lr | test | "
            "Δ vs batch | precise | train loss | offset erased | random batch | "
            "class-hom. | nuisance-hom. | skewed maj. / min. | n | 1-at-a-time "
            "Δlogit |",
            "| --- |" + " --- |" * 16,
        ]
        base = table.get("batch", {})
        within_rows = []
        for name in rows_of:
            per_seed = table.get(name)
            if not per_seed:
                continue
            row = known[name]
            done = _finished_runs(per_seed)
            diverged = len(per_seed) - len(done)

            def f(key: str, done: dict[Any, Any] = done) -> str:
                return fmt(seed_values(done, key), 100)

            lr = seed_values(per_seed, "learning_rate")
            loss = fmt(seed_values(done, "train_loss"), 1, 3)
            worst = max(
                (r["single_max_logit_change"] for r in done.values()), default=0.0
            )
            check = f"{worst:.1e}" + (
                " (depends on the batch!)" if worst > 1e-3 else ""
            )
            delta = "" if name == "batch" else _pct_difference(done, base, "accuracy")
            n = f"{len(per_seed)}" + (f" ({diverged} diverged)" if diverged else "")
            lines.append(
                f"| {name} | {row.statistics} | {row.gradient} | {row.noise} | "
                f"{row.granularity} | {lr[0]:g} | {f('accuracy')} | {delta} | "
                f"{f('precise')} | {loss} | {f('accuracy_offset_erased')} | "
                f"{f('random_batch')} | {f('class_homogeneous')} | "
                f"{f('nuisance_homogeneous')} | {f('skewed_majority')} / "
                f"{f('skewed_minority')} | {n} | {check} |"
            )
            within_rows.append(
                f"| {name} | "
                + " | ".join(_within(done, a, b) for _, a, b in WITHIN)
                + " |"
            )
        lines += [
            "",
            "Differences within each row (accuracy points), paired by seed, mean "
            "[95 % t-interval] (per seed):",
            "",
            "| row | " + " | ".join(label for label, _, _ in WITHIN) + " |",
            "| --- |" + " --- |" * len(WITHIN),
            *within_rows,
        ]
        extras = []
        for name in rows_of:
            per_seed = table.get(name, {})
            for seed, r in sorted(per_seed.items(), key=lambda kv: str(kv[0])):
                if "mix_weight" in r:
                    weights = ", ".join(
                        f"{k} {v:.2f}" for k, v in r["mix_weight"].items()
                    )
                    extras.append(f"- {name}, seed {seed}: learned α {weights}")
                if "prior_coefficients" in r:
                    coefficients = ", ".join(
                        f"{k} {v:.3f}" for k, v in r["prior_coefficients"].items()
                    )
                    extras.append(
                        f"- {name}, seed {seed}: mean |coefficient| {coefficients}; "
                        "accuracy with them zeroed "
                        f"{100 * r['accuracy_prior_zeroed']:.2f} % "
                        f"(trained {100 * r['accuracy']:.2f} %)"
                    )
        if extras:
            lines += ["", "Learned mixing weights and prior coefficients:", ""]
            lines += extras
        distances = [
            (r["class_distance"], r["nuisance_distance"])
            for per in table.values()
            for r in per.values()
            if not r.get("diverged")
        ]
        if distances:
            c, n = np.mean(distances, axis=0)
            lines += [
                "",
                f"Distance of the batch-mean input from the population's: "
                f"class-homogeneous batches {c:.3f}, nuisance-homogeneous {n:.3f} "
                "(mean over runs).",
            ]
    lines += _between_settings(
        results.get("ablation", {}), rows_of, dict(config.ablation_budgets)
    )
    lines += reading_section(
        results.get("ablation", {}), rows_of, dict(config.ablation_budgets)
    )
    return lines


def ordered_settings(table: dict[str, Any], epochs: dict[str, float]) -> list[str]:
    """The settings ('short b256', ...) largest batch first, then by budget:
    the same columns whatever order the runs finished in."""

    def key(setting: str) -> tuple[int, float]:
        budget, batch = split_setting(setting)
        return -batch, epochs.get(budget, math.inf)

    return sorted(table, key=key)


def ablation_headline(
    table: dict[str, Any],
    rows_of: tuple[str, ...],
    known: dict[str, Any],
    epochs: dict[str, float],
) -> list[str]:
    """Every row in every setting (budget, batch size) side by side: test
    accuracy with the row's inference statistics, and minus batch norm's,
    paired by seed with its 95 % interval. ``epochs``: each budget's."""
    if not table:
        return []
    settings = ordered_settings(table, epochs)
    lines = [
        "",
        "### Headline: every row in every setting",
        "",
        "Test accuracy (%) with each row's inference statistics, mean ± std over "
        "seeds (n), and minus batch norm's in the same setting, paired by seed, "
        "mean [95 % t-interval] (per seed).",
        "",
        "| row | statistics | gradient | noise | granularity | "
        + " | ".join(f"{s}: test | {s}: Δ vs batch" for s in settings)
        + " |",
        "| --- |" + " --- |" * (4 + 2 * len(settings)),
    ]
    for name in rows_of:
        if not any(table[s].get(name) for s in settings):
            continue
        row = known[name]
        cells = []
        for setting in settings:
            per_seed = table[setting].get(name, {})
            done = _finished_runs(per_seed)
            diverged = len(per_seed) - len(done)
            if not per_seed:
                cells += ["—", "—"]
                continue
            n = f" (n={len(per_seed)}" + (
                f", {diverged} diverged)" if diverged else ")"
            )
            test = fmt(seed_values(done, "accuracy"), 100) + n
            base = _finished_runs(table[setting].get("batch", {}))
            delta = (
                "(baseline)"
                if name == "batch"
                else _pct_difference(done, base, "accuracy")
            )
            cells += [test, delta]
        lines.append(
            f"| {name} | {row.statistics} | {row.gradient} | {row.noise} | "
            f"{row.granularity} | " + " | ".join(cells) + " |"
        )
    return lines


# The comparisons each reading of issue 20 rests on: (readings, a, b) for the
# paired difference a - b of test accuracy; rows missing from the study are
# left out.
READINGS = (
    ("prior; gradient", "renorm_free", "batch"),
    ("prior; gradient", "population", "batch"),
    ("prior", "reference", "batch"),
    ("prior", "online", "batch"),
    ("prior; optimization", "group8", "batch"),
    ("prior; optimization", "layer_chw", "batch"),
    ("prior; optimization", "layer_pixel", "batch"),
    ("prior; optimization", "instance", "batch"),
    ("prior; optimization", "prior", "batch"),
    ("prior (instrument)", "prior", "group8"),
    ("prior (instrument)", "prior", "layer_pixel"),
    ("optimization", "none_wn", "batch"),
    ("optimization", "none_wn", "none"),
    ("optimization", "none_wn", "layer_pixel"),
    ("noise", "ghost4", "ghost16"),
    ("noise", "ghost16", "ghost64"),
    ("noise", "ghost64", "batch"),
    ("noise", "renorm_free", "group8"),
    ("noise", "population", "group8"),
    ("noise", "reference", "group8"),
    ("noise", "online", "group8"),
    ("gradient", "renorm_free", "population"),
    ("granularity", "batch_group", "batch"),
    ("granularity", "instance", "group8"),
    ("granularity", "instance", "layer_chw"),
    ("granularity", "layer_pixel", "layer_chw"),
)


def _finished_runs(per_seed: dict[Any, Any]) -> dict[Any, Any]:
    return {s: r for s, r in per_seed.items() if not r.get("diverged")}


def _equivalence(cell: str, d: dict[str, Any] | None) -> str:
    """``cell`` with '; within ±1' when the interval (accuracy fractions) lies
    inside ±1 accuracy point: the difference is bounded, not just unresolved."""
    if d is None or d["interval"] is None:
        return cell
    lo, hi = d["interval"]
    return cell + ("; within ±1" if -0.01 <= lo and hi <= 0.01 else "")


def _setting_pairs(
    table: dict[str, Any], epochs: dict[str, float], *, smaller_batch: bool
) -> list[tuple[str, str]]:
    """Pairs (a, b) of the ablation's settings to compare, a − b: a longer
    budget and a shorter at the same batch size, and with ``smaller_batch`` a
    smaller batch and a larger at the same budget. ``epochs``: each budget's."""
    pairs = []
    for a in table:
        for b in table:
            (budget_a, batch_a), (budget_b, batch_b) = (
                split_setting(a),
                split_setting(b),
            )
            longer = batch_a == batch_b and epochs[budget_a] > epochs[budget_b]
            smaller = smaller_batch and budget_a == budget_b and batch_a < batch_b
            if longer or smaller:
                pairs.append((a, b))
    return pairs


def _gap_change(
    table: dict[str, Any], rows_of: tuple[str, ...], epochs: dict[str, float]
) -> list[str]:
    """Whether each row's gap to batch norm changes with the budget: (row −
    batch at the longer budget) − (row − batch at the shorter), at the same
    batch size, paired by seed (the optimization reading; positive: the row
    gains on batch norm with training). ``epochs``: each budget's."""

    pairs = _setting_pairs(table, epochs, smaller_batch=False)
    if not pairs:
        return []

    def gaps(setting: str, name: str) -> dict[Any, dict[str, float]]:
        mine = _finished_runs(table[setting].get(name, {}))
        base = _finished_runs(table[setting].get("batch", {}))
        return {
            s: {"gap": mine[s]["accuracy"] - base[s]["accuracy"]}
            for s in set(mine) & set(base)
        }

    lines = [
        "",
        "Change of each row's gap to batch norm with the budget, (row − batch "
        "at the longer budget) − (row − batch at the shorter), paired by seed "
        "(positive: the row gains on batch norm with training):",
        "",
        "| row | " + " | ".join(f"{a} vs {b}" for a, b in pairs) + " |",
        "| --- |" + " --- |" * len(pairs),
    ]
    for name in rows_of:
        if name == "batch":
            continue
        cells = [_pct_difference(gaps(a, name), gaps(b, name), "gap") for a, b in pairs]
        if any(c != "—" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def reading_section(
    table: dict[str, Any], rows_of: tuple[str, ...], epochs: dict[str, float]
) -> list[str]:
    """The paired differences each reading of the outcome rests on (prior,
    noise / regularization, optimization, gradient through batch statistics,
    granularity), one column per setting; the learned α of ``mix``; the
    reliance on the offset of batch vs group norm. The numbers, not verdicts:
    which reading they support is for the reader (and the README) to say."""
    if not table:
        return []
    settings = ordered_settings(table, epochs)
    lines = [
        "",
        "### Reading the outcome: the comparisons",
        "",
        "Test accuracy a − b (points), paired by seed, mean [95 % t-interval] "
        "(per seed); 'no difference': the interval holds 0; 'within ±1': it lies "
        "inside ±1 point.",
        "",
        "| reading | a − b | " + " | ".join(settings) + " |",
        "| --- | --- |" + " --- |" * len(settings),
    ]
    for reading, a, b in READINGS:
        if a not in rows_of or b not in rows_of:
            continue
        cells = []
        for setting in settings:
            ra = _finished_runs(table[setting].get(a, {}))
            rb = _finished_runs(table[setting].get(b, {}))
            d = paired_difference(ra, rb, "accuracy")
            cells.append(_equivalence(_pct_cell(d), d))
        if any(c != "—" for c in cells):
            lines.append(f"| {reading} | {a} − {b} | " + " | ".join(cells) + " |")
    lines += _gap_change(table, rows_of, epochs)
    extra = []
    for setting in settings:
        alphas = {
            seed: float(np.mean(list(r["mix_weight"].values())))
            for seed, r in _finished_runs(table[setting].get("mix", {})).items()
            if r.get("mix_weight")
        }
        if alphas:
            per_seed = ", ".join(
                f"seed {s}: {a:.2f}" for s, a in sorted(alphas.items(), key=str)
            )
            extra.append(
                f"- {setting}: `mix`'s learned α (weight of the sample's own "
                "statistics; 1 = per-sample only, 0 = population only), mean over "
                f"layers: {per_seed}"
            )
        runs = {
            n: {
                s: {"reliance": r["accuracy"] - r["accuracy_offset_erased"]}
                for s, r in _finished_runs(table[setting].get(n, {})).items()
                if "accuracy_offset_erased" in r
            }
            for n in ("batch", "group8")
        }
        if runs["batch"] and runs["group8"]:
            extra.append(
                f"- {setting}: reliance on the offset (test − offset erased: the "
                "accuracy lost when it is erased), batch minus group8: "
                + _pct_difference(runs["batch"], runs["group8"], "reliance")
            )
    if extra:
        lines += [""] + extra
    return lines


def _between_settings(
    table: dict[str, Any], rows_of: tuple[str, ...], epochs: dict[str, float]
) -> list[str]:
    """Each row's test accuracy in one setting minus another (a longer budget
    minus a shorter at the same batch size; a smaller batch minus a larger at
    the same budget), paired by seed."""

    pairs = _setting_pairs(table, epochs, smaller_batch=True)
    if not pairs:
        return []
    lines = [
        "",
        "Between settings (test accuracy points, paired by seed, 95 % interval):",
        "",
        "| row | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |",
        "| --- |" + " --- |" * len(pairs),
    ]
    for name in rows_of:
        cells = [
            _pct_difference(table[a].get(name, {}), table[b].get(name, {}), "accuracy")
            for a, b in pairs
        ]
        if any(c != "—" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def ablation_text_section(
    results: dict[str, Any], config: ml_collections.ConfigDict
) -> list[str]:
    """Section 8: the text ablation, bits per byte by context length with every
    evaluation, and each row against layer norm, paired by seed."""
    text_norms = tuple(config.get("ablation_text_norms") or ())
    if not text_norms:
        return []
    table = results.get("ablation_text", {})
    lengths = [str(n) for n in sorted(config.context_lengths)]
    tokens = config.context_tokens_per_step
    lines = [
        "",
        "## 8. Text ablation: where the statistics come from",
        "",
        f"Validation bits per byte (byte tokenizer, {tokens} tokens per step), "
        "mean ± std over seeds: population (running) / precise population / "
        "leak-free batch / reference batch (each window with "
        f"{config.ablation_text_reference} training windows).",
        "",
        "| row | " + " | ".join(f"L={n}" for n in lengths) + " |",
        "| --- |" + " --- |" * len(lengths),
    ]
    keys = (
        "val_bits_per_byte",
        "val_bits_per_byte_precise",
        "val_bits_per_byte_batch",
        "val_bits_per_byte_reference",
    )
    for variant in text_norms:
        cells = []
        for n in lengths:
            per_seed = table.get(variant, {}).get(n, {})
            parts = [fmt(seed_values(per_seed, k), 1, 3) for k in keys]
            cells.append(" / ".join(parts) + f" (n={len(per_seed)})")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each row minus layer norm, as trained (the evaluation that normalizes as "
        "training did), and with population statistics; paired by seed, mean "
        "[95 % t-interval] (per seed):",
        "",
        "| row | evaluation | " + " | ".join(f"L={n}" for n in lengths) + " |",
        "| --- | --- |" + " --- |" * len(lengths),
    ]
    for variant in text_norms:
        if variant == "layer":
            continue
        for label, key in (
            ("as trained", as_trained(variant)),
            ("population", "val_bits_per_byte"),
            ("reference batch", "val_bits_per_byte_reference"),
        ):
            cells = []
            for n in lengths:
                if key == "val_bits_per_byte_reference":
                    cells.append(_reference_vs_layer(table, variant, n))
                    continue
                mine = table.get(variant, {}).get(n, {})
                layer = table.get("layer", {}).get(n, {})  # per sample: any source
                cells.append(difference_cell(paired_difference(mine, layer, key)))
            if all(c == "—" for c in cells):
                continue
            lines.append(f"| {variant} | {label} | " + " | ".join(cells) + " |")
    lines += _position_tables(table, text_norms, lengths)
    zeroed = [
        (variant, n, seed, r)
        for variant in text_norms
        for n in lengths
        for seed, r in table.get(variant, {}).get(n, {}).items()
        if "prior_zeroed" in r
    ]
    if zeroed:
        lines += ["", "`prior` with its learned offsets zeroed after training:", ""]
    for variant, n, seed, r in zeroed:
        lines.append(
            f"- {variant}, L={n}, seed {seed}: offsets zeroed "
            f"{r.get('prior_zeroed', float('nan')):.3f} (population), "
            f"{r.get('prior_zeroed_batch', float('nan')):.3f} (batch) "
            f"bits per byte; trained {r['val_bits_per_byte']:.3f}, "
            f"{r.get('val_bits_per_byte_batch') or float('nan'):.3f}"
        )
    return lines


# The score key of each text evaluation -> its key in ``val_loss_by_position``.
POSITION_SOURCES = {
    "val_bits_per_byte": "running",
    "val_bits_per_byte_precise": "precise",
    "val_bits_per_byte_batch": "batch",
    "val_bits_per_byte_reference": "reference",
}


def position_losses(
    per_seed: dict[Any, Any], source: str
) -> dict[str, dict[Any, dict[str, float]]]:
    """``{bucket: {seed: {'loss': value}}}``: the validation loss by position
    bucket of evaluation ``source`` (a ``val_loss_by_position`` key), for
    ``paired_difference`` and ``seed_values``."""
    out: dict[str, dict[Any, dict[str, float]]] = {}
    for seed, r in per_seed.items():
        for bucket, value in (
            (r.get("val_loss_by_position") or {}).get(source, {}).items()
        ):
            out.setdefault(bucket, {})[seed] = {"loss": float(value)}
    return out


def bucket_order(bucket: str) -> tuple[int, str]:
    start = bucket.partition("-")[0]
    return (int(start) if start.isdigit() else 1 << 30, bucket)


def _position_tables(
    table: dict[str, Any], text_norms: tuple[str, ...], lengths: list[str]
) -> list[str]:
    """Per context length: the validation loss by position bucket of every row
    (as trained, with population statistics, with the reference batch), and
    each row's as-trained loss minus layer norm's, paired by seed."""
    from experiments.priors.ablation_text import uses_batch_statistics

    lines: list[str] = []
    for n in lengths:
        evaluations = []
        for variant in text_norms:
            per_seed = table.get(variant, {}).get(n, {})
            keys = trained_and_population(variant)
            if uses_batch_statistics(variant):
                keys.append("val_bits_per_byte_reference")
            for key in keys:
                by_bucket = position_losses(per_seed, POSITION_SOURCES[key])
                if by_bucket:
                    evaluations.append((variant, key, by_bucket))
        if not evaluations:
            continue
        buckets = sorted(
            {b for _, _, by_bucket in evaluations for b in by_bucket}, key=bucket_order
        )
        lines += [
            "",
            f"Validation loss (nats per byte) by position, L={n}: mean ± std over "
            "seeds, by evaluation (as trained, population statistics, reference "
            "batch):",
            "",
            "| row | evaluation | " + " | ".join(buckets) + " | n |",
            "| --- | --- |" + " --- |" * (len(buckets) + 1),
        ]
        for variant, key, by_bucket in evaluations:
            label = "as trained" if key == as_trained(variant) else LABELS[key]
            cells = [
                fmt(seed_values(by_bucket.get(b, {}), "loss"), 1, 3) for b in buckets
            ]
            seeds = len({s for per in by_bucket.values() for s in per})
            lines.append(
                f"| {variant} | {label} | " + " | ".join(cells) + f" | {seeds} |"
            )
        layer = position_losses(
            table.get("layer", {}).get(n, {}), POSITION_SOURCES[as_trained("layer")]
        )
        differences = []
        for variant, key, by_bucket in evaluations:
            if variant == "layer" or key != as_trained(variant):
                continue
            cells = [
                difference_cell(
                    paired_difference(by_bucket.get(b, {}), layer.get(b, {}), "loss")
                )
                for b in buckets
            ]
            if any(c != "—" for c in cells):
                differences.append(f"| {variant} | " + " | ".join(cells) + " |")
        if differences:
            lines += [
                "",
                f"As trained minus layer norm, nats per byte by position, L={n}; "
                "paired by seed, mean [95 % t-interval] (per seed):",
                "",
                "| row | " + " | ".join(buckets) + " |",
                "| --- |" + " --- |" * len(buckets),
                *differences,
            ]
    return lines


LABELS = {
    "val_bits_per_byte": "population",
    "val_bits_per_byte_precise": "precise population",
    "val_bits_per_byte_batch": "leak-free batch",
    "val_bits_per_byte_reference": "reference batch",
}


def trained_and_population(variant: str) -> list[str]:
    """The score keys of a text row's evaluation as trained and with population
    statistics: one key for a per-sample norm (every source gives the same)."""
    keys = [as_trained(variant)]
    if not is_per_sample(variant.partition(":")[0]) and keys[0] != "val_bits_per_byte":
        keys.append("val_bits_per_byte")
    return keys


def _reference_vs_layer(table: dict[str, Any], variant: str, n: str) -> str:
    """The row evaluated with the reference batch minus layer norm as trained."""
    a = {
        s: {"v": r["val_bits_per_byte_reference"]}
        for s, r in table.get(variant, {}).get(n, {}).items()
        if r.get("val_bits_per_byte_reference") is not None
    }
    b = {
        s: {"v": r.get(as_trained("layer"))}
        for s, r in table.get("layer", {}).get(n, {}).items()
    }
    return difference_cell(paired_difference(a, b, "v")) if a else "—"


def text_section(results: dict[str, Any], config: ml_collections.ConfigDict) -> list:
    """Section 5: bits per byte with population and leak-free batch statistics,
    and every difference against layer norm, paired by seed, with its 95 %
    interval."""
    text = results["text"]
    batch_size = config.text.batch_size
    # Results of studies made before these settings existed: their values.
    precise_batches = config.text.get("precise_batches", 50)
    tokens_per_step = config.get("context_tokens_per_step", 2048)
    lines = ["", "## 5. Text: validation bits per byte", ""]
    new_evaluation = any(
        seed_values(per_seed, "val_bits_per_byte_precise") for per_seed in text.values()
    )
    if text and not new_evaluation:
        lines.append(
            "**Results made before the evaluation was corrected:** the first "
            "figure used the running statistics (one row pooled over the whole "
            "window), the bracket each evaluation batch's causal statistics over "
            f"{config.text.eval_batch_size} consecutive windows, which pool other "
            "windows' future tokens (not leak-free). The captions below describe "
            "the corrected evaluation."
        )
        lines.append("")
    lines.append(
        "Each cell: population statistics (precise, per position: the average "
        "of each training batch's prefix moments over "
        f"{precise_batches} training batches) and, in brackets, each "
        "evaluation batch's own causal statistics — batches of the training "
        "batch size whose windows lie more than 2L tokens apart, so no scored "
        "token is pooled into another window's statistics. Batch norm and bln "
        "normalize with batch statistics in training (as trained: the bracket); "
        "power norm and causal='running' with running statistics (as trained: "
        "the first figure); per-sample norms read the same in both. Mean ± std "
        "over seeds."
    )
    lines.append("")
    toks = list(config.text_tokenizers)
    lines.append("| norm | " + " | ".join(toks) + " |")
    lines.append("| --- |" + " --- |" * len(toks))
    for variant in config.text_norms:
        cells = []
        for t in toks:
            per_seed = text.get(text_key("tokenizer", variant, t, {}), {})
            cells.append(text_cell(per_seed))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    baseline = "layer"
    lines += [
        "",
        f"Differences against {baseline} norm (bits per byte; negative: better "
        "than layer norm), paired by seed: mean [95 % t-interval] and the "
        "per-seed differences. 'as trained' as above; 'population' with precise "
        "statistics for every norm.",
        "",
        "| norm | tokenizer | as trained | population |",
        "| --- | --- | --- | --- |",
    ]
    for variant in config.text_norms:
        if variant == baseline:
            continue
        for t in toks:
            a = text.get(text_key("tokenizer", variant, t, {}), {})
            b = text.get(text_key("tokenizer", baseline, t, {}), {})
            trained = paired_difference(a, b, as_trained(variant))
            population = paired_difference(a, b, population_key(a))
            lines.append(
                f"| {variant} | {t} | {difference_cell(trained)} | "
                f"{difference_cell(population)} |"
            )
    lengths = sorted(config.context_lengths)
    for kind, title in (
        ("context", f"fixed batch size {batch_size}"),
        (
            "context tokens",
            f"fixed {tokens_per_step} tokens per step (B = {tokens_per_step} / L)",
        ),
    ):

        def runs(variant: str, n: int, kind: str = kind) -> dict[Any, Any]:
            extra: dict[str, int] = {"max_len": n}
            if kind == "context tokens":
                extra["batch_size"] = tokens_per_step // n
            return text.get(text_key(kind, variant, "byte", extra), {})

        lines += [
            "",
            f"Context-length sweep (byte tokens), {title}: population "
            "(leak-free batch) statistics:",
            "",
            "| norm | " + " | ".join(f"L={n}" for n in lengths) + " |",
            "| --- |" + " --- |" * len(lengths),
        ]
        for variant in config.context_norms:
            cells = [text_cell(runs(variant, n)) for n in lengths]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Difference against {baseline} norm, as trained, {title}:",
            "",
            "| norm | " + " | ".join(f"L={n}" for n in lengths) + " |",
            "| --- |" + " --- |" * len(lengths),
        ]
        for variant in config.context_norms:
            if variant == baseline:
                continue
            cells = [
                difference_cell(
                    paired_difference(
                        runs(variant, n), runs(baseline, n), as_trained(variant)
                    )
                )
                for n in lengths
            ]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines
