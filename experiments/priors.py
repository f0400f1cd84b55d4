"""The priors study: what do batch statistics give a network that per-sample
statistics don't?

    python -m experiments.priors --config=experiments/configs/priors.py:quick \
        --config.data_dir=../shared/tfds --workdir=runs/priors [--config.parts=probe]

The hypothesis: batch statistics give each sample a prior — how far it sits from
the typical sample — and samples of one class deviate from the population in
similar ways; per-sample norms discard that; a tokenizer supplies global
statistics to text models in another way. Parts (``config.parts``, comma
separated; every table is mean ± std over ``config.seeds``):

1. ``probe`` — CIFAR-10, a model per norm, each evaluated on the test set with
   statistics from: running averages; precise statistics recomputed over training
   images; the current batch, for random batches of each size in
   ``probe_batch_sizes``; class-homogeneous batches; class-skewed batches. The
   per-sample norms' rows must not move (a built-in sanity check, recorded as the
   largest logit change against running statistics).
2. ``stats`` — at every norm layer of those models, each sample's per-channel
   mean and standard deviation of the norm's input, and a logistic regression on
   them alone (train split -> test split), against chance (10 %).
3. ``sweep`` — each norm trained at each batch size (learning rate scaled with the
   batch size, same epochs), evaluated with running and with precise statistics
   (4. is the gap between the two).
5. ``text`` — tokenizers x norms (validation bits per byte), a context-length
   sweep, and small-batch text runs for the headline.
6. The headline table: batch vs layer/group vs prior, CIFAR and text, at large
   and small batch.

Resumable: every run lives in ``WORKDIR/runs/<name>/``; a finished run (its
results file exists) is skipped and a killed one resumes from its checkpoint.
``results.json``, ``results.md`` and the PNG plots are rebuilt from whatever runs
exist, so the study can be run in parts across sessions. Several processes may
work on one workdir at once (the same command started again, e.g. one per core
or per GPU): each run is locked by the process running it and skipped by the
others; ``--config.parts=`` afterwards rebuilds the tables from every run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import cifar as cifar_experiment
from experiments import common
from experiments import text as text_experiment
from normjax import calibrate, registry
from normjax.data import cifar

try:
    import fcntl
except ImportError:  # not POSIX: no run locks, run one study process at a time
    fcntl = None

Array = jax.Array
PARTS = ("probe", "stats", "sweep", "text")
# The headline's norms: batch statistics, per-sample, per-sample + global prior.
PLOTS = ("sweep.png", "probe.png", "stats.png", "text.png")
HEADLINE_CIFAR_NORMS = ("batch", "layer", "group", "prior")
HEADLINE_TEXT_NORMS = ("batch", "layer", "prior")


# ------------------------------------------------------------------ utilities


def _parts(config: ml_collections.ConfigDict) -> set[str]:
    parts = {p.strip() for p in str(config.parts).split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(
            f"unknown parts {sorted(unknown)}; use a comma-separated subset of "
            f"{', '.join(PARTS)}."
        )
    return parts


def _read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _claimed(
    run_dir: pathlib.Path, run: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """``run(*args, **kwargs)`` while holding ``run_dir``'s lock, or None
    (without running) when another process holds it: several processes can work
    through one study, each run taken by one. The lock is ``flock``'s, so a
    killed process leaves none behind."""
    if fcntl is None:
        return run(*args, **kwargs)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "LOCK", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[priors] {run_dir.name}: another process runs it", flush=True)
            return None
        return run(*args, **kwargs)  # the lock goes with the file


def _run_or_read(
    path: pathlib.Path,
    run_now: bool,
    run: Callable[..., Any],
    *args: Any,
    **kwargs: Any,
) -> Any:
    """A run's record: ``run(*args, **kwargs)`` when ``run_now`` and no other
    process holds the run, else what it wrote to ``path`` so far (None: nothing)."""
    record = _claimed(path.parent, run, *args, **kwargs) if run_now else None
    return _read_json(path) if record is None else record


def _write_json(path: pathlib.Path, value: Any) -> None:
    """Atomic: a killed study never leaves a half-written results file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, allow_nan=True) + "\n")
    tmp.replace(path)


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return float("nan"), float("nan"), 0
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return float(v.mean()), std, len(v)


