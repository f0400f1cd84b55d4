"""normjax: normalization layers with explicit statistics for JAX/Flax."""

from normjax import calibrate, functional, nn, stats
from normjax.registry import make_norm, names

__all__ = [
    "calibrate",
    "functional",
    "make_norm",
    "names",
    "nn",
    "stats",
]
__version__ = "0.1.0"
