"""The ablation (part ``ablation``): batch norm taken apart on CIFAR-10.

Each row changes one property of batch norm — where the forward statistics come
from, whether the gradient flows through them, batch noise, granularity — with
its own learning rate (chosen on a held-out split of the training set at the
short budget), then paired seeds (the same data order in every row) at a short
and a long budget, batch 256, and batch 8 for the rows that claim to work
without a batch. Each trained model is evaluated with its inference statistics
(checked invariant to the evaluation batch on the first test images), with
precise statistics recomputed on augmented training images, with every
sample's offset from the population erased at every norm input ("reliance on
the offset"), and on class-homogeneous, nuisance-homogeneous (brightness) and
class-skewed batches.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict

from experiments import cifar as cifar_experiment
from experiments.priors.cifar_eval import TestSet
from experiments.priors.probe import norm_types
from experiments.priors.runs import (
    Job,
    Study,
    cifar_config,
    read_json,
    train_for_epochs,
    write_json,
)
from normjax.data import cifar, samplers


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the ablation: a registered norm with options, and what it
    isolates (for the table)."""

    norm: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    weight_norm: bool = False
    statistics: str = ""
    gradient: str = ""
    noise: str = ""
    granularity: str = "channel"


def rows(
    config: ml_collections.ConfigDict, batch_size: int | None = None
) -> dict[str, Row]:
    """Every row the ablation knows, by name (``config.ablation_rows`` picks).
    ``batch_size`` (default the ablation's): the warm-up of the rows that
    train on population statistics (batch renorm unclipped, ``population``),
    given in steps at the ablation's batch size, covers the same number of
    images, and is the same for both rows (they differ in the gradient only)."""
    scale = config.ablation_batch_size / (batch_size or config.ablation_batch_size)
    warmup = max(1, round(config.ablation_population_warmup * scale))
    free = 1e6  # r and d unclipped (finite: the relaxation ramp multiplies it)
    return {
        "batch": Row("batch", {}, False, "batch", "yes", "yes"),
        "ghost4": Row(
            "ghost_batch", {"ghost_batch_size": 4}, False, "ghost 4", "yes", "yes"
        ),
        "ghost16": Row(
            "ghost_batch", {"ghost_batch_size": 16}, False, "ghost 16", "yes", "yes"
        ),
        "ghost64": Row(
            "ghost_batch", {"ghost_batch_size": 64}, False, "ghost 64", "yes", "yes"
        ),
        "renorm_free": Row(
            "batch_renorm",
            {"r_max": free, "d_max": free, "relax": (warmup, warmup + 1, warmup + 1)},
            False,
            "population (after warm-up)",
            "yes",
            "no",
        ),
        "population": Row(
            "population",
            {"warmup_steps": warmup},
            False,
            "population (after warm-up)",
            "no",
            "no",
        ),
        "reference": Row("reference", {}, False, "reference + self", "via R", "no"),
        "online": Row("online", {}, False, "past population", "control", "no"),
        "mix": Row("mix", {}, False, "sample + population", "—", "no"),
        "batch_group": Row("batch_group", {}, False, "batch", "yes", "yes", "group"),
        "instance": Row("instance", {}, False, "sample", "—", "—"),
        "group8": Row("group", {"num_groups": 8}, False, "sample", "—", "—", "group"),
        "layer_chw": Row(
            "layer", {"reduction_axes": (1, 2, 3)}, False, "sample", "—", "—", "sample"
        ),
        "layer_pixel": Row("layer", {}, False, "sample", "—", "—", "pixel"),
        "none": Row("none", {}, False, "none", "—", "—", "—"),
        "none_wn": Row("none", {}, True, "none (weight norm)", "—", "—", "—"),
        "prior": Row("prior", {}, False, "sample + learned prior", "—", "—", "group"),
    }


def selected_rows(config: ml_collections.ConfigDict) -> dict[str, Row]:
    known = rows(config)
    unknown = [r for r in config.ablation_rows if r not in known]
    if unknown:
        raise ValueError(
            f"unknown ablation rows {unknown}; use some of {', '.join(known)}."
        )
    return {name: known[name] for name in config.ablation_rows}


def small_batch_rows(config: ml_collections.ConfigDict) -> list[str]:
    """The rows also trained at ``ablation_small_batch`` (ghost rows whose
    virtual batch exceeds it are left out)."""
    size = config.ablation_small_batch
    out = []
    for name in config.ablation_small_batch_rows:
        row = selected_rows(config).get(name)
        if row is None:
            continue
        if row.options.get("ghost_batch_size", 0) > size:
            continue
        out.append(name)
    return out


