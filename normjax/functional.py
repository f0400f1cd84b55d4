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

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

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


def normalize(
    x: Array,
    axes: Axes,
    *,
    epsilon: float,
    mask: Array | None = None,
    center: bool = True,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    params: Params | None = None,
    feature_axes: Axes = (),
    name: str = "normalize",
) -> tuple[Array, Moments]:
    """``affine(standardize(x, m, epsilon), params, feature_axes)`` with
    ``m = stats.moments(x, axes, ...)``, and ``m`` (keepdims): the core of batch,
    layer, RMS, instance and group norm. ``params`` ('scale' and/or 'bias', shaped
    like the ``feature_axes`` of ``x``) are optional.

    Without ``axis_name`` it has a hand-derived backward pass (``jax.custom_vjp``)
    that saves only ``x`` (in its own dtype), the parameters and the per-slot
    mean, count and reciprocal standard deviation, and computes, with
    x^ = (x - mean) r, w the mask, n the count of each slot and g = dy * scale,

        dx = r g - (w r / n) (sum g + x^ sum(g x^))      (sums over ``axes``)
        dscale = sum(dy x^),  dbias = sum(dy)            (sums over the others)

    (no ``sum g`` term when ``center`` is False) plus the terms of any cotangent
    of the returned moments — one pass of reductions instead of autodiff through
    the two-pass statistics, and no standardized copy of ``x`` kept for the
    parameters' gradients. With ``axis_name`` it is plain autodiff of the same
    forward (the collectives' transposes are left to JAX).
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}.")
    axes = stats.canonicalize_axes(x.ndim, axes)
    feature_axes = stats.canonicalize_axes(x.ndim, feature_axes, name="feature_axes")
    _check_params(x.shape, params, feature_axes, name=name)
    if mask is not None:
        mask = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    if axis_name is not None:
        m = stats.moments(
            x,
            axes,
            mask=mask,
            center=center,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
        )
        return affine(standardize(x, m, epsilon), params, feature_axes, name=name), m
    params = params or {}
    return _normalize(
        x,
        mask,
        params.get("scale"),
        params.get("bias"),
        axes,
        feature_axes,
        center,
        float(epsilon),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _normalize(
    x: Array,
    mask: Array | None,
    scale: Array | None,
    bias: Array | None,
    axes: tuple[int, ...],
    feature_axes: tuple[int, ...],
    center: bool,
    epsilon: float,
) -> tuple[Array, Moments]:
    return _normalize_fwd(x, mask, scale, bias, axes, feature_axes, center, epsilon)[0]


def _normalize_fwd(
    x: Array,
    mask: Array | None,
    scale: Array | None,
    bias: Array | None,
    axes: tuple[int, ...],
    feature_axes: tuple[int, ...],
    center: bool,
    epsilon: float,
) -> tuple[tuple[Array, Moments], tuple[Any, ...]]:
    m = stats.moments(x, axes, mask=mask, center=center)
    r = jax.lax.rsqrt(stats.variance(m) + epsilon)
    dtype = m.mean.dtype
    shape = _broadcast_shape(x.ndim, x.shape, feature_axes)
    y = (x.astype(dtype) - m.mean) * r
    if scale is not None:
        y = y * scale.reshape(shape).astype(dtype)
    if bias is not None:
        y = y + bias.reshape(shape).astype(dtype)
    return (y, m), (x, mask, scale, bias, m.count, m.mean, r)


def _normalize_bwd(
    axes: tuple[int, ...],
    feature_axes: tuple[int, ...],
    center: bool,
    epsilon: float,
    residuals: tuple[Any, ...],
    cotangents: tuple[Array, Moments],
) -> tuple[Array, None, Array | None, Array | None]:
    # With c = x - mean, r the reciprocal std, w the mask and 1/n (0 for an empty
    # slot), g = dy * scale, and sums over ``axes`` of every position (the outputs
    # at masked positions depend on the statistics too):
    #   dx = r g + w (c A + B),  A = 2 dm2 - r^3/n sum(g c),
    #                            B = (dmean - r sum(g)) / n   (centred only),
    # where dmean, dm2 are the cotangents of the returned moments (d mean/dx = w/n,
    # d m2/dx = 2 w c). One fused reduction pass over (x, dy), then one
    # elementwise pass; the centring inside the sums keeps them exact when
    # |mean| >> std.
    x, mask, scale, bias, count, mean, r = residuals
    dy, dm = cotangents
    dtype = mean.dtype
    dy = dy.astype(dtype)
    centred = x.astype(dtype) - mean
    others = _other_axes(x.ndim, feature_axes)
    shape = _broadcast_shape(x.ndim, x.shape, feature_axes)
    scale_b = None if scale is None else scale.reshape(shape).astype(dtype)
    pooled = tuple(a for a in axes if a not in feature_axes)
    if pooled:
        # Batch and group norm: the parameters are constant along the ``pooled``
        # axes, so sums over them of dy and dy c (c = x - mean) first; every
        # other sum, and the scale, then work on those small partial sums (no
        # scaled or standardized full-size copy for XLA to materialize).
        part_dy = stats.reduce_sum(dy, pooled)
        part_dyc = stats.reduce_sum(dy * centred, pooled)
        rest = tuple(a for a in others if a not in pooled)  # e.g. ghost groups
        dbias = None if bias is None else jnp.sum(part_dy, rest, keepdims=True)
        dscale = None if scale is None else jnp.sum(r * part_dyc, rest, keepdims=True)
        if scale is not None:
            part_dy, part_dyc, dy = part_dy * scale_b, part_dyc * scale_b, dy * scale_b
        within = tuple(a for a in axes if a not in pooled)  # group norm's channels
        sum_dy = jnp.sum(part_dy, within, keepdims=True)
        sum_dyc = jnp.sum(part_dyc, within, keepdims=True)
    else:  # layer/RMS norm over the features
        dscale = dbias = None
        if bias is not None:
            dbias = stats.reduce_sum(dy, others)
        if scale is not None:
            dscale = stats.reduce_sum(dy * (centred * r), others)
            dy = dy * scale_b
        sum_dyc = stats.reduce_sum(dy * centred, axes)
        sum_dy = stats.reduce_sum(dy, axes) if center else None
    if dbias is not None:
        dbias = dbias.reshape(bias.shape).astype(bias.dtype)
    if dscale is not None:
        dscale = dscale.reshape(scale.shape).astype(scale.dtype)
    inv_n = stats._safe_div(jnp.ones_like(count), count)
    dm2 = dm.m2.astype(dtype)
    a = 2.0 * dm2 - r * r * r * inv_n * sum_dyc
    if center:
        b = inv_n * (dm.mean.astype(dtype) - r * sum_dy)
        correction = centred * a + b
    else:
        correction = centred * a
    if mask is not None:
        correction = jnp.where(mask, correction, 0.0)
    dx = r * dy + correction
    return dx.astype(x.dtype), None, dscale, dbias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _check_params(
    shape: tuple[int, ...],
    params: Params | None,
    feature_axes: tuple[int, ...],
    *,
    name: str,
) -> None:
    feature_shape = tuple(shape[a] for a in feature_axes)
    for key in params or {}:
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


def _broadcast_shape(ndim: int, shape: tuple[int, ...], feature_axes: tuple[int, ...]):
    return [shape[a] if a in feature_axes else 1 for a in range(ndim)]


def affine(
    y: Array, params: Params | None, feature_axes: tuple[int, ...], *, name: str
) -> Array:
    """``y * scale + bias`` with parameters of the shape of ``y``'s feature axes."""
    if not params:
        return y
    _check_params(y.shape, params, feature_axes, name=name)
    broadcast = _broadcast_shape(y.ndim, y.shape, feature_axes)
    if "scale" in params:
        y = y * params["scale"].reshape(broadcast).astype(y.dtype)
    if "bias" in params:
        y = y + params["bias"].reshape(broadcast).astype(y.dtype)
    return y


