"""Flax NNX modules for every registered norm, NNX versions of normjax's models,
and :mod:`normjax.calibrate` for NNX models.

    from flax import nnx
    import normjax.nnx as nj

    norm = nj.BatchNorm(64, rngs=nnx.Rngs(0))       # or nj.make_norm("mix", 64, ...)
    y = norm(x)                  # training: batch statistics, running ones updated
    norm.eval()                  # model.train() / model.eval() reach it
    y = norm(x)                  # running statistics
    y = norm(x, use_running_average=False)          # or choose per call

Each module runs the normjax Linen module of its registry name
(:func:`normjax.registry.make_norm`, over :mod:`normjax.functional`): one
implementation, two front ends. Its variables are NNX variables named as the
Linen ones — ``scale``/``bias`` are :class:`nnx.Param`, running statistics
(``mean``/``var`` ...) :class:`nnx.BatchStat` — so the state of
``flax.nnx.BatchNorm``, ``LayerNorm``, ``RMSNorm`` and ``GroupNorm`` loads with
``nnx.update(ours, nnx.state(theirs))`` and gives the same outputs. Other Linen
collections keep their name as an attribute holding variables of their
registered type: ``perturbations`` (:class:`nnx.Perturbation`, the backward
state of ``online`` and ``power``: see :func:`apply_perturbation_grads`) and
``reference`` (:class:`ReferenceInputs`).

Whole Linen models (``models.FastCNN``, ``ResNet``, ``Transformer``) become NNX
modules with :func:`bridge`, their train flag driven by ``model.train()`` /
``model.eval()``. :func:`precise_batch_stats`, :func:`calibrate`,
:class:`Evaluator` and :func:`evaluate` are :mod:`normjax.calibrate` for any NNX
model holding these modules (hand-written or bridged).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import flax.linen as linen
import jax
import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from normjax import calibrate as _calibrate
from normjax import registry
from normjax.functional.causal import parse_causal
from normjax.functional.power import apply_nu_updates
from normjax.nn.reference import reference_batch, with_reference

Array = jax.Array


class ReferenceInputs(nnx.Variable):
    """The reference batch of reference batch norm (Linen collection
    ``reference``): state, never trained."""


nnx.register_variable_name("reference", ReferenceInputs, overwrite=True)

# Collections whose variables sit at the top level under their Linen names, as
# flax.nnx's own norms keep them; any other collection is an attribute of its
# own name (``perturbations``, ``reference``).
_TOP_LEVEL = ("params", "batch_stats")
# Read by the computation, never written by it.
_READ_ONLY = ("params", "perturbations", "reference")

_RECORDER: contextvars.ContextVar[dict[int, Any] | None] = contextvars.ContextVar(
    "normjax_nnx_moments", default=None
)


@contextlib.contextmanager
def _recording() -> Iterator[dict[int, Any]]:
    """Within it every bridged module keeps the batch moments of its
    statistics ('moments' collection, for normjax.calibrate) by its id."""
    recorded: dict[int, Any] = {}
    token = _RECORDER.set(recorded)
    try:
        yield recorded
    finally:
        _RECORDER.reset(token)


def _variable_type(collection: str) -> type[nnx.Variable]:
    return nnx.variable_type_from_name(collection, allow_register=True)


class Bridged(nnx.Module):
    """An NNX module that runs a Linen module on NNX variables.

    Variables of the Linen collections ``params`` and ``batch_stats`` are
    attributes at their Linen paths (``scale``, ``Conv_0/kernel``...); any other
    collection is one attribute of its name holding its tree. The training flag
    is the attribute ``use_running_average`` (set by ``model.train()`` /
    ``model.eval()``, overridable per call), passed to the Linen module as
    ``flag`` (``use_running_average`` for norms, ``train=not ...`` for models);
    running statistics are written back only in training.

    Build one with :func:`bridge` (models) or a norm class; not directly.
    """

    def __init__(
        self,
        module: linen.Module,
        variables: Mapping[str, Any],
        *,
        flag: str | None,
        use_running_average: bool,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        self.linen_module = module
        self.flag = flag
        self.use_running_average = use_running_average
        self.rngs = rngs
        layout = []
        top: dict[tuple[Any, ...], nnx.Variable] = {}
        others: dict[str, dict[tuple[Any, ...], nnx.Variable]] = {}
        for collection, tree in variables.items():
            kind = _variable_type(collection)
            for path, value in flatten_dict(dict(tree)).items():
                variable = kind(value)
                if collection in _TOP_LEVEL:
                    if path in top:
                        raise ValueError(
                            f"{type(module).__name__}: {'/'.join(map(str, path))} "
                            "is in both 'params' and 'batch_stats'; NNX needs one "
                            "variable per path."
                        )
                    top[path] = variable
                    attr = path
                else:
                    others.setdefault(collection, {})[path] = variable
                    attr = (collection, *path)
                layout.append((collection, attr, path))
        self.layout = tuple(layout)
        top_level = unflatten_dict(top)
        for name, node in top_level.items():
            if not isinstance(node, nnx.Variable):
                node = nnx.data(node)
            setattr(self, name, node)
        for collection, flat in others.items():
            if collection in top_level:
                raise ValueError(
                    f"{type(module).__name__}: collection {collection!r} has the "
                    "name of a submodule; NNX needs one attribute per name."
                )
            setattr(self, collection, nnx.data(unflatten_dict(flat)))

    def _variable(self, attr: tuple[Any, ...]) -> nnx.Variable:
        node: Any = getattr(self, attr[0])
        for key in attr[1:]:
            node = node[key]
        return node

    def linen_variables(self) -> dict[str, Any]:
        """The variables as the Linen module takes them (``{'params': ...,
        'batch_stats': ...}``), current values."""
        flat = {
            (collection, *path): self._variable(attr).get_value()
            for collection, attr, path in self.layout
        }
        return unflatten_dict(flat) if flat else {}

    def _run(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        use_running_average: bool | None,
        method: Callable[..., Any] | str | None = None,
    ) -> Any:
        training = not (
            self.use_running_average
            if use_running_average is None
            else use_running_average
        )
        if self.flag == "use_running_average":
            kwargs = {**kwargs, "use_running_average": not training}
        elif self.flag is not None:
            kwargs = {**kwargs, self.flag: training}
        variables = self.linen_variables()
        mutable = [c for c in variables if c not in _READ_ONLY]
        recorder = _RECORDER.get()
        if recorder is not None:
            mutable.append("moments")
        rngs = None
        if self.rngs is not None:
            rngs = {name: stream() for name, stream in self.rngs.items()}
        out, updates = self.linen_module.apply(
            variables, *args, method=method, mutable=mutable, rngs=rngs, **kwargs
        )
        if recorder is not None and "moments" in updates:
            recorder[id(self)] = updates["moments"]
        if training:
            flat = flatten_dict(dict(updates))
            for collection, attr, path in self.layout:
                if collection not in _READ_ONLY and (collection, *path) in flat:
                    self._variable(attr).set_value(flat[(collection, *path)])
        return out


class Model(Bridged):
    """A Linen model as an NNX module (see :func:`bridge`): called with the
    Linen model's arguments, its train flag from ``use_running_average``."""

    def __call__(
        self,
        *args: Any,
        use_running_average: bool | None = None,
        method: Callable[..., Any] | str | None = None,
        **kwargs: Any,
    ) -> Any:
        return self._run(args, kwargs, use_running_average, method)


