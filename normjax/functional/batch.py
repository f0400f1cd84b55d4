"""Batch statistics and batch norm. No Flax import.

Every norm that reads statistics of the whole batch gets them from
:func:`batch_moments`: one place for masks, devices (``axis_name``), ghost
batches and the causal modes for sequences (:mod:`normjax.functional.causal`).
Running statistics are ``batch_stats`` ``mean``/``var``, updated by
:func:`update_running` and read by :func:`running_mean_var` — or, in causal
modes, per position (max_len, features), updated by
:func:`update_position_running` and read by :func:`position_mean_var`.
:func:`example_weighted` mixes a sample's own statistics with them (inference
example weighting).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normjax import stats
from normjax.functional.causal import Causal, parse_causal
from normjax.functional.core import (
    BatchStats,
    Normalized,
    Params,
    affine,
    broadcast_mask,
    cast_output,
    feature_layout,
    normalize,
    other_axes,
    standardize,
)
from normjax.stats import Axes, MeanVar, Moments

Array = jax.Array


class BatchMoments(NamedTuple):
    """Batch statistics ready to normalize with and to update running averages.

    Attributes:
      x: the input as normalized (ghost batches split out of the batch axis).
      moments: statistics broadcastable against ``x``.
      pooled: statistics of the whole batch, feature-shaped, for running averages
        (for ghost batches: the pooled mean and the pooled within-group m2).
      restore: maps an array shaped like ``x`` back to the input's shape.
      mask: the validity mask in the layout of ``x`` (None: all valid).
      normalized: with ``epsilon`` given and non-causal statistics, ``x``
        standardized by ``moments`` and scaled and shifted by ``params`` if given
        (through :func:`normalize`'s fused backward); else None.
      positions: causal modes only: what position t was normalized with, shaped
        (L, *features) — count, mean and the within-batch m2 of the batch's
        prefix (or position) t; for ghost batches the merged mean and the summed
        within-group m2, as ``pooled``. Per-position running statistics follow
        its mean and variance (:func:`update_position_running`).
      ghost: the statistics are those of ghost batches.
    """

    x: Array
    moments: Moments
    pooled: Moments
    restore: Callable[[Array], Array]
    mask: Array | None = None
    normalized: Array | None = None
    positions: Moments | None = None
    ghost: bool = False


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
    causal: Causal | None = False,
    time_axis: int = 1,
    epsilon: float | None = None,
    params: Params | None = None,
) -> BatchMoments:
    """Per-feature statistics over every axis but ``feature_axes``.

    x_NxHxWxC -> moments_1x1x1xC; with ``ghost_batch_size`` g the batch splits into
    ceil(N / g) virtual batches (the last one padded and masked) and
    x_(N/g)xgxHxWxC -> moments_(N/g)x1x1x1xC; with causal 'cumulative' or
    'per_position', x_BxLxD -> moments_1xLxD. ``causal='running'`` is the
    caller's business (it normalizes with running statistics) and is refused.
    """
    feature_axes = stats.canonicalize_axes(x.ndim, feature_axes, name="axis")
    reduction_axes = other_axes(x.ndim, feature_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    mode = parse_causal(
        causal, supported=("cumulative", "per_position"), name="batch_moments"
    )
    time = None
    if mode is not None:
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
    positions = None
    if mode is not None:
        assert time is not None
        per_group = m
        if group_axis is not None:  # as ``pooled`` below, position by position
            merged = stats.merge_over(m, group_axis, keepdims=True)
            per_group = Moments(
                merged.count, merged.mean, jnp.sum(m.m2, group_axis, keepdims=True)
            )
        positions = Moments(*(_time_major(s, time, x_feature_axes) for s in per_group))
    pooled = m
    if mode == "cumulative":  # the last position has merged every position.
        assert time is not None
        pooled = Moments(*(jax.lax.slice_in_dim(s, -1, None, axis=time) for s in m))
    elif mode == "per_position":
        assert time is not None
        pooled = stats.merge_over(m, time, keepdims=True)
    if group_axis is not None:
        # Ghost batches: the pooled mean, and the sum of the groups' m2 under the
        # pooled count — the within-group variance that training normalized with,
        # which the running variance follows (as TensorFlow's virtual_batch_size).
        # Not the whole batch's m2: the one pooled statistic here that is not a
        # sufficient statistic; calibrate's merge of it across batches adds the
        # spread between batch means, not between virtual batches.
        merged = stats.merge_over(pooled, group_axis)
        pooled = Moments(merged.count, merged.mean, jnp.sum(pooled.m2, group_axis))
    pooled = Moments(*(s.reshape(feature_shape) for s in pooled))
    return BatchMoments(
        x, m, pooled, restore, mask, normalized, positions, group_axis is not None
    )


def _time_major(s: Array, time: int, feature_axes: tuple[int, ...]) -> Array:
    """A statistic with size-1 axes but ``time`` and ``feature_axes`` as
    (L, *features)."""
    keep = sorted({time, *feature_axes})
    s = s.reshape([s.shape[a] for a in keep])
    return jnp.transpose(s, [keep.index(a) for a in (time, *feature_axes)])


def _from_time_major(
    rows: Array, ndim: int, time: int, feature_axes: tuple[int, ...]
) -> Array:
    """(L, *features) as an array broadcastable against an input of ``ndim``
    dimensions with time on ``time`` and the features on ``feature_axes``."""
    source = (time, *feature_axes)
    keep = sorted(source)
    rows = jnp.transpose(rows, [source.index(a) for a in keep])
    shape = [1] * ndim
    for axis, size in zip(keep, rows.shape, strict=True):
        shape[axis] = size
    return rows.reshape(shape)


def time_axis_of(x: Array, time_axis: int, feature_axes: tuple[int, ...]) -> int:
    """The canonical time axis of ``x``; it must not be a feature axis."""
    time = stats.canonicalize_axes(x.ndim, time_axis, name="time_axis")[0]
    if time in feature_axes:
        raise ValueError(
            f"time_axis {time_axis} is a feature axis; causal statistics need time "
            "and features on different axes."
        )
    return time


def position_rows(running: Array, length: int) -> Array:
    """Rows 0..length-1 of per-position statistics (max_len, ...); positions at
    or past max_len read the last row."""
    index = jnp.minimum(jnp.arange(length), running.shape[0] - 1)
    return running[index]


def position_mean_var(
    batch_stats: BatchStats,
    x: Array,
    time: int,
    feature_axes: tuple[int, ...],
    *,
    keys: tuple[str, str] = ("mean", "var"),
) -> MeanVar:
    """Per-position running ``mean``/``var`` (max_len, *features) for ``x``:
    position t reads row t, positions past max_len the last row; broadcastable
    against ``x``."""
    length = x.shape[time]
    mean, var = (
        _from_time_major(
            position_rows(batch_stats[k], length), x.ndim, time, feature_axes
        )
        for k in keys
    )
    return MeanVar(mean, var)


def check_position_stats(
    batch_stats: BatchStats,
    keys: Mapping[str, tuple[int, ...]],
    *,
    name: str,
) -> int:
    """Checks that each of ``keys`` is shaped (max_len, *shape), one max_len for
    all; returns max_len."""
    lengths = set()
    for key, shape in keys.items():
        if key not in batch_stats:
            raise ValueError(
                f"{name}: batch_stats needs {sorted(keys)}, got keys "
                f"{sorted(batch_stats)}."
            )
        got = tuple(batch_stats[key].shape)
        if len(got) != len(shape) + 1 or got[1:] != shape or got[0] < 1:
            raise ValueError(
                f"{name}: per-position statistics batch_stats[{key!r}] must be "
                f"shaped (max_len, *{shape}), got {got}. Statistics made without "
                "per-position rows (or for another layer) need "
                "per_position_stats=False, or re-initialize them."
            )
        lengths.add(got[0])
    if len(lengths) != 1:
        raise ValueError(
            f"{name}: per-position statistics of different lengths {sorted(lengths)}."
        )
    return lengths.pop()


def update_position_running(
    batch_stats: BatchStats,
    positions: Moments,
    momentum: float,
    *,
    unbiased: bool = False,
    keys: tuple[str, str] = ("mean", "var"),
    name: str = "norm",
) -> dict[str, Array]:
    """EMA of per-position ``mean``/``var`` rows (max_len, *features) towards a
    batch's ``positions`` (L, *features): row t follows the mean and the
    within-batch variance that position t was normalized with. Rows past L, and
    rows without a valid element in the batch, keep their value."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}.")
    length = positions.count.shape[0]
    max_len = batch_stats[keys[0]].shape[0]
    if length > max_len:
        raise ValueError(
            f"{name}: training on sequences of length {length}, but the per-position "
            f"statistics hold max_len={max_len} rows; build the layer with "
            f"max_len >= {length} (or initialize it on sequences that long)."
        )
    valid = positions.count > 0
    batch = stats.mean_var(positions, ddof=1 if unbiased else 0)
    out = {}
    for key, value in zip(keys, batch, strict=True):
        # A complex mean makes the rows complex (as stats.ema does).
        old = batch_stats[key]
        old = old.astype(jnp.result_type(old.dtype, value.dtype))
        out[key] = old.at[:length].set(
            stats.ema(old[:length], value, momentum, valid=valid)
        )
    return out


