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
    "batch_renorm": Entry(
        norms.BatchRenorm,
        {},
        "batch",
        "batch norm corrected towards the running statistics (Ioffe 2017)",
    ),
    "ghost_batch": Entry(
        norms.BatchNorm,
        {"ghost_batch_size": 32},
        "batch",
        "batch norm over virtual batches of 32 (Hoffer et al. 2017)",
    ),
    "frozen_batch": Entry(
        norms.BatchNorm,
        {"frozen": True},
        "running",
        "batch norm with fixed running statistics (never updated)",
    ),
    "bln": Entry(
        norms.BatchLayerNorm,
        {},
        "batch",
        "(1/B) layer-normalized + (1 - 1/B) batch-normalized (Ziaee & Cano 2022)",
    ),
    "power": Entry(
        norms.PowerNorm,
        {},
        "running",
        "quadratic mean, no centring, approximate backward (Shen et al. 2020)",
    ),
    "prior": Entry(
        norms.PriorNorm,
        {"num_groups": 8},
        "per sample + population",
        "group norm plus the sample's learned offset from population statistics",
    ),
    "layer": Entry(norms.LayerNorm, {}, "per sample", "over the features"),
    "rms": Entry(norms.RMSNorm, {}, "per sample", "root mean square over the features"),
    # 8 groups divide every width of the CIFAR ResNets (16/32/64 channels); Wu &
    # He's 32 (and EvoNorm's) would not fit the first stage.
    "group": Entry(
        norms.GroupNorm,
        {"num_groups": 8},
        "per sample",
        "over space and a group of channels",
    ),
    "instance": Entry(
        norms.InstanceNorm, {}, "per sample", "per channel over space/time"
    ),
    "evonorm_s0": Entry(
        norms.EvoNormS0,
        {"num_groups": 8},
        "per sample",
        "x * sigmoid(v x) / group std (Liu et al. 2020)",
    ),
    "none": Entry(norms.Identity, {}, "none", "identity"),
}


def register(
    name: str,
    module: Callable[..., nn.Module],
    *,
    defaults: dict[str, Any] | None = None,
    statistics: str = "custom",
    summary: str = "",
    replace: bool = False,
) -> None:
    """Adds a norm under ``name`` so that every model and flag can use it.

    ``module(**defaults, **overrides)`` must build a Flax module called as
    ``norm(x, use_running_average=..., mask=...)``; a module that accepts
    ``causal=`` is given it in sequence models. An existing name is an error
    unless ``replace=True``.

    Example: ``register('my_norm', MyNorm, defaults={'num_groups': 4})``, then
    ``ResNet(norm='my_norm')`` or ``--config.norm=my_norm``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a norm's name must be a non-empty string, got {name!r}.")
    if name in _REGISTRY and not replace:
        raise ValueError(
            f"norm {name!r} is already registered; pass replace=True to override it."
        )
    if not callable(module):
        raise TypeError(f"register({name!r}): module must be callable, got {module!r}.")
    _REGISTRY[name] = Entry(module, dict(defaults or {}), statistics, summary)


def unregister(name: str) -> None:
    """Removes a norm added with :func:`register`."""
    entry(name)
    del _REGISTRY[name]


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


def make_norm(name: str, *, causal: bool | str = False, **overrides: Any) -> nn.Module:
    """A Flax module for the norm ``name``, its defaults updated by ``overrides``.

    ``causal=True`` makes it safe in a causal sequence model x_BxLxD: no output at
    position t depends on inputs after t, in training or evaluation (batch
    statistics become cumulative over (batch, positions <= t); a batch norm may
    instead take causal='per_position' or 'running').

    Example: ``make_norm('group', num_groups=4)(x)``,
    ``make_norm('batch', momentum=0.9)(x, use_running_average=not train)``.
    """
    spec = entry(name)
    kwargs = {**spec.defaults, **overrides}
    if causal:
        kwargs["causal"] = causal
    try:
        return spec.module(**kwargs)
    except TypeError as error:
        fields = [f.name for f in dataclasses.fields(spec.module) if f.init]
        fields = [f for f in fields if f not in ("parent", "name")]
        raise TypeError(
            f"make_norm({name!r}): {error}. {spec.module.__name__} accepts: "
            f"{', '.join(fields) or 'no options'}."
        ) from None
