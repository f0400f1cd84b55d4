"""One name per norm, for models and flags: ``make_norm('batch', momentum=0.9)``.

Models know norms only by these names; every module returned is called as
``norm(x, use_running_average=..., mask=...)`` (per-sample norms ignore
``use_running_average``).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any, cast

import flax.linen as nn

from normjax import nn as norms
from normjax.functional.causal import CAUSAL_MODES, Causal, parse_causal


class Statistics(enum.StrEnum):
    """Where a registered norm's statistics come from (its value reads as text)."""

    BATCH = "batch"  # the batch's, with running averages for evaluation
    RUNNING = "running"  # running averages, in training too
    PER_SAMPLE = "per sample"  # the sample's own
    PER_SAMPLE_PRIOR = "per sample + population"  # the sample's, plus a prior
    REFERENCE = "reference batch + sample"  # a fixed reference batch's and its own
    NONE = "none"  # no statistics
    CUSTOM = "custom"  # a norm registered without saying

    @property
    def per_sample(self) -> bool:
        """Outputs never depend on other samples and nothing running is read."""
        return self in (Statistics.PER_SAMPLE, Statistics.NONE)


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered norm: its module, default overrides, where its statistics
    come from and a one-line summary."""

    module: Callable[..., nn.Module]
    defaults: dict[str, Any]
    statistics: Statistics
    summary: str


_REGISTRY: dict[str, Entry] = {
    "batch": Entry(
        norms.BatchNorm,
        {},
        Statistics.BATCH,
        "per channel over the batch (and space/time)",
    ),
    "batch_renorm": Entry(
        norms.BatchRenorm,
        {},
        Statistics.BATCH,
        "batch norm corrected towards the running statistics (Ioffe 2017)",
    ),
    "ghost_batch": Entry(
        norms.BatchNorm,
        {"ghost_batch_size": 32},
        Statistics.BATCH,
        "batch norm over virtual batches of 32 (Hoffer et al. 2017)",
    ),
    "frozen_batch": Entry(
        norms.BatchNorm,
        {"frozen": True},
        Statistics.RUNNING,
        "batch norm with fixed running statistics (never updated)",
    ),
    "bln": Entry(
        norms.BatchLayerNorm,
        {},
        Statistics.BATCH,
        "(1/B) layer-normalized + (1 - 1/B) batch-normalized (Ziaee & Cano 2022)",
    ),
    "power": Entry(
        norms.PowerNorm,
        {},
        Statistics.RUNNING,
        "quadratic mean, no centring, approximate backward (Shen et al. 2020)",
    ),
    "prior": Entry(
        norms.PriorNorm,
        {"num_groups": 8},
        Statistics.PER_SAMPLE_PRIOR,
        "group norm plus the sample's learned offset from population statistics",
    ),
    "online": Entry(
        norms.OnlineNorm,
        {},
        Statistics.RUNNING,
        "each sample by the running statistics of the samples before it, control "
        "process backward (Chiley et al. 2019; batch size 1 works)",
    ),
    "population": Entry(
        norms.PopulationNorm,
        {},
        Statistics.RUNNING,
        "batch norm trained on its running statistics after a batch-norm warm-up "
        "(isolates the prior from batch noise and the gradient through it)",
    ),
    "mix": Entry(
        norms.MixNorm,
        {},
        Statistics.PER_SAMPLE_PRIOR,
        "per-sample statistics mixed with population statistics by a learned "
        "weight per channel (how much prior a network uses)",
    ),
    "batch_group": Entry(
        norms.BatchGroupNorm,
        {"num_groups": 8},
        Statistics.BATCH,
        "batch statistics over (batch, space, a group of channels) (Zhou et al. "
        "2020; separates pooling over the batch from per-channel)",
    ),
    "reference": Entry(
        norms.ReferenceNorm,
        {},
        Statistics.REFERENCE,
        "each sample by the statistics of a fixed reference batch of training "
        "inputs plus itself, R run through the current weights (Salimans et al. "
        "2016; the model wrapped in nn.WithReference)",
    ),
    "layer": Entry(norms.LayerNorm, {}, Statistics.PER_SAMPLE, "over the features"),
    "rms": Entry(
        norms.RMSNorm,
        {},
        Statistics.PER_SAMPLE,
        "root mean square over the features",
    ),
    # 8 groups divide every width of the CIFAR ResNets (16/32/64 channels); Wu &
    # He's 32 (and EvoNorm's) would not fit the first stage.
    "group": Entry(
        norms.GroupNorm,
        {"num_groups": 8},
        Statistics.PER_SAMPLE,
        "over space and a group of channels",
    ),
    "instance": Entry(
        norms.InstanceNorm,
        {},
        Statistics.PER_SAMPLE,
        "per channel over space/time",
    ),
    "evonorm_s0": Entry(
        norms.EvoNormS0,
        {"num_groups": 8},
        Statistics.PER_SAMPLE,
        "x * sigmoid(v x) / group std (Liu et al. 2020)",
    ),
    "none": Entry(norms.Identity, {}, Statistics.NONE, "identity"),
}


def register(
    name: str,
    module: Callable[..., nn.Module],
    *,
    defaults: dict[str, Any] | None = None,
    statistics: Statistics | str = Statistics.CUSTOM,
    summary: str = "",
    replace: bool = False,
) -> None:
    """Adds a norm under ``name`` so that every model and flag can use it.

    ``module(**defaults, **overrides)`` must build a Flax module called as
    ``norm(x, use_running_average=..., mask=...)``. A module that declares a
    ``causal`` field is given the causal mode in sequence models, as one of
    ``functional.CAUSAL_MODES`` (True arrives as 'cumulative'); it may declare
    ``supported_causal``, the modes it accepts. ``statistics`` is a
    :class:`Statistics` or its value. An existing name is an error unless
    ``replace=True``.

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
    try:
        kind = Statistics(statistics)
    except ValueError:
        raise ValueError(
            f"register({name!r}): statistics={statistics!r} is not one of "
            f"{', '.join(repr(s.value) for s in Statistics)}."
        ) from None
    _REGISTRY[name] = Entry(module, dict(defaults or {}), kind, summary)


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


