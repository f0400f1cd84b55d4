"""Norms that carry population statistics into each sample without the batch:
population norm (batch norm trained on its running statistics), the mix norm (a
sample's statistics mixed with the population's by a learned weight) and batch
group norm (batch statistics over a group of channels, Zhou et al. 2020). No
Flax import."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from normjax import stats
from normjax.functional.batch import (
    batch_moments,
    batch_norm,
    calibration_moments,
    check_batch_stats,
    check_position_stats,
    position_mean_var,
    running_mean_var,
    time_axis_of,
    update_batch_running,
    update_running,
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
    other_axes,
    standardize,
)
from normjax.functional.per_sample import group_split
from normjax.stats import Axes, MeanVar, Moments

Array = jax.Array

MIX_CAUSAL = ("cumulative", "per_position")


def _running(
    batch_stats: BatchStats,
    x: Array,
    feature_axes: tuple[int, ...],
    feature_shape: tuple[int, ...],
    broadcast: list[int],
    *,
    positions: bool,
    time_axis: int,
    name: str,
) -> MeanVar:
    """The running ``mean``/``var`` checked and broadcast against ``x`` (row t at
    position t when ``positions``)."""
    shapes = {"mean": feature_shape, "var": feature_shape}
    if positions:
        check_position_stats(batch_stats, shapes, name=name)
        time = time_axis_of(x, time_axis, feature_axes)
        return position_mean_var(batch_stats, x, time, feature_axes)
    check_batch_stats(batch_stats, shapes, name=name)
    return running_mean_var(batch_stats, broadcast)


def population_norm(
    x: Array,
    params: Params | None = None,
    batch_stats: BatchStats | None = None,
    *,
    train: bool,
    axis: Axes = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    warmup_steps: int = 200,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    causal: Causal = False,
    time_axis: int = 1,
    per_position_stats: bool = True,
    dtype: Any = None,
) -> Normalized:
    """Batch norm that trains on its population statistics.

    For the first ``warmup_steps`` training steps (counted in
    ``batch_stats['steps']``) it is batch norm. After them the forward pass
    normalizes with the running ``mean``/``var`` (no gradient through them),
    which keep following the batch's statistics as in batch norm: the prior of
    the population without the batch's noise and without a gradient through
    batch statistics. Evaluation normalizes alike; after the warm-up no output
    depends on other samples of the batch, in training either.

    Training on running statistics is known to be unstable (the statistics
    drift with the weights they normalize; Equinox shipped such a mode and
    reverted it); the warm-up puts the statistics near the weights' first.

    ``batch_stats``: ``mean``, ``var`` (per position in causal modes with
    ``per_position_stats``, as ``batch_norm``) and ``steps`` (int32 scalar).
    Causal modes as in ``batch_norm`` ('cumulative', 'per_position'); the
    population phase reads row t at position t.
    """
    name = "population_norm"
    if batch_stats is None or "steps" not in batch_stats:
        raise ValueError(
            f"{name}: batch_stats needs 'mean', 'var' and 'steps' (the training "
            "steps taken, for the warm-up)."
        )
    if warmup_steps < 0:
        raise ValueError(f"{name}: warmup_steps must be >= 0, got {warmup_steps}.")
    mode = parse_causal(causal, supported=MIX_CAUSAL, name=name)
    feature_axes, feature_shape, broadcast = feature_layout(x, axis, name)
    positions = mode is not None and per_position_stats
    steps = jnp.asarray(batch_stats["steps"])
    running = {"mean": batch_stats["mean"], "var": batch_stats["var"]}
    population = _running(
        running,
        x,
        feature_axes,
        feature_shape,
        broadcast,
        positions=positions,
        time_axis=time_axis,
        name=name,
    )
    population = MeanVar(*map(jax.lax.stop_gradient, population))

    def normalize_with_population() -> Array:
        y = standardize(x, population, epsilon, broadcast_mask(mask, x))
        return cast_output(affine(y, params, feature_axes, name=name), x, dtype)

    if not train:
        return Normalized(normalize_with_population(), batch_stats, {})
    kwargs = dict(
        axis=axis,
        momentum=momentum,
        epsilon=epsilon,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        causal=causal,
        time_axis=time_axis,
        per_position_stats=per_position_stats,
        dtype=dtype,
    )

    def warmup() -> tuple[Array, Any, Any]:
        out = batch_norm(x, params, running, train=True, **kwargs)
        return out.y, out.batch_stats, out.moments

    def populate() -> tuple[Array, Any, Any]:
        b = batch_moments(
            x,
            feature_axes,
            mask=mask,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            causal=mode,
            time_axis=time_axis,
        )
        b = b._replace(
            moments=jax.tree.map(jax.lax.stop_gradient, b.moments),
            positions=None
            if b.positions is None
            else jax.tree.map(jax.lax.stop_gradient, b.positions),
            pooled=jax.tree.map(jax.lax.stop_gradient, b.pooled),
        )
        new = update_batch_running(running, b, momentum, positions=positions, name=name)
        moments = {"": calibration_moments(b, positions, running)}
        return normalize_with_population(), new, moments

    if warmup_steps == 0:
        y, new_stats, moments = populate()
    else:
        y, new_stats, moments = jax.lax.cond(steps < warmup_steps, warmup, populate)
    return Normalized(y, {**new_stats, "steps": steps + 1}, moments)


def _mix_forward(
    x: Array,
    a: Array,
    pm: Array,
    pv: Array,
    valid: Array,
    sample: Moments,
    epsilon: float,
) -> tuple[Array, tuple[Array, ...]]:
    n = sample.count.astype(x.dtype)
    mu = sample.mean.astype(x.dtype)
    var_s = stats.variance(sample).astype(x.dtype)
    delta = mu - pm
    v = a * var_s + (1 - a) * pv + a * (1 - a) * delta * delta
    r = jax.lax.rsqrt(v + epsilon)
    # x - m = (x - mu) + (1 - a) delta
    y = jnp.where(valid, (x - mu + (1 - a) * delta) * r, 0.0)
    return y, (y, r, a, n, delta, var_s, pv, valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _mix_standardize(
    x: Array,
    a: Array,
    pm: Array,
    pv: Array,
    valid: Array,
    sample: Moments,
    epsilon: float,
    axes: tuple[int, ...],
) -> Array:
    """``(x - m) / sqrt(v + eps)`` with the mixture's mean m and variance v of
    the sample's moments ``sample`` over ``axes`` (per slot, computed from
    ``x`` by the caller; the features are not among them) and the population's
    ``pm``, ``pv`` with weight ``a``; zero where not ``valid``. One elementwise
    pass forward. Hand-derived backward, through the sample's statistics too:
    with g the cotangent, y the output, r = (v + eps)^-1/2 and sums over the
    sample's valid elements, dx = r (g - a/n (sum g + y sum g y)); no gradient
    to ``pm``, ``pv`` or (beyond that formula) ``sample``."""
    return _mix_forward(x, a, pm, pv, valid, sample, epsilon)[0]


def _mix_standardize_fwd(
    x: Array,
    a: Array,
    pm: Array,
    pv: Array,
    valid: Array,
    sample: Moments,
    epsilon: float,
    axes: tuple[int, ...],
) -> tuple[Array, tuple[Any, ...]]:
    y, res = _mix_forward(x, a, pm, pv, valid, sample, epsilon)
    return y, (*res, sample)


def _mix_standardize_bwd(
    epsilon: float, axes: tuple[int, ...], res: tuple[Any, ...], g: Array
) -> tuple[Any, ...]:
    y, r, a, n, delta, var_s, pv, valid, sample = res
    g = jnp.where(valid, g, 0.0).astype(y.dtype)
    sg = jnp.sum(g, axes, keepdims=True)
    sgy = jnp.sum(g * y, axes, keepdims=True)
    dx = jnp.where(valid, r * (g - stats.safe_div(a, n) * (sg + sgy * y)), 0.0)
    dm, dv = -r * sg, -0.5 * r * r * sgy
    da = dm * delta + dv * (var_s - pv + (1 - 2 * a) * delta * delta)
    summed = tuple(i for i, size in enumerate(a.shape) if size == 1 and da.shape[i] > 1)
    da = jnp.sum(da, summed, keepdims=True)
    # the population statistics (same shape as pv) get no gradient; the
    # sample's moments are x's, whose gradient dx already carries
    no_sample = jax.tree.map(jnp.zeros_like, sample)
    return dx, da, jnp.zeros_like(pv), jnp.zeros_like(pv), None, no_sample


_mix_standardize.defvjp(_mix_standardize_fwd, _mix_standardize_bwd)


def mix_norm(
    x: Array,
    params: Params | None = None,
    batch_stats: BatchStats | None = None,
    *,
    train: bool,
    axis: Axes = -1,
    reduction_axes: Axes | None = None,
    alpha: float | None = None,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    causal: Causal = False,
    time_axis: int = 1,
    per_position_stats: bool = True,
    dtype: Any = None,
) -> Normalized:
    """A per-sample norm with a global prior: the sample's statistics mixed with
    the population's.

    With the sample's mean and variance mu_s, var_s over ``reduction_axes``
    (default: every axis but the batch axis 0 and the features — per channel
    over space, as instance norm; in causal modes, or where no such axis is
    left, over the features — per token, as layer norm) and the population's
    mu_p, var_p per feature (the running averages of the batch's statistics,
    as batch norm keeps them; no gradient through them), and a weight a per
    feature:

        mean = a mu_s + (1 - a) mu_p
        var  = a var_s + (1 - a) var_p + a (1 - a) (mu_s - mu_p)^2

    the mean and variance of the two-component mixture. a = 1 is the per-sample
    norm, a = 0 population normalization. ``alpha`` fixes a; None (default)
    learns it per feature as ``sigmoid(params['mix_logit'])``, 0.5 at
    initialization. No output depends on other samples of the batch, in
    training or evaluation: the batch only updates the running statistics.

    Causal modes ('cumulative', 'per_position') for x_BxLxD: sample statistics
    per token (or cumulative over positions <= t when ``reduction_axes``
    includes time), population statistics per position as ``batch_norm``'s.
    """
    name = "mix_norm"
    if batch_stats is None:
        raise ValueError(f"{name}: batch_stats (population mean/var) is required.")
    params = dict(params or {})
    logit = params.pop("mix_logit", None)
    mode = parse_causal(causal, supported=MIX_CAUSAL, name=name)
    feature_axes, feature_shape, broadcast = feature_layout(x, axis, name)
    positions = mode is not None and per_position_stats
    population = _running(
        batch_stats,
        x,
        feature_axes,
        feature_shape,
        broadcast,
        positions=positions,
        time_axis=time_axis,
        name=name,
    )
    population = MeanVar(*map(jax.lax.stop_gradient, population))
    if reduction_axes is None:
        sample_axes = other_axes(x.ndim, (0, *feature_axes))
        if mode is not None or not sample_axes:
            sample_axes = feature_axes
    else:
        sample_axes = stats.canonicalize_axes(
            x.ndim, reduction_axes, name=f"{name} reduction_axes"
        )
        if 0 in sample_axes:
            raise ValueError(
                f"{name}: reduction_axes {sample_axes} include the batch axis 0; "
                "a sample's statistics are over its own axes only."
            )
    cumulative = None
    if mode is not None:
        time = time_axis_of(x, time_axis, feature_axes)
        if time in sample_axes:
            cumulative = time
    mask = broadcast_mask(mask, x)
    if alpha is not None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{name}: alpha must lie in [0, 1], got {alpha}.")
        a: Array | float = alpha
    else:
        if logit is None:
            raise ValueError(
                f"{name}: params needs 'mix_logit' of shape {feature_shape} "
                "(or pass a fixed alpha)."
            )
        if tuple(logit.shape) != feature_shape:
            raise ValueError(
                f"{name}: params['mix_logit'] must have shape {feature_shape}, got "
                f"{tuple(logit.shape)}."
            )
        a = jax.nn.sigmoid(logit.astype(stats.stat_dtype(logit.dtype)))
        a = a.reshape(broadcast)
    # The batch's moments (for the running statistics) follow from the samples'
    # when the samples' axes and the batch axis cover every non-feature axis:
    # merged over the batch, without another pass over x.
    from_samples = False
    if cumulative is None and not set(sample_axes) & set(feature_axes):
        # The common case (per channel over space): one pass of the sample's
        # moments, one elementwise pass; the same in the backward.
        dt = stats.stat_dtype(x.dtype)
        valid = jnp.ones(x.shape, bool) if mask is None else mask
        sample_moments = stats.moments(jax.lax.stop_gradient(x), sample_axes, mask=mask)
        y = _mix_standardize(
            x.astype(dt),
            jnp.broadcast_to(jnp.asarray(a, dt), broadcast),
            population.mean.astype(dt),
            population.var.astype(dt),
            valid,
            sample_moments,
            epsilon,
            sample_axes,
        )
        from_samples = (
            mode is None
            and axis_name is None
            and {0, *sample_axes} == set(other_axes(x.ndim, feature_axes))
        )
    else:
        sample = stats.mean_var(
            stats.moments(x, sample_axes, mask=mask, cumulative_axis=cumulative)
        )
        delta = sample.mean - population.mean
        mixed = MeanVar(
            population.mean + a * delta,
            a * sample.var + (1 - a) * population.var + a * (1 - a) * stats.abs2(delta),
        )
        y = standardize(x, mixed, epsilon, mask)
    y = cast_output(affine(y, params, feature_axes, name=name), x, dtype)
    if not train:
        return Normalized(y, batch_stats, {})
    if from_samples:
        pooled = stats.merge_over(sample_moments, 0, keepdims=True)
        pooled = Moments(*(s.reshape(feature_shape) for s in pooled))
        new_stats = update_running(batch_stats, pooled, momentum)
        return Normalized(y, new_stats, {"": pooled})
    b = batch_moments(
        jax.lax.stop_gradient(x),
        feature_axes,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        causal=mode,
        time_axis=time_axis,
    )
    new_stats = update_batch_running(
        batch_stats, b, momentum, positions=positions, name=name
    )
    return Normalized(
        y, new_stats, {"": calibration_moments(b, positions, batch_stats)}
    )


def batch_group_norm(
    x: Array,
    params: Params | None = None,
    batch_stats: BatchStats | None = None,
    *,
    train: bool,
    num_groups: int | None = 8,
    group_size: int | None = None,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    causal: Causal = False,
    time_axis: int = 1,
    per_position_stats: bool = True,
    example_weight: float | None = None,
    dtype: Any = None,
) -> Normalized:
    """Batch group norm (Zhou et al. 2020): batch norm whose statistics pool a
    group of channels too — over (batch, space, the group's channels), one
    mean/var per group. It separates 'pooled across the batch' from 'per
    channel': one group per channel is batch norm.

    The channels (last axis) split into groups as in group norm
    (x_NxHxWxC -> x_NxHxWxGx(C/G)); running statistics (G,) (per position
    (max_len, G) in causal modes, as ``batch_norm``); ``params`` scale/bias per
    channel (C,). Every other argument as ``batch_norm``.
    """
    name = "batch_group_norm"
    if x.ndim < 2:
        raise ValueError(f"{name}: the input needs a batch and a channel axis.")
    time = stats.canonicalize_axes(x.ndim, time_axis, name="time_axis")[0]
    if time == x.ndim - 1 and parse_causal(causal, name=name) is not None:
        raise ValueError(f"{name}: time_axis {time_axis} is the channel axis.")
    x_grouped, _, grouped_mask = group_split(
        x,
        num_groups=num_groups,
        group_size=group_size,
        reduction_axes=None,
        mask=mask,
        name=name,
    )
    out = batch_norm(
        x_grouped,
        None,
        batch_stats,
        train=train,
        axis=x.ndim - 1,  # the group axis of x_grouped
        momentum=momentum,
        epsilon=epsilon,
        mask=grouped_mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        causal=causal,
        time_axis=time,
        per_position_stats=per_position_stats,
        example_weight=example_weight,
    )
    y = affine(out.y.reshape(x.shape), params, (x.ndim - 1,), name=name)
    return Normalized(cast_output(y, x, dtype), out.batch_stats, out.moments)
