"""The pieces every norm is built from: ``standardize``, ``affine`` and the fused
``normalize`` (statistics, standardize and affine in one, with a hand-derived
backward pass). No Flax import.

``params`` is a mapping with optional ``'scale'`` and ``'bias'``, shaped like the
input's feature axes — the tree Flax keeps in ``params``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normjax import stats
from normjax.stats import Averaged, Axes, MeanVar, Moments

Array = jax.Array
Params = Mapping[str, Array]
BatchStats = Mapping[str, Array]


class Normalized(NamedTuple):
    """What a norm with running statistics returns.

    Attributes:
      y: the normalized output.
      batch_stats: the new running statistics (training), the given ones
        (evaluation), or None when none were given.
      moments: ``{prefix: Moments}``, the batch moments behind each running pair
        ``{prefix}mean``/``{prefix}var`` (empty in evaluation) — what
        ``normjax.calibrate`` merges into precise statistics; or
        ``stats.Averaged`` where the population value is the average of
        per-batch statistics (per-position prefixes, ghost batches).
    """

    y: Array
    batch_stats: Any
    moments: Mapping[str, Moments | Averaged]


class NormalizeOutput(NamedTuple):
    """:func:`normalize`'s output ``y`` and the moments it normalized with."""

    y: Array
    moments: Moments


