"""The training loop shared by every experiment (CIFAR, text, priors).

Shaped like Flax's ImageNet example: ``train_and_evaluate(config, workdir, ...)``
with a pure, jitted ``train_step``; what differs between experiments (data, loss,
evaluation, artifacts) comes from a :class:`Task`.

Data parallel: the global batch is split over a 1-D ``data`` mesh of every device
(``jax.sharding``), parameters and statistics are replicated, and XLA inserts the
collectives — so batch statistics are those of the global batch, exactly as on
one device. Per-device or ghost statistics are a norm option
(``ghost_batch_size``), not a property of the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from normjax import calibrate
from normjax.functional import apply_nu_updates
from normjax.train.checkpoint import Checkpointer
from normjax.train.metrics import MetricsLog, progress_bar
from normjax.train.resume import check_config
from normjax.train.state import TrainState, create_train_state, make_optimizer

Array = jax.Array
Batch = dict[str, Any]


class Task(Protocol):
    """What an experiment supplies to the loop.

    ``train_batch(step)`` must be a pure function of the step (so a resumed run
    sees the same batches); ``model_inputs`` runs inside jit on the device
    (augmentation, masks); ``evaluate`` runs on the host with a
    ``calibrate.Evaluator`` (:func:`make_evaluator`).
    """

    def init_args(self) -> tuple[Any, ...]: ...

    def prepare_variables(self, variables: dict[str, Any]) -> dict[str, Any]: ...

    def train_batch(self, step: int) -> Batch: ...

    def model_inputs(
        self, batch: Batch, rng: Array, train: bool
    ) -> tuple[tuple[Any, ...], dict[str, Any]]: ...

    def loss(self, logits: Array, batch: Batch) -> tuple[Array, dict[str, Array]]: ...

    def evaluate(
        self, evaluator: calibrate.Evaluator, state: TrainState
    ) -> dict[str, float]: ...

    def finalize(
        self, evaluator: calibrate.Evaluator, state: TrainState, workdir: pathlib.Path
    ) -> dict[str, Any]: ...


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over every device (all hosts)."""
    # Auto axes: XLA decides the layouts and inserts the collectives (GSPMD), so
    # model code needs no sharding annotations.
    return jax.make_mesh(
        (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
    )


def shard_batch(batch: Batch, mesh: jax.sharding.Mesh) -> Batch:
    """Places the global batch on the ``data`` axis.

    Every host (process) passes the same global batch — tasks' batches are pure
    functions of the step and seed — and fills only the shards of its own
    devices, whatever order the mesh puts the hosts' devices in.
    """
    sharding = NamedSharding(mesh, P("data"))

    def put(x: Any) -> Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, batch)


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    devices = mesh.devices.size
    if batch_size % devices:
        raise ValueError(
            f"batch_size={batch_size} does not divide over {devices} devices; use a "
            f"multiple of {devices} (e.g. {math.ceil(batch_size / devices) * devices})."
        )


def make_evaluator(
    model: nn.Module, task: Task, mesh: jax.sharding.Mesh
) -> calibrate.Evaluator:
    """The task's evaluation path: ``evaluator(state.variables(), batch,
    source=...)`` runs ``task.model_inputs`` and the model (``train=False``)
    under jit, the batch placed on the mesh's ``data`` axis."""
    return calibrate.Evaluator(
        model,
        inputs=lambda batch: task.model_inputs(batch, jax.random.key(0), False),
        place_batch=functools.partial(shard_batch, mesh=mesh),
        train=False,
    )


