"""Online Normalization (Chiley et al., NeurIPS 2019). No Flax import.

Each sample is normalized by the running per-channel mean and variance of the
samples *before* it — a batch is processed sample by sample, so batch size 1
works and training and inference normalize alike — and the statistics then take
in the sample's own. No gradient flows through the statistics; instead the
backward pass runs the paper's control process: running estimates ``u``, ``v``
of the gradient's components along the constant and along the output, removed
from each sample's gradient with their own momentum, so that the gradients stay
orthogonal to what normalization removes (without it they drift).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from normjax import stats
from normjax.functional.batch import check_batch_stats
from normjax.functional.core import (
    BatchStats,
    Normalized,
    Params,
    affine,
    broadcast_mask,
    cast_output,
    feature_layout,
    other_axes,
)
from normjax.stats import Axes

Array = jax.Array

ONLINE_STATE = ("mean", "var", "u", "v")
ECMS = ("clamp", "layer_scaling", "none")


def _sample_axes(ndim: int, feature_axes: tuple[int, ...]) -> tuple[int, ...]:
    return other_axes(ndim, (0, *feature_axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _normalize_online(
    x: Array,
    center: Array,
    scale: Array,
    u: Array,
    v: Array,
    valid: Array,
    backward_momentum: float,
    sample_axes: tuple[int, ...],
) -> Array:
    """``(x - center) / scale`` (zero where not ``valid``); the backward pass is
    the control process, and the cotangents of ``u`` and ``v`` are their
    increments."""
    return jnp.where(valid, (x - center) / scale, 0.0)


def _normalize_online_fwd(
    x: Array,
    center: Array,
    scale: Array,
    u: Array,
    v: Array,
    valid: Array,
    backward_momentum: float,
    sample_axes: tuple[int, ...],
) -> tuple[Array, tuple[Array, ...]]:
    out = _normalize_online(
        x, center, scale, u, v, valid, backward_momentum, sample_axes
    )
    return out, (out, scale, u, v, valid, center)


def _normalize_online_bwd(
    backward_momentum: float,
    sample_axes: tuple[int, ...],
    residuals: tuple[Array, ...],
    g: Array,
) -> tuple[Any, ...]:
    out, scale, u0, v0, valid, center = residuals
    keep = 1.0 - backward_momentum
    g = jnp.where(valid, g, 0.0).astype(out.dtype)
    # per-sample reductions: sample_axes shifted by the scanned batch axis
    axes = tuple(a - 1 for a in sample_axes)
    count = jnp.sum(valid, axis=sample_axes, keepdims=True).astype(out.dtype)

    def mean_over_sample(t: Array, n: Array) -> Array:
        return stats.safe_div(jnp.sum(t, axis=axes, keepdims=True), n)

    def step(carry: tuple[Array, Array], inputs: tuple[Array, ...]) -> Any:
        u, v = carry
        g_i, out_i, scale_i, valid_i, n_i = inputs
        grad = g_i - keep * v * out_i
        v = v + mean_over_sample(grad * out_i, n_i)
        grad = grad / scale_i
        grad_in = jnp.where(valid_i, grad - keep * u, 0.0)
        u = u + mean_over_sample(grad_in, n_i)
        return (u, v), grad_in

    (u, v), grad_x = jax.lax.scan(step, (u0, v0), (g, out, scale, valid, count))
    return (
        grad_x.astype(out.dtype),
        jnp.zeros_like(center),
        jnp.zeros_like(scale),
        u - u0,
        v - v0,
        None,
    )


_normalize_online.defvjp(_normalize_online_fwd, _normalize_online_bwd)


def online_norm(
    x: Array,
    params: Params | None = None,
    batch_stats: BatchStats | None = None,
    *,
    train: bool,
    axis: Axes = -1,
    momentum: float = 1023 / 1024,
    backward_momentum: float = 127 / 128,
    epsilon: float = 1e-5,
    ecm: str = "clamp",
    clamp_value: float = 5.0,
    ls_epsilon: float = 1e-5,
    mask: Array | None = None,
    dtype: Any = None,
) -> Normalized:
    """Online Normalization (Chiley et al. 2019), the authors' algorithm.

    Statistics per sample and feature (``axis``) over every other non-batch
    axis (per channel over space). In training the batch (axis 0) is processed
    in order: sample i is normalized by the running ``mean``/``var`` left by
    samples < i (and earlier batches), ``y_i = (x_i - mean) / sqrt(var + eps)``,
    then ``var <- a var + (1 - a) var_i + a (1 - a) (mu_i - mean)^2`` and
    ``mean <- a mean + (1 - a) mu_i`` with ``a = momentum`` (the authors'
    ``alpha_fwd``, the kept fraction, as Flax's momentum; the paper's CIFAR
    setting 1023/1024 is the default). A sample with no valid element changes
    nothing. Evaluation normalizes with the running statistics, as training
    does.

    Backward: no gradient through the statistics. The control process (with
    ``b = backward_momentum``, the authors' ``alpha_bkw``, default 127/128) runs
    over the samples in order: ``g <- g - (1 - b) v y_i``, ``v <- v + mean(g
    y_i)``, ``g <- g / sqrt(var + eps)``, ``g_x <- g - (1 - b) u``, ``u <- u +
    mean(g_x)`` (means over the sample's valid elements per feature). The
    cotangents of ``batch_stats['u']`` and ``['v']`` are their increments:
    differentiate the loss with respect to them too and add them
    (``functional.apply_nu_updates``; the Linen module and ``normjax.train``
    do it through Flax's 'perturbations' collection).

    Then the affine ``scale``/``bias`` and the paper's error compensation
    ``ecm``: 'clamp' (clip to ±``clamp_value``, the authors' default 5),
    'layer_scaling' (divide each sample by its root mean square over every
    non-batch axis) or 'none'.

    ``batch_stats``: ``mean``, ``var``, ``u``, ``v`` (feature-shaped).
    """
    name = "online_norm"
    feature_axes, feature_shape, broadcast = feature_layout(x, axis, name)
    if 0 in feature_axes:
        raise ValueError(f"{name}: the batch axis 0 cannot be a feature axis.")
    if batch_stats is None:
        raise ValueError(f"{name}: batch_stats needs {ONLINE_STATE}.")
    check_batch_stats(
        batch_stats, dict.fromkeys(ONLINE_STATE, feature_shape), name=name
    )
    if ecm not in ECMS:
        raise ValueError(f"{name}: ecm={ecm!r} is not one of {ECMS}.")
    for label, value in (
        ("momentum", momentum),
        ("backward_momentum", backward_momentum),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: {label} must lie in [0, 1], got {value}.")
    if epsilon < 0:
        raise ValueError(f"{name}: epsilon must be >= 0, got {epsilon}.")
    dt = stats.stat_dtype(x.dtype)
    mask_b = broadcast_mask(mask, x)
    valid = jnp.ones(x.shape, bool) if mask_b is None else mask_b
    sample_axes = _sample_axes(x.ndim, feature_axes)
    mean0 = batch_stats["mean"].astype(dt)
    var0 = batch_stats["var"].astype(dt)
    new_stats = dict(batch_stats)
    if train:
        m = stats.moments(x, sample_axes, mask=mask_b)  # per sample, keepdims
        n = x.shape[0]
        per_sample = [s.reshape((n, *feature_shape)) for s in m]
        count, mu = per_sample[0], per_sample[1]
        var_s = stats.safe_div(per_sample[2], count)
        a = momentum

        def step(carry: tuple[Array, Array], sample: tuple[Array, ...]) -> Any:
            mean, var = carry
            c, mu_i, var_i = sample
            seen = c > 0
            new_var = a * var + (1 - a) * var_i + a * (1 - a) * jnp.square(mu_i - mean)
            new_mean = mean + (1 - a) * (mu_i - mean)
            carry = (jnp.where(seen, new_mean, mean), jnp.where(seen, new_var, var))
            return carry, (mean, var)

        (mean_n, var_n), (centers, variances) = jax.lax.scan(
            step, (mean0, var0), (count, mu, var_s)
        )
        sample_broadcast = [n, *broadcast[1:]]
        center = jax.lax.stop_gradient(centers.reshape(sample_broadcast))
        scale = jax.lax.stop_gradient(
            jnp.sqrt(variances.reshape(sample_broadcast) + epsilon)
        )
        u = batch_stats["u"].astype(dt).reshape(broadcast[1:])
        v = batch_stats["v"].astype(dt).reshape(broadcast[1:])
        y = _normalize_online(
            x.astype(dt), center, scale, u, v, valid, backward_momentum, sample_axes
        )
        new_stats["mean"] = mean_n.astype(batch_stats["mean"].dtype)
        new_stats["var"] = var_n.astype(batch_stats["var"].dtype)
    else:
        center = mean0.reshape(broadcast)
        scale = jnp.sqrt(var0.reshape(broadcast) + epsilon)
        y = jnp.where(valid, (x.astype(dt) - center) / scale, 0.0)
    y = affine(y, params, feature_axes, name=name)
    if ecm == "clamp":
        y = jnp.clip(y, -clamp_value, clamp_value)
    elif ecm == "layer_scaling":
        axes = tuple(range(1, x.ndim))
        count = jnp.sum(valid, axes, keepdims=True)
        square = stats.safe_div(
            jnp.sum(jnp.where(valid, y * y, 0.0), axes, keepdims=True), count
        )
        y = y * jax.lax.rsqrt(square + ls_epsilon)
    return Normalized(cast_output(y, x, dtype), new_stats, {})
