"""Pure normalization transforms with explicit statistics. No Flax import.

Every norm here is three steps:

  1. reduce the input to ``stats.Moments`` over some axes — per sample (layer,
     RMS, group, instance) or across the batch (batch norm) — or read a plain
     ``stats.MeanVar`` (running, population or prior statistics);
  2. standardize: ``(x - mean) * rsqrt(var + epsilon)`` (RMS: mean 0);
  3. an optional affine ``scale`` / ``bias`` over the feature axes.

``params`` is a mapping with optional ``'scale'`` and ``'bias'`` and
``batch_stats`` a mapping ``{'mean', 'var'}`` — the trees Flax keeps in its
``params`` and ``batch_stats`` collections, so ``variables['params']`` and
``variables['batch_stats']`` can be passed straight in. Norms with running
statistics return :class:`Normalized` ``(y, batch_stats, moments)``; per-sample
norms return ``y``.

Statistics are float32 or wider; the output has the input's dtype unless
``dtype`` asks otherwise (Flax instead promotes bfloat16 inputs to float32
outputs when the parameters are float32).

One idea per module: :mod:`~normjax.functional.core` (standardize, affine, the
fused ``normalize``), :mod:`~normjax.functional.causal` (causal modes),
:mod:`~normjax.functional.per_sample`, :mod:`~normjax.functional.batch`,
:mod:`~normjax.functional.renorm`, :mod:`~normjax.functional.bln`,
:mod:`~normjax.functional.prior`, :mod:`~normjax.functional.power` and
:mod:`~normjax.functional.population` (population, mix and batch group norm),
:mod:`~normjax.functional.online` (Online Normalization) and
:mod:`~normjax.functional.reference` (reference batch norm).
"""

from normjax.functional import power
from normjax.functional.batch import (
    BatchMoments,
    batch_moments,
    batch_norm,
    check_batch_stats,
    running_mean_var,
    update_running,
)
from normjax.functional.bln import BLN_SOURCES, batch_layer_norm
from normjax.functional.causal import CAUSAL_MODES, Causal, CausalMode, parse_causal
from normjax.functional.core import (
    BatchStats,
    Normalized,
    NormalizeOutput,
    Params,
    affine,
    broadcast_mask,
    cast_output,
    feature_layout,
    normalize,
    standardize,
)
from normjax.functional.online import online_norm
from normjax.functional.per_sample import (
    evonorm_s0,
    group_moments,
    group_norm,
    instance_norm,
    layer_norm,
    rms_norm,
)
from normjax.functional.population import (
    batch_group_norm,
    mix_norm,
    population_norm,
)
from normjax.functional.power import apply_nu_updates, power_norm
from normjax.functional.prior import prior_norm
from normjax.functional.reference import reference_norm
from normjax.functional.renorm import batch_renorm, renorm_limits

__all__ = [
    "BLN_SOURCES",
    "CAUSAL_MODES",
    "BatchMoments",
    "BatchStats",
    "Causal",
    "CausalMode",
    "NormalizeOutput",
    "Normalized",
    "Params",
    "affine",
    "apply_nu_updates",
    "batch_group_norm",
    "batch_layer_norm",
    "batch_moments",
    "batch_norm",
    "batch_renorm",
    "broadcast_mask",
    "cast_output",
    "check_batch_stats",
    "evonorm_s0",
    "feature_layout",
    "group_moments",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "mix_norm",
    "normalize",
    "online_norm",
    "parse_causal",
    "population_norm",
    "power",
    "power_norm",
    "prior_norm",
    "reference_norm",
    "renorm_limits",
    "rms_norm",
    "running_mean_var",
    "standardize",
    "update_running",
]
