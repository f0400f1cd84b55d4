"""A tiny synthetic classification task for the training-loop tests."""

from __future__ import annotations

import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import normjax


class Net(nn.Module):
    """Dense -> norm -> relu -> Dense, the norm by registry name."""

    norm: str = "batch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(16)(x)
        x = normjax.make_norm(self.norm)(x[:, None, :], use_running_average=not train)
        return nn.Dense(3)(nn.relu(x[:, 0]))


class SyntheticTask:
    """Three Gaussian classes in 8 dimensions; batches are a pure function of the
    step, as the loop requires."""

    def __init__(self, config: ml_collections.ConfigDict, crash_at: int | None = None):
        self.config = config
        self.crash_at = crash_at
        rng = np.random.default_rng(0)
        self.centres = rng.normal(size=(3, 8)).astype(np.float32) * 2

    def _batch(self, seed: int, size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 3, size=size).astype(np.int32)
        x = self.centres[labels] + rng.normal(size=(size, 8)).astype(np.float32)
        return {"x": x, "label": labels}

    def init_args(self) -> tuple[Any, ...]:
        return (jnp.zeros((2, 8)),)

    def prepare_variables(self, variables: dict[str, Any]) -> dict[str, Any]:
        return variables

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        if step == self.crash_at:
            raise KeyboardInterrupt(f"simulated kill at step {step}")
        return self._batch(1000 + step, self.config.batch_size)

    def model_inputs(self, batch, rng, train):
        return (batch["x"],), {}

    def loss(self, logits, batch):
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss.mean(), {"accuracy": accuracy}

    def evaluate(self, evaluator, state) -> dict[str, float]:
        batch = self._batch(7, 64)
        logits = evaluator(state.variables(), batch)
        return {
            "test_accuracy": float(jnp.mean(jnp.argmax(logits, -1) == batch["label"]))
        }

    def finalize(self, evaluator, state, workdir: pathlib.Path) -> dict[str, Any]:
        return {"finalized": True}


def config(**overrides: Any) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(
        {
            "seed": 0,
            "batch_size": 16,
            "num_steps": 8,
            "optimizer": "sgd",
            "learning_rate": 0.1,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 1e-4,
            "schedule": "linear",
            "warmup_steps": 2,
            "log_every": 1,
            "eval_every": 4,
            "checkpoint_every": 2,
            "keep_checkpoints": 2,
            "progress": False,
        }
    )
    c.update(overrides)
    return c
