"""One name per norm, for models and flags: ``make_norm('batch', momentum=0.9)``.

Models know norms only by these names; every module returned is called as
``norm(x, use_running_average=..., mask=...)`` (per-sample norms ignore
``use_running_average``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from normjax import nn as norms


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered norm: its module, default overrides and a one-line summary."""

    module: Callable[..., nn.Module]
    defaults: dict[str, Any]
    statistics: str
    summary: str


_REGISTRY: dict[str, Entry] = {
    "batch": Entry(
        norms.BatchNorm, {}, "batch", "per channel over the batch (and space/time)"
    ),
    "layer": Entry(norms.LayerNorm, {}, "per sample", "over the features"),
    "rms": Entry(norms.RMSNorm, {}, "per sample", "root mean square over the features"),
    # 8 groups divide every width of the CIFAR ResNets (16/32/64 channels); Wu &
    # He's 32 would not fit the first stage.
    "group": Entry(
        norms.GroupNorm,
        {"num_groups": 8},
        "per sample",
        "over space and a group of channels",
    ),
    "instance": Entry(
        norms.InstanceNorm, {}, "per sample", "per channel over space/time"
    ),
    "none": Entry(norms.Identity, {}, "none", "identity"),
}


def names() -> list[str]:
    """The registered norm names, in registration order."""
    return list(_REGISTRY)


def entry(name: str) -> Entry:
    """The registry entry for ``name``; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown norm {name!r}; valid names are: {', '.join(_REGISTRY)}."
        )
    return _REGISTRY[name]


def make_norm(name: str, **overrides: Any) -> nn.Module:
    """A Flax module for the norm ``name``, its defaults updated by ``overrides``.

    Example: ``make_norm('group', num_groups=4)(x)``,
    ``make_norm('batch', momentum=0.9)(x, use_running_average=not train)``.
    """
    spec = entry(name)
    kwargs = {**spec.defaults, **overrides}
    try:
        return spec.module(**kwargs)
    except TypeError as error:
        fields = [f.name for f in dataclasses.fields(spec.module) if f.init]
        fields = [f for f in fields if f not in ("parent", "name")]
        raise TypeError(
            f"make_norm({name!r}): {error}. {spec.module.__name__} accepts: "
            f"{', '.join(fields) or 'no options'}."
        ) from None