def standardize(
    x: Array, mv: MeanVar, epsilon: float, mask: Array | None = None
) -> Array:
    """``(x - mean) * rsqrt(var + epsilon)`` in the statistics' dtype; ``mv``
    broadcasts against ``x`` (mean 0, var the mean square: RMS normalization).

    Where ``mask`` is False the result is 0, whatever ``x`` holds there (NaN and
    inf included), and no gradient reaches ``x`` or the statistics from there.
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}.")
    mean = jnp.asarray(mv.mean)
    x = x.astype(jnp.result_type(mean.dtype, x.dtype))
    if mask is None:
        return (x - mean) * jax.lax.rsqrt(mv.var + epsilon)
    # Selected on the way in (no arithmetic on what padding holds) and on the way
    # out (no cotangent from a padded output reaches the statistics); a slot
    # with nothing in it (variance 0, epsilon 0) divides by nothing.
    x = jnp.where(mask, x, jnp.broadcast_to(mean, x.shape))
    total = mv.var + epsilon
    inverse = jnp.where(total > 0, jax.lax.rsqrt(jnp.where(total > 0, total, 1.0)), 0.0)
    return jnp.where(mask, (x - mean) * inverse, 0.0)


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
) -> NormalizeOutput:
    """``affine(standardize(x, mean_var(m), epsilon, mask), params, feature_axes)``
    with ``m = stats.moments(x, axes, mask=mask, ...)`` (keepdims): the core of
    batch, layer, RMS, instance and group norm. ``params`` ('scale' and/or
    'bias', shaped like the ``feature_axes`` of ``x``) are optional. Masked
    elements standardize to 0 (their output is the bias), whatever they hold.

    Without ``axis_name`` its backward pass is hand-derived (``jax.custom_vjp``,
    the derivation beside ``_normalize_bwd``): it saves only ``x``, the
    parameters and per-slot statistics, and needs one pass of reductions instead
    of autodiff through the two-pass statistics. With ``axis_name`` (or a
    complex input) it is plain autodiff of the same forward.
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}.")
    axes = stats.canonicalize_axes(x.ndim, axes)
    feature_axes = stats.canonicalize_axes(x.ndim, feature_axes, name="feature_axes")
    check_params(x.shape, params, feature_axes, name=name)
    if mask is not None:
        mask = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    if axis_name is not None or jnp.iscomplexobj(x):
        m = stats.moments(
            x,
            axes,
            mask=mask,
            center=center,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
        )
        y = standardize(x, stats.mean_var(m), epsilon, mask)
        return NormalizeOutput(affine(y, params, feature_axes), m)
    params = params or {}
    y, m = _normalize(
        x,
        mask,
        params.get("scale"),
        params.get("bias"),
        axes,
        feature_axes,
        center,
        float(epsilon),
    )
    return NormalizeOutput(y, m)


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
    if mask is not None:  # an empty slot (epsilon 0): no infinite scale anywhere
        r = jnp.where(m.count > 0, r, 0.0)
    dtype = m.mean.dtype
    shape = broadcast_shape(x.shape, feature_axes)
    y = (x.astype(dtype) - m.mean) * r
    if mask is not None:  # selected: padding may hold NaN or inf
        y = jnp.where(mask, y, 0.0)
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
    # The forward is y = w c r * scale + bias with w the mask, c = x - mean and r
    # the reciprocal std: a masked output is the bias alone. With 1/n (0 for an
    # empty slot), g = dy * scale and sums over ``axes`` of the valid positions:
    #   dx = w (r g + c A + B),  A = 2 dm2 - r^3/n sum(g c),
    #                            B = (dmean - r sum(g)) / n   (centred only),
    #   dscale = sum(dy w c r),  dbias = sum(dy)         (sums over the others),
    # where dmean, dm2 are the cotangents of the returned moments (d mean/dx = w/n,
    # d m2/dx = 2 w c). c is taken 0 where w is: padding may hold NaN or inf.
    # One fused reduction pass over (x, dy), then one elementwise pass; the
    # centring inside the sums keeps them exact when |mean| >> std.
    x, mask, scale, bias, count, mean, r = residuals
    dy, dm = cotangents
    dtype = mean.dtype
    dy = dy.astype(dtype)
    xc = x.astype(dtype)

    def centred() -> Array:  # c = x - mean, 0 where masked
        c = xc - mean
        return c if mask is None else jnp.where(mask, c, 0.0)

    others = other_axes(x.ndim, feature_axes)
    shape = broadcast_shape(x.shape, feature_axes)
    scale_b = None if scale is None else scale.reshape(shape).astype(dtype)
    pooled = tuple(a for a in axes if a not in feature_axes)
    # Batch, group and instance norm, centred, without a mask: where every slot's
    # |mean| <= sqrt(3) std (the forward's one-pass bound), the partial sums of
    # dy c are sum(dy x) - mean sum(dy), which loses no more than float32
    # rounding of a few std; otherwise (lax.cond, one branch runs) the centred
    # sums. Then c feeds dx alone: XLA:CPU writes out in full a c shared by a
    # reduction and dx (group norm's full-size temporary in the compiled step).
    guarded = mask is None and center and bool(pooled)
    safe = jnp.all(mean * mean * (r * r) <= stats.ONE_PASS_RATIO) if guarded else None
    # The mean term sums g over the valid positions only (a masked output is the
    # bias, whatever the mean): dy itself may be anything at padding.
    dy_valid = dy if mask is None else jnp.where(mask, dy, 0.0)
    sum_dy: Array | None = None
    if pooled:
        # Batch and group norm: the parameters are constant along the ``pooled``
        # axes, so sums over them of dy and dy c (c = x - mean) first; every
        # other sum, and the scale, then work on those small partial sums (no
        # scaled or standardized full-size copy for XLA to materialize).
        part_dy = stats.reduce_sum(dy, pooled)
        if guarded:
            part_dyc = jax.lax.cond(
                safe,
                lambda: stats.reduce_sum(dy * xc, pooled) - mean * part_dy,
                lambda: stats.reduce_sum(dy * centred(), pooled),
            )
        else:
            part_dyc = stats.reduce_sum(dy_valid * centred(), pooled)
        part_valid = part_dy if mask is None else stats.reduce_sum(dy_valid, pooled)
        rest = tuple(a for a in others if a not in pooled)  # e.g. ghost groups
        dbias = None if bias is None else jnp.sum(part_dy, rest, keepdims=True)
        dscale = None if scale is None else jnp.sum(r * part_dyc, rest, keepdims=True)
        if scale_b is not None:
            part_valid, part_dyc = part_valid * scale_b, part_dyc * scale_b
            dy = dy * scale_b
        within = tuple(a for a in axes if a not in pooled)  # group norm's channels
        if center:
            sum_dy = jnp.sum(part_valid, within, keepdims=True)
        sum_dyc = jnp.sum(part_dyc, within, keepdims=True)
    else:  # layer/RMS norm over the features
        dscale = dbias = None
        if bias is not None:
            dbias = stats.reduce_sum(dy, others)
        c = centred()
        if scale_b is not None:
            dscale = stats.reduce_sum(dy_valid * (c * r), others)
            dy, dy_valid = dy * scale_b, dy_valid * scale_b
        sum_dyc = stats.reduce_sum(dy_valid * c, axes)
        if center:
            sum_dy = stats.reduce_sum(dy_valid, axes)
    if dbias is not None:
        dbias = dbias.reshape(bias.shape).astype(bias.dtype)
    if dscale is not None:
        dscale = dscale.reshape(scale.shape).astype(scale.dtype)
    inv_n = stats.safe_div(jnp.ones_like(count), count)
    dm2 = dm.m2.astype(dtype)
    a = 2.0 * dm2 - r * r * r * inv_n * sum_dyc
    shift: Array | float = 0.0
    if sum_dy is not None:
        shift = inv_n * (dm.mean.astype(dtype) - r * sum_dy)
    dx = r * dy + centred() * a + shift
    if mask is not None:
        dx = jnp.where(mask, dx, 0.0)
    return dx.astype(x.dtype), None, dscale, dbias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def check_params(
    shape: tuple[int, ...],
    params: Params | None,
    feature_axes: tuple[int, ...],
    *,
    name: str,
) -> None:
    """A clear error when ``params`` holds other keys than 'scale' and 'bias' or
    shapes that are not the input's feature shape."""
    feature_shape = tuple(shape[a] for a in feature_axes)
    for key in params or {}:
        if key not in ("scale", "bias"):
            raise ValueError(
                f"{name}: unknown parameter {key!r}; expected 'scale' and/or 'bias'."
            )
        got = tuple(params[key].shape)  # type: ignore[index]
        if got != feature_shape:
            raise ValueError(
                f"{name}: params[{key!r}] has shape {got} but the input's feature "
                f"axes {feature_axes} have shape {feature_shape}; the parameters "
                "belong to another layer or the feature axes are set wrongly."
            )