# ------------------------------------------------------------------- configs


def run_config(
    study: Study,
    name: str,
    seed: int,
    *,
    learning_rate: float,
    epochs: float,
    batch_size: int,
    holdout: int = 0,
) -> ml_collections.ConfigDict:
    c = study.config
    row = rows(c, batch_size)[name]
    run = cifar_config(c, row.norm, seed)
    if batch_size != c.ablation_batch_size and run.norm_momentum is not None:
        # Running averages over the same number of images as at the ablation's
        # batch size (momentum per step m -> m ** (B / B_ablation)).
        run.norm_momentum = run.norm_momentum ** (batch_size / c.ablation_batch_size)
    run.norm_kwargs = ml_collections.ConfigDict(dict(row.options))
    run.weight_norm = row.weight_norm
    run.batch_size = batch_size
    run.learning_rate = learning_rate
    train_for_epochs(run, epochs)
    run.train_subset = c.ablation_train_subset
    run.holdout = holdout
    if holdout:
        run.test_subset = None  # the held-out images are the evaluation set
        run.eval_batch_size = math.gcd(run.eval_batch_size, holdout)
    run.log_every = max(1, min(run.log_every, 50))
    return run


def budgets(config: ml_collections.ConfigDict) -> list[str]:
    """The budget names, shortest first."""
    return sorted(config.ablation_budgets, key=lambda b: config.ablation_budgets[b])


def lr_dir(study: Study, name: str, lr: float) -> pathlib.Path:
    return study.run_dir(f"ablation_lr_{name}_lr{lr:g}")


def main_dir(
    study: Study, name: str, budget: str, batch_size: int, seed: int
) -> pathlib.Path:
    return study.run_dir(f"ablation_{name}_{budget}_b{batch_size}_s{seed}")


def lr_run(study: Study, name: str, lr: float) -> dict[str, Any]:
    """One learning rate of the grid: held-out accuracy at the short budget."""
    path = lr_dir(study, name, lr) / "lr.json"
    if path.exists():
        return read_json(path)
    c = study.config
    print(f"[priors] ablation learning rate: row={name} lr={lr:g}", flush=True)
    run = run_config(
        study,
        name,
        c.ablation_lr_seed,
        learning_rate=lr,
        epochs=c.ablation_budgets[budgets(c)[0]],
        batch_size=c.ablation_batch_size,
        holdout=c.ablation_holdout,
    )
    try:
        summary, *_ = cifar_experiment.train(run, str(path.parent))
    except FloatingPointError as error:  # a diverged grid point ranks last
        print(f"[priors] {path.parent.name}: {error}", flush=True)
        record = {"holdout_accuracy": float("nan"), "train_loss": float("nan")}
        write_json(path, {**record, "diverged": True})
        return read_json(path)
    record = {
        "holdout_accuracy": float(summary["test_accuracy"]),
        "train_loss": final_train_loss(path.parent),
    }
    write_json(path, record)
    return record


def grid_rates(
    base: Sequence[float], records: Mapping[float, Any], extend: int
) -> tuple[list[float], bool]:
    """The learning rates a row's grid needs, and whether it is complete, given
    the ``records`` finished so far (by rate). The grid starts at ``base``;
    while its best rate is at an edge it grows past that edge by the grid's
    outer step (up: x max/second max; down: / second min/min; x2 for a single
    rate), at most ``extend`` rates each way. Every rate diverged: it grows
    down. Incomplete while a needed rate has no record."""
    rates = sorted({float(r) for r in base})
    up = down = 0
    while True:
        if any(r not in records for r in rates):
            return rates, False
        best = choose_learning_rate({r: records[r] for r in rates})
        diverged = all(not np.isfinite(records[r]["train_loss"]) for r in rates)
        step_up = rates[-1] / rates[-2] if len(rates) > 1 else 2.0
        step_down = rates[1] / rates[0] if len(rates) > 1 else 2.0
        if not diverged and best == rates[-1] and up < extend:
            rates.append(float(f"{rates[-1] * step_up:.6g}"))
            up += 1
        elif (diverged or best == rates[0]) and down < extend:
            rates.insert(0, float(f"{rates[0] / step_down:.6g}"))
            down += 1
        else:
            return rates, True


