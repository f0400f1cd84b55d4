"""Experiment configurations: one file per experiment, presets by name.

Each file defines ``PRESETS`` (name -> function returning the configuration;
its docstring's first line describes it), ``KEYS`` (the main ``--config.*`` keys
with one line each, for ``--help``) and ``get_config(preset)``."""

import pathlib
import types
from collections.abc import Callable

import ml_collections

HERE = pathlib.Path(__file__).resolve().parent


def select(
    presets: dict[str, Callable[[], ml_collections.ConfigDict]], preset: str
) -> ml_collections.ConfigDict:
    """The configuration of ``preset``; an unknown name lists the valid ones."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(presets)}.")
    return presets[preset]()


def path(name: str) -> str:
    """The configuration file of experiment ``name``, found from this package
    (not from the current directory)."""
    return str(HERE / f"{name}.py")


def describe(module: types.ModuleType, default_preset: str = "quick") -> str:
    """The presets and main keys of a configuration module, for ``--help``."""
    presets: dict[str, Callable[[], ml_collections.ConfigDict]] = module.PRESETS
    keys: dict[str, str] = module.KEYS
    default = presets[default_preset]()
    width = max(map(len, [*presets, *keys])) + 2
    name = pathlib.Path(module.__file__ or "").stem
    lines = [
        f"presets (--config=experiments/configs/{name}.py:PRESET; "
        f"default {default_preset}):"
    ]
    for preset, make in presets.items():
        doc = (make.__doc__ or "").strip().split("\n\n")[0]  # first paragraph
        lines.append(f"  {preset:<{width}}{' '.join(doc.split())}")
    lines.append(
        f"main keys (--config.KEY=VALUE; in brackets the {default_preset} "
        "preset's value):"
    )
    for key, text in keys.items():
        value = default
        for part in key.split("."):
            value = value[part]
        if isinstance(value, ml_collections.ConfigDict):
            value = value.to_dict()
        lines.append(f"  {key:<{width}}{text} [{value}]")
    lines.append(
        f'every key: python -c "from experiments.configs import {name}; '
        f"print({name}.get_config('{default_preset}'))\""
    )
    return "\n".join(lines)
