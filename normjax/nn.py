"""Flax linen drop-ins over ``normjax.functional``.

Each module takes the constructor and call arguments of its ``flax.linen``
namesake and keeps the same variable tree — ``params/{scale,bias}`` and
``batch_stats/{mean,var}`` — so variables made by a ``flax.linen`` layer load here
and give the same output up to float32 rounding. Differences, all deliberate:

* the variance is always the exact two-pass one (``use_fast_variance`` and
  ``force_float32_reductions`` are accepted for drop-in use; statistics are always
  float32 or wider and never ``E[x^2] - E[x]^2``);
* a fully masked slot gives finite outputs and gradients (Flax gives NaN), and
  masked statistics pooled over ``axis_name`` are exact when devices hold
  different numbers of valid elements (Flax averages the per-device means);
* the output has the input's dtype unless ``dtype`` is set (Flax promotes a
  bfloat16 input with float32 parameters to float32);
* every module accepts ``use_running_average`` so any norm can be called as
  ``norm(x, use_running_average=..., mask=...)``; per-sample norms ignore it;
* every module accepts ``causal`` and ``time_axis`` for sequences x_BxLxD: in
  causal mode no output at position t depends on inputs after t (see
  ``functional.CAUSAL_MODES``).

Batch-statistics modules also honour ``statistics_source`` (evaluate with running
or current-batch statistics without editing the model) and, when the 'moments'
collection is mutable, store the batch moments behind their running statistics
(``moments/{count,mean,m2}``) for ``normjax.calibrate``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer

from normjax import functional as F
from normjax import stats

Array = jax.Array
zeros = nn.initializers.zeros
ones = nn.initializers.ones

STATISTICS_SOURCES = ("running", "batch")
_SOURCE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "normjax_statistics_source", default=None
)


@contextlib.contextmanager
def statistics_source(source: str) -> Iterator[None]:
    """Within this context every normjax batch-statistics module normalizes with
    ``source`` — 'running' (the stored averages) or 'batch' (the current batch,
    without updating the stored averages) — whatever ``use_running_average`` it
    is given. It acts when a function is traced: jit inside the context.
    """
    if source not in STATISTICS_SOURCES:
        raise ValueError(
            f"unknown statistics source {source!r}; use one of {STATISTICS_SOURCES}."
        )
    token = _SOURCE.set(source)
    try:
        yield
    finally:
        _SOURCE.reset(token)


def _affine_params(module: nn.Module, feature_shape: tuple[int, ...]) -> dict:
    """Creates ``scale`` and ``bias`` as Flax does (same names, shapes, order)."""
    params = {}
    if getattr(module, "use_scale", True):
        params["scale"] = module.param(
            "scale", module.scale_init, feature_shape, module.param_dtype
        )
    if getattr(module, "use_bias", False):
        params["bias"] = module.param(
            "bias", module.bias_init, feature_shape, module.param_dtype
        )
    return params


def _feature_shape(x: Array, feature_axes: Axes, name: str) -> tuple[int, ...]:
    axes = stats.canonicalize_axes(x.ndim, feature_axes, name=name)
    return tuple(x.shape[a] for a in axes)


class _BatchStatistics(nn.Module):
    """Shared plumbing of the modules that keep running statistics."""

    def _train_and_update(self, use_running_average: bool | None) -> tuple[bool, bool]:
        """(normalize with batch statistics?, update the running ones?)."""
        source = _SOURCE.get()
        if source is not None:
            return source == "batch", False
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        train = not use_running_average
        return train, train and not self.is_initializing()

    def _running(self, shapes: Mapping[str, tuple[tuple[int, ...], Any]]) -> dict:
        """``batch_stats`` variables: name -> (shape, initializer)."""
        return {
            key: self.variable("batch_stats", key, init, shape, jnp.float32)
            for key, (shape, init) in shapes.items()
        }

    def _apply(
        self,
        fn: Any,
        x: Array,
        params: dict,
        running: dict,
        use_running_average: bool | None,
        **kwargs: Any,
    ) -> Array:
        train, update = self._train_and_update(use_running_average)
        want_moments = (
            train
            and self.is_mutable_collection("moments")
            and not self.is_initializing()
        )
        out = fn(
            x,
            params,
            {key: var.value for key, var in running.items()},
            train=train,
            return_moments=want_moments,
            **kwargs,
        )
        if want_moments:
            for prefix, m in out[2].items():
                for field in ("count", "mean", "m2"):
                    self.put_variable("moments", prefix + field, getattr(m, field))
        if update:
            for key, value in out[1].items():
                running[key].value = value
        return out[0]

    def _axis_name(self) -> Any:
        # As in Flax: at init the named axis may not exist yet.
        return None if self.is_initializing() else self.axis_name


class BatchNorm(_BatchStatistics):
    """Batch norm with Flax's interface, plus ``ghost_batch_size`` (training only),
    ``frozen`` (always the running statistics, never updated: fine-tuning),
    ``causal``/``time_axis`` for sequences and ``unbiased_running_var``
    (PyTorch's running variance, for porting).

    Running statistics live in ``batch_stats/{mean,var}``; they are updated when
    ``use_running_average`` is False and the collection is mutable, never while
    initializing.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    ghost_batch_size: int | None = None
    frozen: bool = False
    causal: bool | str = False
    time_axis: int = 1
    unbiased_running_var: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        feature_shape = _feature_shape(x, self.axis, "BatchNorm axis")
        running = self._running(
            {"mean": (feature_shape, jnp.zeros), "var": (feature_shape, jnp.ones)}
        )
        if self.frozen:
            use_running_average = True
        return self._apply(
            F.batch_norm,
            x,
            _affine_params(self, feature_shape),
            running,
            use_running_average,
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self._axis_name(),
            axis_index_groups=self.axis_index_groups,
            ghost_batch_size=self.ghost_batch_size,
            causal=self.causal,
            time_axis=self.time_axis,
            unbiased_running_var=self.unbiased_running_var,
            dtype=self.dtype,
        )

    def _train_and_update(self, use_running_average: bool | None) -> tuple[bool, bool]:
        if self.frozen:  # frozen statistics stay frozen whatever the source.
            return False, False
        return super()._train_and_update(use_running_average)


class BatchRenorm(_BatchStatistics):
    """Batch renormalization (Ioffe 2017) — see ``functional.batch_renorm``.

    ``relax=(start, r_end, d_end)`` relaxes the limits from r_max = 1, d_max = 0
    (batch norm) after step ``start`` to ``r_max`` at ``r_end`` and ``d_max`` at
    ``d_end``, counting training steps in ``batch_stats/steps``; the paper uses
    (5000, 40000, 25000). Without it the limits are fixed.

    Under ``statistics_source('batch')`` (evaluation with the batch's own
    statistics, and the calibration pass of precise statistics) it normalizes
    with the batch's statistics alone, r = 1 and d = 0: with its correction, a
    batch renorm's training output is the running-statistics normalization
    whenever r and d are not clipped, so 'batch' would otherwise mean 'running'
    and precise statistics would be measured under running-normalized upstream
    layers but applied under precise-normalized ones.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    r_max: float = 3.0
    d_max: float = 5.0
    relax: tuple[int, int, int] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    causal: bool | str = False
    time_axis: int = 1

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        feature_shape = _feature_shape(x, self.axis, "BatchRenorm axis")
        running = self._running(
            {"mean": (feature_shape, jnp.zeros), "var": (feature_shape, jnp.ones)}
        )
        r_max, d_max = self.r_max, self.d_max
        if self.relax is not None:
            steps = self.variable("batch_stats", "steps", jnp.zeros, (), jnp.int32)
            r_max, d_max = F.renorm_limits(steps.value, r_max, d_max, self.relax)
            if self._train_and_update(use_running_average)[1]:
                steps.value = steps.value + 1
        if _SOURCE.get() == "batch":  # the batch's statistics alone (see above)
            r_max, d_max = 1.0, 0.0
        return self._apply(
            F.batch_renorm,
            x,
            _affine_params(self, feature_shape),
            running,
            use_running_average,
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            r_max=r_max,
            d_max=d_max,
            mask=mask,
            axis_name=self._axis_name(),
            axis_index_groups=self.axis_index_groups,
            causal=self.causal,
            time_axis=self.time_axis,
            dtype=self.dtype,
        )


class BatchLayerNorm(_BatchStatistics):
    """Batch-layer normalization, BLN — see ``functional.batch_layer_norm``.

    ``inference``: the source of (batch mean, batch var, feature mean, feature
    var) at evaluation, each 'running' or 'batch'; change it with ``clone`` (or
    ``make_norm('bln', inference=...)``) to try the paper's 16 configurations on
    one set of variables.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    feature_reduction_axes: Axes = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    inference: tuple[str, str, str, str] = ("running", "running", "running", "running")
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    causal: bool | str = False
    time_axis: int = 1

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        feature_shape = _feature_shape(x, self.axis, "BatchLayerNorm axis")
        running = self._running(
            {
                "mean": (feature_shape, jnp.zeros),
                "var": (feature_shape, jnp.ones),
                "feature_mean": ((), jnp.zeros),
                "feature_var": ((), jnp.ones),
            }
        )
        return self._apply(
            F.batch_layer_norm,
            x,
            _affine_params(self, feature_shape),
            running,
            use_running_average,
            axis=self.axis,
            feature_reduction_axes=self.feature_reduction_axes,
            momentum=self.momentum,
            epsilon=self.epsilon,
            inference=self.inference,
            mask=mask,
            axis_name=self._axis_name(),
            axis_index_groups=self.axis_index_groups,
            causal=self.causal,
            time_axis=self.time_axis,
            dtype=self.dtype,
        )


class PriorNorm(_BatchStatistics):
    """Per-sample (group) norm that carries a global prior — see
    ``functional.prior_norm``. Params: ``scale``, ``bias``, ``prior_mean``,
    ``prior_scale`` (C,), the last two zero-initialized; population statistics in
    ``batch_stats/{mean,var}`` (G,)."""

    use_running_average: bool | None = None
    num_groups: int | None = 32
    group_size: int | None = None
    reduction_axes: Axes | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    prior_init: Initializer = zeros
    axis_name: str | None = None
    axis_index_groups: Any = None
    causal: bool | str = False
    time_axis: int = 1

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        channels = x.shape[-1]
        groups = self.num_groups
        if groups is None and self.group_size:  # functional checks divisibility.
            groups = channels // self.group_size
        running = self._running(
            {"mean": ((groups,), jnp.zeros), "var": ((groups,), jnp.ones)}
        )
        params = _affine_params(self, (channels,))
        for key in ("prior_mean", "prior_scale"):
            params[key] = self.param(
                key, self.prior_init, (channels,), self.param_dtype
            )
        return self._apply(
            F.prior_norm,
            x,
            params,
            running,
            use_running_average,
            num_groups=self.num_groups,
            group_size=self.group_size,
            reduction_axes=self.reduction_axes,
            momentum=self.momentum,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self._axis_name(),
            axis_index_groups=self.axis_index_groups,
            causal=self.causal,
            time_axis=self.time_axis,
            dtype=self.dtype,
        )


class LayerNorm(nn.Module):
    """Layer norm with Flax's interface (``reduction_axes``, ``feature_axes``)."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    causal: bool = False
    time_axis: int = 1

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        del use_running_average  # per-sample statistics: nothing is running.
        feature_shape = _feature_shape(x, self.feature_axes, "LayerNorm feature_axes")
        return F.layer_norm(
            x,
            _affine_params(self, feature_shape),
            reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            causal=bool(self.causal),
            time_axis=self.time_axis,
            dtype=self.dtype,
        )


class RMSNorm(nn.Module):
    """RMS norm with Flax's interface (scale only)."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    causal: bool = False
    time_axis: int = 1

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        del use_running_average
        feature_shape = _feature_shape(x, self.feature_axes, "RMSNorm feature_axes")
        return F.rms_norm(
            x,
            _affine_params(self, feature_shape),
            reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            causal=bool(self.causal),
            time_axis=self.time_axis,
            dtype=self.dtype,
        )


class GroupNorm(nn.Module):
    """Group norm with Flax's interface (``num_groups`` or ``group_size``,
    ``reduction_axes`` that include the last axis)."""

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    reduction_axes: Axes | None = None
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    causal: bool = False
    time_axis: int = 1

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        del use_running_average
        return F.group_norm(
            x,
            _affine_params(self, (x.shape[-1],)),
            num_groups=self.num_groups,
            group_size=self.group_size,
            reduction_axes=self.reduction_axes,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            causal=bool(self.causal),
            time_axis=self.time_axis,
            dtype=self.dtype,
        )


class InstanceNorm(nn.Module):
    """Instance norm with Flax's interface (``feature_axes``)."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    causal: bool = False
    time_axis: int = 1

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        del use_running_average
        feature_shape = _feature_shape(
            x, self.feature_axes, "InstanceNorm feature_axes"
        )
        return F.instance_norm(
            x,
            _affine_params(self, feature_shape),
            feature_axes=self.feature_axes,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            causal=bool(self.causal),
            time_axis=self.time_axis,
            dtype=self.dtype,
        )


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (Liu et al. 2020) — see ``functional.evonorm_s0``. Params
    ``v`` (ones), ``scale`` (ones), ``bias`` (zeros), each (C,)."""

    num_groups: int | None = 32
    group_size: int | None = None
    reduction_axes: Axes | None = None
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    causal: bool = False
    time_axis: int = 1

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        del use_running_average
        channels = (x.shape[-1],)
        params = {"v": self.param("v", ones, channels, self.param_dtype)}
        params.update(_affine_params(self, channels))
        return F.evonorm_s0(
            x,
            params,
            num_groups=self.num_groups,
            group_size=self.group_size,
            reduction_axes=self.reduction_axes,
            epsilon=self.epsilon,
            mask=mask,
            causal=bool(self.causal),
            time_axis=self.time_axis,
            dtype=self.dtype,
        )


class Identity(nn.Module):
    """No normalization (the registry's ``'none'``), with the common call signature."""

    causal: bool | str = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        del use_running_average, mask
        return x


# ---------------------------------------------------------------------- PowerNorm

from normjax import power  # noqa: E402  (appended after the modules above)


class PowerNorm(_BatchStatistics):
    """PowerNorm (Shen et al. 2020) with BatchNorm's interface; the math is in
    ``normjax.power`` (running quadratic mean in the forward, the paper's
    approximate backward with its running ``nu``).

    Variables: ``params/{scale,bias}``; ``batch_stats/{psi2,nu,steps}`` (PN-V:
    ``psi2`` only); and, for PN, ``perturbations/nu``: a zero that carries nu's
    update out of the backward pass. ``psi2`` and ``steps`` are updated when
    ``use_running_average`` is False and ``batch_stats`` is mutable, never while
    initializing; ``nu`` is updated from the gradient w.r.t. the perturbations::

        def loss_fn(params, perturbations):  # variables from model.init
            out, updates = model.apply({'params': params, 'batch_stats':
                batch_stats, 'perturbations': perturbations}, x, train=True,
                mutable=['batch_stats'])
            return loss(out), updates['batch_stats']

        (grads, nu_grads), batch_stats = jax.grad(loss_fn, argnums=(0, 1),
            has_aux=True)(params, variables['perturbations'])
        batch_stats = power.apply_nu_updates(batch_stats, nu_grads)

    The gradient w.r.t. a perturbation is the increment ``nu_t - nu_{t-1}``; the
    parameter gradients are the same with or without it. A plain train step (no
    perturbations passed, or not differentiated) trains the same way but nu keeps
    its value. Under ``pmap``, ``pmean`` the perturbation gradients with the
    others (every device computes the same increment from pooled statistics when
    ``axis_name`` is set).

    Fields beyond BatchNorm's: ``warmup_steps``, ``warmup_gradient`` and
    ``nu_momentum`` (see ``power.power_norm``), ``variant`` ('pn' or 'pn-v'),
    and ``causal`` / ``time_axis``: batch statistics used in the forward (warm-up,
    PN-V) are cumulative over positions <= t (or per position, or never: see
    ``functional.CAUSAL_MODES``), so a decoder cannot see later tokens through
    them. Under ``statistics_source('batch')`` it normalizes with the current
    batch's quadratic mean (PN-V's forward) and updates nothing. It writes no
    'moments' collection: its running statistic, psi2, is a mean square, outside
    ``calibrate``'s mean/var protocol.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    warmup_steps: int = 0
    variant: str = "pn"
    warmup_gradient: str = "exact"
    nu_momentum: float | None = None
    causal: bool | str = False
    time_axis: int = 1

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        feature_shape = _feature_shape(x, self.axis, "PowerNorm axis")
        variables = {
            "psi2": self.variable(
                "batch_stats", "psi2", jnp.ones, feature_shape, jnp.float32
            )
        }
        if self.variant == "pn":
            variables["nu"] = self.variable(
                "batch_stats", "nu", jnp.zeros, feature_shape, jnp.float32
            )
            variables["steps"] = self.variable(
                "batch_stats", "steps", jnp.zeros, (), jnp.int32
            )
        state = {key: v.value for key, v in variables.items()}
        if "nu" in state:
            # Perturbed in eval too, so that init always creates the variable.
            state["nu"] = self.perturb("nu", state["nu"])
        train, update = self._train_and_update(use_running_average)
        batch_source = _SOURCE.get() == "batch"
        y, new_state = power.power_norm(
            x,
            _affine_params(self, feature_shape),
            state,
            train=train,
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            warmup_steps=0 if batch_source else self.warmup_steps,
            variant="pn-v" if batch_source else self.variant,
            warmup_gradient=self.warmup_gradient,
            nu_momentum=self.nu_momentum,
            mask=mask,
            axis_name=self._axis_name(),
            axis_index_groups=self.axis_index_groups,
            causal=self.causal,
            time_axis=self.time_axis,
            dtype=self.dtype,
        )
        if update:
            for key in ("psi2", "steps"):
                if key in variables:
                    variables[key].value = new_state[key]
        return y