def grid_choice(
    base: Sequence[float], records: Mapping[float, Any], extend: int
) -> tuple[list[float], float | None]:
    """The rates a row's grid needs (``grid_rates``) and the one it chooses,
    None while it is incomplete."""
    rates, complete = grid_rates(base, records, extend)
    if not complete:
        return rates, None
    return rates, choose_learning_rate({r: records[r] for r in rates})


def grid_records(
    study: Study, name: str
) -> tuple[dict[float, Any], list[float], float | None]:
    """A row's grid records on disk (by rate), the rates it needs, and the rate
    it chooses (None while incomplete; ``grid_choice``)."""
    c = study.config
    records: dict[float, Any] = {}
    while True:
        rates, best = grid_choice(
            c.ablation_learning_rates, records, c.get("ablation_lr_extend", 0)
        )
        new = {
            r: record
            for r in rates
            if r not in records
            and (record := read_json(lr_dir(study, name, r) / "lr.json")) is not None
        }
        if not new:
            return records, rates, best
        records.update(new)


def best_learning_rate(study: Study, name: str) -> float | None:
    """The grid's learning rate with the best held-out accuracy (a diverged run,
    NaN loss, counts as worst), or None while the row's grid is incomplete
    (a rate missing, or the best at an edge it still grows past)."""
    return grid_records(study, name)[2]


def paired_rate(study: Study, name: str, batch_size: int) -> float | None:
    """The learning rate of a row's paired runs at ``batch_size``: the grid's
    choice scaled linearly with the batch size (None while it is incomplete)."""
    best = best_learning_rate(study, name)
    return (
        None if best is None else best * batch_size / study.config.ablation_batch_size
    )


def choose_learning_rate(records: dict[float, dict[str, Any]]) -> float:
    """The learning rate with the best held-out accuracy; a run whose training
    loss is not finite (diverged) ranks last; ties go to the smaller rate."""

    def score(lr: float) -> tuple[float, float]:
        record = records[lr]
        ok = np.isfinite(record["train_loss"])
        return (record["holdout_accuracy"] if ok else -1.0, -lr)

    return max(records, key=score)


def final_train_loss(workdir: pathlib.Path, last: int = 5) -> float:
    """Mean training loss of the last ``last`` logged steps."""
    losses = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "train" and "loss" in row:
            losses.append(float(row["loss"]))
    return float(np.mean(losses[-last:])) if losses else float("nan")


# ---------------------------------------------------------------- evaluation


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(logits.argmax(-1) == y))


def _norm_inputs(
    model: nn.Module,
    variables: Any,
    x: jax.Array,
    population: dict[str, tuple[jax.Array, jax.Array]] | None,
) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """The model's logits (evaluation mode), and each norm layer's input
    channel mean over (batch, space) and mean within-sample variance. With
    ``population``
    ({path: (mean, std)} per channel) every sample's per-channel mean and std
    at each norm input are first replaced by the population's."""
    types = norm_types()
    seen: dict[str, tuple[jax.Array, jax.Array]] = {}

    def interceptor(next_fun, args, kwargs, context):  # noqa: ANN001, ANN202
        module = context.module
        if context.method_name == "__call__" and isinstance(module, types):
            path = "/".join(module.path)
            x = args[0]
            space = tuple(range(1, x.ndim - 1))
            # the channel's mean, and its within-sample variance (over space)
            # averaged over the samples: a typical sample's spread
            seen[path] = (x.mean(tuple(range(x.ndim - 1))), x.var(space).mean(0))
            if population is not None and path in population:
                mu = x.mean(space, keepdims=True)
                sd = x.std(space, keepdims=True)
                mean, std = population[path]
                x = (x - mu) / (sd + 1e-5) * std + mean
                args = (x, *args[1:])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        logits = model.apply(variables, x, train=False)
    return logits, seen