def example_weighted(
    x: Array,
    running: MeanVar,
    feature_axes: tuple[int, ...],
    weight: float,
    *,
    mask: Array | None = None,
    batch_axis: int = 0,
    causal: Causal | None = False,
    time_axis: int = 1,
) -> MeanVar:
    """Inference example weighting (Summers & Dinneen 2020): each sample's own
    statistics (over its axes but the features; causal modes: over its positions
    <= t, or at t) mixed with the population's ``running`` ones with weight
    ``weight`` for the sample: the mean and variance of the two-component
    mixture,

        mean = w mu_s + (1 - w) mu,
        var  = w var_s + (1 - w) var + w (1 - w) (mu_s - mu)^2.

    With w = 1 / B this is, in expectation, what training normalized the sample
    with in a batch of B. No output depends on other samples.
    """
    if not 0.0 < weight <= 1.0:
        raise ValueError(f"example_weight must lie in (0, 1], got {weight}.")
    mode = parse_causal(causal, name="example_weighted")
    batch = stats.canonicalize_axes(x.ndim, batch_axis, name="batch_axis")[0]
    axes = tuple(a for a in range(x.ndim) if a not in feature_axes and a != batch)
    cumulative = None
    if mode is not None:
        time = time_axis_of(x, time_axis, feature_axes)
        if mode == "cumulative":
            cumulative = time
        else:  # the sample at position t alone
            axes = tuple(a for a in axes if a != time)
    sample = stats.mean_var(
        stats.moments(x, axes, mask=broadcast_mask(mask, x), cumulative_axis=cumulative)
    )
    delta = sample.mean - running.mean
    return MeanVar(
        running.mean + weight * delta,
        weight * sample.var
        + (1 - weight) * running.var
        + weight * (1 - weight) * stats.abs2(delta),
    )


