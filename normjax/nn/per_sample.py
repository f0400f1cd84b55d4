"""Linen drop-ins for the per-sample norms — layer, RMS, group, instance norm,
EvoNorm-S0 — and ``Identity``: thin modules over :mod:`normjax.functional`."""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer

from normjax import functional as F
from normjax.functional.causal import CAUSAL_MODES, Causal
from normjax.functional.per_sample import SUPPORTED_CAUSAL
from normjax.nn.common import affine_params, feature_shape_of

Array = jax.Array
zeros = nn.initializers.zeros
ones = nn.initializers.ones


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
    supported_causal: ClassVar[tuple[str, ...]] = SUPPORTED_CAUSAL
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
        del use_running_average  # per-sample statistics: nothing is running.
        feature_shape = feature_shape_of(x, self.feature_axes, "LayerNorm feature_axes")
        return F.layer_norm(
            x,
            affine_params(self, feature_shape),
            reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            causal=self.causal,
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
    supported_causal: ClassVar[tuple[str, ...]] = SUPPORTED_CAUSAL
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
        del use_running_average
        feature_shape = feature_shape_of(x, self.feature_axes, "RMSNorm feature_axes")
        return F.rms_norm(
            x,
            affine_params(self, feature_shape),
            reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            causal=self.causal,
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
    supported_causal: ClassVar[tuple[str, ...]] = SUPPORTED_CAUSAL
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
        del use_running_average
        return F.group_norm(
            x,
            affine_params(self, (x.shape[-1],)),
            num_groups=self.num_groups,
            group_size=self.group_size,
            reduction_axes=self.reduction_axes,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            causal=self.causal,
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
    supported_causal: ClassVar[tuple[str, ...]] = SUPPORTED_CAUSAL
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
        del use_running_average
        feature_shape = feature_shape_of(
            x, self.feature_axes, "InstanceNorm feature_axes"
        )
        return F.instance_norm(
            x,
            affine_params(self, feature_shape),
            feature_axes=self.feature_axes,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            causal=self.causal,
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
    supported_causal: ClassVar[tuple[str, ...]] = SUPPORTED_CAUSAL
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
        del use_running_average
        channels = (x.shape[-1],)
        params = {"v": self.param("v", ones, channels, self.param_dtype)}
        params.update(affine_params(self, channels))
        return F.evonorm_s0(
            x,
            params,
            num_groups=self.num_groups,
            group_size=self.group_size,
            reduction_axes=self.reduction_axes,
            epsilon=self.epsilon,
            mask=mask,
            causal=self.causal,
            time_axis=self.time_axis,
            dtype=self.dtype,
        )


class Identity(nn.Module):
    """No normalization (the registry's ``'none'``), with the common call
    signature. As every norm, it outputs 0 at masked elements, whatever they
    hold."""

    supported_causal: ClassVar[tuple[str, ...]] = CAUSAL_MODES
    causal: Causal = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        del use_running_average
        mask = F.broadcast_mask(mask, x)
        return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))
