"""Shared test settings: small hypothesis budgets, and a persistent compilation
cache so that a rerun of the suite compiles almost nothing (most of a test's time
here is XLA compiling small functions)."""

import pathlib

import jax
from hypothesis import settings

settings.register_profile("normjax", max_examples=25, deadline=None)
settings.load_profile("normjax")

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
