"""Pure normalization transforms with explicit statistics. No Flax import.

Every norm here is the same three steps (see DESIGN.md):

  1. reduce the input to ``stats.Moments`` over some axes — per sample
     (layer, RMS, group, instance) or across the batch (batch norm);
  2. standardize: ``(x - mean) * rsqrt(var + epsilon)`` (RMS: ``x * rsqrt(ms + eps)``);
  3. an optional affine ``scale`` / ``bias`` over the feature axes.

``params`` is a mapping with optional ``'scale'`` and ``'bias'`` and ``batch_stats``
a mapping ``{'mean', 'var'}`` — the same trees Flax keeps in its ``params`` and
``batch_stats`` collections, so ``variables['params']`` and
``variables['batch_stats']`` can be passed straight in.

Statistics are float32 or wider; the output has the input's dtype unless ``dtype``
asks otherwise (Flax instead promotes bfloat16 inputs to float32 outputs when the
parameters are float32).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from normjax import stats
from normjax.stats import Axes, Moments

Array = jax.Array
Params = Mapping[str, Array]
BatchStats = Mapping[str, Array]


# --------------------------------------------------------------------------- pieces


def standardize(x: Array, m: Moments, epsilon: float) -> Array:
    """``(x - mean) * rsqrt(var + epsilon)`` in the statistics' dtype.

    ``m`` broadcasts against ``x``; for uncentred moments (mean 0) this is
    ``x * rsqrt(mean_square + epsilon)``.
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}.")
    x = x.astype(m.mean.dtype)
    return (x - m.mean) * jax.lax.rsqrt(stats.variance(m) + epsilon)


def affine(
    y: Array, params: Params | None, feature_axes: tuple[int, ...], *, name: str
) -> Array:
    """``y * scale + bias`` with parameters of the shape of ``y``'s feature axes."""
    if not params:
        return y
    feature_shape = tuple(y.shape[a] for a in feature_axes)
    broadcast = [y.shape[a] if a in feature_axes else 1 for a in range(y.ndim)]
    for key in params:
        if key not in ("scale", "bias"):
            raise ValueError(
                f"{name}: unknown parameter {key!r}; expected 'scale' and/or 'bias'."
            )
        if tuple(params[key].shape) != feature_shape:
            raise ValueError(
                f"{name}: params[{key!r}] has shape {tuple(params[key].shape)} but "
                f"the input's feature axes {feature_axes} have shape "
                f"{feature_shape}; the parameters belong to another layer or the "
                "feature axes are set wrongly."
            )
    if "scale" in params:
        y = y * params["scale"].reshape(broadcast).astype(y.dtype)
    if "bias" in params:
        y = y + params["bias"].reshape(broadcast).astype(y.dtype)
    return y


def _output(y: Array, x: Array, dtype: Any) -> Array:
    return y.astype(x.dtype if dtype is None else dtype)


def _other_axes(ndim: int, axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in axes)


def _broadcast_mask(mask: Array | None, x: Array) -> Array | None:
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    try:
        return jnp.broadcast_to(mask.astype(bool), x.shape)
    except ValueError:
        raise ValueError(
            f"mask of shape {mask.shape} does not broadcast to the input's shape "
            f"{x.shape}; give a boolean mask broadcastable to the input."
        ) from None


# ------------------------------------------------------------------ per-sample norms


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
    dtype: Any,
    name: str,
) -> Array:
    reduction_axes = stats.canonicalize_axes(
        x.ndim, reduction_axes, name=f"{name} reduction_axes"
    )
    feature_axes = stats.canonicalize_axes(
        x.ndim, feature_axes, name=f"{name} feature_axes"
    )
    m = stats.moments(
        x,
        reduction_axes,
        mask=_broadcast_mask(mask, x),
        center=center,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    )
    y = affine(standardize(x, m, epsilon), params, feature_axes, name=name)
    return _output(y, x, dtype)


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
            "instance_norm: feature_axes may not include axis 0, the batch axis."
        )
    reduction_axes = _other_axes(x.ndim, (0, *feature_axes))
    if not reduction_axes:
        raise ValueError(
            f"instance_norm: an input of shape {x.shape} with feature_axes "
            f"{feature_axes} leaves no axis to reduce; it needs at least one axis "
            "between the batch and the features."
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
        dtype=dtype,
        name="instance_norm",
    )


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
    dtype: Any = None,
) -> Array:
    """Group norm (Wu & He 2018): the channels (last axis) split into groups;
    statistics per group over ``reduction_axes``, which must include the last
    axis (default: every axis but the batch axis 0).

    x_NxHxWxC -> x_NxHxWxGx(C/G) -> mean_Nx1x1xGx1; ``params`` of shape (C,).
    """
    channels = x.shape[-1]
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            "group_norm: give exactly one of num_groups and group_size (pass "
            "num_groups=None to use group_size)."
        )
    if group_size is None:
        if num_groups <= 0 or channels % num_groups:
            raise ValueError(
                f"group_norm: num_groups={num_groups} does not divide the "
                f"{channels} channels; choose a divisor of {channels}."
            )
        group_size = channels // num_groups
    if reduction_axes is None:
        reduction_axes = tuple(range(1, x.ndim))
    reduction_axes = stats.canonicalize_axes(
        x.ndim, reduction_axes, name="group_norm reduction_axes"
    )
    if reduction_axes[-1] != x.ndim - 1:
        raise ValueError(
            f"group_norm: reduction_axes {reduction_axes} must include the last "
            "axis, the channels that are split into groups."
        )
    x_grouped = stats.split_groups(x, -1, group_size, name="group_norm group_size")
    mask = _broadcast_mask(mask, x)
    if mask is not None:
        mask = mask.reshape(x_grouped.shape)
    m = stats.moments(
        x_grouped,
        (*reduction_axes[:-1], x.ndim),
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    )
    y = standardize(x_grouped, m, epsilon).reshape(x.shape)
    y = affine(y, params, (x.ndim - 1,), name="group_norm")
    return _output(y, x, dtype)


