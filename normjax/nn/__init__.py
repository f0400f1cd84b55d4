"""Flax Linen modules over ``normjax.functional``.

Each drop-in takes the constructor and call arguments of its ``flax.linen``
namesake and keeps the same variable tree — ``params/{scale,bias}`` and
``batch_stats/{mean,var}`` — so variables made by a ``flax.linen`` layer load here
and give the same output up to float32 rounding. Differences, all deliberate:

* the variance is always the exact two-pass one (``use_fast_variance`` and
  ``force_float32_reductions`` are accepted for drop-in use; statistics are always
  float32 or wider and never ``E[x^2] - E[x]^2``);
* a fully masked slot gives finite outputs and gradients (Flax gives NaN), and
  masked statistics pooled over ``axis_name`` are exact when devices hold
  different numbers of valid elements (Flax averages the per-device means);
* the output has the input's dtype unless ``dtype`` is set;
* every module is called as ``norm(x, use_running_average=..., mask=...)``
  (per-sample norms ignore ``use_running_average``) and takes ``causal`` and
  ``time_axis`` for sequences x_BxLxD (:mod:`normjax.functional.causal`); each
  refuses, by name, the causal modes it does not support (``supported_causal``).

Batch-statistics modules also honour :func:`statistics_source` (evaluate with
running or current-batch statistics without editing the model) and, when the
'moments' collection is mutable, store the batch moments behind their running
statistics (``moments/{count,mean,m2}``) for ``normjax.calibrate``.
"""

from normjax.nn.batch import (
    BatchLayerNorm,
    BatchNorm,
    BatchRenorm,
    PowerNorm,
    PriorNorm,
)
from normjax.nn.common import (
    STATISTICS_SOURCES,
    current_example_weight,
    current_source,
    statistics_source,
)
from normjax.nn.per_sample import (
    EvoNormS0,
    GroupNorm,
    Identity,
    InstanceNorm,
    LayerNorm,
    RMSNorm,
)
from normjax.nn.population import (
    BatchGroupNorm,
    MixNorm,
    OnlineNorm,
    PopulationNorm,
    mix_weights,
)
from normjax.nn.reference import (
    ReferenceNorm,
    WithReference,
    current_reference_size,
    reference_batch,
)

__all__ = [
    "STATISTICS_SOURCES",
    "BatchGroupNorm",
    "BatchLayerNorm",
    "BatchNorm",
    "BatchRenorm",
    "EvoNormS0",
    "GroupNorm",
    "Identity",
    "InstanceNorm",
    "LayerNorm",
    "MixNorm",
    "OnlineNorm",
    "PopulationNorm",
    "PowerNorm",
    "PriorNorm",
    "RMSNorm",
    "ReferenceNorm",
    "WithReference",
    "current_example_weight",
    "current_reference_size",
    "current_source",
    "mix_weights",
    "reference_batch",
    "statistics_source",
]
