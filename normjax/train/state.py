"""Train state (params, batch_stats, other collections, optimizer) and optax setup."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes, as in Flax's ImageNet example.

    ``batch_stats`` holds running statistics; ``constants`` every other
    non-trainable collection of the model (e.g. a frozen whitening stem);
    ``perturbations`` the zero template of Flax's 'perturbations' collection,
    through whose gradients PowerNorm returns its backward-pass state.
    """

    step: Array
    params: Any
    batch_stats: Any
    constants: Any
    perturbations: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    def variables(self) -> dict[str, Any]:
        """The model's variables for ``apply`` (without perturbations)."""
        return {
            "params": self.params,
            "batch_stats": self.batch_stats,
            **self.constants,
        }

    def checkpoint(self) -> dict[str, Any]:
        """The arrays a checkpoint holds."""
        return {
            "step": self.step,
            "params": self.params,
            "batch_stats": self.batch_stats,
            "constants": self.constants,
            "opt_state": self.opt_state,
        }

    def restore(self, saved: dict[str, Any]) -> TrainState:
        """This state with the arrays of a checkpoint."""
        return dataclasses.replace(self, **saved)


def make_schedule(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.Schedule:
    """Learning-rate schedule from ``config.schedule``:

    'constant'; 'linear' (warm-up from ``warmup_from`` x lr, then linear decay to
    ``final_lr_fraction`` x lr at ``total_steps``; ``warmup_steps`` < 1 is a
    fraction of the run);
    'cosine' (warm-up then cosine decay to ``final_lr_fraction`` x lr);
    'piecewise' (``config.boundaries`` steps, each multiplying by
    ``config.decay_factor``, e.g. He et al.'s /10 at 32k, 48k; a boundary
    below 1 is a fraction of the run, e.g. (0.5, 0.75) for a run of any
    length).
    """
    lr = config.learning_rate
    warmup = config.get("warmup_steps", 0)
    warmup = int(warmup * total_steps) if 0 < warmup < 1 else int(warmup)
    name = config.get("schedule", "constant")
    final = lr * config.get("final_lr_fraction", 0.0)
    if name == "constant":
        main = optax.constant_schedule(lr)
    elif name == "linear":
        main = optax.linear_schedule(lr, final, max(total_steps - warmup, 1))
    elif name == "cosine":
        main = optax.cosine_decay_schedule(
            lr, max(total_steps - warmup, 1), alpha=config.get("final_lr_fraction", 0.0)
        )
    elif name == "piecewise":
        factor = config.get("decay_factor", 0.1)
        scales: dict[int, float] = {}
        for b in config.boundaries:  # two boundaries on one step decay twice
            step = (int(b * total_steps) if 0 < b < 1 else int(b)) - warmup
            scales[step] = scales.get(step, 1.0) * factor
        main = optax.piecewise_constant_schedule(lr, scales)
    else:
        raise ValueError(
            f"unknown schedule {name!r}; use constant, linear, cosine or piecewise."
        )
    if not warmup:
        return main
    start = lr * config.get("warmup_from", 0.0)
    return optax.join_schedules(
        [optax.linear_schedule(start, lr, warmup), main], boundaries=[warmup]
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on kernels (ndim > 1) only: not on biases, norm scales, priors."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """``config.optimizer`` 'sgd' (``momentum``, ``nesterov``) or 'adamw' (``b1``,
    ``b2``), with ``weight_decay`` on kernels and optional ``grad_clip``.

    ``vector_lr_scale`` multiplies the learning rate of every 1-D parameter
    (biases, norm scales and shifts) — airbench's large bias learning rate.
    """
    scale = config.get("vector_lr_scale", 1.0)
    if scale != 1.0:
        main = _make_optimizer(config, make_schedule(config, total_steps))
        vectors = _make_optimizer(
            config, lambda step: scale * make_schedule(config, total_steps)(step)
        )
        return optax.multi_transform(
            {"kernel": main, "vector": vectors},
            lambda params: jax.tree.map(
                lambda p: "kernel" if p.ndim > 1 else "vector", params
            ),
        )
    return _make_optimizer(config, make_schedule(config, total_steps))


def _make_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    parts = []
    if config.get("grad_clip"):
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    name = config.get("optimizer", "sgd")
    decay = config.get("weight_decay", 0.0)
    if name == "sgd":
        if decay:
            parts.append(optax.add_decayed_weights(decay, mask=_decay_mask))
        parts.append(
            optax.sgd(
                schedule,
                momentum=config.get("momentum", 0.9) or None,
                nesterov=config.get("nesterov", False),
            )
        )
    elif name == "adamw":
        parts.append(
            optax.adamw(
                schedule,
                b1=config.get("b1", 0.9),
                b2=config.get("b2", 0.999),
                weight_decay=decay,
                mask=_decay_mask,
            )
        )
    else:
        raise ValueError(f"unknown optimizer {name!r}; use sgd or adamw.")
    return optax.chain(*parts)


def create_train_state(
    model: nn.Module,
    rng: Array,
    init_args: tuple[Any, ...],
    tx: optax.GradientTransformation,
    *,
    prepare_variables: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **init_kwargs: Any,
) -> TrainState:
    """Initializes the model (``model.init(rng, *init_args, **init_kwargs)``) and
    the optimizer. ``prepare_variables`` may fill non-trainable collections
    (e.g. whitening filters computed from data) before training starts."""
    variables = dict(model.init(rng, *init_args, **init_kwargs))
    if prepare_variables is not None:
        variables = dict(prepare_variables(variables))
    params = variables.pop("params")
    batch_stats = variables.pop("batch_stats", {})
    perturbations = variables.pop("perturbations", {})
    variables.pop("moments", None)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        constants=variables,
        perturbations=jax.tree.map(jnp.zeros_like, perturbations),
        opt_state=tx.init(params),
        tx=tx,
    )