def bridge(
    module: linen.Module,
    *sample_args: Any,
    rngs: nnx.Rngs,
    flag: str | None = "train",
    use_running_average: bool = False,
    **sample_kwargs: Any,
) -> Model:
    """The Linen model ``module`` as an NNX module, initialized on
    ``sample_args``/``sample_kwargs`` with ``rngs`` (its ``params`` stream, and
    every other stream, e.g. ``dropout``, forked for later calls).

    ``flag`` is the model's keyword for training (``train`` for normjax's
    models: it receives ``not use_running_average``), or None. Its variables are
    NNX variables at the Linen paths (``nnx.state(model, nnx.BatchStat)`` holds
    its running statistics); :func:`calibrate` and :class:`Evaluator` work on
    it; ``nn.WithReference`` models keep their reference batch as
    :class:`ReferenceInputs`.

    Example: ``model = bridge(FastCNN(norm="batch"), images[:2],
    rngs=nnx.Rngs(0)); logits = model(images)``.
    """
    keys = {name: stream() for name, stream in rngs.items()}
    if "params" not in keys and "default" in keys:
        keys["params"] = keys.pop("default")
    init_kwargs = dict(sample_kwargs)
    if flag is not None and flag != "use_running_average":
        init_kwargs.setdefault(flag, False)
    variables = module.init(keys, *sample_args, **init_kwargs)
    others = {n: s for n, s in rngs.items() if n not in ("params", "default")}
    return Model(
        module,
        variables,
        flag=flag,
        use_running_average=use_running_average,
        rngs=nnx.Rngs(**{n: s.fork() for n, s in others.items()}) if others else None,
    )