def make_train_step(
    model: nn.Module, task: Task
) -> Callable[[TrainState, Batch, Array], tuple[TrainState, dict[str, Array]]]:
    """The pure training step: forward with batch statistics, backward, optimizer
    update, running statistics (and PowerNorm's backward-pass state) updated."""

    def train_step(
        state: TrainState, batch: Batch, rng: Array
    ) -> tuple[TrainState, dict[str, Array]]:
        args, kwargs = task.model_inputs(batch, rng, True)

        def loss_fn(params: Any, perturbations: Any) -> tuple[Array, Any]:
            variables = {**state.variables(), "params": params}
            if perturbations:
                variables["perturbations"] = perturbations
            logits, updates = model.apply(
                variables,
                *args,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": rng},
                **kwargs,
            )
            loss, metrics = task.loss(logits, batch)
            return loss, (updates, metrics)

        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (loss, (updates, metrics)), (grads, nu_increments) = grad_fn(
            state.params, state.perturbations
        )
        batch_stats = updates.get("batch_stats", state.batch_stats)
        if state.perturbations:
            batch_stats = apply_nu_updates(batch_stats, nu_increments)
        param_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + u, state.params, param_updates)
        metrics = {"loss": loss, **metrics}
        new_state = dataclasses.replace(
            state,
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        return new_state, metrics

    return train_step


def _num_params(params: Any) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    model: nn.Module,
    task: Task,
    *,
    return_state: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], TrainState]:
    """Trains ``model`` on ``task`` for ``config.num_steps``, resuming from the
    latest checkpoint in ``workdir``; writes ``config.json``, ``metrics.jsonl``,
    ``checkpoints/`` and ``summary.json``. Returns the summary, and the final
    ``TrainState`` too if ``return_state``. A finished run (its last checkpoint
    and ``summary.json`` written) is restored and returned as it was, without
    training and without touching its files: its summary keeps the wall time
    and throughput of the training that made it.

    A workdir holding a run made with another configuration is refused
    (:func:`normjax.train.resume.check_config`) unless ``resume='force'``.

    Config keys: ``seed``, ``batch_size``, ``num_steps``, optimizer keys (see
    ``make_optimizer``), ``log_every``, ``eval_every`` (0: only at the end),
    ``checkpoint_every``, ``keep_checkpoints``, ``progress`` (bool), ``resume``
    ('auto' or 'force').
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    forced = check_config(workdir, config)  # before anything is built or written
    primary = jax.process_index() == 0  # with several hosts, one writes files
    mesh = make_mesh()
    check_batch_size(config.batch_size, mesh)
    total_steps = int(config.num_steps)
    rng = jax.random.key(config.seed)
    tx = make_optimizer(config, total_steps)
    state = create_train_state(
        model,
        jax.random.fold_in(rng, 0),
        task.init_args(),
        tx,
        prepare_variables=task.prepare_variables,
        train=False,
    )
    log = MetricsLog(workdir, tensorboard=config.get("tensorboard", False))
    checkpointer = Checkpointer(
        workdir,
        every=config.get("checkpoint_every", 1000),
        keep=config.get("keep_checkpoints", 2),
    )
    start = checkpointer.latest_step()
    if start is not None:
        try:
            restored = checkpointer.restore(state.checkpoint())
        except Exception as error:  # orbax's tree mismatches come in many kinds
            checkpointer.close()
            raise ValueError(
                f"the checkpoint at step {start} in {checkpointer.directory} could "
                "not be restored into this model and optimizer — most likely it "
                "does not fit them (another architecture, norm or optimizer made "
                "it), else it is damaged. Use a new --workdir for this "
                f"configuration. ({type(error).__name__}: {str(error)[:300]})"
            ) from error
        state = state.restore(restored)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(state, replicated)
    summary_path = workdir / "summary.json"
    if start == total_steps and summary_path.exists():
        checkpointer.close()
        summary = json.loads(summary_path.read_text())
        return (summary, state) if return_state else summary
    if forced and primary:
        print(
            f"[train] resume=force: continuing the run in {workdir} with a changed "
            "configuration; config.json now holds the new one.",
            flush=True,
        )
    if primary:
        (workdir / "config.json").write_text(
            config.to_json_best_effort(indent=2) + "\n"
        )
    if start is not None:
        log.truncate_after(start)
    else:
        log.truncate_after(-1)
        start = 0
    train_step = jax.jit(make_train_step(model, task), donate_argnums=(0,))
    evaluator = make_evaluator(model, task, mesh)
    step_rng = jax.random.fold_in(rng, 1)

    log_every = config.get("log_every", 50)
    eval_every = config.get("eval_every", 0)
    bar = progress_bar(total_steps, start, disable=not config.get("progress", True))
    pending: list[dict[str, Array]] = []
    # Throughput counts the steps after the first logged interval (which holds
    # compilation) and leaves out time spent evaluating and checkpointing.
    timer_start, timed_steps, excluded = None, 0, 0.0
    started = time.time()
    throughput = float("nan")

    def rate() -> float:
        if timer_start is None or not timed_steps:
            return float("nan")
        return timed_steps * config.batch_size / (time.time() - timer_start - excluded)

    try:
        for step in range(start, total_steps):
            batch = shard_batch(task.train_batch(step), mesh)
            state, metrics = train_step(
                state, batch, jax.random.fold_in(step_rng, step)
            )
            pending.append(metrics)
            done = step + 1
            if timer_start is not None:
                timed_steps += 1
            if done % log_every == 0 or done == total_steps:
                means = jax.tree.map(lambda *m: float(jnp.mean(jnp.stack(m))), *pending)
                pending = []
                if timer_start is None:
                    timer_start = time.time()
                speed = rate()  # none over the first interval (compilation)
                timed = {} if math.isnan(speed) else {"examples_per_second": speed}
                log.write(done, "train", **timed, **means)
                if not math.isfinite(means["loss"]):
                    raise FloatingPointError(
                        f"training diverged: the mean loss of the steps up to {done} "
                        f"is {means['loss']} (norm {config.get('norm', '?')!r}, "
                        f"learning rate {config.get('learning_rate', '?')}); see "
                        f"{log.path}. Lower the learning rate or change the norm, "
                        "in a new --workdir (the latest checkpoint here may hold "
                        "the diverged state)."
                    )
                bar.set_postfix(loss=f"{means['loss']:.3f}", ex_s=f"{rate():.0f}")
            bar.update(1)
            paused = time.time()
            if eval_every and done % eval_every == 0 and done != total_steps:
                log.write(done, "test", **task.evaluate(evaluator, state))
            checkpointer.save(done, state.checkpoint())
            if timer_start is not None:
                excluded += time.time() - paused
        throughput = rate()
        if checkpointer.latest_step() != total_steps:
            checkpointer.save(total_steps, state.checkpoint(), force=True)
    finally:  # an interrupted run still completes the checkpoints it started.
        bar.close()
        checkpointer.close()
        log.close()
    last_eval = log.write(total_steps, "test", **task.evaluate(evaluator, state))
    log.close()
    extra = task.finalize(evaluator, state, workdir)
    summary = {
        "final_step": total_steps,
        **{k: v for k, v in last_eval.items() if k not in ("step", "split")},
        **extra,
        "wall_seconds": time.time() - started,
        "examples_per_second": None if math.isnan(throughput) else throughput,
        "num_params": _num_params(state.params),
        "devices": mesh.devices.size,
    }
    if primary:
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return (summary, state) if return_state else summary
