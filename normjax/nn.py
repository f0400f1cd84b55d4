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
  ``norm(x, use_running_average=..., mask=...)``; per-sample norms ignore it.
"""

from __future__ import annotations

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


class BatchNorm(nn.Module):
    """Batch norm with Flax's interface, plus ``ghost_batch_size`` (training only)
    and ``unbiased_running_var`` (PyTorch's running variance, for porting).

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
    unbiased_running_var: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        feature_shape = _feature_shape(x, self.axis, "BatchNorm axis")
        ra_mean = self.variable(
            "batch_stats", "mean", jnp.zeros, feature_shape, jnp.float32
        )
        ra_var = self.variable(
            "batch_stats", "var", jnp.ones, feature_shape, jnp.float32
        )
        params = _affine_params(self, feature_shape)
        initializing = self.is_initializing()
        y, new_stats = F.batch_norm(
            x,
            params,
            {"mean": ra_mean.value, "var": ra_var.value},
            train=not use_running_average,
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            mask=mask,
            # As in Flax: at init the named axis may not exist yet.
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            ghost_batch_size=None if use_running_average else self.ghost_batch_size,
            unbiased_running_var=self.unbiased_running_var,
            dtype=self.dtype,
        )
        if not use_running_average and not initializing:
            ra_mean.value = new_stats["mean"]
            ra_var.value = new_stats["var"]
        return y


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
            dtype=self.dtype,
        )


class Identity(nn.Module):
    """No normalization (the registry's ``'none'``), with the common call signature."""

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
