"""Per-sample norms: layer, RMS, instance and group norm, EvoNorm-S0. No Flax
import.

Each sample is normalized by statistics of itself alone, so training and
evaluation are the same computation and nothing is kept between calls. Causal
mode ('cumulative', or True) matters only when the reduction axes include
``time_axis``: the statistics at position t then merge positions <= t only
(instance/group norm over time). Layer and RMS norm over the features are per
token and causal as they are.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normjax import stats
from normjax.functional.causal import Causal, parse_causal
from normjax.functional.core import (
    Params,
    affine,
    broadcast_mask,
    cast_output,
    check_params,
    normalize,
    other_axes,
    standardize,
)
from normjax.stats import Axes, Moments

Array = jax.Array
SUPPORTED_CAUSAL = ("cumulative",)


def _per_sample_norm(
    x: Array,
    params: Params | None,
    *,
    reduction_axes: Axes,
    feature_axes: Axes,
    epsilon: float,
    center: bool,
    mask: Array | None,
    axis_name: Any,
    axis_index_groups: Any,
    causal: Causal,
    time_axis: int,
    dtype: Any,
    name: str,
) -> Array:
    reduction_axes = stats.canonicalize_axes(
        x.ndim, reduction_axes, name=f"{name} reduction_axes"
    )
    feature_axes = stats.canonicalize_axes(
        x.ndim, feature_axes, name=f"{name} feature_axes"
    )
    mode = parse_causal(causal, supported=SUPPORTED_CAUSAL, name=name)
    mask = broadcast_mask(mask, x)
    if mode is not None and time_axis % x.ndim in reduction_axes:
        m = stats.moments(
            x,
            reduction_axes,
            mask=mask,
            center=center,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            cumulative_axis=time_axis,
        )
        y = standardize(x, stats.mean_var(m), epsilon, mask)
        y = affine(y, params, feature_axes, name=name)
    else:  # statistics, standardize and affine fused, with the hand-derived backward
        y = normalize(
            x,
            reduction_axes,
            epsilon=epsilon,
            mask=mask,
            center=center,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            params=params,
            feature_axes=feature_axes,
            name=name,
        ).y
    return cast_output(y, x, dtype)


def layer_norm(
    x: Array,
    params: Params | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    causal: Causal = False,
    time_axis: int = 1,
    dtype: Any = None,
) -> Array:
    """Layer norm (Ba et al. 2016): per-sample mean and variance over
    ``reduction_axes`` (default the last); ``params`` over ``feature_axes``.

    x_BxLxD -> y_BxLxD with y = (x - mean_BxLx1) / sqrt(var_BxLx1 + eps) * scale_D
    + bias_D.
    """
    return _per_sample_norm(
        x,
        params,
        reduction_axes=reduction_axes,
        feature_axes=feature_axes,
        epsilon=epsilon,
        center=True,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        causal=causal,
        time_axis=time_axis,
        dtype=dtype,
        name="layer_norm",
    )


def rms_norm(
    x: Array,
    params: Params | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    causal: Causal = False,
    time_axis: int = 1,
    dtype: Any = None,
) -> Array:
    """RMS norm (Zhang & Sennrich 2019): no centring, ``x * rsqrt(mean(x^2) + eps)``
    per sample over ``reduction_axes``, then ``scale`` (and ``bias`` if given)."""
    return _per_sample_norm(
        x,
        params,
        reduction_axes=reduction_axes,
        feature_axes=feature_axes,
        epsilon=epsilon,
        center=False,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        causal=causal,
        time_axis=time_axis,
        dtype=dtype,
        name="rms_norm",
    )


def instance_norm(
    x: Array,
    params: Params | None = None,
    *,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    causal: Causal = False,
    time_axis: int = 1,
    dtype: Any = None,
) -> Array:
    """Instance norm (Ulyanov et al. 2016): statistics per sample and per feature,
    over every axis except the batch (0) and ``feature_axes``.

    x_NxHxWxC -> mean_Nx1x1xC, var_Nx1x1xC.
    """
    feature_axes = stats.canonicalize_axes(
        x.ndim, feature_axes, name="instance_norm feature_axes"
    )
    if 0 in feature_axes:
        raise ValueError(
            "instance_norm: The channel axes cannot include the leading dimension "
            "as this is assumed to be the batch axis. Got feature_axes="
            f"{feature_axes} for an input of shape {x.shape}."
        )
    reduction_axes = other_axes(x.ndim, (0, *feature_axes))
    if not reduction_axes:
        # Every non-batch axis is a feature: each statistic is one element, and
        # the centred input is 0 (as Flax's InstanceNorm returns).
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}.")
        parse_causal(causal, supported=SUPPORTED_CAUSAL, name="instance_norm")
        y = jnp.zeros(x.shape, stats.stat_dtype(x.dtype))
        return cast_output(
            affine(y, params, feature_axes, name="instance_norm"), x, dtype
        )
    return _per_sample_norm(
        x,
        params,
        reduction_axes=reduction_axes,
        feature_axes=feature_axes,
        epsilon=epsilon,
        center=True,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        causal=causal,
        time_axis=time_axis,
        dtype=dtype,
        name="instance_norm",
    )


def group_split(
    x: Array,
    *,
    num_groups: int | None,
    group_size: int | None,
    reduction_axes: Axes | None,
    mask: Array | None,
    name: str,
) -> tuple[Array, tuple[int, ...], Array | None]:
    """x_NxHxWxC -> (x_NxHxWxGx(C/G), the grouped reduction axes, the grouped
    mask): a reshape of the last axis, no transpose."""
    channels = x.shape[-1]
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"{name}: give exactly one of num_groups and group_size (pass "
            "num_groups=None to use group_size)."
        )
    if group_size is None:
        assert num_groups is not None
        if num_groups <= 0 or channels % num_groups:
            raise ValueError(
                f"{name}: num_groups={num_groups} does not divide the "
                f"{channels} channels; choose a divisor of {channels}."
            )
        group_size = channels // num_groups
    if reduction_axes is None:
        reduction_axes = tuple(range(1, x.ndim))
    reduction_axes = stats.canonicalize_axes(
        x.ndim, reduction_axes, name=f"{name} reduction_axes"
    )
    if reduction_axes[-1] != x.ndim - 1:
        raise ValueError(
            f"{name}: reduction_axes {reduction_axes} must include the last "
            "axis, the channels that are split into groups."
        )
    x_grouped = stats.split_groups(x, -1, group_size, name=f"{name} group_size")
    mask = broadcast_mask(mask, x)
    if mask is not None:
        mask = mask.reshape(x_grouped.shape)
    return x_grouped, (*reduction_axes[:-1], x.ndim), mask


def group_moments(
    x: Array,
    *,
    num_groups: int | None,
    group_size: int | None,
    reduction_axes: Axes | None,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    causal: Causal | None = False,
    time_axis: int = 1,
    name: str = "group_norm",
) -> tuple[Array, Moments, Array | None]:
    """Splits the channels (last axis) into groups and reduces each group.

    x_NxHxWxC -> (x_NxHxWxGx(C/G), moments_Nx1x1xGx1, the mask grouped alike) for
    the default ``reduction_axes`` (every axis but the batch axis 0; they must
    include the last axis). Shared by group norm, the prior norm and EvoNorm.
    """
    mode = parse_causal(causal, supported=SUPPORTED_CAUSAL, name=name)
    x_grouped, axes, mask = group_split(
        x,
        num_groups=num_groups,
        group_size=group_size,
        reduction_axes=reduction_axes,
        mask=mask,
        name=name,
    )
    m = stats.moments(
        x_grouped,
        axes,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        cumulative_axis=None if mode is None else time_axis,
    )
    return x_grouped, m, mask


def group_norm(
    x: Array,
    params: Params | None = None,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    reduction_axes: Axes | None = None,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    causal: Causal = False,
    time_axis: int = 1,
    dtype: Any = None,
) -> Array:
    """Group norm (Wu & He 2018): the channels (last axis) split into groups;
    statistics per group over ``reduction_axes``, which must include the last
    axis (default: every axis but the batch axis 0).

    x_NxHxWxC -> x_NxHxWxGx(C/G) -> mean_Nx1x1xGx1 (a reshape, no transpose);
    ``params`` of shape (C,). Non-causal, it runs on ``normalize`` (the fused
    backward pass).
    """
    name = "group_norm"
    if parse_causal(causal, supported=SUPPORTED_CAUSAL, name=name) is not None:
        x_grouped, m, grouped_mask = group_moments(
            x,
            num_groups=num_groups,
            group_size=group_size,
            reduction_axes=reduction_axes,
            mask=mask,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            causal=causal,
            time_axis=time_axis,
        )
        y = standardize(x_grouped, stats.mean_var(m), epsilon, grouped_mask)
        y = y.reshape(x.shape)
        y = affine(y, params, (x.ndim - 1,), name=name)
        return cast_output(y, x, dtype)
    y = grouped_normalize(
        x,
        params,
        num_groups=num_groups,
        group_size=group_size,
        reduction_axes=reduction_axes,
        epsilon=epsilon,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        name=name,
    ).y
    return cast_output(y.reshape(x.shape), x, dtype)


class GroupedNormalized(NamedTuple):
    """:func:`grouped_normalize`'s output, all in the grouped layout."""

    y: Array
    moments: Moments
    x: Array
    mask: Array | None


