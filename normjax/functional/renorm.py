"""Batch renormalization (Ioffe 2017). No Flax import."""

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
    standardize,
)
from normjax.stats import Axes

Array = jax.Array


def renorm_limits(
    step: Array,
    r_max: float | Array,
    d_max: float | Array,
    relax: tuple[int, int, int],
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
    causal: Causal = False,
    time_axis: int = 1,
    per_position_stats: bool = True,
    example_weight: float | None = None,
    dtype: Any = None,
) -> Normalized:
    """Batch renormalization (Ioffe 2017): batch statistics corrected towards the
    running ones, so training and inference normalize alike.

    With batch mu_B, sigma_B and running mu, sigma (sigma = sqrt(var + eps)):
    r = stop_gradient(clip(sigma_B / sigma, 1/r_max, r_max)),
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max)),
    x_hat = (x - mu_B) / sigma_B * r + d. Evaluation: (x - mu) / sigma. The running
    statistics are updated as in ``batch_norm``. r_max = 1, d_max = 0 is batch norm.
    In causal modes with ``per_position_stats`` (the default; see ``batch_norm``)
    the running statistics are per position, and position t's r and d compare
    its batch statistics with row t.
    """
    name = "batch_renorm"
    feature_axes, feature_shape, broadcast = feature_layout(x, axis, name)
    if batch_stats is None:
        raise ValueError(f"{name}: batch_stats (running mean/var) is required.")
    mode = parse_causal(causal, name=name)
    positions = mode is not None and per_position_stats
    shapes = {"mean": feature_shape, "var": feature_shape}
    if positions:
        check_position_stats(batch_stats, shapes, name=name)
        time = time_axis_of(x, time_axis, feature_axes)
        running = position_mean_var(batch_stats, x, time, feature_axes)
    else:
        check_batch_stats(batch_stats, shapes, name=name)
        running = running_mean_var(batch_stats, broadcast)
    if not train or mode == "running":
        if (
            example_weight is not None and not train and mode != "running"
        ):  # see batch_norm
            running = example_weighted(
                x,
                running,
                feature_axes,
                example_weight,
                mask=mask,
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
        causal="per_position" if mode == "running" else mode,
        time_axis=time_axis,
        # Non-causal: x standardized by the batch's moments through the fused
        # normalize (its hand-derived backward); r and d are constants to it.
        epsilon=epsilon if mode is None else None,
    )
    if mode != "running":
        sigma_batch = jnp.sqrt(stats.variance(b.moments) + epsilon)
        sigma = jnp.sqrt(running.var + epsilon)
        r = jax.lax.stop_gradient(jnp.clip(sigma_batch / sigma, 1.0 / r_max, r_max))
        d = jax.lax.stop_gradient(
            jnp.clip((b.moments.mean - running.mean) / sigma, -d_max, d_max)
        )
        standardized = b.normalized
        if standardized is None:  # causal: per-position or prefix moments
            standardized = standardize(x, stats.mean_var(b.moments), epsilon, b.mask)
        x_hat = standardized * r + d
        if b.mask is not None:  # padding: 0 before the affine, as every norm
            x_hat = jnp.where(b.mask, x_hat, 0.0)
        y = cast_output(affine(x_hat, params, feature_axes, name=name), x, dtype)
    new_stats = update_batch_running(
        batch_stats, b, momentum, positions=positions, name=name
    )
    return Normalized(
        y, new_stats, {"": calibration_moments(b, positions, batch_stats)}
    )
