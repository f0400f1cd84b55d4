"""Batch-layer normalization, BLN (Ziaee & Cano 2022). No Flax import."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from normjax import stats
from normjax.functional.batch import (
    BatchMoments,
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
    broadcast_shape,
    cast_output,
    check_params,
    feature_layout,
    other_axes,
    standardize,
)
from normjax.stats import Axes, MeanVar, Moments

Array = jax.Array
BLN_SOURCES = ("running", "batch")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _bln_train(
    x: Array,
    mask: Array | None,
    scale: Array | None,
    bias: Array | None,
    weight: Array,
    feature_axes: tuple[int, ...],
    reduce_features: tuple[int, ...],
    epsilon: float,
) -> tuple[Array, Moments, Moments]:
    """BLN in training, non-causal, in one elementwise pass each way:
    ``(w x_F + (1 - w) x_B) * scale + bias`` with x_B standardized per feature
    over every other axis and x_F per slot over ``reduce_features``, and both
    sets of moments (for the running statistics). Hand-derived backward: the
    sum of the two standardizations' backward passes (see ``_bln_train_bwd``)."""
    return _bln_train_fwd(
        x, mask, scale, bias, weight, feature_axes, reduce_features, epsilon
    )[0]


def _bln_train_fwd(
    x: Array,
    mask: Array | None,
    scale: Array | None,
    bias: Array | None,
    weight: Array,
    feature_axes: tuple[int, ...],
    reduce_features: tuple[int, ...],
    epsilon: float,
) -> tuple[tuple[Array, Moments, Moments], tuple[Any, ...]]:
    mb = stats.moments(x, other_axes(x.ndim, feature_axes), mask=mask)
    mf = stats.moments(x, reduce_features, mask=mask)
    dtype = mb.mean.dtype
    rb = jax.lax.rsqrt(stats.variance(mb) + epsilon)
    rf = jax.lax.rsqrt(stats.variance(mf) + epsilon)
    if mask is not None:  # an empty slot (epsilon 0): no infinite scale anywhere
        rb = jnp.where(mb.count > 0, rb, 0.0)
        rf = jnp.where(mf.count > 0, rf, 0.0)
    w = weight.astype(dtype)
    xd = x.astype(dtype)
    y = w * ((xd - mf.mean) * rf) + (1 - w) * ((xd - mb.mean) * rb)
    if mask is not None:  # selected: padding may hold NaN or inf
        y = jnp.where(mask, y, 0.0)
    shape = broadcast_shape(x.shape, feature_axes)
    if scale is not None:
        y = y * scale.reshape(shape).astype(dtype)
    if bias is not None:
        y = y + bias.reshape(shape).astype(dtype)
    residuals = (x, mask, scale, bias, weight, mb.count, mb.mean, rb, mf.count)
    return (y, mb, mf), (*residuals, mf.mean, rf)


