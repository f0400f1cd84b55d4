"""Shared test settings: small hypothesis budgets, and caches in .pytest_cache:
XLA's compiled functions (a rerun of the suite compiles almost nothing; most of a
test's time here is compilation) and the decoded datasets."""

import os
import pathlib

import jax
from hypothesis import settings

settings.register_profile("normjax", max_examples=25, deadline=None)
settings.load_profile("normjax")

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Decoded datasets too (subprocesses and notebook kernels inherit it), so that
# the tests never write into the user's own cache.
os.environ.setdefault("NORMJAX_CACHE_DIR", str(_CACHE / "normjax"))
