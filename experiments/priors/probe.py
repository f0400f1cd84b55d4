"""The statistics probe (part 2): how much class information each sample's
per-channel input statistics carry at every norm layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from normjax import registry
from normjax.data import cifar

if TYPE_CHECKING:
    from experiments.priors.cifar_eval import TestSet

Array = jax.Array


def norm_types() -> tuple[type, ...]:
    return tuple({registry.entry(name).module for name in registry.names()})


def norm_input_statistics(
    model: nn.Module, variables: dict[str, Any], images: Array
) -> dict[str, tuple[Array, Array]]:
    """{norm layer path: (per-sample per-channel mean, std) of its input}, each
    (N, C), from one evaluation-mode pass (statistics over the spatial axes)."""
    captured: dict[str, tuple[Array, Array]] = {}
    types = norm_types()

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


def collect_statistics(
    test_set: TestSet, images: np.ndarray, batch_size: int = 500
) -> dict[str, np.ndarray]:
    fn = jax.jit(
        lambda v, x: norm_input_statistics(test_set.model, v, x),
    )
    parts: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(images), batch_size):
        for path, (mean, std) in fn(
            test_set.variables, images[s : s + batch_size]
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
    config: ml_collections.ConfigDict, test_set: TestSet
) -> dict[str, float]:
    """Per norm layer (and all layers together): test accuracy of a linear
    classifier on each sample's per-channel input mean and std."""
    data = test_set.task.data
    count = min(config.stats_train_images, len(data.train_labels))
    rows = np.random.default_rng(1).permutation(len(data.train_labels))[:count]
    train_images = np.asarray(
        cifar.standardize_images(
            jnp.asarray(data.train_images[rows]),
            test_set.task.mean,
            test_set.task.std,
        )
    )
    train_stats = collect_statistics(test_set, train_images)
    test_stats = collect_statistics(test_set, test_set.test_x)
    train_y, test_y = data.train_labels[rows], test_set.test_y
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