def _output(y: Array, x: Array, dtype: Any) -> Array:
    return y.astype(x.dtype if dtype is None else dtype)


def _other_axes(ndim: int, axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in axes)


def broadcast_mask(mask: Array | None, x: Array) -> Array | None:
    """``mask`` as a boolean array of ``x``'s shape (None stays None); a clear
    error when it does not broadcast."""
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


def _causal_axis(causal: bool, time_axis: int) -> int | None:
    """The axis along which statistics accumulate causally, or None."""
    if causal not in (False, True):
        raise ValueError(f"causal must be True or False here, got {causal!r}.")
    return time_axis if causal else None


# ------------------------------------------------------------------ per-sample norms
#
# Causal mode (``causal=True``) matters only when the reduction axes include
# ``time_axis``: the statistics at position t then merge positions <= t only
# (instance/group norm over time). Layer and RMS norm over the features are
# per token and causal as they are.


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
    causal: bool,
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
    cumulative = _causal_axis(causal, time_axis)
    if cumulative is not None and cumulative % x.ndim in reduction_axes:
        m = stats.moments(
            x,
            reduction_axes,
            mask=broadcast_mask(mask, x),
            center=center,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            cumulative_axis=cumulative,
        )
        y = affine(standardize(x, m, epsilon), params, feature_axes, name=name)
    else:  # statistics, standardize and affine fused, with the hand-derived backward
        y, _ = normalize(
            x,
            reduction_axes,
            epsilon=epsilon,
            mask=broadcast_mask(mask, x),
            center=center,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            params=params,
            feature_axes=feature_axes,
            name=name,
        )
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
    causal: bool = False,
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
    causal: bool = False,
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
    causal: bool = False,
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
        causal=causal,
        time_axis=time_axis,
        dtype=dtype,
        name="instance_norm",
    )