def _bln_train_bwd(
    feature_axes: tuple[int, ...],
    reduce_features: tuple[int, ...],
    epsilon: float,
    residuals: tuple[Any, ...],
    cotangents: tuple[Array, Moments, Moments],
) -> tuple[Any, ...]:
    # Each part is normalize's standardization (see core._normalize_bwd) with
    # the cotangent g = dy * scale weighted by (1 - w) (batch part, sums over
    # the batch axes B) or w (feature part, sums over the feature axes F):
    #   dx = m ((1-w) rb g + w rf g + cb A_b + cf A_f + B_b + B_f),
    #   A_b = 2 dm2_b - rb^3/n_b (1-w) sum_B(g cb),
    #   B_b = (dmean_b - rb (1-w) sum_B(g)) / n_b, and alike for F with w;
    #   dscale = sum_B(dy m (w cf rf + (1-w) cb rb)), dbias = sum_B(dy).
    # Two reduction passes over (x, dy) — per feature over B, per slot over F
    # — then one elementwise pass.
    x, mask, scale, bias, weight, nb, mub, rb, nf, muf, rf = residuals
    dy, dmb, dmf = cotangents
    dtype = mub.dtype
    w = weight.astype(dtype)
    batch_axes = other_axes(x.ndim, feature_axes)
    xd = x.astype(dtype)
    cb, cf = xd - mub, xd - muf
    dy = dy.astype(dtype)
    if mask is not None:
        cb, cf = jnp.where(mask, cb, 0.0), jnp.where(mask, cf, 0.0)
    dy_valid = dy if mask is None else jnp.where(mask, dy, 0.0)
    shape = broadcast_shape(x.shape, feature_axes)
    # The parameters are constant along the batch axes: sums over them of dy,
    # dy cb and dy cf rf serve the batch part's sums and both parameters' (three
    # reductions in one pass; a masked output is the bias, so dbias sums every dy).
    sum_b = stats.reduce_sum(dy_valid, batch_axes)
    sum_bc = stats.reduce_sum(dy_valid * cb, batch_axes)
    dbias = dscale = None
    if bias is not None:
        dbias = sum_b if mask is None else stats.reduce_sum(dy, batch_axes)
        dbias = dbias.reshape(bias.shape).astype(bias.dtype)
    if scale is not None:
        sum_bcf = stats.reduce_sum(dy_valid * (cf * rf), batch_axes)
        dscale = w * sum_bcf + (1 - w) * rb * sum_bc
        dscale = dscale.reshape(scale.shape).astype(scale.dtype)
        scale_b = scale.reshape(shape).astype(dtype)
        g = dy_valid * scale_b
        sum_b, sum_bc = sum_b * scale_b, sum_bc * scale_b
    else:
        g = dy_valid
    sum_f = stats.reduce_sum(g, reduce_features)
    sum_fc = stats.reduce_sum(g * cf, reduce_features)
    inv_nb = stats.safe_div(jnp.ones_like(nb), nb)
    inv_nf = stats.safe_div(jnp.ones_like(nf), nf)
    a_b = 2.0 * dmb.m2.astype(dtype) - rb * rb * rb * inv_nb * (1 - w) * sum_bc
    a_f = 2.0 * dmf.m2.astype(dtype) - rf * rf * rf * inv_nf * w * sum_fc
    dx = ((1 - w) * rb + w * rf) * g + cb * a_b + cf * a_f
    dx = dx + inv_nb * (dmb.mean.astype(dtype) - rb * (1 - w) * sum_b)
    dx = dx + inv_nf * (dmf.mean.astype(dtype) - rf * w * sum_f)
    if mask is not None:
        dx = jnp.where(mask, dx, 0.0)
    return dx.astype(x.dtype), None, dscale, dbias, jnp.zeros_like(weight)


_bln_train.defvjp(_bln_train_fwd, _bln_train_bwd)


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
    # Training, non-causal, on one device: one function with a hand-derived
    # backward pass (``_bln_train``), not autodiff through two sets of moments.
    one_pass = train and mode is None and axis_name is None and not jnp.iscomplexobj(x)
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

    def mix_weight(samples: Array) -> Array:
        # 1/B in the computation's precision (float64 inputs: 1/5 is not float32's)
        return 1.0 / jnp.maximum(samples.astype(jnp.result_type(x, jnp.float32)), 1.0)

    if one_pass:
        # Both parts, the mixture and the affine in one custom-VJP function.
        params = dict(params or {})
        check_params(x.shape, params, feature_axes, name=name)
        y, mb, feature_moments = _bln_train(
            x,
            mask,
            params.get("scale"),
            params.get("bias"),
            mix_weight(samples),
            feature_axes,
            reduce_features,
            float(epsilon),
        )
        y = cast_output(y, x, dtype)
        pooled = Moments(*(s.reshape(feature_shape) for s in mb))
        b = BatchMoments(x, mb, pooled, lambda y: y, mask)
        return _bln_training_output(
            y, b, feature_moments, batch_stats, samples, momentum, positions=False
        )
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
    if (
        "samples" in batch_stats
        and not train
        and tuple(sources[:2]) != ("batch", "batch")
    ):
        # Evaluation with population batch statistics mixes as training did:
        # with the training batch's B, whatever the evaluation batch holds.
        samples = batch_stats["samples"].reshape(())
    weight = mix_weight(samples)
    y = weight * standardize(x, feature_part, epsilon, mask) + (
        1 - weight
    ) * standardize(x, batch_part, epsilon, mask)
    y = cast_output(affine(y, params, feature_axes, name=name), x, dtype)
    if not train:
        return Normalized(y, batch_stats, {})
    return _bln_training_output(
        y,
        b,
        feature_moments,
        batch_stats,
        samples,
        momentum,
        positions=positions,
        time=time if positions else None,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    )


def _bln_training_output(
    y: Array,
    b: BatchMoments,
    feature_moments: Moments,
    batch_stats: BatchStats,
    samples: Array,
    momentum: float,
    *,
    positions: bool,
    time: int | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> Normalized:
    """The training output: ``y`` with the four running statistics (and B)
    updated from the batch's and the samples' moments."""
    name = "batch_layer_norm"
    sample = stats.mean_var(feature_moments)
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
