"""Experiment configurations: one file per experiment, presets by name."""

from collections.abc import Callable

import ml_collections


def select(
    presets: dict[str, Callable[[], ml_collections.ConfigDict]], preset: str
) -> ml_collections.ConfigDict:
    """The configuration of ``preset``; an unknown name lists the valid ones."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(presets)}.")
    return presets[preset]()