def _fmt(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    mean, std, n = mean_std(values)
    if not n:
        return "—"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _is_per_sample(norm: str) -> bool:
    return registry.entry(norm).statistics in ("per sample", "none")


def _cifar_config(
    config: ml_collections.ConfigDict, norm: str, seed: int
) -> ml_collections.ConfigDict:
    run = ml_collections.ConfigDict(config.cifar.to_dict())
    run.data_dir = config.data_dir
    run.norm = norm
    run.seed = seed
    return run


# ------------------------------------------------------------- CIFAR evaluation


class _Evaluator:
    """Test-set accuracy of one trained CIFAR model under each statistics source."""

    def __init__(self, model: nn.Module, task: Any, variables: dict[str, Any]):
        self.model, self.task, self.variables = model, task, variables
        data = task.data
        self.test_x = np.asarray(
            cifar.standardize(jnp.asarray(data.test_images), task.mean, task.std)
        )
        self.test_y = data.test_labels
        self._fns: dict[Any, Callable[..., Array]] = {}

    def _fn(self, source: str, precise: Any = None) -> Callable[..., Array]:
        key = (source, id(precise))
        if key not in self._fns:
            self._fns[key] = calibrate.make_eval_fn(
                self.model,
                source=source,
                precise_stats=precise,
                method=lambda m, x, mask: m(x, train=False, mask=mask),
            )
        return self._fns[key]

    def logits(
        self, batches: cifar.Batches, source: str, precise: Any = None
    ) -> np.ndarray:
        """Logits for every test image, each once, from its slot in ``batches``."""
        fn = self._fn(source, precise)
        out = np.zeros((len(self.test_y), 10), np.float32)
        for idx, mask in zip(batches.indices, batches.mask, strict=True):
            logits = np.asarray(fn(self.variables, self.test_x[idx], mask))
            out[idx[mask]] = logits[mask]
        return out

    def precise_stats(self, count: int, batch_size: int) -> Any:
        data = self.task.data
        count = min(count, len(data.train_labels))
        order = np.random.default_rng(0).permutation(len(data.train_labels))[:count]

        def batches():
            for s in range(0, count - batch_size + 1, batch_size):
                rows = order[s : s + batch_size]
                x = cifar.standardize(
                    jnp.asarray(data.train_images[rows]), self.task.mean, self.task.std
                )
                yield (x, jnp.ones(len(rows), bool))

        with warnings.catch_warnings():
            # Expected: bln's feature pair and batch_renorm's step counter are not
            # population moments and keep their running values.
            warnings.filterwarnings("ignore", message="precise statistics left")
            return calibrate.precise_batch_stats(
                self.model,
                self.variables,
                batches(),
                method=lambda m, x, mask: m(x, train=False, mask=mask),
            )


def probe_sources(
    config: ml_collections.ConfigDict, evaluator: _Evaluator, seed: int
) -> dict[str, dict[str, float]]:
    """Accuracy (and the largest logit change against running statistics) under
    every statistics source of part 1."""
    y = evaluator.test_y
    n = len(y)
    whole = cifar.eval_batches(n, min(n, 500))
    results: dict[str, dict[str, float]] = {}
    running = evaluator.logits(whole, "running")

    def record(name: str, logits: np.ndarray) -> None:
        results[name] = {
            "accuracy": float(np.mean(logits.argmax(-1) == y)),
            "max_logit_change": float(np.max(np.abs(logits - running))),
        }

    record("running", running)
    has_stats = bool(evaluator.variables.get("batch_stats"))
    if has_stats:
        precise = evaluator.precise_stats(
            config.precise_images, config.precise_batch_size
        )
        record("precise", evaluator.logits(whole, "precise", precise))
    else:  # nothing to recompute: precise statistics are the running ones
        record("precise", evaluator.logits(whole, "running"))
    order = np.random.default_rng([seed, 1]).permutation(n)
    for size in config.probe_batch_sizes:
        b = cifar.eval_batches(n, size)
        shuffled = cifar.Batches(order[b.indices], b.mask, b.batch_class)
        record(f"batch {size}", evaluator.logits(shuffled, "batch"))
    size = config.class_batch_size
    record(
        "class-homogeneous",
        evaluator.logits(
            cifar.class_homogeneous_eval_batches(y, size, seed=seed), "batch"
        ),
    )
    record(
        "class-skewed",
        evaluator.logits(
            cifar.class_skewed_eval_batches(
                y, size, fraction=config.skew_fraction, seed=seed
            ),
            "batch",
        ),
    )
    return results


# -------------------------------------------------- part 2: statistics probe


def _norm_types() -> tuple[type, ...]:
    return tuple({registry.entry(name).module for name in registry.names()})


def norm_input_statistics(
    model: nn.Module, variables: dict[str, Any], images: Array
) -> dict[str, tuple[Array, Array]]:
    """{norm layer path: (per-sample per-channel mean, std) of its input}, each
    (N, C), from one evaluation-mode pass (statistics over the spatial axes)."""
    captured: dict[str, tuple[Array, Array]] = {}
    types = _norm_types()

    def interceptor(next_fun, args, kwargs, context):  # noqa: ANN001, ANN202
        module = context.module
        if context.method_name == "__call__" and isinstance(module, types):
            x = args[0].astype(jnp.float32)
            axes = tuple(range(1, x.ndim - 1))
            captured["/".join(module.path)] = (x.mean(axes), x.std(axes))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, images, train=False)
    return captured