def reliance(test_set: TestSet, count: int, batch_size: int = 500) -> dict[str, float]:
    """Accuracy with every sample's per-channel offset from the population
    erased at every norm input: its mean and std over space replaced by the
    channel's population mean and a typical sample's std (the root mean
    within-sample variance), both from ``count`` training images through the
    unmodified model."""
    task, data = test_set.task, test_set.task.data
    model, variables = test_set.model, test_set.variables
    plain = jax.jit(lambda v, x: _norm_inputs(model, v, x, None)[1])
    sums: dict[str, list[np.ndarray]] = {}
    count = min(count, len(data.train_labels))
    batch_size = min(batch_size, count)
    for s in range(0, count - batch_size + 1, batch_size):
        x = cifar.standardize_images(
            jnp.asarray(data.train_images[s : s + batch_size]), task.mean, task.std
        )
        for path, (m1, m2) in plain(variables, x).items():
            acc = sums.setdefault(path, [0.0, 0.0, 0])
            acc[0] = acc[0] + np.asarray(m1, np.float64)
            acc[1] = acc[1] + np.asarray(m2, np.float64)
            acc[2] += 1
    population = {}
    for path, (m1, within, n) in sums.items():
        population[path] = (
            jnp.asarray(m1 / n, jnp.float32),
            jnp.asarray(np.sqrt(within / n), jnp.float32),
        )
    erased = jax.jit(lambda v, x: _norm_inputs(model, v, x, population)[0])
    y = test_set.test_y
    size = min(500, len(y))
    logits = np.concatenate(
        [
            np.asarray(erased(variables, test_set.test_x[s : s + size]))
            for s in range(0, len(y) - len(y) % size, size)
        ]
    )
    return {"accuracy_offset_erased": _accuracy(logits, y[: len(logits)])}


def nuisance_homogeneous_batches(
    images: np.ndarray, target_distance: float, batch_size: int, seed: int
) -> tuple[samplers.Batches, dict[str, float]]:
    """Batches homogeneous in a nuisance — mean brightness — instead of class.

    Images are ordered by ``f * brightness rank + (1 - f) * random rank`` and cut
    into batches: f = 1 sorts by brightness alone, f = 0 is random. f is chosen
    on a grid so that the batches' mean distance of the batch-mean input (per
    channel) from the population's matches ``target_distance`` (that of the
    class-homogeneous batches): the same shift of the batch statistics, without
    class information."""
    n = len(images)
    channel_means = images.reshape(n, -1, images.shape[-1]).mean(1)  # (N, C)
    population = channel_means.mean(0)
    brightness = np.argsort(np.argsort(channel_means.mean(1)))
    random_rank = np.random.default_rng([seed, 7]).permutation(n)
    full = n - n % batch_size

    def build(f: float) -> tuple[np.ndarray, float]:
        order = np.argsort(f * brightness + (1 - f) * random_rank, kind="stable")
        groups = order[:full].reshape(-1, batch_size)
        d = np.linalg.norm(channel_means[groups].mean(1) - population, axis=-1)
        return groups, float(d.mean())

    fractions = np.linspace(0.0, 1.0, 41)
    built = [build(f) for f in fractions]
    best = int(np.argmin([abs(d - target_distance) for _, d in built]))
    groups, distance = built[best]
    rest = np.setdiff1d(np.arange(n), groups.ravel())
    indices, mask = [groups], [np.ones_like(groups, bool)]
    if len(rest):  # the last, partial batch: padded with its own images
        pad = np.resize(rest, batch_size)
        indices.append(pad[None])
        mask.append((np.arange(batch_size) < len(rest))[None])
    batches = samplers.Batches(
        np.concatenate(indices).astype(np.int32),
        np.concatenate(mask),
        np.full(len(np.concatenate(indices)), -1, np.int32),
    )
    info = {"brightness_fraction": float(fractions[best]), "distance": distance}
    return batches, info


def batch_distance(images: np.ndarray, batches: samplers.Batches) -> float:
    """Mean distance of each batch's mean input (per channel) from the
    population's."""
    n = len(images)
    channel_means = images.reshape(n, -1, images.shape[-1]).mean(1)
    population = channel_means.mean(0)
    d = []
    for idx, m in zip(batches.indices, batches.mask, strict=True):
        d.append(np.linalg.norm(channel_means[idx[m]].mean(0) - population))
    return float(np.mean(d))