# --------------------------------------------------------------------------- norms


def _init_shape(module: linen.Module, name: str, num_features: int) -> tuple[int, ...]:
    """A small input the Linen norm can be initialized on: batch 2, its feature
    axis ``num_features`` wide; sequences (B, L, C) in a causal mode."""
    mode = parse_causal(getattr(module, "causal", False), name=f"norm {name!r}")
    if mode is not None:
        rows = getattr(module, "max_len", None)
        per_position = getattr(module, "per_position_stats", False)
        if per_position and rows is None:
            raise ValueError(
                f"normjax.nnx norm {name!r} with causal={mode!r} keeps running "
                "statistics per position: pass max_len=<the longest sequence> "
                "(or input_shape=(B, L, C) of a sample input)."
            )
        return (2, rows or 1, num_features)
    axis = getattr(module, "axis", getattr(module, "feature_axes", -1))
    shape = [2, 1, 1, num_features]
    if isinstance(axis, int):
        shape[-1] = 1
        shape[axis] = num_features
        return tuple(shape)
    axes = tuple(axis)
    if len(axes) != 1:
        raise ValueError(
            f"normjax.nnx norm {name!r} has feature axes {axes}: num_features "
            "does not say their sizes; pass input_shape=<a sample input's shape>."
        )
    shape[-1] = 1
    shape[axes[0]] = num_features
    return tuple(shape)


class Norm(Bridged):
    """An NNX norm: the registered norm ``norm`` (or the class's own name) on
    ``num_features`` features. Keyword arguments are the Linen module's (as in
    ``flax.nnx``: ``axis``, ``momentum``, ``epsilon``, ``dtype``,
    ``param_dtype``, ``use_bias``, ``use_scale``, ``bias_init``, ``scale_init``,
    ``axis_name``, ``num_groups``, ``causal``, ``max_len``...); ``rngs`` seeds
    the parameter initializers. ``input_shape`` gives a sample input's shape
    where ``num_features`` is not enough (several feature axes).

    Called as ``norm(x, use_running_average=None, *, mask=None)``; without
    ``use_running_average``, the module's attribute (``model.train()`` /
    ``model.eval()``) decides.
    """

    norm_name: ClassVar[str | None] = None

    def __init__(
        self,
        num_features: int,
        *,
        norm: str | None = None,
        use_running_average: bool = False,
        input_shape: tuple[int, ...] | None = None,
        rngs: nnx.Rngs | None = None,
        **options: Any,
    ) -> None:
        name = norm or self.norm_name
        if name is None:
            raise ValueError(
                "normjax.nnx.Norm needs norm=<a registered name>, e.g. "
                f"Norm(64, norm='batch'); names: {', '.join(registry.names())}."
            )
        if norm is not None and self.norm_name not in (None, norm):
            raise ValueError(
                f"{type(self).__name__} is norm {self.norm_name!r}; use "
                f"normjax.nnx.make_norm({norm!r}, ...) for another."
            )
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"num_features must be a positive int, got {num_features!r}."
            )
        module = registry.make_norm(name, **options)
        shape = input_shape or _init_shape(module, name, num_features)
        key = rngs.params() if rngs is not None else jax.random.key(0)
        x = jnp.zeros(shape, jnp.float32)
        context = (
            reference_batch(1)
            if registry.needs_reference(name)
            else contextlib.nullcontext()
        )
        with context:
            variables = module.init({"params": key}, x, use_running_average=False)
        super().__init__(
            module,
            variables,
            flag="use_running_average",
            use_running_average=use_running_average,
        )
        self.num_features = num_features
        self.norm = name

    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        return self._run((x,), {"mask": mask}, use_running_average)


