"""The normalization core alone: fused hand-derived backward vs autodiff.

    python -m benchmarks.normalize [--shapes 256x32x32x64,64x256x384] [--repeats 7]

For each shape (features last) and reduction (batch norm: every axis but the
last; layer norm: the last), times the jitted VJP of ``y = (x - mean) / std``:

* ``fused``: ``normjax.functional.normalize`` (custom VJP, two-pass forward);
* ``autodiff``: the same forward (``stats.moments`` + ``standardize``) under
  JAX's autodiff;
* ``one-pass``: Flax's formula, E[x^2] - E[x]^2 in one pass, under autodiff
  (faster forward, inexact when |mean| >> std).

Prints medians of interleaved runs and the fused/autodiff and fused/one-pass
ratios. Timings are for comparing side by side in one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from normjax import functional as F
from normjax import stats

EPS = 1e-5


def _one_pass(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    mean = x.mean(axes, keepdims=True)
    var = jnp.maximum(jnp.square(x).mean(axes, keepdims=True) - mean**2, 0.0)
    return (x - mean) * jax.lax.rsqrt(var + EPS)


def _cores(axes: tuple[int, ...]) -> dict[str, Callable[[jax.Array], jax.Array]]:
    return {
        "fused": lambda x: F.normalize(x, axes, epsilon=EPS).y,
        "autodiff": lambda x: F.standardize(
            x, stats.mean_var(stats.moments(x, axes)), EPS
        ),
        "one-pass": lambda x: _one_pass(x, axes),
    }


def _time(fn: Callable[[], jax.Array]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.normalize")
    parser.add_argument("--shapes", default="256x32x32x64,128x16x16x128,64x256x384")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rows = []
    header = (
        f"{'shape':18s} {'reduce':7s} {'pass':8s} {'fused ms':>9s} "
        f"{'autodiff ms':>12s} {'one-pass ms':>12s} {'f/ad':>6s} {'f/1p':>6s}"
    )
    print(header)
    print("-" * len(header))
    for spec in args.shapes.split(","):
        shape = tuple(int(n) for n in spec.split("x"))
        x = jax.random.normal(jax.random.key(0), shape) * 2 + 1
        dy = jax.random.normal(jax.random.key(1), shape)
        for reduce, axes in (
            ("batch", tuple(range(len(shape) - 1))),
            ("layer", (len(shape) - 1,)),
        ):
            cores = _cores(axes)
            fns = {
                "fwd": {k: jax.jit(f) for k, f in cores.items()},
                "fwd+bwd": {
                    k: jax.jit(lambda x, dy, f=f: jax.vjp(f, x)[1](dy)[0])
                    for k, f in cores.items()
                },
            }
            for pass_name, table in fns.items():
                inputs = (x,) if pass_name == "fwd" else (x, dy)
                call = {k: functools.partial(f, *inputs) for k, f in table.items()}
                for f in call.values():  # compile and warm up
                    _time(f)
                    _time(f)
                times = {k: [] for k in call}
                for _ in range(args.repeats):
                    for k, f in call.items():
                        times[k].append(_time(f))
                ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
                row = {
                    "shape": spec,
                    "reduce": reduce,
                    "pass": pass_name,
                    **{f"{k}_ms": v for k, v in ms.items()},
                }
                rows.append(row)
                print(
                    f"{spec:18s} {reduce:7s} {pass_name:8s} {ms['fused']:9.3f} "
                    f"{ms['autodiff']:12.3f} {ms['one-pass']:12.3f} "
                    f"{ms['fused'] / ms['autodiff']:6.3f} "
                    f"{ms['fused'] / ms['one-pass']:6.3f}"
                )
    return rows


if __name__ == "__main__":
    main()
