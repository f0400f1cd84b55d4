"""Reference (virtual) batch norm (Salimans et al. 2016). No Flax import.

A fixed reference batch R of training inputs goes through the network with every
call, ahead of the samples: the first ``reference_size`` rows of the batch axis
are R's activations at this layer, the rest the samples'. R is normalized by its
own statistics; each sample by the statistics of R together with itself, the
sample weighted 1/(|R| + 1) (with per-channel statistics over space: its pixels
count as one more image among R's). So every sample keeps its offset from a
population — R, propagated by the current weights — and never sees the other
samples of its batch, in training and in evaluation alike; gradients flow
through R's statistics. Nothing is kept between calls.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from normjax import stats
from normjax.functional.core import (
    Params,
    affine,
    broadcast_mask,
    cast_output,
    feature_layout,
    other_axes,
    standardize,
)
from normjax.stats import Axes, Moments

Array = jax.Array

# Why the causal modes are refused (the registry adds it to the refusal).
CAUSAL_REFUSAL = (
    "reference batch norm has no per-position reference statistics: in a causal "
    "sequence model R's statistics pooled over time would carry later positions "
    "into earlier ones; use 'batch' (per-position population statistics) or "
    "'mix' there"
)


def check_reference_size(reference_size: int | None, batch: int, name: str) -> int:
    """``reference_size`` validated against a batch axis of ``batch`` rows."""
    if reference_size is None:
        raise ValueError(
            f"{name}: no reference batch. Wrap the model in "
            "normjax.nn.WithReference(model, reference_size=...), which passes a "
            "fixed batch of training inputs through it with every call, or give "
            "reference_size and put the reference rows first in the batch."
        )
    if isinstance(reference_size, bool) or not isinstance(reference_size, int):
        raise TypeError(
            f"{name}: reference_size must be an int, got {reference_size!r}."
        )
    if not 1 <= reference_size <= batch:
        raise ValueError(
            f"{name}: reference_size={reference_size} must lie in [1, {batch}] "
            f"(the batch axis holds {batch} rows: the reference's, then the "
            "samples')."
        )
    return reference_size


def reference_norm(
    x: Array,
    params: Params | None = None,
    *,
    reference_size: int | None,
    axis: Axes = -1,
    reduction_axes: Axes | None = None,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    dtype: Any = None,
) -> Array:
    """Reference batch norm of ``x``, whose first ``reference_size`` rows (axis
    0) are the reference batch R.

    With ``reduction_axes`` a sample's own axes (default: every axis but the
    batch axis 0 and the features ``axis`` — per channel over space, as batch
    norm pools them; none for x_NxD), R's statistics are the moments over
    (R's rows, reduction axes) and sample i's are those of R's elements and its
    own merged (``stats.merge``: exact, with counts — an image of H x W pixels
    weighs 1/(|R| + 1) against R's |R| images, Salimans et al.'s
    ``new_coeff``). Masked elements count 0 in both; a sample or a reference
    that is all padding changes nothing.

    Returns the normalized ``x`` (R's rows included), with ``params``'
    ``scale`` and ``bias`` over the features applied. No axis_name: every device
    holds the whole reference batch, so its statistics need no collective.
    """
    name = "reference_norm"
    r = check_reference_size(reference_size, x.shape[0], name)
    feature_axes, _, _ = feature_layout(x, axis, name)
    if 0 in feature_axes:
        raise ValueError(f"{name}: the batch axis 0 cannot be a feature axis.")
    if reduction_axes is None:
        sample_axes = other_axes(x.ndim, (0, *feature_axes))
    else:
        sample_axes = stats.canonicalize_axes(
            x.ndim, reduction_axes, name=f"{name} reduction_axes"
        )
        if 0 in sample_axes or set(sample_axes) & set(feature_axes):
            raise ValueError(
                f"{name}: reduction_axes {sample_axes} must leave out the batch "
                f"axis 0 and the feature axes {feature_axes}."
            )
    mask = broadcast_mask(mask, x)
    reference = stats.moments(
        x[:r], (0, *sample_axes), mask=None if mask is None else mask[:r]
    )
    # Every row's own moments (x_NxD: one element per sample and feature, count
    # 1), merged with R's; R's rows are normalized by R's alone. One standardize
    # over the whole x: the per-row statistics are selected, not the data
    # concatenated (a copy of x).
    own = stats.moments(x, sample_axes, mask=mask)
    reference = Moments(*(jnp.broadcast_to(s, own.mean.shape) for s in reference))
    merged = stats.merge(reference, own)
    in_reference = (jnp.arange(x.shape[0]) < r).reshape(
        (-1,) + (1,) * (own.mean.ndim - 1)
    )
    mean_var = jax.tree.map(
        lambda a, b: jnp.where(in_reference, a, b),
        stats.mean_var(reference),
        stats.mean_var(merged),
    )
    y = standardize(x, mean_var, epsilon, mask)
    return cast_output(affine(y, params, feature_axes, name=name), x, dtype)
