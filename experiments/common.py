"""What every experiment module shares: its command line and its norm options."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from experiments import configs
from normjax import nn as norms
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


def check_overrides(flag: flags.Flag) -> None:
    """Every ``--config.KEY=VALUE`` must name a key of the preset, except the
    options under a ``norm_kwargs`` (any option of the chosen norm); a typo is a
    usage error naming the closest keys, not a key silently added."""
    filename = config_flags.get_config_filename(flag)
    parser = config_flags.config_flags.ConfigFileFlagParser(name="config")
    reference = parser.parse(filename)
    known = set(_flat_keys(reference))
    for path in config_flags.get_override_values(flag):
        parent, _, _ = path.rpartition(".")
        norm_option = parent.rpartition(".")[2] == "norm_kwargs" and parent in known
        if path in known or norm_option:
            continue
        close = difflib.get_close_matches(path, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise app.UsageError(
            f"--config.{path}: {filename} has no key {path!r}.{hint} (Options of "
            "the norm go under --config.norm_kwargs.NAME=VALUE.)"
        )


def _flat_keys(tree: Any, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            keys += _flat_keys(value, f"{prefix}{key}.")
    return keys


def run_with_flags(
    experiment: str, run: Callable[[ml_collections.ConfigDict, str], Any]
) -> None:
    """``--config=FILE:PRESET`` (with ``--config.KEY=VALUE`` overrides) and a
    required ``--workdir``, then ``run(config, workdir)`` under absl.

    ``experiment`` names the configuration file ``experiments/configs/NAME.py``;
    the default ``--config`` is its ``quick`` preset, found from the package
    (any current directory works). ``--help`` lists its presets and main keys;
    each run prints its resolved configuration first.

    ``--distributed`` first calls ``jax.distributed.initialize()`` (several hosts:
    run the same command on each; on Cloud TPU, SLURM, Open MPI and Kubernetes the
    peers are found automatically, elsewhere add ``--coordinator_address=HOST:PORT
    --num_processes=N --process_id=I``)."""
    # New keys are accepted while parsing so that --config.norm_kwargs.KEY=VALUE
    # can name any option of the norm; every other override must name a key of
    # the preset (checked in main), and the config is locked after.
    module = importlib.import_module(f"experiments.configs.{experiment}")
    main_module = sys.modules["__main__"]
    main_module.__doc__ = (main_module.__doc__ or "") + "\n" + configs.describe(module)
    config = config_flags.DEFINE_config_file(
        "config",
        f"{configs.path(experiment)}:quick",
        f"Experiment configuration FILE:PRESET (default: the quick preset of "
        f"experiments/configs/{experiment}.py), then --config.KEY=VALUE overrides.",
        lock_config=False,
        accept_new_attributes=True,
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

    # --help lists the flags of the main module: these are its flags.
    for name in ("config", "workdir", "distributed"):
        flags.FLAGS.register_flag_by_module(sys.argv[0], flags.FLAGS[name])

    def main(argv: list[str]) -> None:
        del argv
        check_overrides(flags.FLAGS["config"])
        config.value.lock()
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
        if jax.process_index() == 0:
            filename = config_flags.get_config_filename(flags.FLAGS["config"])
            print(f"configuration ({filename} with overrides):", flush=True)
            print(config.value, flush=True)
        run(config.value, workdir.value)

    app.run(main)


def mix_summary(params: Any) -> dict[str, Any]:
    """``{'mix_weight': {layer: mean sigmoid(mix_logit)}}`` for a model with
    learned mix norms (how much of its own statistics each layer uses; 1 = per
    sample, 0 = population), else ``{}``."""
    weights = norms.mix_weights(params)
    if not weights:
        return {}
    return {"mix_weight": {k: float(jnp.mean(v)) for k, v in sorted(weights.items())}}