def _group_split(
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
    causal: bool = False,
    time_axis: int = 1,
    name: str = "group_norm",
) -> tuple[Array, Moments]:
    """Splits the channels (last axis) into groups and reduces each group.

    x_NxHxWxC -> (x_NxHxWxGx(C/G), moments_Nx1x1xGx1) for the default
    ``reduction_axes`` (every axis but the batch axis 0; they must include the
    last axis). Shared by group norm, the prior norm and EvoNorm.
    """
    x_grouped, axes, mask = _group_split(
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
        cumulative_axis=_causal_axis(causal, time_axis),
    )
    return x_grouped, m


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
    causal: bool = False,
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
    cumulative = _causal_axis(causal, time_axis)
    if cumulative is not None:
        x_grouped, m = group_moments(
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
        y = standardize(x_grouped, m, epsilon)
    else:
        x_grouped, axes, mask = _group_split(
            x,
            num_groups=num_groups,
            group_size=group_size,
            reduction_axes=reduction_axes,
            mask=mask,
            name="group_norm",
        )
        # The (C,) parameters as (G, C/G), over the grouped layout's last two axes.
        _check_params(x.shape, params, (x.ndim - 1,), name="group_norm")
        grouped = {
            k: v.reshape(x_grouped.shape[-2:]) for k, v in (params or {}).items()
        }
        y, _ = normalize(
            x_grouped,
            axes,
            epsilon=epsilon,
            mask=mask,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            params=grouped,
            feature_axes=(x.ndim - 1, x.ndim),
            name="group_norm",
        )
        return _output(y.reshape(x.shape), x, dtype)
    y = affine(y.reshape(x.shape), params, (x.ndim - 1,), name="group_norm")
    return _output(y, x, dtype)


def evonorm_s0(
    x: Array,
    params: Params | None = None,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    reduction_axes: Axes | None = None,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    causal: bool = False,
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
    x_grouped, m = group_moments(
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
    gate = x32 if v is None else x32 * v.astype(x32.dtype)
    numerator = x32 * jax.nn.sigmoid(gate)
    y = (numerator.reshape(x_grouped.shape) * inv_std).reshape(x.shape)
    y = affine(y, params, (x.ndim - 1,), name="evonorm_s0")
    return _output(y, x, dtype)


# ------------------------------------------------------------ batch statistics
#
# Every norm that reads statistics of the whole batch gets them from
# ``batch_moments``: one place for masks, devices (axis_name), ghost batches and
# the causal modes for sequences. Statistics pooled over (batch, time) leak later
# tokens into earlier positions of a causal model; the modes that do not:
#
#   'cumulative'   (causal=True) position t uses (batch, positions <= t);
#   'per_position' position t uses the batch at position t only;
#   'running'      the forward uses the running statistics of earlier steps; the
#                  current batch only updates them.
#
# Running statistics may be updated from the whole batch in every mode: they only
# act on later steps.

CAUSAL_MODES = ("cumulative", "per_position", "running")


def causal_mode(causal: bool | str | None) -> str | None:
    """Canonical causal mode: None (not causal) or one of ``CAUSAL_MODES``."""
    if causal is None or causal is False:
        return None
    if causal is True:
        return "cumulative"
    if causal in CAUSAL_MODES:
        return causal
    raise ValueError(
        f"causal={causal!r} is not a causal mode; use False, True (= 'cumulative') "
        f"or one of {CAUSAL_MODES}."
    )


class BatchMoments(NamedTuple):
    """Batch statistics ready to normalize with and to update running averages.

    Attributes:
      x: the input as normalized (ghost batches split out of the batch axis).
      moments: statistics broadcastable against ``x``.
      pooled: statistics of the whole batch, feature-shaped, for running averages
        (for ghost batches: the pooled mean and the pooled within-group m2).
      restore: maps an array shaped like ``x`` back to the input's shape.
      normalized: with ``epsilon`` given and non-causal statistics, ``x``
        standardized by ``moments`` and scaled and shifted by ``params`` if given
        (through :func:`normalize`'s fused backward); else None.
    """

    x: Array
    moments: Moments
    pooled: Moments
    restore: Callable[[Array], Array]
    normalized: Array | None = None


def batch_moments(
    x: Array,
    feature_axes: Axes,
    *,
    mask: Array | None = None,
    center: bool = True,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    ghost_batch_size: int | None = None,
    batch_axis: int = 0,
    causal: bool | str | None = None,
    time_axis: int = 1,
    epsilon: float | None = None,
    params: Params | None = None,
) -> BatchMoments:
    """Per-feature statistics over every axis but ``feature_axes``.

    x_NxHxWxC -> moments_1x1x1xC; with ``ghost_batch_size`` g the batch splits into
    ceil(N / g) virtual batches (the last one padded and masked) and
    x_(N/g)xgxHxWxC -> moments_(N/g)x1x1x1xC; with causal 'cumulative' or
    'per_position', x_BxLxD -> moments_1xLxD.
    """
    feature_axes = stats.canonicalize_axes(x.ndim, feature_axes, name="axis")
    reduction_axes = _other_axes(x.ndim, feature_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    mode = causal_mode(causal)
    time = None
    if mode in ("cumulative", "per_position"):
        time = stats.canonicalize_axes(x.ndim, time_axis, name="time_axis")[0]
        if time in feature_axes:
            raise ValueError(f"time_axis {time} is a feature axis.")
    mask = broadcast_mask(mask, x)

    def restore(y: Array) -> Array:
        return y

    group_axis = None
    x_feature_axes = feature_axes  # the features' axes in the layout of b.x
    if ghost_batch_size is not None:
        batch = stats.canonicalize_axes(x.ndim, batch_axis, name="batch_axis")[0]
        if batch in feature_axes:
            raise ValueError(f"batch_axis {batch} is a feature axis.")
        if axis_name is not None:
            raise ValueError(
                "ghost_batch_size splits each device's local batch; it cannot be "
                "combined with axis_name. Use one or the other."
            )
        if ghost_batch_size <= 0:
            raise ValueError(
                f"ghost_batch_size must be positive, got {ghost_batch_size}."
            )
        n = x.shape[batch]
        pad = -n % ghost_batch_size
        if pad:  # the last virtual batch is short: pad it and mask the padding.
            widths = [(0, pad if a == batch else 0) for a in range(x.ndim)]
            valid = jnp.ones(x.shape, bool) if mask is None else mask
            x, mask = jnp.pad(x, widths), jnp.pad(valid, widths)
        padded = x.shape
        x = stats.split_groups(x, batch, ghost_batch_size, name="ghost_batch_size")
        mask = None if mask is None else mask.reshape(x.shape)

        def restore(y: Array) -> Array:
            return jax.lax.slice_in_dim(y.reshape(padded), 0, n, axis=batch)

        group_axis = batch
        reduction_axes = tuple(a + (a >= batch) for a in reduction_axes)
        x_feature_axes = tuple(a + (a >= batch) for a in feature_axes)
        if time is not None:
            time = time + (time >= batch)

    if mode == "per_position":
        reduction_axes = tuple(a for a in reduction_axes if a != time)
    normalized = None
    if epsilon is not None and mode is None:
        normalized, m = normalize(
            x,
            reduction_axes,
            epsilon=epsilon,
            mask=mask,
            center=center,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            params=params,
            feature_axes=x_feature_axes,
            name="batch_norm",
        )
    else:
        m = stats.moments(
            x,
            reduction_axes,
            mask=mask,
            center=center,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            cumulative_axis=time if mode == "cumulative" else None,
        )
    pooled = m
    if mode == "cumulative":  # the last position has merged every position.
        pooled = Moments(*(jax.lax.slice_in_dim(s, -1, None, axis=time) for s in m))
    elif mode == "per_position":
        pooled = stats.merge_over(m, time, keepdims=True)
    if group_axis is not None:
        # Pooled mean, and the within-group m2 that ghost training normalized with.
        merged = stats.merge_over(pooled, group_axis)
        pooled = Moments(merged.count, merged.mean, jnp.sum(pooled.m2, group_axis))
    pooled = Moments(*(s.reshape(feature_shape) for s in pooled))
    return BatchMoments(x, m, pooled, restore, normalized)


def _check_batch_stats(
    batch_stats: BatchStats,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    name: str,
) -> None:
    for key, shape in shapes.items():
        if key not in batch_stats:
            raise ValueError(
                f"{name}: batch_stats needs {sorted(shapes)}, got keys "
                f"{sorted(batch_stats)}."
            )
        if tuple(batch_stats[key].shape) != shape:
            raise ValueError(
                f"{name}: batch_stats[{key!r}] has shape "
                f"{tuple(batch_stats[key].shape)} but the input has feature shape "
                f"{shape}; the statistics were made for another layer or "
                "input — re-initialize them, or check `axis`."
            )


def update_running(
    batch_stats: BatchStats,
    pooled: Moments,
    momentum: float,
    *,
    unbiased: bool = False,
    prefix: str = "",
) -> dict[str, Array]:
    """EMA of ``{prefix}mean`` / ``{prefix}var`` towards the batch's ``pooled``
    moments; slots without a valid element keep their value."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}.")
    valid = pooled.count > 0
    mean, var = batch_stats[prefix + "mean"], batch_stats[prefix + "var"]
    batch_var = stats.variance(pooled, ddof=1 if unbiased else 0)
    return {
        prefix + "mean": jnp.where(valid, stats.ema(mean, pooled.mean, momentum), mean),
        prefix + "var": jnp.where(valid, stats.ema(var, batch_var, momentum), var),
    }


def _returns(
    y: Array, new_stats: Any, moments: dict[str, Moments], return_moments: bool
) -> tuple:
    """``(y, new_stats)``, plus the batch moments behind each running pair
    (``{prefix: Moments}`` for ``{prefix}mean``/``{prefix}var``) when asked —
    what ``normjax.calibrate`` merges into precise statistics."""
    return (y, new_stats, moments) if return_moments else (y, new_stats)


def _running_moments(
    batch_stats: BatchStats, broadcast: list[int], prefix: str = ""
) -> Moments:
    """Running mean/var as Moments that ``standardize`` accepts (count 1)."""
    return Moments(
        jnp.ones(broadcast, jnp.float32),
        batch_stats[prefix + "mean"].reshape(broadcast),
        batch_stats[prefix + "var"].reshape(broadcast),
    )


def feature_layout(
    x: Array, axis: Axes, name: str
) -> tuple[tuple[int, ...], tuple[int, ...], list[int]]:
    """(feature axes, feature shape, shape that broadcasts feature-shaped
    statistics against ``x``) for the features on ``axis``."""
    feature_axes = stats.canonicalize_axes(x.ndim, axis, name=f"{name} axis")
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    broadcast = [x.shape[a] if a in feature_axes else 1 for a in range(x.ndim)]
    return feature_axes, feature_shape, broadcast


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
    causal: bool | str = False,
    time_axis: int = 1,
    unbiased_running_var: bool = False,
    dtype: Any = None,
    return_moments: bool = False,
) -> tuple[Array, BatchStats | None] | tuple[Array, BatchStats | None, dict]:
    """Batch norm (Ioffe & Szegedy 2015): per-feature statistics over every axis
    but ``axis`` (the features).

    x_NxHxWxC -> mean_C, var_C. In training the statistics are the batch's (pooled
    over ``axis_name`` devices if given, exactly even with unequal masked counts)
    and the returned ``batch_stats`` is the running average
    ``momentum * old + (1 - momentum) * batch``; a batch with no valid element
    leaves it unchanged. In evaluation (``train=False``) the statistics are
    ``batch_stats`` and it is returned as is.

    Args:
      ghost_batch_size: training only. Normalize each virtual batch of this many
        samples along ``batch_axis`` by its own statistics (Hoffer et al. 2017);
        a last, shorter virtual batch is allowed. The running mean/var follow the
        pooled mean and the pooled within-group variance (as TensorFlow's
        ``virtual_batch_size``), matching what training normalized with.
      causal: for sequences x_BxLxD: False, True (= 'cumulative'),
        'per_position' or 'running' — see ``CAUSAL_MODES`` above.
      unbiased_running_var: update the running variance with the Bessel-corrected
        batch variance (n / (n - 1)), as PyTorch does; for porting.

    Returns:
      ``(y, new_batch_stats)``; ``new_batch_stats`` is None when ``batch_stats``
      is None (training without running statistics).
    """
    name = "batch_norm"
    feature_axes, feature_shape, broadcast = feature_layout(x, axis, name)
    if batch_stats is not None:
        _check_batch_stats(
            batch_stats, {"mean": feature_shape, "var": feature_shape}, name=name
        )
    mode = causal_mode(causal)
    if not train or mode == "running":
        if batch_stats is None:
            raise ValueError(
                f"{name}: normalizing with running statistics (train=False or "
                "causal='running'), but batch_stats is None; pass the layer's "
                "batch_stats."
            )
        running = _running_moments(batch_stats, broadcast)
        y = affine(standardize(x, running, epsilon), params, feature_axes, name=name)
        y = _output(y, x, dtype)
        if not train:
            return _returns(y, batch_stats, {}, return_moments)
    b = batch_moments(
        x,
        feature_axes,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        ghost_batch_size=ghost_batch_size,
        batch_axis=batch_axis,
        causal="per_position" if mode == "running" else mode,
        time_axis=time_axis,
        epsilon=epsilon,
        params=params,
    )
    if mode != "running":
        if b.normalized is not None:  # the affine is folded in
            y = b.restore(b.normalized)
        else:
            y = standardize(b.x, b.moments, epsilon)
            y = affine(b.restore(y), params, feature_axes, name=name)
        y = _output(y, x, dtype)
    new_stats = None
    if batch_stats is not None:
        new_stats = update_running(
            batch_stats, b.pooled, momentum, unbiased=unbiased_running_var
        )
    return _returns(y, new_stats, {"": b.pooled}, return_moments)


def renorm_limits(
    step: Array, r_max: float, d_max: float, relax: tuple[int, int, int]
) -> tuple[Array, Array]:
    """Batch renorm's relaxation schedule (Ioffe 2017, Sec. 4).

    ``relax = (start, r_end, d_end)``: r_max = 1 and d_max = 0 until ``start``,
    then linear to ``r_max`` at step ``r_end`` and to ``d_max`` at ``d_end``. The
    paper: start 5k, r_max 3 at 40k, d_max 5 at 25k steps.
    """
    start, r_end, d_end = relax
    step = jnp.asarray(step, jnp.float32)

    def ramp(end: int) -> Array:
        return jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)

    return 1.0 + (r_max - 1.0) * ramp(r_end), d_max * ramp(d_end)


def batch_renorm(
    x: Array,
    params: Params | None = None,
    batch_stats: BatchStats | None = None,
    *,
    train: bool,
    axis: Axes = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    r_max: float | Array = 3.0,
    d_max: float | Array = 5.0,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    causal: bool | str = False,
    time_axis: int = 1,
    dtype: Any = None,
    return_moments: bool = False,
) -> tuple[Array, BatchStats] | tuple[Array, BatchStats, dict]:
    """Batch renormalization (Ioffe 2017): batch statistics corrected towards the
    running ones, so training and inference normalize alike.

    With batch mu_B, sigma_B and running mu, sigma (sigma = sqrt(var + eps)):
    r = stop_gradient(clip(sigma_B / sigma, 1/r_max, r_max)),
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max)),
    x_hat = (x - mu_B) / sigma_B * r + d. Evaluation: (x - mu) / sigma. The running
    statistics are updated as in ``batch_norm``. r_max = 1, d_max = 0 is batch norm.
    """
    name = "batch_renorm"
    feature_axes, feature_shape, broadcast = feature_layout(x, axis, name)
    if batch_stats is None:
        raise ValueError(f"{name}: batch_stats (running mean/var) is required.")
    _check_batch_stats(
        batch_stats, {"mean": feature_shape, "var": feature_shape}, name=name
    )
    mode = causal_mode(causal)
    running = _running_moments(batch_stats, broadcast)
    if not train or mode == "running":
        y = _output(
            affine(standardize(x, running, epsilon), params, feature_axes, name=name),
            x,
            dtype,
        )
        if not train:
            return _returns(y, batch_stats, {}, return_moments)
    b = batch_moments(
        x,
        feature_axes,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        causal="per_position" if mode == "running" else mode,
        time_axis=time_axis,
    )
    if mode != "running":
        sigma_batch = jnp.sqrt(stats.variance(b.moments) + epsilon)
        sigma = jnp.sqrt(running.m2 + epsilon)
        r = jax.lax.stop_gradient(jnp.clip(sigma_batch / sigma, 1.0 / r_max, r_max))
        d = jax.lax.stop_gradient(
            jnp.clip((b.moments.mean - running.mean) / sigma, -d_max, d_max)
        )
        x_hat = (x.astype(sigma.dtype) - b.moments.mean) / sigma_batch * r + d
        y = _output(affine(x_hat, params, feature_axes, name=name), x, dtype)
    new_stats = update_running(batch_stats, b.pooled, momentum)
    return _returns(y, new_stats, {"": b.pooled}, return_moments)


BLN_SOURCES = ("running", "batch")


def batch_layer_norm(
    x: Array,
    params: Params | None = None,
    batch_stats: BatchStats | None = None,
    *,
    train: bool,
    axis: Axes = -1,
    feature_reduction_axes: Axes = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    inference: tuple[str, str, str, str] = ("running",) * 4,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    causal: bool | str = False,
    time_axis: int = 1,
    dtype: Any = None,
    return_moments: bool = False,
) -> tuple[Array, BatchStats] | tuple[Array, BatchStats, dict]:
    """Batch-layer normalization, BLN (Ziaee & Cano 2022, arXiv:2209.08898).

    x_B = (x - mu_B) / sqrt(var_B + eps): batch statistics per channel (``axis``)
    over every other axis, as batch norm; x_F = (x - mu_F) / sqrt(var_F + eps):
    per-sample statistics over ``feature_reduction_axes``, as layer norm. With B the
    number of samples in the batch (across ``axis_name`` devices; with a ``mask``,
    those with at least one valid element), y = (1/B) x_F + (1 - 1/B) x_B, then
    the affine ``scale``/``bias`` per channel.

    Four running statistics: ``mean``/``var`` (C,) for the batch part and
    ``feature_mean``/``feature_var`` (scalars) for the feature part, the
    population averages of the per-sample statistics. At inference each of the
    four — (batch mean, batch var, feature mean, feature var) — comes from
    ``inference[i]`` in {'running', 'batch'} (the current batch or sample): the
    paper's 16 inference configurations.

    Departures from the paper's code: its feature running statistics are kept per
    batch slot (shape (B, 1)), which ties inference to the training batch size and
    slot order; here they are population scalars. Its variance is unbiased, NaN at
    B = 1; here it is the biased one, finite at B = 1 (where y = x_F).

    Precise statistics (``normjax.calibrate``) recompute the batch pair; the
    feature pair, an average of per-sample statistics rather than moments of one
    population, keeps its running value.
    """
    name = "batch_layer_norm"
    feature_axes, feature_shape, broadcast = feature_layout(x, axis, name)
    if batch_stats is None:
        raise ValueError(f"{name}: batch_stats (four running statistics) is required.")
    shapes = {
        "mean": feature_shape,
        "var": feature_shape,
        "feature_mean": (),
        "feature_var": (),
    }
    _check_batch_stats(batch_stats, shapes, name=name)
    if len(inference) != 4 or any(s not in BLN_SOURCES for s in inference):
        raise ValueError(
            f"{name}: inference={inference!r} must give 4 sources (batch mean, batch "
            f"var, feature mean, feature var), each one of {BLN_SOURCES}."
        )
    mode = causal_mode(causal)
    sources = ("batch",) * 4 if train else tuple(inference)
    if mode == "running":
        sources = ("running",) * 4
    mask = broadcast_mask(mask, x)
    feature_moments = stats.moments(
        x,
        stats.canonicalize_axes(
            x.ndim, feature_reduction_axes, name=f"{name} feature_reduction_axes"
        ),
        mask=mask,
        cumulative_axis=time_axis if mode in ("cumulative", "per_position") else None,
    )
    b = batch_moments(
        x,
        feature_axes,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        causal="per_position" if mode == "running" else mode,
        time_axis=time_axis,
    )
    running = _running_moments(batch_stats, broadcast)
    pick = lambda source, batch, run: batch if source == "batch" else run  # noqa: E731
    batch_part = Moments(
        running.count,
        pick(sources[0], b.moments.mean, running.mean),
        pick(sources[1], stats.variance(b.moments), running.m2),
    )
    feature_part = Moments(
        jnp.ones((), jnp.float32),
        pick(sources[2], feature_moments.mean, batch_stats["feature_mean"]),
        pick(sources[3], stats.variance(feature_moments), batch_stats["feature_var"]),
    )
    # B counts the samples with at least one valid element: padding samples of a
    # masked batch are not samples.
    if mask is None:
        samples = jnp.asarray(x.shape[0], jnp.float32)
    else:
        valid = jnp.broadcast_to(mask, x.shape).reshape(x.shape[0], -1)
        samples = jnp.sum(jnp.any(valid, axis=1).astype(jnp.float32))
    if axis_name is not None:
        samples = jax.lax.psum(samples, axis_name, axis_index_groups=axis_index_groups)
    samples = jnp.maximum(samples, 1.0)
    weight = 1.0 / samples
    y = weight * standardize(x, feature_part, epsilon) + (1 - weight) * standardize(
        x, batch_part, epsilon
    )
    y = _output(affine(y, params, feature_axes, name=name), x, dtype)
    if not train:
        return _returns(y, batch_stats, {}, return_moments)
    new_stats = update_running(batch_stats, b.pooled, momentum)
    # Feature statistics: the mean over valid samples/positions of the per-sample
    # mean and variance (count-weighted, so padding does not count).
    per_sample = Moments(
        (feature_moments.count > 0).astype(jnp.float32),
        feature_moments.mean,
        stats.variance(feature_moments),
    )
    slots = jnp.sum(per_sample.count)
    averages = Moments(
        slots,
        jnp.sum(per_sample.count * per_sample.mean) / jnp.maximum(slots, 1.0),
        jnp.sum(per_sample.count * per_sample.m2) / jnp.maximum(slots, 1.0) * slots,
    )
    new_stats.update(update_running(batch_stats, averages, momentum, prefix="feature_"))
    return _returns(y, new_stats, {"": b.pooled}, return_moments)


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
    causal: bool | str = False,
    time_axis: int = 1,
    dtype: Any = None,
    return_moments: bool = False,
) -> tuple[Array, BatchStats] | tuple[Array, BatchStats, dict]:
    """A per-sample norm that carries a global prior (normjax's own).

    Group norm's statistics per sample s and group g (mu_sg, var_sg, over
    ``reduction_axes``) normalize the sample, as group norm does: nothing depends
    on the other samples, so it works at batch size 1 and is identical in training
    and inference. What group norm throws away — where the sample sits relative to
    the population — is put back from running population statistics mu_g, var_g
    (``batch_stats`` 'mean'/'var', shape (G,), running averages of the batch-pooled
    group statistics, no gradient through them):

        y_c = scale_c * (x_c - mu_sg) / sqrt(var_sg + eps) + bias_c
              + prior_mean_c * (mu_sg - mu_g) / sqrt(var_g + eps)
              + prior_scale_c * 0.5 * log((var_sg + eps) / (var_g + eps))

    for channel c in group g. ``prior_mean`` and ``prior_scale`` are learned per
    channel and start at zero, so at initialization this is group norm. Why these
    two offsets: they are exactly the per-sample information batch norm keeps and
    group norm removes — batch norm's output for sample s is a per-sample affine
    map of group norm's output with shift (mu_sg - mu_B) / sigma_B and log-scale
    log(sigma_sg / sigma_B); here the population replaces the batch, so it does
    not depend on batch composition. The log keeps the scale offset symmetric and
    unbounded in both directions.
    """
    name = "prior_norm"
    params = dict(params or {})
    prior_mean = params.pop("prior_mean", None)
    prior_scale = params.pop("prior_scale", None)
    channels = x.shape[-1]
    x_grouped, m = group_moments(
        x,
        num_groups=num_groups,
        group_size=group_size,
        reduction_axes=reduction_axes,
        mask=mask,
        causal=causal_mode(causal) is not None,
        time_axis=time_axis,
        name=name,
    )
    groups = x_grouped.shape[-2]
    if batch_stats is None:
        raise ValueError(
            f"{name}: batch_stats (population mean/var per group) is required."
        )
    _check_batch_stats(batch_stats, {"mean": (groups,), "var": (groups,)}, name=name)
    group_shape = [1] * (x_grouped.ndim - 2) + [groups, 1]
    pop_mean = batch_stats["mean"].reshape(group_shape)
    pop_var = batch_stats["var"].reshape(group_shape)
    sample_var = stats.variance(m)
    y = standardize(x_grouped, m, epsilon).reshape(x.shape)
    y = affine(y, params, (x.ndim - 1,), name=name).reshape(x_grouped.shape)
    offsets = {
        "prior_mean": (
            prior_mean,
            (m.mean - pop_mean) * jax.lax.rsqrt(pop_var + epsilon),
        ),
        "prior_scale": (
            prior_scale,
            0.5 * (jnp.log(sample_var + epsilon) - jnp.log(pop_var + epsilon)),
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
        y = y + coefficient.reshape(groups, channels // groups).astype(y.dtype) * offset
    y = _output(y.reshape(x.shape), x, dtype)
    if not train:
        return _returns(y, batch_stats, {}, return_moments)
    # Population statistics per group: the group's moments over everything else
    # (batch, space/time, the group's channels), pooled over devices.
    group_axis = x_grouped.ndim - 2
    grouped_mask = broadcast_mask(mask, x)
    pooled = stats.moments(
        x_grouped,
        _other_axes(x_grouped.ndim, (group_axis,)),
        mask=None if grouped_mask is None else grouped_mask.reshape(x_grouped.shape),
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        keepdims=False,
    )
    new_stats = update_running(batch_stats, pooled, momentum)
    return _returns(y, new_stats, {"": pooled}, return_moments)