def make_norm(name: str, num_features: int, /, **options: Any) -> Norm:
    """The NNX module of the registered norm ``name`` (any name of
    :func:`normjax.registry.names`, including ones you registered), e.g.
    ``make_norm("group", 64, num_groups=8, rngs=nnx.Rngs(0))``."""
    registry.entry(name)
    return Norm(num_features, norm=name, **options)


class BatchNorm(Norm):
    """Batch norm (``flax.nnx.BatchNorm``'s arguments and state)."""

    norm_name = "batch"


class BatchRenorm(Norm):
    """Batch renormalization (Ioffe 2017)."""

    norm_name = "batch_renorm"


class GhostBatchNorm(Norm):
    """Batch norm over virtual batches (``ghost_batch_size``, default 32)."""

    norm_name = "ghost_batch"


class FrozenBatchNorm(Norm):
    """Batch norm with fixed running statistics."""

    norm_name = "frozen_batch"


class BatchLayerNorm(Norm):
    """Batch layer normalization (Ziaee & Cano 2022)."""

    norm_name = "bln"


class PowerNorm(Norm):
    """PowerNorm (Shen et al. 2020); see :func:`apply_perturbation_grads`."""

    norm_name = "power"


class PriorNorm(Norm):
    """Group norm plus a learned offset from population statistics."""

    norm_name = "prior"


class OnlineNorm(Norm):
    """Online Normalization (Chiley et al. 2019); see
    :func:`apply_perturbation_grads`."""

    norm_name = "online"


class PopulationNorm(Norm):
    """Batch norm trained on its running statistics after a warm-up."""

    norm_name = "population"


class MixNorm(Norm):
    """Per-sample statistics mixed with population ones by a learned weight."""

    norm_name = "mix"


class BatchGroupNorm(Norm):
    """Batch group norm (Zhou et al. 2020)."""

    norm_name = "batch_group"


class ReferenceNorm(Norm):
    """Reference batch norm (Salimans et al. 2016); run the model inside
    :class:`WithReference`."""

    norm_name = "reference"


class LayerNorm(Norm):
    """Layer norm (``flax.nnx.LayerNorm``'s arguments and state)."""

    norm_name = "layer"


class RMSNorm(Norm):
    """RMS norm (``flax.nnx.RMSNorm``'s arguments and state)."""

    norm_name = "rms"


class GroupNorm(Norm):
    """Group norm (``flax.nnx.GroupNorm``'s state; ``num_groups`` default 8)."""

    norm_name = "group"


class InstanceNorm(Norm):
    """Instance norm, per channel over space/time."""

    norm_name = "instance"


class EvoNormS0(Norm):
    """EvoNorm-S0 (Liu et al. 2020)."""

    norm_name = "evonorm_s0"


class Identity(Norm):
    """No normalization."""

    norm_name = "none"


class WithReference(nnx.Module):
    """``model`` (an NNX module whose norms include :class:`ReferenceNorm`) with
    the fixed reference batch ``reference_inputs`` (training inputs, kept as
    :class:`ReferenceInputs`) run ahead of every input — ``nn.WithReference``
    for NNX. A ``mask`` keyword with a leading batch axis is extended with R's
    rows; every output leaf with R's and the input's rows is cut to the input's.
    """

    def __init__(self, model: nnx.Module, reference_inputs: Array) -> None:
        self.model = model
        self.reference = ReferenceInputs(jnp.asarray(reference_inputs))

    def __call__(self, x: Array, *args: Any, **kwargs: Any) -> Any:
        return with_reference(
            self.model, self.reference.get_value(), x, args, kwargs, "WithReference"
        )