def check_batch_stats(
    batch_stats: BatchStats,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    name: str,
) -> None:
    """A clear error when ``batch_stats`` lacks a key of ``shapes`` or holds
    another shape."""
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
) -> dict[str, Array]:
    """EMA of ``mean`` / ``var`` towards the batch's ``pooled`` moments; slots
    without a valid element keep their value."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}.")
    valid = pooled.count > 0
    batch = stats.mean_var(pooled, ddof=1 if unbiased else 0)
    return {
        key: stats.ema(batch_stats[key], value, momentum, valid=valid)
        for key, value in (("mean", batch.mean), ("var", batch.var))
    }


def running_mean_var(batch_stats: BatchStats, broadcast: list[int]) -> MeanVar:
    """The running ``mean``/``var``, reshaped to ``broadcast``."""
    return MeanVar(
        batch_stats["mean"].reshape(broadcast), batch_stats["var"].reshape(broadcast)
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
    causal: Causal = False,
    time_axis: int = 1,
    per_position_stats: bool = True,
    unbiased_running_var: bool = False,
    example_weight: float | None = None,
    dtype: Any = None,
) -> Normalized:
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
      causal: for sequences x_BxLxD: False, 'cumulative' (or True),
        'per_position' or 'running' (:mod:`normjax.functional.causal`).
      per_position_stats: causal modes only. True (the default): the running
        statistics are per position, ``batch_stats`` mean/var shaped
        (max_len, *features); row t is the running average of what training
        normalized position t with — the batch's prefix (or per-position) mean
        and its within-batch variance. Evaluation (and causal='running') reads
        row t at position t; a sequence shorter than max_len uses the first
        rows, a longer one reuses the last row at every position past it.
        Training on sequences longer than max_len is an error. False: one row
        (features,), updated from the moments pooled over the whole window (the
        statistics of the last position), read at every position — the old
        behaviour, kept for checkpoints made with it.
      unbiased_running_var: update the running variance with the Bessel-corrected
        batch variance (n / (n - 1)), as PyTorch does; for porting.
      example_weight: evaluation only. Normalize each sample by its own
        statistics mixed with the running ones with this weight
        (:func:`example_weighted`; 1 / the training batch size: what training
        normalized it with, in expectation).

    Returns:
      ``Normalized(y, batch_stats, moments)``; ``batch_stats`` is None when none
      were given (training without running statistics). ``moments[""]`` is what
      ``normjax.calibrate`` pools into precise statistics: the batch's
      :class:`~normjax.stats.Moments`, or for per-position and ghost statistics
      the batch's :class:`~normjax.stats.Averaged` mean and within-batch variance.
    """
    name = "batch_norm"
    feature_axes, feature_shape, broadcast = feature_layout(x, axis, name)
    mode = parse_causal(causal, name=name)
    positions = mode is not None and per_position_stats
    time = time_axis_of(x, time_axis, feature_axes) if positions else -1
    if batch_stats is not None:
        shapes = {"mean": feature_shape, "var": feature_shape}
        if positions:
            check_position_stats(batch_stats, shapes, name=name)
        else:
            check_batch_stats(batch_stats, shapes, name=name)
    if not train or mode == "running":
        if batch_stats is None:
            raise ValueError(
                f"{name}: normalizing with running statistics (train=False or "
                "causal='running'), but batch_stats is None; pass the layer's "
                "batch_stats."
            )
        if positions:
            running = position_mean_var(batch_stats, x, time, feature_axes)
        else:
            running = running_mean_var(batch_stats, broadcast)
        if example_weight is not None and not train and mode != "running":
            running = example_weighted(
                x,
                running,
                feature_axes,
                example_weight,
                mask=mask,
                batch_axis=batch_axis,
                causal=mode,
                time_axis=time_axis,
            )
        y = standardize(x, running, epsilon, broadcast_mask(mask, x))
        y = cast_output(affine(y, params, feature_axes, name=name), x, dtype)
        if not train:
            return Normalized(y, batch_stats, {})
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
            y = standardize(b.x, stats.mean_var(b.moments), epsilon, b.mask)
            y = affine(b.restore(y), params, feature_axes, name=name)
        y = cast_output(y, x, dtype)
    new_stats = None
    if batch_stats is not None:
        new_stats = update_batch_running(
            batch_stats,
            b,
            momentum,
            positions=positions,
            unbiased=unbiased_running_var,
            name=name,
        )
    return Normalized(
        y, new_stats, {"": calibration_moments(b, positions, batch_stats)}
    )