def evaluate(
    config: ml_collections.ConfigDict,
    test_set: TestSet,
    summary: dict[str, Any],
    seed: int,
    batch_size: int,
) -> dict[str, Any]:
    """Every column of the ablation for one trained model."""
    y = test_set.test_y
    n = len(y)
    whole = samplers.eval_batches(n, min(n, 500))
    running = test_set.logits(whole, "running")
    out: dict[str, Any] = {"accuracy": _accuracy(running, y)}
    # One sample at a time: the inference statistics must not depend on the
    # evaluation batch (checked on the first test images).
    k = min(config.ablation_single_images, n)
    single = np.concatenate(
        [
            test_set.evaluator(
                test_set.variables,
                (test_set.test_x[i : i + 1], np.ones(1, bool)),
                source="running",
            )
            for i in range(k)
        ]
    )
    out["single_max_logit_change"] = float(np.max(np.abs(single - running[:k])))
    if test_set.variables.get("batch_stats"):
        precise = test_set.precise_stats(
            config.precise_images, max(batch_size, 2), augmented=True
        )
        out["precise"] = _accuracy(test_set.logits(whole, "precise", precise), y)
    else:
        out["precise"] = out["accuracy"]
    out.update(reliance(test_set, config.precise_images))
    # Batches shifted by class, by a nuisance (brightness) at the same distance
    # of the batch mean from the population's, and class-skewed batches.
    size = config.class_batch_size
    homogeneous = samplers.class_homogeneous_eval_batches(y, size, seed=seed)
    order = np.random.default_rng([seed, 3]).permutation(n)
    plain = samplers.eval_batches(n, size)
    shuffled = samplers.Batches(order[plain.indices], plain.mask, plain.batch_class)
    # the baseline of the shifted batches: random ones, same size and source
    out["random_batch"] = _accuracy(test_set.logits(shuffled, "batch"), y)
    out["class_homogeneous"] = _accuracy(test_set.logits(homogeneous, "batch"), y)
    out["class_distance"] = batch_distance(test_set.test_x, homogeneous)
    nuisance, info = nuisance_homogeneous_batches(
        test_set.test_x, out["class_distance"], size, seed
    )
    out["nuisance_homogeneous"] = _accuracy(test_set.logits(nuisance, "batch"), y)
    out["nuisance_distance"] = info["distance"]
    out["nuisance_brightness_fraction"] = info["brightness_fraction"]
    skewed = samplers.class_skewed_eval_batches(
        y, size, fraction=config.skew_fraction, seed=seed
    )
    logits = test_set.logits(skewed, "batch")
    majority = np.zeros(n, bool)
    for idx, m, c in zip(skewed.indices, skewed.mask, skewed.batch_class, strict=True):
        majority[idx[m]] = y[idx[m]] == c
    correct = logits.argmax(-1) == y
    out["skewed_majority"] = float(correct[majority].mean())
    out["skewed_minority"] = float(correct[~majority].mean())
    out["skewed_batch"] = _accuracy(logits, y)
    if "mix_weight" in summary:
        out["mix_weight"] = summary["mix_weight"]
    out.update(prior_columns(test_set, whole))
    return out


PRIOR_KEYS = ("prior_mean", "prior_scale")


def zero_prior(tree: Any) -> Any:
    """``tree`` (params, or all variables) with every ``prior_mean`` and
    ``prior_scale`` zeroed."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: (
            jnp.zeros_like(v) if str(getattr(path[-1], "key", "")) in PRIOR_KEYS else v
        ),
        tree,
    )


def prior_columns(test_set: TestSet, whole: samplers.Batches) -> dict[str, Any]:
    """For ``prior``: its learned offsets (mean |prior_mean|, |prior_scale| per
    layer) and the accuracy with them zeroed; {} for other norms."""
    flat = flatten_dict(dict(test_set.variables.get("params", {})), sep="/")
    keys = [k for k in flat if k.endswith(PRIOR_KEYS)]
    if not keys:
        return {}
    coefficients = {k: float(np.mean(np.abs(np.asarray(flat[k])))) for k in keys}
    zeroed = copy.copy(test_set)
    zeroed.variables = zero_prior(test_set.variables)
    return {
        "prior_coefficients": coefficients,
        "accuracy_prior_zeroed": _accuracy(
            zeroed.logits(whole, "running"), test_set.test_y
        ),
    }


def main_run(
    study: Study, name: str, budget: str, batch_size: int, seed: int
) -> dict[str, Any] | None:
    """One (row, budget, batch size, seed) model with every column, at the
    row's chosen learning rate (scaled linearly with the batch size); None
    while the row's learning-rate grid is unfinished."""
    workdir = main_dir(study, name, budget, batch_size, seed)
    path = workdir / "ablation.json"
    c = study.config
    lr = paired_rate(study, name, batch_size)
    if lr is None:
        if path.exists():  # the grid grew since: the record's rate may be stale
            return None
        print(
            f"[priors] ablation {workdir.name}: waits for its learning-rate grid "
            "(run --config.parts=ablation_lr first, or alongside)",
            flush=True,
        )
        return None
    set_aside_other_rate(workdir, lr)
    if path.exists():
        return read_json(path)
    print(
        f"[priors] ablation run: row={name} budget={budget} batch={batch_size} "
        f"seed={seed} lr={lr:g}",
        flush=True,
    )
    run = run_config(
        study,
        name,
        seed,
        learning_rate=lr,
        epochs=c.ablation_budgets[budget],
        batch_size=batch_size,
    )
    try:
        summary, model, task, state = cifar_experiment.train(run, str(workdir))
    except FloatingPointError as error:  # recorded, not evaluated; no rerun
        print(f"[priors] {workdir.name}: {error}", flush=True)
        write_json(path, {"learning_rate": lr, "diverged": True})
        return read_json(path)
    test_set = TestSet(model, task, jax.device_get(state.variables()))
    record = {
        "learning_rate": lr,
        "train_loss": final_train_loss(workdir),
        "train_seconds": summary["wall_seconds"],
        **evaluate(c, test_set, summary, seed, batch_size),
    }
    write_json(path, record)
    return record


