"""The prior norm: group norm plus the sample's learned offset from population
statistics (normjax's own). No Flax import."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from normjax import stats
from normjax.functional.batch import check_batch_stats, update_running
from normjax.functional.causal import Causal, parse_causal
from normjax.functional.core import (
    BatchStats,
    Normalized,
    Params,
    affine,
    cast_output,
    other_axes,
    standardize,
)
from normjax.functional.per_sample import group_moments, grouped_normalize
from normjax.stats import Axes

Array = jax.Array
# The sample's statistics may accumulate over positions; there is no batch to
# take per position, and the forward never reads running statistics alone.
SUPPORTED_CAUSAL = ("cumulative",)


def prior_norm(
    x: Array,
    params: Params | None = None,
    batch_stats: BatchStats | None = None,
    *,
    train: bool,
    num_groups: int | None = 32,
    group_size: int | None = None,
    reduction_axes: Axes | None = None,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    causal: Causal = False,
    time_axis: int = 1,
    dtype: Any = None,
) -> Normalized:
    """Group norm that carries a global prior.

    With group norm's statistics mu_sg, var_sg of sample s and group g (over
    ``reduction_axes``) and population statistics mu_g, var_g (``batch_stats``
    'mean'/'var', shape (G,): running averages of the batch-pooled group
    statistics, no gradient through them), for channel c of group g:

        y_c = scale_c * (x_c - mu_sg) / sqrt(var_sg + eps) + bias_c
              + prior_mean_c * (mu_sg - mu_g) / sqrt(var_g + eps)
              + prior_scale_c * 0.5 * log((var_sg + eps) / (var_g + eps))

    ``prior_mean``, ``prior_scale`` (C,) start at zero: group norm. The two
    offsets are what batch norm keeps of a sample and group norm removes (the
    shift and log-scale of batch norm's output against group norm's), measured
    against the population instead of the batch. No output depends on other
    samples, in training or evaluation.
    """
    name = "prior_norm"
    params = dict(params or {})
    prior_mean = params.pop("prior_mean", None)
    prior_scale = params.pop("prior_scale", None)
    channels = x.shape[-1]
    mode = parse_causal(causal, supported=SUPPORTED_CAUSAL, name=name)
    if mode is None:
        # Group norm through the fused normalize: its backward pass also takes
        # the cotangent of the moments, through which the offsets' gradient
        # flows (no autodiff through the two-pass statistics).
        y, m, x_grouped, grouped_mask = grouped_normalize(
            x,
            params,
            num_groups=num_groups,
            group_size=group_size,
            reduction_axes=reduction_axes,
            epsilon=epsilon,
            mask=mask,
            name=name,
        )
    else:
        x_grouped, m, grouped_mask = group_moments(
            x,
            num_groups=num_groups,
            group_size=group_size,
            reduction_axes=reduction_axes,
            mask=mask,
            causal=mode,
            time_axis=time_axis,
            name=name,
        )
    groups = x_grouped.shape[-2]
    if batch_stats is None:
        raise ValueError(
            f"{name}: batch_stats (population mean/var per group) is required."
        )
    check_batch_stats(batch_stats, {"mean": (groups,), "var": (groups,)}, name=name)
    group_shape = [1] * (x_grouped.ndim - 2) + [groups, 1]
    population = stats.MeanVar(
        batch_stats["mean"].reshape(group_shape),
        batch_stats["var"].reshape(group_shape),
    )
    sample = stats.mean_var(m)
    if mode is not None:
        y = standardize(x_grouped, sample, epsilon, grouped_mask).reshape(x.shape)
        y = affine(y, params, (x.ndim - 1,), name=name).reshape(x_grouped.shape)
    offsets = {
        "prior_mean": (
            prior_mean,
            (sample.mean - population.mean) * jax.lax.rsqrt(population.var + epsilon),
        ),
        "prior_scale": (
            prior_scale,
            0.5 * (jnp.log(sample.var + epsilon) - jnp.log(population.var + epsilon)),
        ),
    }
    for key, (coefficient, offset) in offsets.items():
        if coefficient is None:
            continue
        if coefficient.shape != (channels,):
            raise ValueError(
                f"{name}: params[{key!r}] must have shape ({channels},), got "
                f"{coefficient.shape}."
            )
        shift = coefficient.reshape(groups, channels // groups).astype(y.dtype) * offset
        if grouped_mask is not None:  # padding: the bias alone, as every norm
            shift = jnp.where(grouped_mask, shift, 0.0)
        y = y + shift
    y = cast_output(y.reshape(x.shape), x, dtype)
    if not train:
        return Normalized(y, batch_stats, {})
    # Population statistics per group: the group's moments over everything else
    # (batch, space/time, the group's channels), pooled over devices.
    group_axis = x_grouped.ndim - 2
    pooled = stats.moments(
        x_grouped,
        other_axes(x_grouped.ndim, (group_axis,)),
        mask=grouped_mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        keepdims=False,
    )
    new_stats = update_running(batch_stats, pooled, momentum)
    return Normalized(y, new_stats, {"": pooled})
