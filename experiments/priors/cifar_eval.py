"""CIFAR-10 evaluation per statistics source (part 1), and the CIFAR runs of
parts 1-3."""

from __future__ import annotations

import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import cifar as cifar_experiment
from experiments.priors.probe import statistics_probe
from experiments.priors.runs import (
    Study,
    cifar_config,
    read_json,
    train_for_epochs,
    write_json,
)
from normjax import calibrate
from normjax.data import augment, cifar, samplers


def _call(model: nn.Module, images: jax.Array, mask: jax.Array) -> jax.Array:
    """The model in evaluation mode on a padded batch."""
    return model(images, train=False, mask=mask)


class TestSet:
    """One trained CIFAR model on the test set, evaluated through
    ``calibrate.Evaluator`` under each statistics source."""

    def __init__(self, model: nn.Module, task: Any, variables: dict[str, Any]):
        self.model, self.task, self.variables = model, task, variables
        data = task.data
        self.test_x = np.asarray(
            cifar.standardize_images(jnp.asarray(data.test_images), task.mean, task.std)
        )
        self.test_y = data.test_labels
        self.evaluator = calibrate.Evaluator(model, method=_call)

    def logits(
        self, batches: samplers.Batches, source: str, precise: Any = None
    ) -> np.ndarray:
        """Logits for every test image, each once, from its slot in ``batches``."""
        out = np.zeros((len(self.test_y), 10), np.float32)
        for idx, mask in zip(batches.indices, batches.mask, strict=True):
            logits = self.evaluator(
                self.variables,
                (self.test_x[idx], mask),
                source=source,
                precise_stats=precise,
            )
            out[idx[mask]] = np.asarray(logits)[mask]
        return out

    def precise_stats(
        self, count: int, batch_size: int, *, augmented: bool = False
    ) -> Any:
        """Precise statistics over ``count`` training images in batches of
        ``batch_size``; ``augmented``: the images cropped and flipped as training
        saw them (a fixed draw)."""
        data = self.task.data
        count = min(count, len(data.train_labels))
        batch_size = min(batch_size, count)
        order = np.random.default_rng(0).permutation(len(data.train_labels))[:count]
        key = jax.random.key(0)

        def batches():
            for i, s in enumerate(range(0, count - batch_size + 1, batch_size)):
                rows = order[s : s + batch_size]
                images = jnp.asarray(data.train_images[rows])
                if augmented:
                    images = augment.augment(jax.random.fold_in(key, i), images)
                x = cifar.standardize_images(images, self.task.mean, self.task.std)
                yield (x, jnp.ones(len(rows), bool))

        with warnings.catch_warnings():
            # Expected: bln's feature pair and batch_renorm's step counter are not
            # population moments and keep their running values.
            warnings.filterwarnings("ignore", message="precise statistics left")
            return calibrate.precise_batch_stats(
                self.model,
                self.variables,
                batches(),
                method=_call,
            )


def probe_sources(
    config: ml_collections.ConfigDict, test_set: TestSet, seed: int
) -> dict[str, dict[str, float]]:
    """Accuracy (and the largest logit change against running statistics) under
    every statistics source of part 1."""
    y = test_set.test_y
    n = len(y)
    whole = samplers.eval_batches(n, min(n, 500))
    results: dict[str, dict[str, float]] = {}
    running = test_set.logits(whole, "running")

    def record(name: str, logits: np.ndarray) -> None:
        results[name] = {
            "accuracy": float(np.mean(logits.argmax(-1) == y)),
            "max_logit_change": float(np.max(np.abs(logits - running))),
        }

    record("running", running)
    has_stats = bool(test_set.variables.get("batch_stats"))
    if has_stats:
        precise = test_set.precise_stats(
            config.precise_images, config.precise_batch_size
        )
        record("precise", test_set.logits(whole, "precise", precise))
    else:  # nothing to recompute: precise statistics are the running ones
        record("precise", test_set.logits(whole, "running"))
    order = np.random.default_rng([seed, 1]).permutation(n)
    for size in config.probe_batch_sizes:
        b = samplers.eval_batches(n, size)
        shuffled = samplers.Batches(order[b.indices], b.mask, b.batch_class)
        record(f"batch {size}", test_set.logits(shuffled, "batch"))
    size = config.class_batch_size
    record(
        "class-homogeneous",
        test_set.logits(
            samplers.class_homogeneous_eval_batches(y, size, seed=seed), "batch"
        ),
    )
    record(
        "class-skewed",
        test_set.logits(
            samplers.class_skewed_eval_batches(
                y, size, fraction=config.skew_fraction, seed=seed
            ),
            "batch",
        ),
    )
    return results


def probe_run(study: Study, norm: str, seed: int, parts: set[str]) -> dict[str, Any]:
    """Parts 1 and 2 on one trained model (they share it): its accuracy under
    every statistics source, and the statistics probe."""
    workdir = study.probe_dir(norm, seed)
    path = workdir / "probe.json"
    done = read_json(path) or {}
    want = {"sources"} if "probe" in parts else set()
    want |= {"statistics"} if "stats" in parts else set()
    if want <= set(done):
        return done
    print(f"[priors] CIFAR probe run: norm={norm} seed={seed}", flush=True)
    summary, model, task, state = cifar_experiment.train(
        cifar_config(study.config, norm, seed), str(workdir)
    )
    test_set = TestSet(model, task, jax.device_get(state.variables()))
    done["train_seconds"] = summary["wall_seconds"]
    if "probe" in parts and "sources" not in done:
        done["sources"] = probe_sources(study.config, test_set, seed)
    if "stats" in parts and "statistics" not in done:
        done["statistics"] = statistics_probe(study.config, test_set)
    write_json(path, done)
    return done


def sweep_run(study: Study, norm: str, batch_size: int, seed: int) -> dict[str, Any]:
    """Part 3: one model trained at ``batch_size`` (learning rate scaled with
    it), its test accuracy with running and with precise statistics."""
    workdir = study.sweep_dir(norm, batch_size, seed)
    path = workdir / "sweep.json"
    if path.exists():
        return read_json(path)
    print(
        f"[priors] batch-size sweep run: norm={norm} batch={batch_size} seed={seed}",
        flush=True,
    )
    c = study.config
    run = cifar_config(c, norm, seed)
    run.batch_size = batch_size
    run.learning_rate = c.cifar.learning_rate * batch_size / c.sweep_base_batch_size
    train_for_epochs(run, c.sweep_epochs)
    run.train_subset = c.sweep_train_subset
    run.log_every = max(1, min(run.log_every, 50))
    summary, model, task, state = cifar_experiment.train(run, str(workdir))
    test_set = TestSet(model, task, jax.device_get(state.variables()))
    whole = samplers.eval_batches(len(test_set.test_y), min(500, len(test_set.test_y)))
    y = test_set.test_y
    result = {
        "running": float(np.mean(test_set.logits(whole, "running").argmax(-1) == y))
    }
    if test_set.variables.get("batch_stats"):
        precise = test_set.precise_stats(c.precise_images, max(batch_size, 2))
        logits = test_set.logits(whole, "precise", precise)
    else:
        logits = test_set.logits(whole, "running")
    result["precise"] = float(np.mean(logits.argmax(-1) == y))
    result["train_seconds"] = summary["wall_seconds"]
    write_json(path, result)
    return result
