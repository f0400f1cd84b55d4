"""Linen modules that keep running statistics: batch norm, batch renorm, BLN,
the prior norm and PowerNorm — thin modules over :mod:`normjax.functional`."""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer

from normjax import functional as F
from normjax import stats
from normjax.functional import prior
from normjax.functional.causal import CAUSAL_MODES, Causal
from normjax.nn.common import (
    BatchStatistics,
    affine_params,
    current_example_weight,
    current_source,
    feature_shape_of,
    stat_shape,
)

Array = jax.Array
zeros = nn.initializers.zeros
ones = nn.initializers.ones


class BatchNorm(BatchStatistics):
    """Batch norm with Flax's interface, plus ``ghost_batch_size`` (training only),
    ``frozen`` (always the running statistics, never updated: fine-tuning),
    ``causal``/``time_axis`` for sequences and ``unbiased_running_var``
    (PyTorch's running variance, for porting).

    In a causal mode the running statistics are per position (``max_len``, C):
    ``max_len`` rows, or as many as the sequences the module is initialized on;
    ``per_position_stats=False`` keeps one row (see ``functional.batch_norm``).

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
    supported_causal: ClassVar[tuple[str, ...]] = CAUSAL_MODES
    causal: Causal = False
    time_axis: int = 1
    per_position_stats: bool = True
    max_len: int | None = None
    unbiased_running_var: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        feature_shape = feature_shape_of(x, self.axis, "BatchNorm axis")
        shape = stat_shape(self._position_rows(x), feature_shape)
        running = self._running(
            {"mean": (shape, jnp.zeros), "var": (shape, jnp.ones)},
            mean_dtype=stats.stat_dtype(x.dtype)
            if jnp.iscomplexobj(x)
            else jnp.float32,
        )
        if self.frozen:
            use_running_average = True
        return self._apply(
            F.batch_norm,
            x,
            affine_params(self, feature_shape),
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
            per_position_stats=self.per_position_stats,
            example_weight=self._example_weight(),
            unbiased_running_var=self.unbiased_running_var,
            dtype=self.dtype,
        )

    def _example_weight(self) -> float | None:
        """The example weight under ``statistics_source('example_weighted')``:
        a sample's share of the statistics it was trained with — 1 / the ghost
        batch size for ghost batches, else the context's; none when frozen."""
        weight = current_example_weight()
        if weight is None or self.frozen:
            return None
        return 1.0 / self.ghost_batch_size if self.ghost_batch_size else weight

    def _train_and_update(self, use_running_average: bool | None) -> tuple[bool, bool]:
        if self.frozen:  # frozen statistics stay frozen whatever the source.
            return False, False
        return super()._train_and_update(use_running_average)


class BatchRenorm(BatchStatistics):
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
    supported_causal: ClassVar[tuple[str, ...]] = CAUSAL_MODES
    causal: Causal = False
    time_axis: int = 1
    per_position_stats: bool = True
    max_len: int | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        feature_shape = feature_shape_of(x, self.axis, "BatchRenorm axis")
        shape = stat_shape(self._position_rows(x), feature_shape)
        running = self._running({"mean": (shape, jnp.zeros), "var": (shape, jnp.ones)})
        r_max: float | Array = self.r_max
        d_max: float | Array = self.d_max
        if self.relax is not None:
            steps = self.variable("batch_stats", "steps", jnp.zeros, (), jnp.int32)
            r_max, d_max = F.renorm_limits(steps.value, r_max, d_max, self.relax)
            if self._train_and_update(use_running_average)[1]:
                steps.value = steps.value + 1
        if current_source() == "batch":  # the batch's statistics alone (see above)
            r_max, d_max = 1.0, 0.0
        return self._apply(
            F.batch_renorm,
            x,
            affine_params(self, feature_shape),
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
            per_position_stats=self.per_position_stats,
            example_weight=current_example_weight(),
            dtype=self.dtype,
        )