# ----------------------------------------------------------------------- batch norm


def _check_batch_stats(
    batch_stats: BatchStats, feature_shape: tuple[int, ...], *, name: str
) -> None:
    for key in ("mean", "var"):
        if key not in batch_stats:
            raise ValueError(
                f"{name}: batch_stats needs 'mean' and 'var', got keys "
                f"{sorted(batch_stats)}."
            )
        if tuple(batch_stats[key].shape) != feature_shape:
            raise ValueError(
                f"{name}: batch_stats[{key!r}] has shape "
                f"{tuple(batch_stats[key].shape)} but the input has feature shape "
                f"{feature_shape}; the statistics were made for another layer or "
                "input — re-initialize them, or check `axis`."
            )


def batch_norm(
    x: Array,
    params: Params | None = None,
    batch_stats: BatchStats | None = None,
    *,
    train: bool,
    axis: Axes = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    ghost_batch_size: int | None = None,
    batch_axis: int = 0,
    unbiased_running_var: bool = False,
    dtype: Any = None,
) -> tuple[Array, BatchStats | None]:
    """Batch norm (Ioffe & Szegedy 2015): per-feature statistics over every axis
    but ``axis`` (the features).

    x_NxHxWxC -> mean_C, var_C. In training the statistics are the batch's (pooled
    over ``axis_name`` devices if given, exactly even with unequal masked counts)
    and the returned ``batch_stats`` is the running average
    ``momentum * old + (1 - momentum) * batch``; a batch with no valid element
    leaves it unchanged. In evaluation (``train=False``) the statistics are
    ``batch_stats`` and it is returned as is.

    Args:
      ghost_batch_size: training only. Split ``batch_axis`` into virtual batches
        of this size, each normalized by its own statistics (Hoffer et al. 2017).
        The running mean/var are updated with the pooled mean and the pooled
        within-group variance (the count-weighted mean of the group variances,
        as TensorFlow's ``virtual_batch_size`` does), matching what training saw.
      unbiased_running_var: update the running variance with the Bessel-corrected
        batch variance (n / (n - 1)), as PyTorch does; for porting.

    Returns:
      ``(y, new_batch_stats)``; ``new_batch_stats`` is None when ``batch_stats``
      is None (training without running statistics).
    """
    name = "batch_norm"
    feature_axes = stats.canonicalize_axes(x.ndim, axis, name=f"{name} axis")
    reduction_axes = _other_axes(x.ndim, feature_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    if batch_stats is not None:
        _check_batch_stats(batch_stats, feature_shape, name=name)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{name}: momentum must lie in [0, 1], got {momentum}.")
    broadcast = [x.shape[a] if a in feature_axes else 1 for a in range(x.ndim)]

    if not train:
        if batch_stats is None:
            raise ValueError(
                f"{name}: train=False normalizes with running statistics, but "
                "batch_stats is None; pass the layer's batch_stats."
            )
        running = Moments(
            jnp.ones(broadcast, jnp.float32),
            batch_stats["mean"].reshape(broadcast),
            batch_stats["var"].reshape(broadcast),
        )
        y = affine(standardize(x, running, epsilon), params, feature_axes, name=name)
        return _output(y, x, dtype), batch_stats

    mask = _broadcast_mask(mask, x)
    if ghost_batch_size is None:
        m = stats.moments(
            x,
            reduction_axes,
            mask=mask,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
        )
        y = standardize(x, m, epsilon)
        pooled_count, pooled_mean, pooled_m2 = m
    else:
        batch_axis = stats.canonicalize_axes(x.ndim, batch_axis, name="batch_axis")[0]
        if batch_axis in feature_axes:
            raise ValueError(f"{name}: batch_axis {batch_axis} is a feature axis.")
        if axis_name is not None:
            raise ValueError(
                f"{name}: ghost_batch_size splits each device's local batch; it "
                "cannot be combined with axis_name. Use one or the other."
            )
        x_ghost = stats.split_groups(
            x, batch_axis, ghost_batch_size, name="ghost_batch_size"
        )
        mask_ghost = None if mask is None else mask.reshape(x_ghost.shape)
        # The group axis stays at batch_axis; the within-group axis follows it.
        ghost_axes = tuple(a + (a >= batch_axis) for a in reduction_axes)
        m = stats.moments(x_ghost, ghost_axes, mask=mask_ghost)
        y = standardize(x_ghost, m, epsilon).reshape(x.shape)
        pooled_count = jnp.sum(m.count, batch_axis)
        pooled_mean = stats.merge_over(m, batch_axis).mean
        pooled_m2 = jnp.sum(m.m2, batch_axis)
    y = _output(affine(y, params, feature_axes, name=name), x, dtype)
    if batch_stats is None:
        return y, None

    ddof = 1 if unbiased_running_var else 0
    batch = Moments(pooled_count, pooled_mean, pooled_m2)
    batch = Moments(*(s.reshape(feature_shape) for s in batch))
    valid = batch.count > 0
    new_stats = {
        "mean": jnp.where(
            valid,
            stats.ema(batch_stats["mean"], batch.mean, momentum),
            batch_stats["mean"],
        ),
        "var": jnp.where(
            valid,
            stats.ema(batch_stats["var"], stats.variance(batch, ddof=ddof), momentum),
            batch_stats["var"],
        ),
    }
    return y, new_stats
