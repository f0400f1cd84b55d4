"""Benchmark normjax's fast CPU conv and pooling against flax.linen.

Run from the repository root::

    python -m benchmarks.conv                       # layers, then train steps
    python -m benchmarks.conv --repeats 3 --steps 0 # layers only, quicker
    python -m benchmarks.conv --json out.json

Layers: ``flax.linen.Conv`` vs ``normjax.models.Conv`` at the shapes of FastCNN
(batch 256) and ResNet-20 (batch 128), forward and forward+backward (VJP w.r.t.
input and params), and ``flax.linen.max_pool`` vs ``max_pool_2x2``. Train steps:
one jitted SGD (Nesterov) step of FastCNN (batch 256) and ResNet-20 (batch
128) built with each pair of layers, in images/s.

Every case is compiled and run once, then the two implementations are timed in
interleaved order (alternating which goes first) and the median is reported.
Each call receives the previous call's outputs as donated buffers, so that its
outputs reuse their pages: a fresh output over ~32 MiB page-faults on every
call on our CPU, which would time the page faults, not the layers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.norms import machine_info
from normjax.models import Conv, FastCNN, ResNet, max_pool_2x2

Array = jax.Array

# (label, batch, height, width, in channels, out channels, stride)
CONV_CASES: tuple[tuple[str, int, int, int, int, int, int], ...] = (
    ("FastCNN conv1", 256, 31, 31, 24, 32, 1),
    ("FastCNN conv2", 256, 15, 15, 32, 64, 1),
    ("FastCNN conv3", 256, 7, 7, 64, 128, 1),
    ("32x32x32", 256, 32, 32, 32, 32, 1),
    ("ResNet stem", 128, 32, 32, 3, 16, 1),
    ("ResNet stage1", 128, 32, 32, 16, 16, 1),
    ("ResNet down2", 128, 32, 32, 16, 32, 2),
    ("ResNet stage2", 128, 16, 16, 32, 32, 1),
    ("ResNet down3", 128, 16, 16, 32, 64, 2),
    ("ResNet stage3", 128, 8, 8, 64, 64, 1),
)
POOL_SHAPES: tuple[tuple[int, ...], ...] = (
    (256, 31, 31, 32),
    (256, 15, 15, 64),
    (256, 7, 7, 128),
    (128, 32, 32, 32),
)


def flax_max_pool(x: Array) -> Array:
    """The baseline: ``flax.linen.max_pool`` 2x2, stride 2."""
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def _call(fn: Callable[..., Any], args: tuple[Any, ...], scratch: Any) -> Any:
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, scratch))
    return out, time.perf_counter() - start


def time_interleaved(
    fns: Sequence[Callable[..., Any]], args: Sequence[tuple[Any, ...]], repeats: int
) -> tuple[list[float], list[Any]]:
    """Median seconds of each ``fns[i](*args[i], scratch)`` over ``repeats``
    interleaved runs, and each function's last output.

    ``scratch`` is the function's previous output, donated (see the module
    docstring); the first call, untimed, compiles and makes it.
    """
    outs = [jax.block_until_ready(f(*a, None)) for f, a in zip(fns, args, strict=True)]
    # Compiles again for a scratch argument (no longer None), untimed.
    outs = [
        jax.block_until_ready(f(*a, o)) for f, a, o in zip(fns, args, outs, strict=True)
    ]
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for r in range(repeats):
        for i in order if r % 2 == 0 else order[::-1]:
            outs[i], seconds = _call(fns[i], args[i], outs[i])
            times[i].append(seconds)
    return [statistics.median(t) for t in times], outs


def _donating(fn: Callable[..., Any]) -> Callable[..., Any]:
    """jit(fn) taking a last, donated argument (the previous output) that it
    ignores, so that XLA writes the outputs into those buffers."""
    return jax.jit(lambda *args: fn(*args[:-1]), donate_argnums=(-1,))


def _max_diff(a: Any, b: Any) -> float:
    return max(
        float(jnp.max(jnp.abs(u - v)))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def bench_conv(case: tuple, repeats: int) -> list[dict[str, Any]]:
    """flax.linen.Conv vs normjax Conv (3x3, SAME) on one shape."""
    label, n, h, w, cin, cout, stride = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)), jnp.float32)
    modules = [
        nn.Conv(cout, (3, 3), strides=stride, use_bias=False),
        Conv(cout, (3, 3), strides=stride, use_bias=False),
    ]
    variables = modules[0].init(jax.random.key(0), x)
    y_shape = jax.eval_shape(modules[0].apply, variables, x).shape
    dy = jnp.asarray(rng.normal(size=y_shape), jnp.float32)
    flops = 2 * np.prod(y_shape) * 9 * cin
    rows = []
    for pass_ in ("fwd", "fwd+bwd"):
        if pass_ == "fwd":
            fns = [_donating(m.apply) for m in modules]
            args = [(variables, x)] * 2
        else:

            def fwd_bwd(variables: Any, x: Array, dy: Array, module: nn.Module) -> Any:
                y, vjp = jax.vjp(module.apply, variables, x)
                return y, vjp(dy)

            fns = [
                _donating(lambda v, x, dy, m=m: fwd_bwd(v, x, dy, m)) for m in modules
            ]
            args = [(variables, x, dy)] * 2
            flops *= 3  # forward, input gradient, kernel gradient
        (flax_s, ours_s), outs = time_interleaved(fns, args, repeats)
        rows.append(
            _row(label, x.shape, f"3x3/{stride} -> {cout}", pass_, flax_s, ours_s)
            | {
                "gflops_flax": flops / flax_s / 1e9,
                "gflops_normjax": flops / ours_s / 1e9,
            }
            | {"max_abs_diff": _max_diff(*outs)}
        )
    return rows


def bench_pool(shape: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    """flax.linen.max_pool vs max_pool_2x2."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    dy = jnp.asarray(
        rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])),
        jnp.float32,
    )
    pools = [flax_max_pool, max_pool_2x2]
    rows = []
    for pass_ in ("fwd", "fwd+bwd"):
        if pass_ == "fwd":
            fns = [_donating(p) for p in pools]
            args = [(x,)] * 2
        else:

            def fwd_bwd(x: Array, dy: Array, pool: Callable) -> Any:
                y, vjp = jax.vjp(pool, x)
                return y, vjp(dy)

            fns = [_donating(lambda x, dy, p=p: fwd_bwd(x, dy, p)) for p in pools]
            args = [(x, dy)] * 2
        (flax_s, ours_s), outs = time_interleaved(fns, args, repeats)
        rows.append(
            _row("max_pool 2x2", shape, "", pass_, flax_s, ours_s)
            | {"max_abs_diff": _max_diff(*outs)}
        )
    return rows