# -------------------------------------------------------- backward-pass state


def apply_perturbation_grads(model: nnx.Module, grads: nnx.State) -> None:
    """Adds the gradients of the ``nnx.Perturbation`` variables (``grads``, from
    ``nnx.grad(loss, argnums=nnx.DiffState(0, (nnx.Param, nnx.Perturbation)))``
    or a state holding them) to the backward-pass state of every ``online``
    and ``power`` norm in ``model``, in place — what the Linen training loop
    does with ``functional.power.apply_nu_updates``."""
    pure = nnx.to_pure_dict(nnx.state(grads, nnx.Perturbation))
    found = False
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, Bridged) or not any(
            c == "perturbations" for c, _, _ in node.layout
        ):
            continue
        sub: Any = pure
        for key in path:
            sub = sub.get(key, {}) if isinstance(sub, Mapping) else {}
        sub = sub.get("perturbations", {}) if isinstance(sub, Mapping) else {}
        if not sub:
            raise ValueError(
                f"apply_perturbation_grads: no gradient for the perturbations of "
                f"{'/'.join(map(str, path)) or 'the model'}; differentiate with "
                "respect to nnx.Perturbation too (nnx.DiffState(0, (nnx.Param, "
                "nnx.Perturbation)))."
            )
        stats = node.linen_variables().get("batch_stats", {})
        new = flatten_dict(apply_nu_updates(stats, sub))
        for collection, attr, linen_path in node.layout:
            if collection == "batch_stats":
                node._variable(attr).set_value(new[linen_path])
        found = True
    if not found:
        raise ValueError(
            "apply_perturbation_grads: the model has no norm with a backward-pass "
            "state (online, power)."
        )


# ------------------------------------------------------------------- calibrate


class _LinenView:
    """An NNX model presented to :mod:`normjax.calibrate` as a Linen model:
    ``apply(variables, *args, method=..., mutable=..., **kwargs)`` where
    ``variables`` is ``{'batch_stats': pure dict, 'rest': other state}``."""

    def __init__(self, model: nnx.Module) -> None:
        split: Any = nnx.split(model, nnx.BatchStat, ...)
        self.graphdef: Any = split[0]
        self.template: Any = split[1]

    def variables(self, model: nnx.Module) -> dict[str, Any]:
        split: Any = nnx.split(model, nnx.BatchStat, ...)
        graphdef, stats, rest = split
        if graphdef != self.graphdef:
            raise ValueError(
                "the NNX model's structure changed since this Evaluator was made; "
                "make a new one."
            )
        return {"batch_stats": nnx.to_pure_dict(stats), "rest": rest}

    def apply(
        self,
        variables: Mapping[str, Any],
        *args: Any,
        method: Callable[..., Any] | str | None = None,
        mutable: Any = False,
        rngs: Any = None,
        **kwargs: Any,
    ) -> Any:
        del rngs  # NNX models keep their own
        stats = jax.tree.map(lambda v: v, self.template)
        nnx.replace_by_pure_dict(stats, variables["batch_stats"])
        model = nnx.merge(self.graphdef, stats, variables["rest"])
        record = bool(mutable) and "moments" in mutable
        with _recording() if record else contextlib.nullcontext() as recorded:
            if method is None:
                out = model(*args, **kwargs)
            elif isinstance(method, str):
                out = getattr(model, method)(*args, **kwargs)
            else:
                out = method(model, *args, **kwargs)
        if not mutable:
            return out
        flat = {}
        for path, node in nnx.iter_graph(model):
            if isinstance(node, Bridged) and recorded and id(node) in recorded:
                for key, value in flatten_dict(dict(recorded[id(node)])).items():
                    flat[(*path, *key)] = value
        return out, {"moments": unflatten_dict(flat) if flat else {}}


