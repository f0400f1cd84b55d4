"""Linen modules that carry population statistics into each sample: population
norm, the mix norm, and batch group norm — thin modules over
:mod:`normjax.functional.population`."""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer

from normjax import functional as F
from normjax.functional.causal import CAUSAL_MODES, Causal
from normjax.functional.population import MIX_CAUSAL
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


class PopulationNorm(BatchStatistics):
    """Batch norm that trains on its population statistics after
    ``warmup_steps`` of batch norm — see ``functional.population_norm``.

    Variables: ``params/{scale,bias}``, ``batch_stats/{mean,var,steps}``. Under
    ``statistics_source('batch')`` it normalizes with the batch's statistics
    (batch norm's forward), so that 'batch' means the batch and precise
    statistics are measured under batch-normalized upstream layers.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    warmup_steps: int = 200
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    supported_causal: ClassVar[tuple[str, ...]] = MIX_CAUSAL
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
        feature_shape = feature_shape_of(x, self.axis, "PopulationNorm axis")
        shape = stat_shape(self._position_rows(x), feature_shape)
        running = self._running({"mean": (shape, jnp.zeros), "var": (shape, jnp.ones)})
        running["steps"] = self.variable(
            "batch_stats", "steps", jnp.zeros, (), jnp.int32
        )
        kwargs = dict(
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self._axis_name(),
            axis_index_groups=self.axis_index_groups,
            causal=self.causal,
            time_axis=self.time_axis,
            per_position_stats=self.per_position_stats,
            dtype=self.dtype,
        )
        params = affine_params(self, feature_shape)
        if current_source() == "batch":
            pair = {k: running[k] for k in ("mean", "var")}
            return self._apply(F.batch_norm, x, params, pair, None, **kwargs)
        return self._apply(
            F.population_norm,
            x,
            params,
            running,
            use_running_average,
            warmup_steps=self.warmup_steps,
            **kwargs,
        )


class MixNorm(BatchStatistics):
    """Per-sample statistics mixed with population statistics by a learned
    weight per feature — see ``functional.mix_norm``.

    Variables: ``params/{scale,bias,mix_logit}`` (``mix_logit`` absent when
    ``alpha`` is fixed; ``sigmoid(mix_logit)`` is the weight of the sample's own
    statistics, 0.5 at initialization by default), ``batch_stats/{mean,var}``.
    Outputs never depend on other samples of the batch.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    reduction_axes: Axes | None = None
    alpha: float | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    mix_init: Initializer = zeros
    axis_name: str | None = None
    axis_index_groups: Any = None
    supported_causal: ClassVar[tuple[str, ...]] = MIX_CAUSAL
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
        feature_shape = feature_shape_of(x, self.axis, "MixNorm axis")
        shape = stat_shape(self._position_rows(x), feature_shape)
        running = self._running({"mean": (shape, jnp.zeros), "var": (shape, jnp.ones)})
        params = affine_params(self, feature_shape)
        if self.alpha is None:
            params["mix_logit"] = self.param(
                "mix_logit", self.mix_init, feature_shape, self.param_dtype
            )
        return self._apply(
            F.mix_norm,
            x,
            params,
            running,
            use_running_average,
            axis=self.axis,
            reduction_axes=self.reduction_axes,
            alpha=self.alpha,
            momentum=self.momentum,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self._axis_name(),
            axis_index_groups=self.axis_index_groups,
            causal=self.causal,
            time_axis=self.time_axis,
            per_position_stats=self.per_position_stats,
            dtype=self.dtype,
        )


def mix_weights(params: Any) -> dict[str, Array]:
    """The weight each ``MixNorm`` layer of a params tree gives the sample's own
    statistics, ``sigmoid(mix_logit)`` per feature, by layer path ('a/b/c');
    layers with a fixed ``alpha`` hold no ``mix_logit`` and are absent. How
    much of the population prior a trained network chose: 1 = per sample, 0 =
    population."""
    out: dict[str, Array] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if not hasattr(node, "items"):
            return
        for key, value in node.items():
            if key == "mix_logit" and not hasattr(value, "items"):
                out["/".join(path)] = jax.nn.sigmoid(jnp.asarray(value, jnp.float32))
            else:
                walk(value, (*path, key))

    walk(params, ())
    return out