def _collect_statistics(
    evaluator: _Evaluator, images: np.ndarray, batch_size: int = 500
) -> dict[str, np.ndarray]:
    fn = jax.jit(
        lambda v, x: norm_input_statistics(evaluator.model, v, x),
    )
    parts: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(images), batch_size):
        for path, (mean, std) in fn(
            evaluator.variables, images[s : s + batch_size]
        ).items():
            parts.setdefault(path, []).append(
                np.concatenate([np.asarray(mean), np.asarray(std)], axis=-1)
            )
    return {path: np.concatenate(chunks) for path, chunks in parts.items()}


def fit_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    steps: int,
    l2: float,
    num_classes: int = 10,
) -> float:
    """Test accuracy of a multinomial logistic regression trained full-batch
    (Adam, standardized features, L2 penalty ``l2``)."""
    mu = train_x.mean(0)
    sd = train_x.std(0) + 1e-6
    xtr = jnp.asarray((train_x - mu) / sd, jnp.float32)
    xte = jnp.asarray((test_x - mu) / sd, jnp.float32)
    ytr = jnp.asarray(train_y)
    params = {
        "w": jnp.zeros((xtr.shape[1], num_classes)),
        "b": jnp.zeros(num_classes),
    }
    tx = optax.adam(0.05)

    def loss(p: dict[str, Array]) -> Array:
        logits = xtr @ p["w"] + p["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, ytr).mean()
        return ce + l2 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def train(p: dict[str, Array]) -> dict[str, Array]:
        def step(carry, _):  # noqa: ANN001, ANN202
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
        return p

    params = train(params)
    predictions = np.asarray(jnp.argmax(xte @ params["w"] + params["b"], -1))
    return float(np.mean(predictions == test_y))


def statistics_probe(
    config: ml_collections.ConfigDict, evaluator: _Evaluator
) -> dict[str, float]:
    """Per norm layer (and all layers together): test accuracy of a linear
    classifier on each sample's per-channel input mean and std."""
    data = evaluator.task.data
    count = min(config.stats_train_images, len(data.train_labels))
    rows = np.random.default_rng(1).permutation(len(data.train_labels))[:count]
    train_images = np.asarray(
        cifar.standardize(
            jnp.asarray(data.train_images[rows]),
            evaluator.task.mean,
            evaluator.task.std,
        )
    )
    train_stats = _collect_statistics(evaluator, train_images)
    test_stats = _collect_statistics(evaluator, evaluator.test_x)
    train_y, test_y = data.train_labels[rows], evaluator.test_y
    out = {}
    for path in train_stats:
        out[path] = fit_linear_probe(
            train_stats[path],
            train_y,
            test_stats[path],
            test_y,
            steps=config.stats_steps,
            l2=config.stats_l2,
        )
    out["all layers"] = fit_linear_probe(
        np.concatenate(list(train_stats.values()), axis=1),
        train_y,
        np.concatenate(list(test_stats.values()), axis=1),
        test_y,
        steps=config.stats_steps,
        l2=config.stats_l2,
    )
    return out


# ---------------------------------------------------------------------- runs


@dataclasses.dataclass
class Study:
    config: ml_collections.ConfigDict
    workdir: pathlib.Path

    def run_dir(self, name: str) -> pathlib.Path:
        return self.workdir / "runs" / name

    def probe_dir(self, norm: str, seed: int) -> pathlib.Path:
        return self.run_dir(f"probe_{norm}_s{seed}")

    def sweep_dir(self, norm: str, batch_size: int, seed: int) -> pathlib.Path:
        return self.run_dir(f"sweep_{norm}_b{batch_size}_s{seed}")

    # Part 1 and 2 share the trained models.
    def probe_run(self, norm: str, seed: int, parts: set[str]) -> dict[str, Any]:
        workdir = self.probe_dir(norm, seed)
        path = workdir / "probe.json"
        done = _read_json(path) or {}
        want = {"sources"} if "probe" in parts else set()
        want |= {"statistics"} if "stats" in parts else set()
        if want <= set(done):
            return done
        print(f"[priors] CIFAR probe run: norm={norm} seed={seed}", flush=True)
        summary, model, task, state = cifar_experiment.train(
            _cifar_config(self.config, norm, seed), str(workdir)
        )
        evaluator = _Evaluator(model, task, jax.device_get(state.variables()))
        done["train_seconds"] = summary["wall_seconds"]
        if "probe" in parts and "sources" not in done:
            done["sources"] = probe_sources(self.config, evaluator, seed)
        if "stats" in parts and "statistics" not in done:
            done["statistics"] = statistics_probe(self.config, evaluator)
        _write_json(path, done)
        return done

    def sweep_run(self, norm: str, batch_size: int, seed: int) -> dict[str, Any]:
        workdir = self.sweep_dir(norm, batch_size, seed)
        path = workdir / "sweep.json"
        if path.exists():
            return _read_json(path)
        print(
            f"[priors] batch-size sweep run: norm={norm} batch={batch_size} "
            f"seed={seed}",
            flush=True,
        )
        c = self.config
        run = _cifar_config(c, norm, seed)
        run.batch_size = batch_size
        run.learning_rate = c.cifar.learning_rate * batch_size / c.sweep_base_batch_size
        run.num_epochs = c.sweep_epochs
        run.num_steps = None
        run.train_subset = c.sweep_train_subset
        run.log_every = max(1, min(run.log_every, 50))
        summary, model, task, state = cifar_experiment.train(run, str(workdir))
        evaluator = _Evaluator(model, task, jax.device_get(state.variables()))
        whole = cifar.eval_batches(
            len(evaluator.test_y), min(500, len(evaluator.test_y))
        )
        y = evaluator.test_y
        result = {
            "running": float(
                np.mean(evaluator.logits(whole, "running").argmax(-1) == y)
            )
        }
        if evaluator.variables.get("batch_stats"):
            precise = evaluator.precise_stats(c.precise_images, max(batch_size, 2))
            logits = evaluator.logits(whole, "precise", precise)
        else:
            logits = evaluator.logits(whole, "running")
        result["precise"] = float(np.mean(logits.argmax(-1) == y))
        result["train_seconds"] = summary["wall_seconds"]
        _write_json(path, result)
        return result

    def text_dir(
        self,
        variant: str,
        tokenizer: str,
        seed: int,
        *,
        max_len: int | None = None,
        batch_size: int | None = None,
    ) -> pathlib.Path:
        norm, _, causal = variant.partition(":")
        tags = [f"text_{norm}{'_' + causal if causal else ''}_{tokenizer}"]
        if max_len is not None:
            tags.append(f"L{max_len}")
        if batch_size is not None:
            tags.append(f"b{batch_size}")
        return self.run_dir("_".join([*tags, f"s{seed}"]))

    def text_run(
        self,
        variant: str,
        tokenizer: str,
        seed: int,
        *,
        max_len: int | None = None,
        batch_size: int | None = None,
    ) -> dict[str, Any]:
        norm, _, causal = variant.partition(":")
        workdir = self.text_dir(
            variant, tokenizer, seed, max_len=max_len, batch_size=batch_size
        )
        path = workdir / "summary.json"
        if path.exists():
            return _read_json(path)
        print(f"[priors] text run: {workdir.name}", flush=True)
        run = ml_collections.ConfigDict(self.config.text.to_dict())
        run.data_dir = self.config.data_dir
        run.norm, run.tokenizer, run.seed = norm, tokenizer, seed
        if causal:
            run.causal = causal
        if max_len is not None:
            run.max_len = max_len
        if batch_size is not None:
            run.batch_size = batch_size
        return text_experiment.run(run, str(workdir))


# -------------------------------------------------------------- the study


def _seeds(config: ml_collections.ConfigDict) -> list[int]:
    seeds = list(config.seeds)
    if not seeds:
        raise ValueError("config.seeds is empty; give at least one seed.")
    return seeds


def _machine() -> str:
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


def run_study(
    config: ml_collections.ConfigDict, workdir: str, command: str | None = None
) -> dict[str, Any]:
    """Runs the parts in ``config.parts`` (skipping finished runs), then rebuilds
    ``results.json``, ``results.md`` and the plots from every run on disk.
    ``command`` is recorded at the top of the results (default: this call)."""
    for name in [*config.probe_norms, *config.sweep_norms]:
        registry.entry(name)
    for variant in [*config.text_norms, *config.context_norms]:
        registry.entry(variant.partition(":")[0])
    parts = _parts(config)
    study = Study(config, pathlib.Path(workdir))
    study.workdir.mkdir(parents=True, exist_ok=True)
    seeds = _seeds(config)
    results: dict[str, Any] = {"probe": {}, "stats": {}, "sweep": {}, "text": {}}
    # Text runs (finished or not) by directory: reused runs count once.
    text_runs: dict[pathlib.Path, bool] = {}

    # 1-2.
    for norm in config.probe_norms:
        for seed in seeds:
            record = _run_or_read(
                study.probe_dir(norm, seed) / "probe.json",
                bool(parts & {"probe", "stats"}),
                study.probe_run,
                norm,
                seed,
                parts,
            )
            if not record:
                continue
            if "sources" in record:
                results["probe"].setdefault(norm, {})[seed] = record["sources"]
            if "statistics" in record:
                results["stats"].setdefault(norm, {})[seed] = record["statistics"]
    # 3-4.
    for norm in config.sweep_norms:
        for size in config.sweep_batch_sizes:
            for seed in seeds:
                record = _run_or_read(
                    study.sweep_dir(norm, size, seed) / "sweep.json",
                    "sweep" in parts,
                    study.sweep_run,
                    norm,
                    size,
                    seed,
                )
                if record:
                    results["sweep"].setdefault(norm, {}).setdefault(size, {})[seed] = (
                        record
                    )
    # 5. The longest runs (the context sweep) last.
    text_jobs = [
        ("tokenizer", variant, tokenizer, {})
        for variant in config.text_norms
        for tokenizer in config.text_tokenizers
    ]
    text_jobs += [
        ("small batch", variant, "byte", {"batch_size": config.text_small_batch_size})
        for variant in HEADLINE_TEXT_NORMS
        if variant in config.text_norms
    ]
    text_jobs += [  # shortest context first: a column is complete before the next
        ("context", variant, "byte", {"max_len": length})
        for length in sorted(config.context_lengths)
        for variant in config.context_norms
    ]
    for kind, variant, tokenizer, extra in text_jobs:
        # A context length or batch size equal to the text preset's is the
        # tokenizer comparison's run: reuse it.
        same = {k: v for k, v in extra.items() if config.text[k] == v}
        extra_run = {k: v for k, v in extra.items() if k not in same}
        for seed in seeds:
            run_dir = study.text_dir(variant, tokenizer, seed, **extra_run)
            summary = _run_or_read(
                run_dir / "summary.json",
                "text" in parts,
                study.text_run,
                variant,
                tokenizer,
                seed,
                **extra_run,
            )
            text_runs[run_dir] = bool(summary)
            if summary:
                key = _text_key(kind, variant, tokenizer, extra)
                results["text"].setdefault(key, {})[seed] = {
                    "val_bits_per_byte": summary["val_bits_per_byte"],
                    "val_bits_per_byte_batch": summary.get("val_bits_per_byte_batch"),
                }
    probe_done = sum(map(len, results["probe"].values()))
    sweep_done = sum(len(r) for n in results["sweep"].values() for r in n.values())
    sweep_planned = len(config.sweep_norms) * len(config.sweep_batch_sizes) * len(seeds)
    header = {
        "command": command or f"experiments.priors.run_study(config, {workdir!r})",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "machine": _machine(),
        "seeds": seeds,
        # Finished of planned runs per part, for the header of partial results.
        "finished_runs": {
            "probe": f"{probe_done}/{len(config.probe_norms) * len(seeds)}",
            "sweep": f"{sweep_done}/{sweep_planned}",
            "text": f"{sum(text_runs.values())}/{len(text_runs)}",
        },
    }
    out = {
        "header": header,
        "config": json.loads(config.to_json_best_effort()),
        **results,
    }
    _write_json(study.workdir / "results.json", out)
    write_markdown(out, config, study.workdir / "results.md")
    write_plots(out, config, study.workdir)
    return out


# ---------------------------------------------------------------- reporting


def _values(per_seed: dict[Any, Any], *keys: str) -> list[float]:
    out = []
    for record in per_seed.values():
        for key in keys:
            record = record.get(key) if isinstance(record, dict) else None
        if record is not None:
            out.append(float(record))
    return out


def _probe_columns(config: ml_collections.ConfigDict) -> list[str]:
    sizes = [f"batch {s}" for s in config.probe_batch_sizes]
    return ["running", "precise", *sizes, "class-homogeneous", "class-skewed"]


def _text_key(kind: str, variant: str, tokenizer: str, extra: dict[str, Any]) -> str:
    return f"{kind}|{variant}|{tokenizer}|{json.dumps(extra)}"


def _as_trained(variant: str) -> str:
    """The text evaluation that normalizes as training did: the running one for
    norms the registry lists as training on running statistics (power norm) and
    for causal='running', the evaluation batch's own causal statistics otherwise
    (the two are equal for per-sample norms)."""
    norm, _, causal = variant.partition(":")
    if registry.entry(norm).statistics == "running" or causal == "running":
        return "val_bits_per_byte"
    return "val_bits_per_byte_batch"


def _text_cell(per_seed: dict[Any, Any]) -> str:
    """'running (batch's causal statistics)' bits per byte, mean ± std."""
    running = _fmt(_values(per_seed, "val_bits_per_byte"), 1, 3)
    batch = _fmt(_values(per_seed, "val_bits_per_byte_batch"), 1, 3)
    return f"{running} ({batch})"


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
                _values(by_size.get(large, {}), "running"),
                _values(by_size.get(small, {}), "running"),
                100.0,
            )
        )
    for norm in HEADLINE_TEXT_NORMS:
        big = results["text"].get(_text_key("tokenizer", norm, "byte", {}), {})
        little = results["text"].get(
            _text_key(
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
                _values(big, _as_trained(norm)),
                _values(little, _as_trained(norm)),
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
    columns = _probe_columns(config)
    lines.append("| norm | kind | " + " | ".join(columns) + " | n |")
    lines.append("| --- | --- |" + " --- |" * (len(columns) + 1))
    for norm in config.probe_norms:
        per_seed = results["probe"].get(norm, {})
        cells = [_fmt(_values(per_seed, c, "accuracy"), 100) for c in columns]
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
        if per_seed and _is_per_sample(norm):
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
                cells = [_fmt(_values(per_seed, layer), 100, 1) for layer in layers]
                lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    lines += ["", "## 3-4. Batch-size sweep: running (precise) statistics", ""]
    sizes = list(config.sweep_batch_sizes)
    lines.append("| norm | " + " | ".join(f"B={s}" for s in sizes) + " |")
    lines.append("| --- |" + " --- |" * len(sizes))
    for norm in config.sweep_norms:
        by_size = {int(k): v for k, v in results["sweep"].get(norm, {}).items()}
        cells = [
            f"{_fmt(_values(by_size.get(s, {}), 'running'), 100, 1)} "
            f"({_fmt(_values(by_size.get(s, {}), 'precise'), 100, 1)})"
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
            cells.append(_fmt(gaps, 100, 1))
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
            per_seed = results["text"].get(_text_key("tokenizer", variant, t, {}), {})
            cells.append(_text_cell(per_seed))
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
                _text_key("context", variant, "byte", {"max_len": n}), {}
            )
            cells.append(_text_cell(per_seed))
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
            f"| {measure} | {norm} | {_fmt(big, scale, digits)} | "
            f"{_fmt(little, scale, digits)} |"
        )
    path.write_text("\n".join(lines) + "\n")


def _legend(ax: Any, **kwargs: Any) -> None:
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
            stats = [mean_std(_values(by_size[s], source)) for s in sizes]
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
    _legend(axes[1], fontsize=8)
    fig.tight_layout()
    fig.savefig(workdir / "sweep.png", dpi=100)

    columns = _probe_columns(config)
    fig = Figure(figsize=(11, 4))
    ax = fig.subplots()
    norms = [n for n in config.probe_norms if n in results["probe"]]
    width = 0.8 / max(len(columns), 1)
    for j, column in enumerate(columns):
        means = [
            100 * mean_std(_values(results["probe"][n], column, "accuracy"))[0]
            for n in norms
        ]
        ax.bar(np.arange(len(norms)) + j * width, means, width, label=column)
    ax.set_xticks(np.arange(len(norms)) + 0.4 - width / 2, norms)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy by statistics source")
    # Below the bars, one row: inside the axes it would cover them.
    _legend(
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
            [100 * mean_std(_values(per_seed, layer))[0] for layer in layers],
            marker="o",
            label=norm,
        )
    ax.axhline(10, color="gray", linestyle="--", label="chance")
    ax.set_ylabel("linear-probe accuracy (%)")
    ax.set_title("class information in per-sample input statistics")
    _legend(ax, fontsize=7)
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
                _values(
                    results["text"].get(_text_key("tokenizer", v, tok, {}), {}),
                    _as_trained(v),
                )
            )[0]
            for v in variants
        ]
        axes[0].bar(np.arange(len(variants)) + j * width, means, width, label=tok)
    axes[0].set_xticks(np.arange(len(variants)) + 0.4 - width / 2, variants, fontsize=7)
    # As trained: running statistics can be far off for causal batch norms
    # (results.md has both evaluations).
    axes[0].set_ylabel("validation bits per byte\n(statistics as in training)")
    _legend(axes[0])
    for variant in config.context_norms:
        lengths = list(config.context_lengths)
        means = [
            mean_std(
                _values(
                    results["text"].get(
                        _text_key("context", variant, "byte", {"max_len": n}), {}
                    ),
                    _as_trained(variant),
                )
            )[0]
            for n in lengths
        ]
        axes[1].plot(lengths, means, marker="o", label=variant)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("context length (bytes)")
    axes[1].set_ylabel("validation bits per byte (as in training)")
    axes[1].set_title("context-length sweep")
    _legend(axes[1])
    fig.tight_layout()
    fig.savefig(workdir / "text.png", dpi=100)


def main() -> None:
    """``python -m experiments.priors --config=...:quick --workdir=...``."""

    def run(config: ml_collections.ConfigDict, workdir: str) -> None:
        # The command without --config.parts: the parts are run (and the tables
        # rebuilt) by the same command with the parts named.
        args, argv = [], iter(sys.argv[1:])
        for arg in argv:
            if arg == "--config.parts":
                next(argv, None)  # its value, given as the next argument
            elif not arg.startswith("--config.parts="):
                args.append(arg)
        command = "python -m experiments.priors " + " ".join(args)
        run_study(config, workdir, command=command)
        print((pathlib.Path(workdir) / "results.md").read_text())

    common.run_with_flags("experiments/configs/priors.py:quick", run)


if __name__ == "__main__":
    main()
