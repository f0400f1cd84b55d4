"""What every experiment module shares: its command line and its norm options."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from normjax import registry


def norm_fields(norm: str) -> set[str]:
    """The constructor fields of the registered norm's module (an unknown name
    lists the valid ones)."""
    return {f.name for f in dataclasses.fields(registry.entry(norm).module)}


def norm_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config.norm_kwargs``, plus ``config.norm_momentum`` as the norm's
    running-statistics momentum when it keeps running statistics."""
    kwargs = dict(config.norm_kwargs)
    if config.norm_momentum is not None and "momentum" in norm_fields(config.norm):
        kwargs.setdefault("momentum", config.norm_momentum)
    return kwargs


def run_with_flags(
    default_config: str, run: Callable[[ml_collections.ConfigDict, str], Any]
) -> None:
    """``--config=FILE:PRESET`` (with ``--config.KEY=VALUE`` overrides) and a
    required ``--workdir``, then ``run(config, workdir)`` under absl.

    ``--distributed`` first calls ``jax.distributed.initialize()`` (several hosts:
    run the same command on each; on Cloud TPU, SLURM, Open MPI and Kubernetes the
    peers are found automatically, elsewhere add ``--coordinator_address=HOST:PORT
    --num_processes=N --process_id=I``)."""
    config = config_flags.DEFINE_config_file(
        "config", default_config, "Experiment configuration."
    )
    workdir = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
    distributed = flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize() first (multi-host training).",
    )
    coordinator = flags.DEFINE_string(
        "coordinator_address", None, "With --distributed: process 0's HOST:PORT."
    )
    processes = flags.DEFINE_integer(
        "num_processes", None, "With --distributed: the number of processes."
    )
    process_id = flags.DEFINE_integer(
        "process_id", None, "With --distributed: this process's index."
    )

    def main(argv: list[str]) -> None:
        del argv
        if distributed.value:
            jax.distributed.initialize(
                coordinator_address=coordinator.value,
                num_processes=processes.value,
                process_id=process_id.value,
            )
        elif coordinator.value or processes.value or process_id.value is not None:
            raise app.UsageError(
                "--coordinator_address/--num_processes/--process_id need --distributed."
            )
        run(config.value, workdir.value)

    app.run(main)