def needs_reference(norm: str) -> bool:
    """Whether the norm named ``norm`` reads a reference batch: its model must
    be wrapped in :class:`normjax.nn.WithReference`."""
    module = entry(norm).module
    return isinstance(module, type) and issubclass(module, norms.ReferenceNorm)


def causal_modes(norm: str) -> tuple[str, ...]:
    """The causal modes the norm named ``norm`` supports (empty: it refuses
    sequences' causal modes, saying why)."""
    module = entry(norm).module
    fields = getattr(module, "__dataclass_fields__", {})
    supported = CAUSAL_MODES if "causal" in fields else ()
    return tuple(getattr(module, "supported_causal", supported))


def make_norm(norm: str, /, *, causal: Causal = False, **overrides: Any) -> nn.Module:
    """A Flax module for the norm named ``norm``, its defaults updated by
    ``overrides`` (which may include Flax's ``name``).

    ``causal`` ('cumulative' or True, 'per_position', 'running'; see
    :mod:`normjax.functional.causal`) makes it safe in a causal sequence model
    x_BxLxD: no output at position t depends on inputs after t, in training or
    evaluation. A mode the norm does not support is refused here, naming the ones
    it does.

    Example: ``make_norm('group', num_groups=4)(x)``,
    ``make_norm('batch', momentum=0.9)(x, use_running_average=not train)``.
    """
    spec = entry(norm)
    kwargs = {**spec.defaults, **overrides}
    # A module without a ``causal`` field supports no causal mode; one that has
    # it without declaring ``supported_causal`` is trusted with every mode.
    supported = causal_modes(norm)
    try:
        mode = parse_causal(causal, supported=supported, name=f"norm {norm!r}")
    except ValueError as error:
        why = getattr(spec.module, "causal_refusal", "")
        if why and causal:
            raise ValueError(f"{error} {why}.") from None
        raise
    if mode is not None:
        kwargs["causal"] = mode
    try:
        return spec.module(**kwargs)
    except TypeError as error:
        accepted = [
            field.name
            for field in dataclasses.fields(cast(Any, spec.module))
            if field.init and field.name not in ("parent", "name")
        ]
        raise TypeError(
            f"make_norm({norm!r}): {error}. {spec.module.__name__} accepts: "
            f"{', '.join(accepted) or 'no options'}."
        ) from None