def _row(
    label: str, shape: Sequence[int], op: str, pass_: str, flax_s: float, ours_s: float
) -> dict[str, Any]:
    return {
        "case": label,
        "shape": list(shape),
        "op": op,
        "pass": pass_,
        "flax_ms": flax_s * 1e3,
        "normjax_ms": ours_s * 1e3,
        "speedup": flax_s / ours_s,
    }


def train_step(model: nn.Module, batch: int, size: int = 32) -> tuple[Callable, list]:
    """A jitted SGD (Nesterov, label smoothing 0.2) step on random images:
    ``step(params, opt_state, other_collections, images, labels, scratch)``; the
    state is donated and fed back."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, batch))
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)
    params = variables["params"]
    others = {k: v for k, v in variables.items() if k != "params"}
    tx = optax.sgd(0.05, momentum=0.9, nesterov=True)

    def step(params: Any, opt_state: Any, others: Any, images: Array, labels: Array):
        def loss_fn(params: Any) -> tuple[Array, Any]:
            logits, updates = model.apply(
                {"params": params, **others},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            targets = optax.smooth_labels(jax.nn.one_hot(labels, 10), 0.2)
            return optax.softmax_cross_entropy(logits, targets).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        deltas, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, deltas), opt_state, {**others, **updates}

    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    return jitted, [params, tx.init(params), others, images, labels]


def bench_train_steps(
    steps: int, repeats: int, batch: int | None = None
) -> list[dict[str, Any]]:
    """images/s of FastCNN (batch 256) and ResNet-20 (batch 128) train steps."""
    cases = [
        (
            "FastCNN",
            batch or 256,
            FastCNN(conv=nn.Conv, pool=flax_max_pool),
            FastCNN(conv=Conv, pool=max_pool_2x2),
        ),
        ("ResNet-20", batch or 128, ResNet(conv=nn.Conv), ResNet(conv=Conv)),
    ]
    rows = []
    for label, batch, flax_model, model in cases:
        runs = [train_step(m, batch) for m in (flax_model, model)]
        for fn, state in runs:  # compile
            state[:3] = jax.block_until_ready(fn(*state))
        times: list[list[float]] = [[], []]
        for r in range(repeats):
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                fn, state = runs[i]
                start = time.perf_counter()
                for _ in range(steps):
                    state[:3] = fn(*state)
                jax.block_until_ready(state[:3])
                times[i].append((time.perf_counter() - start) / steps)
        flax_s, ours_s = (statistics.median(t) for t in times)
        rows.append(
            _row(label, (batch, 32, 32, 3), "SGD step", "train", flax_s, ours_s)
            | {
                "images_per_s_flax": batch / flax_s,
                "images_per_s_normjax": batch / ours_s,
            }
        )
    return rows


HEADER = (
    f"{'case':<15} {'shape':<15} {'op':<12} {'pass':<7} "
    f"{'flax ms':>9} {'normjax ms':>10} {'speed-up':>8}  notes"
)


def format_row(row: dict[str, Any]) -> str:
    """One line of the table."""
    if "images_per_s_flax" in row:
        notes = (
            f"{row['images_per_s_flax']:.0f} -> {row['images_per_s_normjax']:.0f}"
            " images/s"
        )
    elif "gflops_flax" in row:
        notes = (
            f"{row['gflops_flax']:.0f} -> {row['gflops_normjax']:.0f} GFLOP/s, "
            f"max|diff| {row['max_abs_diff']:.0e}"
        )
    else:
        notes = f"max|diff| {row['max_abs_diff']:.0e}"
    shape = "x".join(map(str, row["shape"]))
    return (
        f"{row['case']:<15} {shape:<15} {row['op']:<12} {row['pass']:<7} "
        f"{row['flax_ms']:>9.2f} {row['normjax_ms']:>10.2f} "
        f"{row['speedup']:>7.2f}x  {notes}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.conv",
        description="Time normjax's fast conv/pool layers against flax.linen.",
    )
    p.add_argument("--repeats", type=int, default=7, help="timed runs per case")
    p.add_argument(
        "--steps",
        type=int,
        default=3,
        help="train steps per timed run (0: skip the train-step benchmark)",
    )
    p.add_argument(
        "--cases",
        default="all",
        help="comma-separated conv case labels or 'all' (see CONV_CASES); "
        "'none' skips conv and pool",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="override every case's batch size (e.g. 2 for a smoke test)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, print the table; returns the rows."""
    args = build_parser().parse_args(argv)
    cases = CONV_CASES
    pools = POOL_SHAPES
    if args.batch is not None:
        cases = tuple((c[0], args.batch, *c[2:]) for c in cases)
        pools = tuple((args.batch, *p[1:]) for p in pools)
    if args.cases == "none":
        cases, pools = (), ()
    elif args.cases != "all":
        wanted = {c.strip() for c in args.cases.split(",")}
        cases = tuple(c for c in cases if c[0] in wanted)
        if unknown := wanted - {c[0] for c in cases}:
            raise SystemExit(f"unknown cases {sorted(unknown)}")
    info = machine_info()
    print(
        f"# {info['processor']}, {info['cpu_count']} CPUs, jax {info['jax_version']},"
        f" flax {info['flax_version']}; median of {args.repeats} interleaved runs"
    )
    print(HEADER)
    print("-" * len(HEADER))
    rows: list[dict[str, Any]] = []
    jobs = [lambda c=c: bench_conv(c, args.repeats) for c in cases]
    jobs += [lambda p=p: bench_pool(p, args.repeats) for p in pools]
    if args.steps > 0:
        jobs.append(lambda: bench_train_steps(args.steps, args.repeats, args.batch))
    for job in jobs:
        for row in job():
            print(format_row(row), flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
