"""What the Linen modules share: the statistics-source context, Flax-shaped
affine parameters and the plumbing of running statistics."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes

from normjax import stats
from normjax.functional.causal import parse_causal

Array = jax.Array

STATISTICS_SOURCES = ("running", "batch", "example_weighted")
_SOURCE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "normjax_statistics_source", default=None
)
_EXAMPLE_WEIGHT: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "normjax_example_weight", default=None
)


@contextlib.contextmanager
def statistics_source(
    source: str, *, example_weight: float | None = None
) -> Iterator[None]:
    """Within this context every normjax batch-statistics module normalizes with
    ``source`` — 'running' (the stored averages), 'batch' (the current batch,
    without updating the stored averages) or 'example_weighted' (each sample by
    ``example_weight`` times its own statistics plus ``1 - example_weight``
    times the running ones, mixed as two distributions: what training
    normalized it with, in expectation, when ``example_weight`` is 1 / the
    training batch size; Summers & Dinneen 2020) — whatever
    ``use_running_average`` it is given. It acts when a function is traced: jit
    inside the context.

    'example_weighted' acts on the modules that normalize with batch statistics
    in training (batch norm and ghost batches, batch renorm, BLN's batch part,
    batch group norm); the others read their running statistics, as in
    evaluation.
    """
    if source not in STATISTICS_SOURCES:
        raise ValueError(
            f"unknown statistics source {source!r}; use one of {STATISTICS_SOURCES}."
        )
    if source == "example_weighted":
        if example_weight is None or not 0.0 < example_weight <= 1.0:
            raise ValueError(
                "statistics_source('example_weighted') needs example_weight in "
                f"(0, 1], got {example_weight!r}; use 1 / the training batch size."
            )
    elif example_weight is not None:
        raise ValueError(
            f"example_weight is read by source 'example_weighted' only, not {source!r}."
        )
    token = _SOURCE.set(source)
    weight_token = _EXAMPLE_WEIGHT.set(example_weight)
    try:
        yield
    finally:
        _SOURCE.reset(token)
        _EXAMPLE_WEIGHT.reset(weight_token)


def current_source() -> str | None:
    """The source set by :func:`statistics_source`, or None outside it."""
    return _SOURCE.get()


def current_example_weight() -> float | None:
    """The example weight of ``statistics_source('example_weighted', ...)``, or
    None outside it."""
    return _EXAMPLE_WEIGHT.get()


def affine_params(module: nn.Module, feature_shape: tuple[int, ...]) -> dict:
    """Creates ``scale`` and ``bias`` as Flax does (same names, shapes, order)."""
    params = {}
    if getattr(module, "use_scale", True):
        params["scale"] = module.param(
            "scale",
            module.scale_init,
            feature_shape,
            module.param_dtype,
        )
    if getattr(module, "use_bias", False):
        params["bias"] = module.param(
            "bias",
            module.bias_init,
            feature_shape,
            module.param_dtype,
        )
    return params


def stat_shape(rows: int | None, feature_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a running statistic: ``feature_shape``, or per position
    ``(rows, *feature_shape)`` (``rows`` from ``BatchStatistics._position_rows``)."""
    return feature_shape if rows is None else (rows, *feature_shape)


def feature_shape_of(x: Array, feature_axes: Axes, name: str) -> tuple[int, ...]:
    """The shape of ``x``'s ``feature_axes``."""
    axes = stats.canonicalize_axes(x.ndim, feature_axes, name=name)
    return tuple(x.shape[a] for a in axes)


class BatchStatistics(nn.Module):
    """Plumbing of the modules that keep running statistics in ``batch_stats``.

    Subclasses declare ``use_running_average`` and ``axis_name``.
    """

    def _train_and_update(self, use_running_average: bool | None) -> tuple[bool, bool]:
        """(normalize with batch statistics?, update the running ones?)."""
        source = _SOURCE.get()
        if source is not None:  # 'running' and 'example_weighted': evaluation
            return source == "batch", False
        use_running_average = nn.merge_param(
            "use_running_average",
            self.use_running_average,
            use_running_average,
        )
        train = not use_running_average
        return train, train and not self.is_initializing()

    def _running(
        self,
        shapes: Mapping[str, tuple[tuple[int, ...], Any]],
        *,
        mean_dtype: Any = jnp.float32,
    ) -> dict:
        """``batch_stats`` variables: name -> (shape, initializer), float32 but
        the ``mean`` in ``mean_dtype`` (complex for a complex input)."""
        return {
            key: self.variable(
                "batch_stats",
                key,
                init,
                shape,
                mean_dtype if key == "mean" else jnp.float32,
            )
            for key, (shape, init) in shapes.items()
        }

    def _apply(
        self,
        fn: Callable[..., Any],
        x: Array,
        params: dict,
        running: dict,
        use_running_average: bool | None,
        **kwargs: Any,
    ) -> Array:
        """``fn(x, params, running values, train=..., **kwargs)`` (a functional
        norm returning ``Normalized``); stores the new running statistics when
        updating, and the batch moments behind them (``moments/{p}count,
        {p}mean, {p}m2``, or for statistics averaged over batches
        ``moments/{p}weight, {p}mean, {p}var``; for ``normjax.calibrate``) when
        the 'moments' collection is mutable."""
        train, update = self._train_and_update(use_running_average)
        out = fn(
            x,
            params,
            {key: var.value for key, var in running.items()},
            train=train,
            **kwargs,
        )
        if train and self.is_mutable_collection("moments"):
            if not self.is_initializing():
                for prefix, m in out.moments.items():
                    for field in m._fields:  # Moments or stats.Averaged
                        self.put_variable("moments", prefix + field, getattr(m, field))
        if update:
            for key, value in out.batch_stats.items():
                running[key].value = value
        return out.y

    def _position_rows(self, x: Array) -> int | None:
        """The number of per-position rows of the running statistics (the
        module's ``max_len``, else the length of the sequences it is initialized
        on), or None when they are not per position (not causal, or
        ``per_position_stats=False``)."""
        mode = parse_causal(getattr(self, "causal", False), name=type(self).__name__)
        if mode is None or not getattr(self, "per_position_stats", False):
            return None
        max_len = getattr(self, "max_len", None)
        if max_len is not None:
            if max_len < 1:
                raise ValueError(
                    f"{type(self).__name__}: max_len must be >= 1, got {max_len}."
                )
            return max_len
        time = stats.canonicalize_axes(x.ndim, self.time_axis, name="time_axis")[0]
        return x.shape[time]

    def _axis_name(self) -> Any:
        # As in Flax: at init the named axis may not exist yet.
        return None if self.is_initializing() else self.axis_name
