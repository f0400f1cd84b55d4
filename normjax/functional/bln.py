"""Batch-layer normalization, BLN (Ziaee & Cano 2022). No Flax import."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from normjax import stats
from normjax.functional.batch import (
    batch_moments,
    calibration_moments,
    check_batch_stats,
    check_position_stats,
    example_weighted,
    position_mean_var,
    position_rows,
    running_mean_var,
    time_axis_of,
    update_batch_running,
)
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
    standardize,
)
from normjax.stats import Axes, MeanVar

Array = jax.Array
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
    causal: Causal = False,
    time_axis: int = 1,
    per_position_stats: bool = True,
    example_weight: float | None = None,
    dtype: Any = None,
) -> Normalized:
    """Batch-layer normalization, BLN (Ziaee & Cano 2022, arXiv:2209.08898).

    x_B = (x - mu_B) / sqrt(var_B + eps): batch statistics per channel (``axis``)
    over every other axis, as batch norm; x_F = (x - mu_F) / sqrt(var_F + eps):
    per-sample statistics over ``feature_reduction_axes``, as layer norm. With B the
    number of samples in the batch (across ``axis_name`` devices; with a ``mask``,
    those with at least one valid element), y = (1/B) x_F + (1 - 1/B) x_B, then
    the affine ``scale``/``bias`` per channel.

    Four running statistics: ``mean``/``var`` (C,) for the batch part and
    ``feature_mean``/``feature_var`` (scalars), the population averages of the
    per-sample statistics; and ``samples`` (optional, a scalar), the B of the
    last training batch: evaluation with running batch statistics mixes with
    it, so its output does not depend on the evaluation batch (without the key,
    the evaluation batch's B). At inference each of (batch mean, batch var, feature
    mean, feature var) comes from ``inference[i]`` in {'running', 'batch'} (the
    current batch or sample): the paper's 16 inference configurations.

    Departures from the paper's code: its feature running statistics are kept per
    batch slot (shape (B, 1)), tying inference to the training batch size; here
    they are population scalars. Its variance is unbiased, NaN at B = 1; here it
    is the biased one, finite at B = 1 (where y = x_F). Precise statistics
    (``normjax.calibrate``) recompute the batch pair only.

    In causal modes with ``per_position_stats`` (the default; see
    ``batch_norm``) all four running statistics are per position: ``mean``/``var``
    (max_len, C), ``feature_mean``/``feature_var`` (max_len,), row t the running
    average of what position t was normalized with.
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
    mode = parse_causal(causal, name=name)
    positions = mode is not None and per_position_stats
    if positions:
        check_position_stats(batch_stats, shapes, name=name)
    else:
        check_batch_stats(batch_stats, shapes, name=name)
    if len(inference) != 4 or any(s not in BLN_SOURCES for s in inference):
        raise ValueError(
            f"{name}: inference={inference!r} must give 4 sources (batch mean, batch "
            f"var, feature mean, feature var), each one of {BLN_SOURCES}."
        )
    sources = ("batch",) * 4 if train else tuple(inference)
    if mode == "running":
        sources = ("running",) * 4
    mask = broadcast_mask(mask, x)
    reduce_features = stats.canonicalize_axes(
        x.ndim, feature_reduction_axes, name=f"{name} feature_reduction_axes"
    )
    # Training, non-causal: both parts through the fused normalize (its
    # hand-derived backward pass), not autodiff through two sets of moments.
    fused = train and mode is None
    y_feature = None
    if fused:
        y_feature, feature_moments = normalize(
            x, reduce_features, epsilon=epsilon, mask=mask
        )
    else:
        feature_moments = stats.moments(
            x,
            reduce_features,
            mask=mask,
            cumulative_axis=None if mode in (None, "running") else time_axis,
        )
    b = batch_moments(
        x,
        feature_axes,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        causal="per_position" if mode == "running" else mode,
        time_axis=time_axis,
        epsilon=epsilon if fused else None,
    )
    if positions:
        time = time_axis_of(x, time_axis, feature_axes)
        running = position_mean_var(batch_stats, x, time, feature_axes)
        shape = [1] * x.ndim
        shape[time] = x.shape[time]
        running_feature = MeanVar(
            *(
                position_rows(batch_stats[k], x.shape[time]).reshape(shape)
                for k in ("feature_mean", "feature_var")
            )
        )
    else:
        running = running_mean_var(batch_stats, broadcast)
        running_feature = MeanVar(
            batch_stats["feature_mean"], batch_stats["feature_var"]
        )
    if (
        example_weight is not None and not train and mode != "running"
    ):  # the batch part, see batch_norm
        running = example_weighted(
            x,
            running,
            feature_axes,
            example_weight,
            mask=mask,
            causal=mode,
            time_axis=time_axis,
        )
    batch, sample = stats.mean_var(b.moments), stats.mean_var(feature_moments)

    def pick(source: str, current: Array, run: Array) -> Array:
        return current if source == "batch" else run

    batch_part = MeanVar(
        pick(sources[0], batch.mean, running.mean),
        pick(sources[1], batch.var, running.var),
    )
    feature_part = MeanVar(
        pick(sources[2], sample.mean, running_feature.mean),
        pick(sources[3], sample.var, running_feature.var),
    )
    # B counts the samples with at least one valid element: padding samples of a
    # masked batch are not samples.
    n = x.shape[0]
    is_sample = (
        jnp.ones((n,), bool) if mask is None else jnp.any(mask.reshape(n, -1), axis=1)
    )
    samples = stats.masked_sum(
        is_sample.astype(jnp.float32),
        0,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    )[0]
    if (
        "samples" in batch_stats
        and not train
        and tuple(sources[:2]) != ("batch", "batch")
    ):
        # Evaluation with population batch statistics mixes as training did:
        # with the training batch's B, whatever the evaluation batch holds.
        samples = batch_stats["samples"].reshape(())
    # in the computation's precision (float64 inputs: 1/5 is not float32's)
    weight = 1.0 / jnp.maximum(samples.astype(jnp.result_type(x, jnp.float32)), 1.0)
    if fused:
        assert y_feature is not None and b.normalized is not None
        y = weight * y_feature + (1 - weight) * b.normalized
    else:
        y = weight * standardize(x, feature_part, epsilon, mask) + (
            1 - weight
        ) * standardize(x, batch_part, epsilon, mask)
    y = cast_output(affine(y, params, feature_axes, name=name), x, dtype)
    if not train:
        return Normalized(y, batch_stats, {})
    new_stats = update_batch_running(
        batch_stats, b, momentum, positions=positions, name=name
    )
    # Feature statistics: the mean over valid samples/positions (and devices) of
    # the per-sample mean and variance — per position, or over all of them.
    valid = feature_moments.count > 0
    if positions:
        reduce = tuple(a for a in range(valid.ndim) if a != time)
    else:
        reduce = tuple(range(valid.ndim))
    slots = stats.masked_sum(
        valid.astype(jnp.float32),
        reduce,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    ).reshape(-1)
    for key, value in (("feature_mean", sample.mean), ("feature_var", sample.var)):
        total = stats.masked_sum(
            value,
            reduce,
            mask=valid,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
        ).reshape(-1)
        new_value = stats.safe_div(total, slots)
        old = batch_stats[key]
        if positions:
            length = new_value.shape[0]
            new_stats[key] = old.at[:length].set(
                stats.ema(old[:length], new_value, momentum, valid=slots > 0)
            )
        else:
            new_stats[key] = stats.ema(
                old, new_value.reshape(()), momentum, valid=(slots > 0).reshape(())
            )
    if "samples" in batch_stats:
        new_stats["samples"] = jnp.where(
            samples > 0, samples, batch_stats["samples"]
        ).astype(batch_stats["samples"].dtype)
    return Normalized(
        y, new_stats, {"": calibration_moments(b, positions, batch_stats)}
    )