def precise_batch_stats(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    method: Callable[..., Any] | str | None = None,
    **call_kwargs: Any,
) -> dict[str, Any]:
    """Precise population statistics of an NNX model (see
    :func:`normjax.calibrate.precise_batch_stats`): the ``nnx.BatchStat``
    state as a pure dict, each running mean/var replaced by the moments of its
    input pooled over the batches (upstream layers on batch statistics, as in
    training). ``method(model, *batch, **call_kwargs)`` or
    ``model(*batch, **call_kwargs)`` is called on each batch (a tuple is the
    positional inputs); call ``model.eval()`` first to switch dropout off.
    Load the result with :func:`load_batch_stats`, or use :func:`calibrate`."""
    view = _LinenView(model)
    return _calibrate.precise_batch_stats(
        view,
        view.variables(model),
        batches,
        num_batches=num_batches,
        method=method,
        **call_kwargs,
    )


def load_batch_stats(model: nnx.Module, batch_stats: Mapping[str, Any]) -> None:
    """Writes a pure-dict ``nnx.BatchStat`` state (e.g. from
    :func:`precise_batch_stats`) into ``model``."""
    state = nnx.state(model, nnx.BatchStat)
    nnx.replace_by_pure_dict(state, dict(batch_stats))
    nnx.update(model, state)


def calibrate(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    method: Callable[..., Any] | str | None = None,
    **call_kwargs: Any,
) -> dict[str, Any]:
    """Replaces ``model``'s running statistics by precise ones, in place
    (:func:`precise_batch_stats` then :func:`load_batch_stats`); returns them."""
    stats = precise_batch_stats(
        model, batches, num_batches=num_batches, method=method, **call_kwargs
    )
    load_batch_stats(model, stats)
    return stats


class Evaluator:
    """:class:`normjax.calibrate.Evaluator` for an NNX model:
    ``evaluator(batch, source=...)`` is the model's output with the statistics
    of every normjax batch-statistics layer from ``source`` ('running',
    'precise' with ``precise_stats`` from :func:`precise_batch_stats`,
    'batch', 'example_weighted' with ``example_weight``), reading the model's
    current state on each call; jitted once per source and input shape.
    ``method`` and ``call_kwargs`` as in :func:`precise_batch_stats`."""

    def __init__(
        self,
        model: nnx.Module,
        *,
        method: Callable[..., Any] | str | None = None,
        jit: bool = True,
        **call_kwargs: Any,
    ) -> None:
        self.model = model
        self._view = _LinenView(model)
        self._evaluator = _calibrate.Evaluator(
            self._view, method=method, jit=jit, **call_kwargs
        )

    def __call__(
        self,
        batch: Any,
        *,
        source: str = "running",
        precise_stats: Mapping[str, Any] | None = None,
        example_weight: float | None = None,
    ) -> Any:
        return self._evaluator(
            self._view.variables(self.model),
            batch,
            source=source,
            precise_stats=precise_stats,
            example_weight=example_weight,
        )


def evaluate(
    model: nnx.Module,
    inputs: Any,
    *,
    source: str,
    precise_stats: Mapping[str, Any] | None = None,
    example_weight: float | None = None,
    method: Callable[..., Any] | str | None = None,
    **call_kwargs: Any,
) -> Any:
    """The NNX model's output on ``inputs`` with statistics from ``source``
    (see :class:`Evaluator`), without jit."""
    return Evaluator(model, method=method, jit=False, **call_kwargs)(
        inputs,
        source=source,
        precise_stats=precise_stats,
        example_weight=example_weight,
    )


__all__ = [
    "BatchGroupNorm",
    "BatchLayerNorm",
    "BatchNorm",
    "BatchRenorm",
    "Bridged",
    "Evaluator",
    "EvoNormS0",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "Identity",
    "InstanceNorm",
    "LayerNorm",
    "MixNorm",
    "Model",
    "Norm",
    "OnlineNorm",
    "PopulationNorm",
    "PowerNorm",
    "PriorNorm",
    "RMSNorm",
    "ReferenceInputs",
    "ReferenceNorm",
    "WithReference",
    "apply_perturbation_grads",
    "bridge",
    "calibrate",
    "evaluate",
    "load_batch_stats",
    "make_norm",
    "precise_batch_stats",
]
