"""Shared test settings: small hypothesis budgets, a cheaper XLA:CPU compile, and
caches in .pytest_cache: XLA's compiled functions (a rerun of the suite compiles
almost nothing; most of a test's time here is compilation) and the decoded
datasets."""

import os
import pathlib

import jax
from hypothesis import settings

settings.register_profile("normjax", max_examples=25, deadline=None)
settings.load_profile("normjax")

# Most of a test's time is XLA:CPU compiling small functions, not running them.
# LLVM's optimization level 0 without its expensive passes compiles the suite
# ~15 % faster here; the arithmetic is the same (no fast-math either way).
# Subprocesses inherit it (tests that set XLA_FLAGS for them add to it). Set
# by the environment's XLA_FLAGS otherwise, e.g. to test optimized code:
# XLA_FLAGS=--xla_backend_optimization_level=2 python -m pytest ...
TEST_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
    )


def xla_flags_with_devices(n: int) -> str:
    """XLA_FLAGS for a subprocess with ``n`` simulated CPU devices, keeping the
    settings above."""
    return (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    )


_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Decoded datasets too (subprocesses and notebook kernels inherit it), so that
# the tests never write into the user's own cache.
os.environ.setdefault("NORMJAX_CACHE_DIR", str(_CACHE / "normjax"))