class BatchLayerNorm(BatchStatistics):
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
    supported_causal: ClassVar[tuple[str, ...]] = CAUSAL_MODES
    causal: Causal = False
    time_axis: int = 1
    per_position_stats: bool = True
    max_len: int | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        feature_shape = feature_shape_of(x, self.axis, "BatchLayerNorm axis")
        rows = self._position_rows(x)
        shape = stat_shape(rows, feature_shape)
        running = self._running(
            {
                "mean": (shape, jnp.zeros),
                "var": (shape, jnp.ones),
                "feature_mean": (stat_shape(rows, ()), jnp.zeros),
                "feature_var": (stat_shape(rows, ()), jnp.ones),
            }
        )
        # The training batch's B, which evaluation mixes with; variables made
        # before it existed load without it (evaluation then mixes with the
        # evaluation batch's B, as before).
        if self.is_initializing() or self.has_variable("batch_stats", "samples"):
            running["samples"] = self.variable(
                "batch_stats", "samples", jnp.ones, (), jnp.float32
            )
        return self._apply(
            F.batch_layer_norm,
            x,
            affine_params(self, feature_shape),
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
            per_position_stats=self.per_position_stats,
            example_weight=current_example_weight(),
            dtype=self.dtype,
        )


class PriorNorm(BatchStatistics):
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
    supported_causal: ClassVar[tuple[str, ...]] = prior.SUPPORTED_CAUSAL
    causal: Causal = False
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
        if (self.num_groups is None) == (self.group_size is None):
            raise ValueError(
                "PriorNorm: give exactly one of num_groups and group_size (pass "
                "num_groups=None to use group_size)."
            )
        # functional.prior_norm checks that the groups divide the channels.
        groups = self.num_groups or channels // (self.group_size or 1)
        running = self._running(
            {"mean": ((groups,), jnp.zeros), "var": ((groups,), jnp.ones)}
        )
        params = affine_params(self, (channels,))
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


class PowerNorm(BatchStatistics):
    """PowerNorm (Shen et al. 2020) with BatchNorm's interface — see
    ``functional.power``: the running quadratic mean in the forward, the paper's
    approximate backward with its running ``nu``.

    Variables: ``params/{scale,bias}``; ``batch_stats/{psi2,nu,steps}`` (PN-V:
    ``psi2`` only); for PN, ``perturbations/nu``, a zero whose gradient is nu's
    increment: differentiate the loss w.r.t. ``variables['perturbations']`` too
    and add it with ``functional.apply_nu_updates(batch_stats, nu_grads)``
    (``normjax.train`` does). Without it, training is the same but nu keeps its
    value::

        def loss_fn(params, perturbations):  # variables from model.init
            out, updates = model.apply({'params': params, 'batch_stats':
                batch_stats, 'perturbations': perturbations}, x, train=True,
                mutable=['batch_stats'])
            return loss(out), updates['batch_stats']

        (grads, nu_grads), batch_stats = jax.grad(loss_fn, argnums=(0, 1),
            has_aux=True)(params, variables['perturbations'])
        batch_stats = functional.apply_nu_updates(batch_stats, nu_grads)

    Fields beyond BatchNorm's: ``warmup_steps``, ``warmup_gradient``,
    ``nu_momentum``, ``variant`` ('pn' or 'pn-v'). Under
    ``statistics_source('batch')`` it divides by the current batch's quadratic
    mean (PN-V's forward). It writes no 'moments': psi2 is a mean square, outside
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
    supported_causal: ClassVar[tuple[str, ...]] = CAUSAL_MODES
    causal: Causal = False
    time_axis: int = 1

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        feature_shape = feature_shape_of(x, self.axis, "PowerNorm axis")
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
        batch_source = current_source() == "batch"
        out = F.power_norm(
            x,
            affine_params(self, feature_shape),
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
                    variables[key].value = out.batch_stats[key]
        return out.y