def grouped_normalize(
    x: Array,
    params: Params | None,
    *,
    num_groups: int | None,
    group_size: int | None,
    reduction_axes: Axes | None,
    epsilon: float,
    mask: Array | None,
    name: str,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> GroupedNormalized:
    """Group norm's non-causal core: ``x`` split into groups
    (:func:`group_split`), standardized per sample and group through the fused
    :func:`normalize` (whose backward also takes the moments' cotangent), with
    the (C,) ``params`` applied as (G, C/G). Returns y, the moments, x and the
    mask, each in the grouped layout."""
    x_grouped, axes, grouped_mask = group_split(
        x,
        num_groups=num_groups,
        group_size=group_size,
        reduction_axes=reduction_axes,
        mask=mask,
        name=name,
    )
    # The (C,) parameters as (G, C/G), over the grouped layout's last two axes.
    check_params(x.shape, params, (x.ndim - 1,), name=name)
    grouped = {k: v.reshape(x_grouped.shape[-2:]) for k, v in (params or {}).items()}
    y, m = normalize(
        x_grouped,
        axes,
        epsilon=epsilon,
        mask=grouped_mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        params=grouped,
        feature_axes=(x.ndim - 1, x.ndim),
        name=name,
    )
    return GroupedNormalized(y, m, x_grouped, grouped_mask)


def evonorm_s0(
    x: Array,
    params: Params | None = None,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    reduction_axes: Axes | None = None,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    causal: Causal = False,
    time_axis: int = 1,
    dtype: Any = None,
) -> Array:
    """EvoNorm-S0 (Liu et al. 2020), a per-sample norm-activation:
    ``y = x * sigmoid(v * x) / group_std(x) * scale + bias``.

    ``group_std`` is the per-sample standard deviation of each channel group over
    ``reduction_axes`` (as in group norm). ``params``: 'v', 'scale', 'bias', each
    (C,); without 'v' it is taken as 1 (the paper's initialization).
    """
    params = dict(params or {})
    v = params.pop("v", None)
    x_grouped, m, _ = group_moments(
        x,
        num_groups=num_groups,
        group_size=group_size,
        reduction_axes=reduction_axes,
        mask=mask,
        causal=causal,
        time_axis=time_axis,
        name="evonorm_s0",
    )
    inv_std = jax.lax.rsqrt(stats.variance(m) + epsilon)
    x32 = x.astype(inv_std.dtype)
    mask = broadcast_mask(mask, x)
    if mask is not None:  # padding: 0 before the affine, whatever it holds
        x32 = jnp.where(mask, x32, 0.0)
    gate = x32 if v is None else x32 * v.astype(x32.dtype)
    numerator = x32 * jax.nn.sigmoid(gate)
    y = (numerator.reshape(x_grouped.shape) * inv_std).reshape(x.shape)
    y = affine(y, params, (x.ndim - 1,), name="evonorm_s0")
    return cast_output(y, x, dtype)