def update_batch_running(
    batch_stats: BatchStats,
    b: BatchMoments,
    momentum: float,
    *,
    positions: bool,
    unbiased: bool = False,
    name: str = "norm",
) -> dict[str, Array]:
    """``mean``/``var`` updated from ``b``: per position (``b.positions``) or
    pooled (``b.pooled``)."""
    if positions:
        assert b.positions is not None
        return update_position_running(
            batch_stats, b.positions, momentum, unbiased=unbiased, name=name
        )
    return update_running(batch_stats, b.pooled, momentum, unbiased=unbiased)


def calibration_moments(
    b: BatchMoments, positions: bool, batch_stats: BatchStats | None = None
) -> Moments | stats.Averaged:
    """What ``normjax.calibrate`` pools over batches into precise statistics:
    the batch's moments (pooled exactly: the statistics of the concatenated
    batches), or where training normalized with within-batch statistics that
    are not sufficient statistics — per-position prefixes, ghost batches — the
    batch's mean and within-batch variance, averaged over batches as the EMA
    does (per-position rows past the batch's length get weight 0)."""
    if positions:
        assert b.positions is not None
        out = stats.averaged(b.positions)
        if batch_stats is not None:  # rows past this batch's length: weight 0
            pad = batch_stats["mean"].shape[0] - out.weight.shape[0]
            if pad > 0:
                out = stats.Averaged(
                    *(jnp.pad(s, [(0, pad)] + [(0, 0)] * (s.ndim - 1)) for s in out)
                )
        return out
    if b.ghost:
        return stats.averaged(b.pooled)
    return b.pooled