class BatchGroupNorm(BatchStatistics):
    """Batch group norm (Zhou et al. 2020) — see ``functional.batch_group_norm``:
    batch statistics over (batch, space, a group of channels).

    Variables: ``params/{scale,bias}`` (C,), ``batch_stats/{mean,var}`` (G,)
    (per position in causal modes).
    """

    use_running_average: bool | None = None
    num_groups: int | None = 8
    group_size: int | None = None
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
        channels = x.shape[-1]
        if (self.num_groups is None) == (self.group_size is None):
            raise ValueError(
                "BatchGroupNorm: give exactly one of num_groups and group_size "
                "(pass num_groups=None to use group_size)."
            )
        groups = self.num_groups or channels // (self.group_size or 1)
        shape = stat_shape(self._position_rows(x), (groups,))
        running = self._running({"mean": (shape, jnp.zeros), "var": (shape, jnp.ones)})
        return self._apply(
            F.batch_group_norm,
            x,
            affine_params(self, (channels,)),
            running,
            use_running_average,
            num_groups=self.num_groups,
            group_size=self.group_size,
            momentum=self.momentum,
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self._axis_name(),
            axis_index_groups=self.axis_index_groups,
            causal=self.causal,
            time_axis=self.time_axis,
            per_position_stats=self.per_position_stats,
            example_weight=current_example_weight(),
            dtype=self.dtype,
        )


class OnlineNorm(BatchStatistics):
    """Online Normalization (Chiley et al. 2019) — see ``functional.online_norm``:
    each sample normalized by the running statistics of the samples before it,
    the control process in the backward pass.

    Variables: ``params/{scale,bias}``; ``batch_stats/{mean,var,u,v}``;
    ``perturbations/{u,v}``, zeros whose gradients are the control process's
    increments of ``u``/``v`` (``normjax.train`` adds them with
    ``functional.apply_nu_updates``, as for PowerNorm's ``nu``). Defaults from
    the paper's CIFAR settings: ``momentum`` 1023/1024 (forward), backward
    127/128, activation clamping at 5.

    Under ``statistics_source('batch')`` it normalizes as in evaluation (its
    forward never uses the batch's statistics) and records no 'moments'.
    Sequences: no causal mode (the statistics run over samples in sequence,
    not over the positions of a sequence).
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 1023 / 1024
    backward_momentum: float = 127 / 128
    epsilon: float = 1e-5
    ecm: str = "clamp"
    clamp_value: float = 5.0
    ls_epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = zeros
    scale_init: Initializer = ones
    supported_causal: ClassVar[tuple[str, ...]] = ()
    causal_refusal: ClassVar[str] = (
        "Online Normalization's statistics run over the samples of the batch in "
        "sequence, not over the positions of a sequence; for a language model "
        "use 'population' or 'mix', which carry population statistics per "
        "position"
    )

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        feature_shape = feature_shape_of(x, self.axis, "OnlineNorm axis")
        state = {
            key: self.variable("batch_stats", key, init, feature_shape, jnp.float32)
            for key, init in (
                ("mean", jnp.zeros),
                ("var", jnp.ones),
                ("u", jnp.zeros),
                ("v", jnp.zeros),
            )
        }
        values = {key: var.value for key, var in state.items()}
        for key in ("u", "v"):  # perturbed in evaluation too: init creates them
            values[key] = self.perturb(key, values[key])
        train, update = self._train_and_update(use_running_average)
        if current_source() == "batch":
            train = False
        out = F.online_norm(
            x,
            affine_params(self, feature_shape),
            values,
            train=train,
            axis=self.axis,
            momentum=self.momentum,
            backward_momentum=self.backward_momentum,
            epsilon=self.epsilon,
            ecm=self.ecm,
            clamp_value=self.clamp_value,
            ls_epsilon=self.ls_epsilon,
            mask=mask,
            dtype=self.dtype,
        )
        if update:
            for key in ("mean", "var"):
                state[key].value = out.batch_stats[key]
        return out.y
