"""Precise population statistics, and evaluation under a chosen statistics source,
for any Flax model with normjax batch-statistics layers anywhere in its tree,
without editing it.

* :func:`precise_batch_stats` (with :func:`precise_moments` and
  :func:`batch_stats_from_moments` underneath) recomputes ``batch_stats`` after
  training: each layer's batch moments over K batches, merged exactly, so they
  are those of the K batches concatenated (precise BN: Wu & Johnson 2021,
  "Rethinking 'Batch' in BatchNorm", sec. 3);
* :class:`Evaluator` (and the shortcuts :func:`make_eval_fn`, :func:`evaluate`)
  runs the model with its statistics from ``'running'`` (the EMA in
  ``batch_stats``), ``'precise'`` (recomputed) or ``'batch'`` (the current
  batch's).

Both use two hooks of :mod:`normjax.nn`: ``nn.statistics_source(source)``, which
switches every batch-statistics module at trace time (so it is entered inside
the jitted function), and the ``'moments'`` collection, where a module stores the
batch moments ``moments/{p}count, {p}mean, {p}m2`` (or, for statistics averaged
over batches, ``{p}weight, {p}mean, {p}var``) behind its running statistics
``batch_stats/{p}mean, {p}var``. Layers outside that protocol (``flax.linen``'s
own ``BatchNorm``) are not switched and get no precise statistics;
:func:`precise_batch_stats` warns about them.

A batch is the model's positional inputs (a tuple) or its only one; for other
forms pass a function as ``method``, as Flax allows, e.g.
``method=lambda m, b: m(b["image"], mask=b["mask"], train=False)``.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from normjax import nn as norms
from normjax import stats
from normjax.stats import Averaged, Moments

Array = jax.Array
Variables = Mapping[str, Any]
Tree = Mapping[str, Any]
# (module path..., prefix) -> the moments of the statistic pair {prefix}mean/var.
_Grouped = dict[tuple[str, ...], Moments | Averaged]

SOURCES = ("running", "precise", "batch", "example_weighted")
_MOMENT_KEYS = ("count", "mean", "m2")
_AVERAGED_KEYS = ("weight", "mean", "var")


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(
            f"unknown statistics source {source!r}; valid sources are: "
            f"{', '.join(SOURCES)}."
        )


def _as_args(batch: Any) -> tuple[Any, ...]:
    """A tuple batch is the positional inputs; anything else is the only one."""
    return batch if isinstance(batch, tuple) else (batch,)


def _without(variables: Variables, *collections: str) -> dict[str, Any]:
    return {k: v for k, v in variables.items() if k not in collections}


# ---------------------------------------------------------------- moments trees


def _group(moments: Tree) -> _Grouped:
    """``{path: {p}count, {p}mean, {p}m2}`` -> ``{(*path, p): Moments}``, and
    ``{path: {p}weight, {p}mean, {p}var}`` -> ``{(*path, p): Averaged}``."""
    flat = flatten_dict(unfreeze(dict(moments)))
    out: _Grouped = {}
    for key in flat:
        *path, leaf = key
        for kind, keys in ((Moments, _MOMENT_KEYS), (Averaged, _AVERAGED_KEYS)):
            if not leaf.endswith(keys[0]):
                continue
            prefix = leaf[: -len(keys[0])]
            missing = [k for k in keys if (*path, prefix + k) not in flat]
            if missing:
                raise ValueError(
                    f"'moments' of layer {'/'.join(path)!r} has {leaf!r} but not "
                    f"{[prefix + k for k in missing]}; a batch-statistics module "
                    f"must store {{p}}{', {p}'.join(keys)} together."
                )
            out[(*path, prefix)] = kind(
                *(jnp.asarray(flat[(*path, prefix + k)]) for k in keys)
            )
    return out


def _ungroup(grouped: _Grouped) -> dict[str, Any]:
    """Inverse of :func:`_group`: the nested ``'moments'`` collection."""
    flat = {}
    for (*path, prefix), m in grouped.items():
        for k, value in zip(m._fields, m, strict=True):
            flat[(*path, prefix + k)] = value
    return unflatten_dict(flat)


def _is_moments(x: Any) -> bool:
    return isinstance(x, (Moments, Averaged))


def _merge_one(a: Moments | Averaged, b: Moments | Averaged) -> Moments | Averaged:
    if isinstance(a, Averaged) and isinstance(b, Averaged):
        return stats.average(a, b)
    if isinstance(a, Moments) and isinstance(b, Moments):
        return stats.merge(a, b)
    raise ValueError(
        "a layer recorded pooled moments in one batch, averaged in another."
    )


@jax.jit
def _merge_grouped(a: _Grouped, b: _Grouped) -> _Grouped:
    return jax.tree.map(_merge_one, a, b, is_leaf=_is_moments)


def _merge_all(parts: list[tuple[int, _Grouped]]) -> _Grouped:
    merged = parts[-1][1]
    for _, part in reversed(parts[:-1]):
        merged = _merge_grouped(part, merged)
    return merged


# ------------------------------------------------------------ precise statistics


def _fold_in(rngs: Any, index: int) -> Any:
    """Every key in ``rngs`` (a key or a dict of keys) folded with ``index``."""
    return jax.tree.map(lambda key: jax.random.fold_in(key, index), rngs)


def precise_moments(
    model: Any,
    variables: Variables,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    method: Callable[..., Any] | str | None = None,
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """The moments of every batch-statistics layer's input, pooled over batches.

    Runs ``model.apply(variables, *batch, method=method, **apply_kwargs)`` on each
    of the first ``num_batches`` batches (all if None) under
    ``nn.statistics_source('batch')`` with the ``'moments'`` collection mutable,
    and merges each layer's moments exactly: every valid element of every batch
    has equal weight, so the result is the statistics of the concatenated batches.
    Layers that normalize with within-batch statistics that are not pooled
    moments — per-position causal prefixes, ghost batches — record
    ``{p}weight, {p}mean, {p}var`` (``stats.Averaged``) instead: each batch's
    mean and within-batch variance, averaged over the batches with equal weight
    (what their running average estimates; pooling would add the spread between
    batch means). A slot no batch had a valid element in keeps its running value.

    Upstream of each layer, every layer normalizes with the statistics of the
    batch, as in training (Wu & Johnson's precise BN): a layer's population
    statistics are those of the features it saw while training. Batches should
    therefore have the training batch size. Pass the evaluation keyword arguments
    (e.g. ``train=False``: no dropout); batch norms are switched by the context,
    and their running statistics are neither used nor updated. If
    ``apply_kwargs`` holds ``rngs`` (e.g. to keep dropout on with ``train=True``),
    each batch gets them folded in with its index.

    One jitted step per input shape (a last, smaller batch compiles once more);
    only the per-layer moments are kept, merged pairwise as batches arrive
    (O(log K) trees of feature-shaped arrays, rounding error O(log K)).

    Args:
      model: a Flax linen module.
      variables: its variables (``params``, ``batch_stats``, ...).
      batches: an iterable of model inputs: a tuple of positional inputs, or the
        single positional input (e.g. images N x H x W x C).
      num_batches: use at most this many batches.
      method, apply_kwargs: passed to ``model.apply``.

    Returns:
      The merged ``'moments'`` collection, ``{layer path: {p}count, {p}mean,
      {p}m2}`` (or ``{p}weight, {p}mean, {p}var`` for averaged statistics) with
      statistics-shaped float32 leaves; empty if the model has no
      batch-statistics layer.
    """
    if num_batches is not None:
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}.")
        batches = itertools.islice(batches, num_batches)
    if "mutable" in apply_kwargs:
        raise ValueError(
            "precise_moments sets mutable=['moments'] itself; remove 'mutable' "
            "from the keyword arguments."
        )
    rngs = apply_kwargs.pop("rngs", None)
    variables = _without(variables, "moments")

    def step(variables: Variables, args: tuple[Any, ...], rngs: Any) -> _Grouped:
        # Entered while tracing, so the jitted step always sees batch statistics.
        with norms.statistics_source("batch"):
            _, state = model.apply(
                variables,
                *args,
                method=method,
                mutable=["moments"],
                rngs=rngs,
                **apply_kwargs,
            )
        return _group(state.get("moments", {}))

    step = jax.jit(step)
    # A binary counter of merged parts: part sizes (in batches) are decreasing
    # powers of two, so each batch's moments pass through O(log K) merges.
    parts: list[tuple[int, _Grouped]] = []
    for index, batch in enumerate(batches):
        batch_rngs = None if rngs is None else _fold_in(rngs, index)
        size, merged = 1, step(variables, _as_args(batch), batch_rngs)
        while parts and parts[-1][0] == size:
            previous_size, previous = parts.pop()
            merged, size = _merge_grouped(previous, merged), size + previous_size
        parts.append((size, merged))
    if not parts:
        raise ValueError(
            "precise statistics need at least one batch, but `batches` is empty."
        )
    return _ungroup(_merge_all(parts))


def batch_stats_from_moments(
    batch_stats: Tree, moments: Tree, *, warn: bool = True
) -> dict[str, Any]:
    """``batch_stats`` with each ``{p}mean``/``{p}var`` that has moments replaced.

    ``moments/{path}/{p}count, {p}mean, {p}m2`` (e.g. from
    :func:`precise_moments`) give ``batch_stats/{path}/{p}mean`` = mean and
    ``{p}var`` = ``stats.variance`` (biased: over a population the Bessel factor
    is 1). Every other entry (step counters, other state) is kept as is; layers
    with moments but no running statistics are skipped. With ``warn``, warns
    about ``*mean``/``*var`` pairs left unchanged (layers that never computed
    batch statistics, or that do not follow the ``'moments'`` protocol).
    """
    flat = dict(flatten_dict(unfreeze(dict(batch_stats))))
    replaced = set()
    for (*path, prefix), m in _group(moments).items():
        keys = {"mean": (*path, prefix + "mean"), "var": (*path, prefix + "var")}
        present = [k for k, key in keys.items() if key in flat]
        if not present:
            continue
        layer = "/".join(map(str, path))
        if len(present) == 1:
            raise ValueError(
                f"batch_stats of layer {layer!r} has {prefix + present[0]!r} but "
                f"not its pair; expected {prefix}mean and {prefix}var."
            )
        if isinstance(m, Averaged):
            values, seen = {"mean": m.mean, "var": m.var}, m.weight > 0
        else:
            values, seen = {"mean": m.mean, "var": stats.variance(m)}, m.count > 0
        for k, key in keys.items():
            old = flat[key]
            value = values[k]
            if tuple(old.shape) != tuple(value.shape):
                raise ValueError(
                    f"layer {layer!r}: batch_stats {prefix + k!r} has shape "
                    f"{tuple(old.shape)} but its moments have shape "
                    f"{tuple(value.shape)}; the moments come from another "
                    "model or input shape (per-position statistics: calibrate on "
                    "sequences of the layer's max_len)."
                )
            # A slot no batch had a valid element in keeps its running value.
            flat[key] = jnp.where(seen, value.astype(old.dtype), old)
            replaced.add(key)
    if warn:
        unchanged = [
            "/".join(map(str, (*key[:-1], key[-1][: -len("mean")] + "{mean,var}")))
            for key in flat
            if key[-1].endswith("mean")
            and key not in replaced
            and (*key[:-1], key[-1][: -len("mean")] + "var") in flat
        ]
        if unchanged:
            warnings.warn(
                "precise statistics left these running statistics unchanged (no "
                "'moments' were recorded for them: the layer did not compute "
                "batch statistics or is not a normjax batch-statistics module): "
                + ", ".join(unchanged),
                stacklevel=2,
            )
    return unflatten_dict(flat) if flat else {}


def precise_batch_stats(
    model: Any,
    variables: Variables,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    method: Callable[..., Any] | str | None = None,
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """A new ``batch_stats`` tree with precise population statistics.

    Every ``{p}mean``/``{p}var`` of every normjax batch-statistics layer becomes
    the mean and (biased) variance of that layer's input pooled over the first
    ``num_batches`` of ``batches`` with equal weight per element (see
    :func:`precise_moments` for how batches are fed and which features are
    pooled); everything else in ``variables['batch_stats']`` is unchanged.
    Use it as ``{**variables, 'batch_stats': precise_batch_stats(...)}``, or pass
    it to :func:`evaluate` as ``precise_stats``.
    """
    moments = precise_moments(
        model,
        variables,
        batches,
        num_batches=num_batches,
        method=method,
        **apply_kwargs,
    )
    return batch_stats_from_moments(variables.get("batch_stats", {}), moments)


# --------------------------------------------------------------------- evaluation


def _missing_precise_stats() -> ValueError:
    return ValueError(
        "source='precise' needs precise_stats: compute them once with "
        "normjax.calibrate.precise_batch_stats(model, variables, batches, "
        "**apply_kwargs) over training batches, then pass "
        "precise_stats=<the returned batch_stats>."
    )


def _with_precise(variables: Variables, precise_stats: Tree | None) -> dict:
    if precise_stats is None:
        raise _missing_precise_stats()
    running = variables.get("batch_stats", {})
    expected = jax.tree.structure(unfreeze(dict(running)))
    got = jax.tree.structure(unfreeze(dict(precise_stats)))
    if expected != got:  # type: ignore[operator]  # PyTreeDef has no stubs
        raise ValueError(
            "precise_stats does not match variables['batch_stats'] (different "
            "layers or entries); pass the batch_stats tree returned by "
            "precise_batch_stats for these variables, not the whole variables. "
            f"Expected {expected}, got {got}."
        )
    return {**variables, "batch_stats": precise_stats}


class Evaluator:
    """A model's outputs with its normalization statistics from a chosen source —
    the one evaluation path of normjax: the training loop, the experiments and
    the notebooks all evaluate through it.

    ``evaluator(variables, batch, source=...)`` runs ``model.apply(variables,
    *args, method=method, **kwargs, **apply_kwargs)`` where ``(args, kwargs) =
    inputs(batch)``, with the statistics of every normjax batch-statistics layer
    taken from ``source``:

    * ``'running'``: the running statistics in ``variables['batch_stats']``, under
      ``nn.statistics_source('running')`` (so even ``train=True`` evaluates);
    * ``'precise'``: the same with ``batch_stats`` replaced by ``precise_stats``
      (from :func:`precise_batch_stats`);
    * ``'batch'``: the statistics of the given batch, under
      ``nn.statistics_source('batch')``; running statistics are not updated;
    * ``'example_weighted'``: each sample by ``example_weight`` times its own
      statistics mixed with ``1 - example_weight`` times the running ones
      (inference example weighting, Summers & Dinneen 2020): with
      ``example_weight = 1 / training batch size`` what training normalized it
      with, in expectation — no retraining, no batch, no model edit. Pass
      ``precise_stats`` too to mix with precise statistics instead of running.

    The function is jitted once per statistics context and input shape (unless
    ``jit=False``); the context is entered inside the traced function.

    Args:
      model: a Flax linen module.
      method: as in ``model.apply``.
      inputs: ``batch -> (args, kwargs)``, traced inside jit (e.g. image
        standardization, masks). Default: a tuple batch is the positional
        inputs, anything else the only one.
      place_batch: applied to each batch before the call, outside jit (e.g.
        placing it on a device mesh).
      jit: jit the call.
      apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``).
    """

    def __init__(
        self,
        model: Any,
        *,
        method: Callable[..., Any] | str | None = None,
        inputs: Callable[[Any], tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
        place_batch: Callable[[Any], Any] | None = None,
        jit: bool = True,
        **apply_kwargs: Any,
    ) -> None:
        self.model = model
        self.method = method
        self.inputs = inputs or (lambda batch: (_as_args(batch), {}))
        self.place_batch = place_batch
        self.jit = jit
        self.apply_kwargs = apply_kwargs
        self._compiled: dict[str, Callable[..., Any]] = {}

    def _apply_fn(
        self, context: str, example_weight: float | None = None
    ) -> Callable[..., Any]:
        key = context if example_weight is None else f"{context}:{example_weight!r}"
        if key not in self._compiled:

            def apply(variables: Variables, batch: Any) -> Any:
                args, kwargs = self.inputs(batch)
                with norms.statistics_source(context, example_weight=example_weight):
                    return self.model.apply(
                        variables,
                        *args,
                        method=self.method,
                        **kwargs,
                        **self.apply_kwargs,
                    )

            self._compiled[key] = jax.jit(apply) if self.jit else apply
        return self._compiled[key]

    def __call__(
        self,
        variables: Variables,
        batch: Any,
        *,
        source: str = "running",
        precise_stats: Tree | None = None,
        example_weight: float | None = None,
    ) -> Any:
        """The model's output on ``batch`` with statistics from ``source``;
        ``precise_stats`` is read by ``'precise'`` (and by
        ``'example_weighted'`` when given), ``example_weight`` by
        ``'example_weighted'`` only (required there: 1 / the training batch
        size)."""
        _check_source(source)
        if source == "precise":
            variables = _with_precise(variables, precise_stats)
        if source == "example_weighted":
            if example_weight is None:
                raise ValueError(
                    "source='example_weighted' needs example_weight: pass "
                    "example_weight=1 / the training batch size (what training "
                    "normalized each sample with, in expectation)."
                )
            if precise_stats is not None:
                variables = _with_precise(variables, precise_stats)
            context = "example_weighted"
        else:
            example_weight = None
            context = "batch" if source == "batch" else "running"
        if self.place_batch is not None:
            batch = self.place_batch(batch)
        return self._apply_fn(context, example_weight)(variables, batch)


def make_eval_fn(
    model: Any,
    *,
    source: str,
    precise_stats: Tree | None = None,
    example_weight: float | None = None,
    method: Callable[..., Any] | str | None = None,
    jit: bool = True,
    **apply_kwargs: Any,
) -> Callable[..., Any]:
    """``f(variables, *inputs) -> model.apply(...)`` with statistics from
    ``source``: an :class:`Evaluator` with the source fixed.

    ``precise_stats`` is ignored by the other sources, so one loop can pass it to
    all three. ``method`` and ``apply_kwargs`` (e.g. ``train=False``,
    ``mutable=[...]``) go to ``model.apply``.
    """
    _check_source(source)
    if source == "precise" and precise_stats is None:
        raise _missing_precise_stats()
    evaluator = Evaluator(model, method=method, jit=jit, **apply_kwargs)

    def f(variables: Variables, *inputs: Any) -> Any:
        return evaluator(
            variables,
            inputs,
            source=source,
            precise_stats=precise_stats,
            example_weight=example_weight,
        )

    return f


def evaluate(
    model: Any,
    variables: Variables,
    inputs: Any,
    *,
    source: str,
    precise_stats: Tree | None = None,
    example_weight: float | None = None,
    method: Callable[..., Any] | str | None = None,
    **apply_kwargs: Any,
) -> Any:
    """The model's output on ``inputs`` with normalization statistics from
    ``source`` (``'running'``, ``'precise'`` or ``'batch'``; see
    :class:`Evaluator`).

    ``inputs`` is a tuple of positional inputs or the single one. Runs without
    jit; to evaluate many batches, make one :class:`Evaluator`.
    """
    evaluator = Evaluator(model, method=method, jit=False, **apply_kwargs)
    return evaluator(
        variables,
        inputs,
        source=source,
        precise_stats=precise_stats,
        example_weight=example_weight,
    )
