"""Sufficient statistics that merge: ``(count, mean, m2)`` per reduced slot.

Every norm in normjax reduces its input to :class:`Moments` and normalizes with
them (as a :class:`MeanVar`). Because moments merge exactly (Chan, Golub &
LeVeque 1979), the same few functions serve masks (padding has count 0), several
devices (``psum`` of the parts), ghost batches (reduce per group, merge the
groups), cumulative statistics along time (prefix merge) and precise population
statistics (merge over batches).

Conventions:
  * statistics are float32 or wider, whatever the input dtype;
  * the mean is computed first and ``m2`` as the sum of squared deviations from it
    (two passes): ``E[x^2] - E[x]^2`` cancels catastrophically when the mean is
    large against the spread, and is never used;
  * a slot with count 0 has mean 0 and m2 0, never NaN;
  * masked elements are selected out (``where``), never multiplied by 0: padding
    may hold NaN or inf without reaching any statistic or gradient;
  * complex inputs have a complex mean and a real ``m2 = sum |x - mean|^2``.

What a norm divides by is a plain :class:`MeanVar` — from moments
(:func:`mean_var`), or a running average, a population or prior estimate, none
of which is a sufficient statistic.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Axes = int | Sequence[int]


class Moments(NamedTuple):
    """Sufficient statistics of one or many slots, all of one broadcast shape.

    Attributes:
      count: number of (unmasked) elements reduced into each slot, float.
      mean: their mean (0 where count is 0).
      m2: sum of squared deviations from ``mean`` (for uncentred moments,
        the sum of squares).
    """

    count: Array  # type: ignore[assignment]  # shadows tuple.count, by design
    mean: Array
    m2: Array


class MeanVar(NamedTuple):
    """The mean and variance a norm standardizes with, broadcastable to its input.

    For uncentred (RMS) normalization the mean is 0 and ``var`` the mean square.
    """

    mean: Array
    var: Array


def stat_dtype(dtype: Any) -> jnp.dtype:
    """The dtype statistics are reduced in: ``dtype`` promoted to at least float32
    (complex64 for complex inputs, whose ``m2`` and count are real)."""
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def canonicalize_axes(ndim: int, axes: Axes, *, name: str = "axes") -> tuple[int, ...]:
    """Sorted, deduplicated, non-negative axes; a clear error when out of range."""
    if not isinstance(axes, Iterable):
        axes = (axes,)
    out = []
    for axis in axes:
        if isinstance(axis, bool):
            raise TypeError(f"{name} must be ints, got {axis!r} in {axes!r}.")
        try:
            axis = operator.index(axis)
        except TypeError:
            raise TypeError(f"{name} must be ints, got {axis!r} in {axes!r}.") from None
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"{name}={tuple(axes)!r} is out of range for an input with {ndim} "
                f"dimensions; valid axes are {-ndim}..{ndim - 1}."
            )
        out.append(axis % ndim)
    return tuple(sorted(set(out)))


def safe_div(num: Array, den: Array) -> Array:
    """num / den where den > 0, else 0 — with finite gradients on both branches."""
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, 1.0), 0.0)


def reduce_sum(x: Array, axes: tuple[int, ...], dtype: Any = None) -> Array:
    """``jnp.sum(x, axes, keepdims=True)``, summing the minor (last) axis last.

    When ``axes`` holds the last axis and others (group norm's x_NxHxWxGxg over
    (H, W, g), a layer norm over (H, W, C)), the major axes are summed first,
    keeping the minor axis contiguous, and the small partial sum is then summed
    over the last axis. XLA:CPU runs the mixed reduction as one strided loop
    3-4x slower than the two (the barrier stops XLA from merging them back).
    """
    last = x.ndim - 1
    if last in axes and len(axes) > 1:
        major = tuple(a for a in axes if a != last)
        partial = jnp.sum(x, major, keepdims=True, dtype=dtype)
        partial = jax.lax.optimization_barrier(partial)
        return jnp.sum(partial, last, keepdims=True)
    return jnp.sum(x, axes, keepdims=True, dtype=dtype)


def psum(value: Array, axis_name: Any, axis_index_groups: Any = None) -> Array:
    """``lax.psum`` over ``axis_name`` (devices, or a ``vmap``); identity if None."""
    if axis_name is None:
        return value
    return jax.lax.psum(value, axis_name, axis_index_groups=axis_index_groups)


def masked_sum(
    x: Array,
    axes: Axes,
    *,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> Array:
    """The sum over ``axes`` (kept as size 1) of the elements of ``x`` where
    ``mask`` holds, summed over ``axis_name`` devices too; masked elements are
    selected out, not multiplied by 0."""
    axes = canonicalize_axes(jnp.ndim(x), axes)
    if mask is not None:
        x = jnp.where(mask, x, jnp.zeros((), jnp.result_type(x)))
    return psum(reduce_sum(x, axes), axis_name, axis_index_groups)


def moments(
    x: Array,
    axes: Axes,
    *,
    mask: Array | None = None,
    center: bool = True,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    keepdims: bool = True,
    cumulative_axis: int | None = None,
) -> Moments:
    """Reduces ``x`` over ``axes`` to ``Moments`` (float32 or wider).

    Args:
      x: input of any shape.
      axes: axes to reduce.
      mask: optional boolean array broadcastable to ``x``; False elements count 0.
      center: if False the mean is fixed at 0 and ``m2`` is the sum of squares
        (RMS norm, PowerNorm).
      axis_name: reduce across this named mapped axis too (``shard_map``, ``pmap``,
        ``vmap``). The pooled result is exact when devices hold different numbers
        of valid elements: counts and sums are ``psum``-ed, then squared deviations
        from the pooled mean are ``psum``-ed (two collectives, no mean of means).
      axis_index_groups: device groups for the collectives, as in ``lax.psum``.
      keepdims: keep reduced axes as size 1 (ready to broadcast against ``x``).
      cumulative_axis: if it is one of ``axes``, the statistics are not pooled
        along it but accumulated: slot t holds the moments of positions <= t
        (causal statistics over time; the axis is kept, whatever ``keepdims``).
    """
    axes = canonicalize_axes(x.ndim, axes)
    if cumulative_axis is not None:
        time = canonicalize_axes(x.ndim, cumulative_axis, name="cumulative_axis")[0]
        if time in axes:
            per_position = moments(
                x,
                tuple(a for a in axes if a != time),
                mask=mask,
                center=center,
                axis_name=axis_name,
                axis_index_groups=axis_index_groups,
            )
            out = prefix_merge(per_position, time)
            if not keepdims:
                pooled = tuple(a for a in axes if a != time)
                out = Moments(*(jnp.squeeze(s, pooled) for s in out))
            return out
    dtype = stat_dtype(x.dtype)
    count_dtype = real_dtype(dtype)
    valid = None
    size = None  # the count, when it is the same static number in every slot
    if mask is None:
        size = 1
        for axis in axes:
            size *= x.shape[axis]
        shape = [1 if i in axes else n for i, n in enumerate(x.shape)]
        count = jnp.full(shape, size, count_dtype)
    else:
        valid = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
        count = reduce_sum(valid.astype(count_dtype), axes)
        # Selected, never multiplied: padding may hold NaN or inf, and none of
        # it reaches a sum, a statistic or (0 * NaN) a gradient.
        x = jnp.where(valid, x, jnp.zeros((), x.dtype))
    count = psum(count, axis_name, axis_index_groups)
    if center and axis_name is None and not jnp.iscomplexobj(x):
        mean, m2 = _centred_moments(x, valid, axes, count, size)
    else:
        x = x.astype(dtype)
        if center:
            total = psum(reduce_sum(x, axes), axis_name, axis_index_groups)
            mean = safe_div(total, count)
        else:
            mean = jnp.zeros(count.shape, dtype)
        m2 = psum(_square_sum(x - mean, valid, axes), axis_name, axis_index_groups)
    out = Moments(jnp.broadcast_to(count, mean.shape), mean, m2)
    if not keepdims:
        out = Moments(*(jnp.squeeze(s, axes) for s in out))
    return out


def real_dtype(dtype: Any) -> jnp.dtype:
    """The real counterpart of ``dtype`` (complex64 -> float32), else ``dtype``."""
    return jnp.real(jnp.zeros((), dtype)).dtype


def abs2(x: Array) -> Array:
    """``|x|^2``, real: ``x^2`` for real ``x``, ``re^2 + im^2`` for complex."""
    if jnp.iscomplexobj(x):
        return jnp.square(x.real) + jnp.square(x.imag)
    return jnp.square(x)


def _square_sum(deviation: Array, valid: Array | None, axes: tuple[int, ...]) -> Array:
    """The sum over ``axes`` of ``|deviation|^2`` at the valid elements."""
    squares = abs2(deviation)
    if valid is not None:
        squares = jnp.where(valid, squares, 0.0)
    return reduce_sum(squares, axes)


# One pass is exact enough while every slot's mean^2 <= ONE_PASS_RATIO * var:
# the cancellation in sum(x^2) - n mean^2 then costs at most a factor
# (1 + ratio) of float32 rounding. (functional.core's backward uses the same
# bound for its sums of dy * x.)
ONE_PASS_RATIO = 3.0


def _centred_moments(
    x: Array,
    valid: Array | None,
    axes: tuple[int, ...],
    count: Array,
    size: int | None,
) -> tuple[Array, Array]:
    """(mean, m2) of each slot of real ``x`` (zero where not ``valid``): over the
    minor axis alone, the exact two-pass sum of squared deviations from the
    mean; otherwise one fused pass of sum(x) and sum(x^2) when no slot's |mean|
    exceeds sqrt(3) of its standard deviation, else (``lax.cond``: only one
    branch runs) the exact two passes. Flax's one-pass
    E[x^2] - E[x]^2 loses every digit when |mean| >> std; this keeps the two-pass
    result's accuracy there and one pass's speed where it is safe (most
    normalization inputs)."""
    # ``x`` in its own dtype: the exact branch converts it itself, so that no
    # converted full-size copy becomes an operand of the cond.
    dtype = count.dtype
    if axes == (x.ndim - 1,):
        # Over the minor axis alone (layer norm over the features): the exact
        # two passes, branch-free. XLA:CPU fuses them with their consumers into
        # one loop over rows held in cache (as it does Flax's one-pass formula);
        # the guard's lax.cond would split that loop into ten kernels.
        total = jnp.sum(x, axes, keepdims=True, dtype=dtype)
        mean = total / size if size else safe_div(total, count)
        return mean, _square_sum(x.astype(dtype) - mean, valid, axes)
    total = reduce_sum(x, axes, dtype)  # the conversion inside each sum
    square_sum = reduce_sum(jnp.square(x.astype(dtype)), axes)
    # A static count divides as jnp.mean does (the same rounding as Flax's exact
    # statistics, whether jitted or not); a masked one may be 0.
    mean = total / size if size else safe_div(total, count)
    m2_fast = square_sum - total * mean

    def exact() -> Array:
        return _square_sum(x.astype(dtype) - mean, valid, axes)

    safe = jnp.all(count * mean * mean <= ONE_PASS_RATIO * m2_fast)
    m2 = jax.lax.cond(safe, lambda: jnp.maximum(m2_fast, 0.0), exact)
    return mean, m2


def variance(m: Moments, *, ddof: int = 0) -> Array:
    """``m2 / (count - ddof)``, clamped at 0; 0 where ``count <= ddof``."""
    return jnp.maximum(safe_div(m.m2, m.count - ddof), 0.0)


def mean_var(m: Moments, *, ddof: int = 0) -> MeanVar:
    """The mean and (biased unless ``ddof``) variance of moments."""
    return MeanVar(m.mean, variance(m, ddof=ddof))


class Averaged(NamedTuple):
    """Per-batch statistics to be averaged over batches, each batch weighing the
    same — the expectation that a running average (EMA) estimates, as opposed to
    :class:`Moments`, whose merge pools elements.

    Used where a norm normalizes with statistics that are not sufficient
    statistics of the pooled elements: the within-batch variances of causal
    prefixes (per position) and of ghost batches. Their population value is the
    average of the per-batch values; merging their moments would add the spread
    between batch means.

    Attributes:
      weight: 1 where the slot had a valid element in the batch, else 0 (after
        :func:`average`: the number of batches that had one).
      mean, var: the batch's mean and variance (after :func:`average`: their
        averages over the batches that had a valid element; 0 where none had).
    """

    weight: Array
    mean: Array
    var: Array


def averaged(m: Moments, *, ddof: int = 0) -> Averaged:
    """One batch's ``m`` as a term of an average: its mean and variance, weight 1
    where it had a valid element."""
    return Averaged(
        (m.count > 0).astype(real_dtype(m.count.dtype)), m.mean, variance(m, ddof=ddof)
    )


def average(a: Averaged, b: Averaged) -> Averaged:
    """The average of two disjoint sets of batches (weights add)."""
    weight = a.weight + b.weight
    fa, fb = safe_div(a.weight, weight), safe_div(b.weight, weight)
    return Averaged(weight, a.mean * fa + b.mean * fb, a.var * fa + b.var * fb)


def merge(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two disjoint sets (Chan et al.'s pairwise formula)."""
    count = a.count + b.count
    delta = b.mean - a.mean
    fraction_b = safe_div(b.count, count)
    mean = a.mean + delta * fraction_b
    m2 = a.m2 + b.m2 + abs2(delta) * a.count * fraction_b
    return Moments(count, mean, m2)