def broadcast_shape(shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> list:
    """``shape`` with every axis but ``feature_axes`` set to 1."""
    return [n if a in feature_axes else 1 for a, n in enumerate(shape)]


def affine(
    y: Array,
    params: Params | None,
    feature_axes: tuple[int, ...],
    *,
    name: str = "affine",
) -> Array:
    """``y * scale + bias`` with parameters of the shape of ``y``'s feature axes."""
    if not params:
        return y
    check_params(y.shape, params, feature_axes, name=name)
    broadcast = broadcast_shape(y.shape, feature_axes)
    if "scale" in params:
        y = y * params["scale"].reshape(broadcast).astype(y.dtype)
    if "bias" in params:
        y = y + params["bias"].reshape(broadcast).astype(y.dtype)
    return y


def cast_output(y: Array, x: Array, dtype: Any) -> Array:
    """``y`` in ``dtype``, or in the input's dtype when ``dtype`` is None."""
    return y.astype(x.dtype if dtype is None else dtype)


def other_axes(ndim: int, axes: tuple[int, ...]) -> tuple[int, ...]:
    """The axes of an ``ndim``-dimensional array that are not in ``axes``."""
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


def feature_layout(
    x: Array, axis: Axes, name: str
) -> tuple[tuple[int, ...], tuple[int, ...], list[int]]:
    """(feature axes, feature shape, shape that broadcasts feature-shaped
    statistics against ``x``) for the features on ``axis``."""
    feature_axes = stats.canonicalize_axes(x.ndim, axis, name=f"{name} axis")
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    return feature_axes, feature_shape, broadcast_shape(x.shape, feature_axes)
