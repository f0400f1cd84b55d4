r"""Train a CNN on CIFAR-10 with any registered norm.

    python -m experiments.cifar --config=experiments/configs/cifar.py:quick \
        --config.norm=layer --workdir=runs/cifar_ln

Writes to the workdir: config.json, metrics.jsonl, checkpoints/, summary.json
(final test accuracy with running statistics and with current-batch statistics,
wall time, examples/s, parameter count) and curves.png.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import common
from normjax import calibrate, models, registry
from normjax import nn as norms
from normjax.data import augment, cifar, samplers
from normjax.train import TrainState, train_and_evaluate
from normjax.train.plots import plot_curves

Array = jax.Array


def _whiten(variables: dict[str, Any], images: Array) -> dict[str, Any]:
    return models.init_whitening(variables, images)


def _unchanged(variables: dict[str, Any], images: Array) -> dict[str, Any]:
    return variables


def build_model(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """The model named by ``config.model`` (its norm by ``config.norm``) and the
    function that prepares its non-trainable variables from training images."""
    norm_kwargs = common.norm_kwargs(config)
    ghost = config.ghost_batch_size
    if config.per_device_batch_stats:  # each device's shard is one ghost batch
        ghost = config.batch_size // jax.device_count()
    if ghost is not None:
        if "ghost_batch_size" not in common.norm_fields(config.norm):
            raise ValueError(
                f"norm {config.norm!r} has no per-device or ghost batch statistics; "
                "use a batch norm ('batch') or unset ghost_batch_size and "
                "per_device_batch_stats."
            )
        norm_kwargs.setdefault("ghost_batch_size", ghost)
    registry.make_norm(config.norm, **norm_kwargs)  # a wrong option, named, now
    conv, pool = models.backend_layers(layers=config.layers)
    if config.weight_norm:
        conv = models.weight_normed(conv)
    builders = {
        "fast_cnn": lambda: (
            models.FastCNN(
                widths=tuple(config.widths),
                num_classes=10,
                norm=config.norm,
                norm_kwargs=norm_kwargs,
                conv=conv,
                pool=pool,
            ),
            _whiten,
        ),
        "resnet": lambda: (
            models.ResNet(
                depth=config.depth,
                width=config.width,
                num_classes=10,
                norm=config.norm,
                norm_kwargs=norm_kwargs,
                zero_init_residual=config.zero_init_residual,
                conv=conv,
            ),
            _unchanged,
        ),
    }
    if config.model not in builders:
        raise ValueError(
            f"unknown model {config.model!r}; use one of {', '.join(builders)}."
        )
    model, prepare = builders[config.model]()
    if registry.needs_reference(config.norm):
        # R: the first reference_size of the training images init is given.
        model = norms.WithReference(model, reference_size=config.reference_size)
    return model, prepare


@functools.lru_cache(maxsize=2)
def load_data(
    data_dir: str | None,
    train_subset: int | None,
    test_subset: int | None,
    download: bool,
    cache_dir: str | None = None,
) -> cifar.Cifar10:
    """``cifar.load_cifar10``, kept: a study training many models in one process
    reads the dataset once (the arrays are never written to)."""
    return cifar.load_cifar10(
        data_dir,
        train_subset=train_subset,
        test_subset=test_subset,
        download=download,
        cache_dir=cache_dir,
    )


def holdout_split(data: cifar.Cifar10, count: int) -> cifar.Cifar10:
    """``data`` with ``count`` training images held out as its test set (for
    choosing hyperparameters without the test split): the last ``count`` of a
    fixed permutation, the same for every seed and norm. The standardization
    constants stay those of the whole training split."""
    n = len(data.train_labels)
    if not 0 < count < n:
        raise ValueError(
            f"holdout={count} must be between 1 and {n - 1}, the training images "
            "less one (0 evaluates on the test split)."
        )
    order = np.random.default_rng(0).permutation(n)
    train, held = np.sort(order[:-count]), np.sort(order[-count:])
    return dataclasses.replace(
        data,
        train_images=data.train_images[train],
        train_labels=data.train_labels[train],
        test_images=data.train_images[held],
        test_labels=data.train_labels[held],
    )


class CifarTask:
    """CIFAR-10 classification for ``normjax.train.train_and_evaluate``."""

    def __init__(
        self, config: ml_collections.ConfigDict, prepare: Any = _unchanged
    ) -> None:
        self.config = config
        self.prepare = prepare
        self.data = load_data(
            config.data_dir,
            config.train_subset,
            config.test_subset,
            config.download,
            config.get("cache_dir"),
        )
        if config.holdout:
            self.data = holdout_split(self.data, config.holdout)
        n = len(self.data.train_labels)
        if config.batch_size > n:
            raise ValueError(
                f"batch_size={config.batch_size} exceeds the {n} training images."
            )
        self.steps_per_epoch = n // config.batch_size
        if config.num_steps is None:
            config.num_steps = max(1, round(config.num_epochs * self.steps_per_epoch))
        self.mean = jnp.asarray(self.data.mean)
        self.std = jnp.asarray(self.data.std)

    # ----------------------------------------------------------------- Task API

    def _standardized(self, count: int) -> Array:
        images = jnp.asarray(self.data.train_images[:count])
        return cifar.standardize_images(images, self.mean, self.std)

    def init_args(self) -> tuple[Any, ...]:
        # Real images: a whitening stem computes its filters from them at init.
        return (self._standardized(256),)

    def prepare_variables(self, variables: dict[str, Any]) -> dict[str, Any]:
        return self.prepare(variables, self._standardized(5000))

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one task per run
    def _epoch_batches(self, epoch: int) -> np.ndarray:
        return samplers.batch_indices(
            self.config.seed,
            epoch,
            len(self.data.train_labels),
            self.config.batch_size,
        )

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, index = divmod(step, self.steps_per_epoch)
        rows = self._epoch_batches(epoch)[index]
        return {
            "image": self.data.train_images[rows],
            "label": self.data.train_labels[rows],
        }

    def model_inputs(
        self, batch: dict[str, Array], rng: Array, train: bool
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        images = batch["image"]
        if train and self.config.augment:
            images = augment.augment(rng, images)
        return (cifar.standardize_images(images, self.mean, self.std),), {}

    def loss(
        self, logits: Array, batch: dict[str, Array]
    ) -> tuple[Array, dict[str, Array]]:
        labels = jax.nn.one_hot(batch["label"], logits.shape[-1])
        if self.config.label_smoothing:
            labels = optax.smooth_labels(labels, self.config.label_smoothing)
        loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"accuracy": accuracy}

    def evaluate(
        self, evaluator: calibrate.Evaluator, state: TrainState
    ) -> dict[str, float]:
        """Test accuracy and loss with each statistics source in
        ``config.eval_sources`` (suffixes name all but the first), and with
        horizontal-flip test-time augmentation for the first source."""
        images, labels = self.data.test_images, self.data.test_labels
        size = self.config.eval_batch_size
        if len(labels) % size or size % jax.device_count():
            raise ValueError(
                f"eval_batch_size={size} must divide the {len(labels)} test images "
                f"and be a multiple of the {jax.device_count()} devices."
            )
        variables = state.variables()

        def test_logits(source: str, flip: bool = False) -> np.ndarray:
            return np.concatenate(
                [
                    np.asarray(
                        evaluator(
                            variables,
                            {
                                "image": images[s : s + size, :, ::-1]
                                if flip
                                else images[s : s + size]
                            },
                            source=source,
                            example_weight=1.0 / self.config.batch_size,
                        ),
                        np.float32,
                    )
                    for s in range(0, len(labels), size)
                ]
            )

        out = {}
        for i, source in enumerate(self.config.eval_sources):
            logits = test_logits(source)
            suffix = "" if i == 0 else f"_{source}"
            out[f"test_accuracy{suffix}"] = float(np.mean(logits.argmax(-1) == labels))
            log_probs = jax.nn.log_softmax(logits)
            out[f"test_loss{suffix}"] = float(
                -np.mean(np.take_along_axis(np.asarray(log_probs), labels[:, None], 1))
            )
            if i == 0 and self.config.flip_test:
                both = logits + test_logits(source, flip=True)
                out["test_accuracy_flip"] = float(np.mean(both.argmax(-1) == labels))
        return out

    def finalize(
        self, evaluator: calibrate.Evaluator, state: TrainState, workdir: pathlib.Path
    ) -> dict[str, Any]:
        plot_curves(workdir / "metrics.jsonl", workdir / "curves.png")
        return {
            "norm": self.config.norm,
            "model": self.config.model,
            **common.mix_summary(state.params),
        }


def train(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[dict[str, Any], Any, CifarTask, TrainState]:
    """Builds the model and task and trains (or resumes, or restores a finished
    run); returns the summary, the model, the task and the final state."""
    model, prepare = build_model(config)
    task = CifarTask(config, prepare)
    summary, state = train_and_evaluate(config, workdir, model, task, return_state=True)
    return summary, model, task, state


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Builds the model and task and trains; returns the summary."""
    return train(config, workdir)[0]


def main() -> None:
    """``python -m experiments.cifar --config=...:quick --workdir=...``."""
    common.run_with_flags(
        "cifar",
        lambda config, workdir: print(json.dumps(run(config, workdir), indent=2)),
    )


if __name__ == "__main__":
    main()