def set_aside_other_rate(workdir: pathlib.Path, lr: float) -> None:
    """Moves a run made at another learning rate than the row's grid now
    chooses (the grid grew past an edge since) to ``<workdir>.lr<rate>``: kept,
    not counted, and not resumed at the new rate."""
    record = read_json(workdir / "ablation.json")
    config = read_json(workdir / "config.json")
    old = (record or {}).get("learning_rate")
    if old is None and config is not None:
        old = config.get("learning_rate")
    if old is None or math.isclose(old, lr, rel_tol=1e-9):
        return
    target = workdir.with_name(f"{workdir.name}.lr{old:g}")
    n = 1
    while target.exists():
        n += 1
        target = workdir.with_name(f"{workdir.name}.lr{old:g}.{n}")
    workdir.rename(target)
    print(
        f"[priors] {workdir.name}: made at lr {old:g}, the grid now chooses "
        f"{lr:g}; moved to {target.name}, run again",
        flush=True,
    )


def jobs(
    study: Study, parts: set[str], seeds: list[int], results: dict[str, Any]
) -> list[Job]:
    """The learning-rate grid (part ``ablation_lr``), then the paired runs
    (part ``ablation``), short budget first."""
    c = study.config
    if not c.ablation_rows:
        return []
    out: list[Job] = []
    grid = results.setdefault("ablation_lr", {})
    for name in selected_rows(c):
        for lr in grid_records(study, name)[1]:  # the rates it needs so far

            def keep_lr(record: Any, name: str = name, lr: float = lr) -> None:
                grid.setdefault(name, {})[f"{lr:g}"] = record

            out.append(
                Job(
                    "ablation_lr",
                    lr_dir(study, name, lr) / "lr.json",
                    bool({"ablation_lr", "ablation"} & parts),
                    lambda name=name, lr=lr: lr_run(study, name, lr),
                    keep_lr,
                    results_key=(name, f"{lr:g}"),
                )
            )
    table = results.setdefault("ablation", {})
    chosen: dict[tuple[str, int], float | None] = {}
    settings = [(b, c.ablation_batch_size) for b in budgets(c)]
    settings += [(b, c.ablation_small_batch) for b in c.ablation_small_batch_budgets]
    for budget, batch_size in settings:
        names = (
            list(selected_rows(c))
            if batch_size == c.ablation_batch_size
            else small_batch_rows(c)
        )
        for name in names:

            def current(
                record: Any, name: str = name, batch_size: int = batch_size
            ) -> bool:
                # made at the rate the row's grid chooses, once it is complete
                # (read when asked: the grid may finish during this call)
                if chosen.get((name, batch_size)) is None:
                    chosen[name, batch_size] = paired_rate(study, name, batch_size)
                lr = chosen[name, batch_size]
                if lr is None:
                    return False
                return math.isclose(
                    record.get("learning_rate", math.nan), lr, rel_tol=1e-9
                )

            for seed in seeds:

                def keep(
                    record: Any,
                    key: str = f"{budget} b{batch_size}",
                    name: str = name,
                    seed: int = seed,
                    current: Any = current,
                ) -> None:
                    if current(record):  # a stale rate's run is not this row's
                        table.setdefault(key, {}).setdefault(name, {})[seed] = record

                out.append(
                    Job(
                        "ablation",
                        main_dir(study, name, budget, batch_size, seed)
                        / "ablation.json",
                        "ablation" in parts,
                        lambda n=name, b=budget, bs=batch_size, s=seed: main_run(
                            study, n, b, bs, s
                        ),
                        keep,
                        finished=current,
                        results_key=(f"{budget} b{batch_size}", name, str(seed)),
                    )
                )
    return out