def merge_over(m: Moments, axis: Axes, *, keepdims: bool = False) -> Moments:
    """Merges slots along ``axis`` (ghost groups into a batch, batches into a
    population) — exact, in one parallel step rather than a chain of merges."""
    count = jnp.sum(m.count, axis, keepdims=True)
    mean = safe_div(jnp.sum(m.count * m.mean, axis, keepdims=True), count)
    m2 = jnp.sum(m.m2 + m.count * abs2(m.mean - mean), axis, keepdims=True)
    out = Moments(count, mean, m2)
    if not keepdims:
        out = Moments(*(jnp.squeeze(s, axis) for s in out))
    return out


def prefix_merge(m: Moments, axis: int) -> Moments:
    """Cumulative moments along ``axis``: slot t holds the merge of slots 0..t.

    Used for causal statistics over time. An associative scan of the pairwise
    merge stays exact, unlike prefix sums of x and x^2.
    """

    def combine(a: tuple[Array, ...], b: tuple[Array, ...]) -> tuple[Array, ...]:
        return tuple(merge(Moments(*a), Moments(*b)))

    count, mean, m2 = jax.lax.associative_scan(combine, tuple(m), axis=axis)
    return Moments(count, mean, m2)


def ema(
    running: Array, value: Array, momentum: float, *, valid: Array | None = None
) -> Array:
    """Running-average update in Flax's convention: ``momentum`` of the old value
    is kept (``momentum=0.99`` keeps 99 %). Where ``valid`` is False (a slot
    without any valid element in the batch) the old value is kept."""
    # A complex statistic (the mean of a complex input) makes the average complex.
    dtype = value.dtype if jnp.iscomplexobj(value) else running.dtype
    new = momentum * running + (1.0 - momentum) * value.astype(dtype)
    return new if valid is None else jnp.where(valid, new, running)


def from_pytorch_momentum(momentum: float) -> float:
    """PyTorch's ``momentum`` (weight of the *new* value, default 0.1) in Flax's
    convention (weight of the old value): ``1 - momentum``."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}.")
    return 1.0 - momentum


def split_groups(x: Array, axis: int, group_size: int, *, name: str) -> Array:
    """Reshapes ``axis`` of size N into (N // group_size, group_size) in place.

    Ghost batches split the batch axis; group norm splits the channel axis.
    """
    axis = axis % x.ndim
    n = x.shape[axis]
    if group_size <= 0 or n % group_size:
        raise ValueError(
            f"{name}={group_size} must be a positive divisor of the size {n} of "
            f"axis {axis}; choose a divisor of {n}."
        )
    return x.reshape(
        x.shape[:axis] + (n // group_size, group_size) + x.shape[axis + 1 :]
    )
