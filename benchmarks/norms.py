"""Benchmark normjax normalization layers against their flax.linen namesakes.

Run from the repository root::

    python -m benchmarks.norms                      # default shapes, all layers
    python -m benchmarks.norms --shapes 4x4x4x32,4x8x32 --repeats 1   # smoke test
    python -m benchmarks.norms --layers batch,layer --dtypes float32 --json out.json

Every (layer, shape, dtype) case is jitted twice (flax.linen and normjax), for
the forward pass and for forward+backward (VJP w.r.t. x and params). After one
warm-up call per function (compile + run), the two implementations are timed
in interleaved order and the median of ``--repeats`` runs is reported.
Achieved bandwidth is reported as a fraction of the bandwidth of a large
jitted, donated ``x + 1.0`` copy (no page faults) measured once at start-up
on the same machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as flax_nn
import jax
import jax.numpy as jnp

import normjax

DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = (
    (256, 32, 32, 64),
    (128, 16, 16, 128),
    (64, 256, 384),
)
DEFAULT_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
DEFAULT_GROUPS = 32
PASSES: tuple[str, ...] = ("fwd", "fwd+bwd")

# Short layer key -> class name shared by flax.linen and normjax.nn.
LAYERS: dict[str, str] = {
    "batch": "BatchNorm",
    "layer": "LayerNorm",
    "rms": "RMSNorm",
    "group": "GroupNorm",
    "instance": "InstanceNorm",
}

# Research norms (registry names) have no flax.linen namesake: each is timed
# against flax.linen.BatchNorm in training mode, the nearest baseline, and built
# with ``normjax.make_norm(name)``. Their max|diff| is not defined (nan).
RESEARCH: tuple[str, ...] = (
    "batch_renorm",
    "ghost_batch",
    "bln",
    "prior",
    "evonorm_s0",
    "power",
    "population",
    "mix",
    "batch_group",
    "online",
    "reference",
)
ALL_LAYERS: tuple[str, ...] = (*LAYERS, *RESEARCH)

BYTES_DOC = (
    "bytes moved: fwd = 2*nbytes(x) (read x, write y); "
    "fwd+bwd = 5*nbytes(x) (read x, write y, read x and dy, write dx); "
    "param/statistics traffic is ignored"
)

Array = jax.Array
ApplyFn = Callable[[Any, Array], tuple[Array, Any]]


# --------------------------------------------------------------------------- #
# Argument parsing
# --------------------------------------------------------------------------- #


def parse_shapes(spec: str) -> list[tuple[int, ...]]:
    """Parse ``"8x4x4x16,4x8x32"`` into ``[(8, 4, 4, 16), (4, 8, 32)]``."""
    shapes = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            shape = tuple(int(d) for d in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}") from None
        if len(shape) < 2 or any(d <= 0 for d in shape):
            raise argparse.ArgumentTypeError(
                f"shape {item!r} needs >= 2 positive dims (batch, ..., features)"
            )
        shapes.append(shape)
    if not shapes:
        raise argparse.ArgumentTypeError("empty shape list")
    return shapes


def parse_layers(spec: str) -> list[str]:
    """Parse ``"batch,layer"`` (also ``BatchNorm``, ``rmsnorm``) into layer keys."""
    keys = []
    for item in spec.split(","):
        key = item.strip().lower()
        if not key:
            continue
        if key.endswith("norm") and key[: -len("norm")] in LAYERS:
            key = key[: -len("norm")]
        if key not in ALL_LAYERS:
            raise argparse.ArgumentTypeError(
                f"unknown layer {item!r}; choose from {','.join(ALL_LAYERS)}"
            )
        if key not in keys:
            keys.append(key)
    if not keys:
        raise argparse.ArgumentTypeError("empty layer list")
    return keys


def parse_dtypes(spec: str) -> list[str]:
    """Parse ``"float32,bfloat16"`` into a list of dtype names."""
    names = []
    for item in spec.split(","):
        name = item.strip().lower()
        if not name:
            continue
        if name not in DEFAULT_DTYPES:
            raise argparse.ArgumentTypeError(
                f"unsupported dtype {item!r}; choose from {','.join(DEFAULT_DTYPES)}"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise argparse.ArgumentTypeError("empty dtype list")
    return names


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.norms",
        description="Time normjax.nn norm layers against flax.linen under jax.jit.",
    )
    p.add_argument(
        "--shapes",
        type=parse_shapes,
        default=list(DEFAULT_SHAPES),
        help="comma-separated shapes, e.g. 8x4x4x16,4x8x32 (feature axis last)",
    )
    p.add_argument(
        "--layers",
        type=parse_layers,
        default=list(ALL_LAYERS),
        help=f"comma-separated subset of {','.join(ALL_LAYERS)}",
    )
    p.add_argument(
        "--dtypes",
        type=parse_dtypes,
        default=list(DEFAULT_DTYPES),
        help="comma-separated input dtypes (params are always float32)",
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="timed repeats per case (median)"
    )
    p.add_argument("--json", metavar="PATH", help="also write results as JSON")
    p.add_argument(
        "--copy-mib",
        type=float,
        default=256.0,
        help="size in MiB of the float32 array used for the copy-bandwidth probe",
    )
    p.add_argument(
        "--impl",
        default="normjax.nn",
        help="module providing the candidate layers (default normjax.nn; "
        "flax.linen gives a flax-vs-flax noise baseline)",
    )
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for inputs")
    return p


# --------------------------------------------------------------------------- #
# Timing helpers
# --------------------------------------------------------------------------- #


def _time_call(fn: Callable[..., Any], *args: Any) -> float:
    """Run ``fn(*args)`` once, block on the result, return seconds elapsed."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def time_interleaved(
    fns: Sequence[Callable[..., Any]], args: Sequence[tuple[Any, ...]], repeats: int
) -> list[float]:
    """Median seconds of each ``fns[i](*args[i])``, runs interleaved across ``fns``.

    The functions must already be compiled. One untimed round runs first, so
    that no function is timed straight after another's compilation, and the
    order alternates every repeat so that neither always runs first.
    """
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for fn, a in zip(fns, args, strict=True):
        jax.block_until_ready(fn(*a))
    for r in range(repeats):
        for i in order if r % 2 == 0 else reversed(order):
            times[i].append(_time_call(fns[i], *args[i]))
    return [statistics.median(t) for t in times]


def measure_copy_bandwidth(mib: float = 256.0, repeats: int = 5) -> float:
    """Bytes/second of a jitted, donated ``x + 1.0`` on a ``mib``-MiB float32 array.

    Counts one read and one write of the array. ``+ 1.0`` cannot be elided by
    XLA, unlike ``x * 1`` or ``x + 0``. The input is donated so the output reuses
    its pages: without donation, every fresh output over ~32 MiB page-faults on
    each call on this CPU and the "copy" measures the page-fault rate (~3 GB/s
    here) rather than memory bandwidth. The timed layers do write fresh outputs,
    so their fractions include that cost: it is part of what they cost a user.
    """
    n = max(1, int(mib * 2**20) // 4)
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = jax.block_until_ready(f(x))  # compile + warm-up
    times = []
    for _ in range(max(repeats, 3)):
        start = time.perf_counter()
        x = jax.block_until_ready(f(x))
        times.append(time.perf_counter() - start)
    nbytes = 2 * x.nbytes
    del x
    return nbytes / statistics.median(times)


def machine_info() -> dict[str, Any]:
    """Describe the machine and software versions."""
    dev = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
    }


# --------------------------------------------------------------------------- #
# Benchmark construction
# --------------------------------------------------------------------------- #


def layer_kwargs(key: str, shape: Sequence[int], dtype: str) -> dict[str, Any]:
    """Constructor kwargs used for both implementations of layer ``key``.

    Modules compute and return in the input dtype (``dtype=<input dtype>``)
    with float32 params. GroupNorm uses 32 groups, or ``gcd(32, features)``
    when the feature count is not a multiple of 32 (tiny smoke-test shapes).
    """
    kwargs: dict[str, Any] = {"dtype": jnp.dtype(dtype), "param_dtype": jnp.float32}
    if key == "group":
        kwargs["num_groups"] = math.gcd(DEFAULT_GROUPS, shape[-1])
    return kwargs


def make_apply(module: flax_nn.Module, key: str) -> ApplyFn:
    """Return ``apply(variables, x) -> (y, aux)``; aux is BatchNorm's new stats."""
    if key == "batch" or key in RESEARCH:

        def apply(variables: Any, x: Array) -> tuple[Array, Any]:
            y, updates = module.apply(
                variables, x, use_running_average=False, mutable=["batch_stats"]
            )
            return y, updates

    else:

        def apply(variables: Any, x: Array) -> tuple[Array, Any]:
            return module.apply(variables, x), None

    return apply


def make_fwd(apply: ApplyFn) -> Callable[[Any, Array], Any]:
    """Jitted forward pass returning ``(y, aux)``."""
    return jax.jit(apply)


def make_fwd_bwd(apply: ApplyFn) -> Callable[[Any, Array, Array], Any]:
    """Jitted forward+backward: VJP of ``y`` w.r.t. ``x`` and params with ``dy``.

    Returns ``(y, dx, dparams, aux)`` so that nothing is dead-code-eliminated.
    """

    def fwd_bwd(variables: Any, x: Array, dy: Array) -> Any:
        params = variables["params"]
        rest = {k: v for k, v in variables.items() if k != "params"}

        def f(p: Any, xx: Array) -> tuple[Array, Any]:
            return apply({"params": p, **rest}, xx)

        y, vjp_fn, aux = jax.vjp(f, params, x, has_aux=True)
        dparams, dx = vjp_fn(dy.astype(y.dtype))
        return y, dx, dparams, aux

    return jax.jit(fwd_bwd)


def _max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference over two matching pytrees of arrays."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(leaves_a) != len(leaves_b):
        return float("nan")
    diff = 0.0
    for u, v in zip(leaves_a, leaves_b, strict=True):
        if u.shape != v.shape:
            return float("nan")
        d = jnp.max(jnp.abs(u.astype(jnp.float32) - v.astype(jnp.float32)))
        diff = max(diff, float(d))
    return diff


def bench_case(
    key: str,
    impl: Any,
    x: Array,
    dy: Array,
    repeats: int,
    copy_bw: float,
) -> list[dict[str, Any]]:
    """Benchmark one layer on one input; returns one row per pass."""
    kwargs = layer_kwargs(key, x.shape, str(x.dtype))
    if key in RESEARCH:
        ref_mod = flax_nn.BatchNorm(**kwargs)
        grouped = key in ("prior", "batch_group")
        groups = {"num_groups": math.gcd(8, x.shape[-1])} if grouped else {}
        if key == "evonorm_s0":
            groups = {"num_groups": math.gcd(DEFAULT_GROUPS, x.shape[-1])}
        if key == "population":  # its population phase, not the batch-norm warm-up
            groups = {"warmup_steps": 0}
        if key == "reference":  # the norm alone: x's first 32 rows are R
            groups = {"reference_size": min(32, x.shape[0])}
        new_mod = normjax.make_norm(key, **kwargs, **groups)
        label = f"{key} (vs BN)"
    else:
        name = LAYERS[key]
        ref_mod = getattr(flax_nn, name)(**kwargs)
        new_mod = getattr(impl, name)(**kwargs)
        label = name
        if key == "group" and kwargs["num_groups"] != DEFAULT_GROUPS:
            label = f"{name}(g={kwargs['num_groups']})"
    train_mode = key == "batch" or key in RESEARCH
    init_kwargs = {"use_running_average": False} if train_mode else {}
    variables = ref_mod.init(jax.random.PRNGKey(1), x, **init_kwargs)
    new_variables = variables
    if key in RESEARCH:  # its own variables; namesakes share Flax's.
        new_variables = new_mod.init(
            jax.random.PRNGKey(1), x, use_running_average=False
        )
    ref_apply, new_apply = make_apply(ref_mod, key), make_apply(new_mod, key)

    rows = []
    for pass_ in PASSES:
        if pass_ == "fwd":
            fns = [make_fwd(ref_apply), make_fwd(new_apply)]
            args: list[tuple[Any, ...]] = [(variables, x), (new_variables, x)]
            nbytes = 2 * x.nbytes
        else:
            fns = [make_fwd_bwd(ref_apply), make_fwd_bwd(new_apply)]
            args = [(variables, x, dy), (new_variables, x, dy)]
            nbytes = 5 * x.nbytes
        outs = [jax.block_until_ready(f(*a)) for f, a in zip(fns, args, strict=True)]
        diff = float("nan") if key in RESEARCH else _max_abs_diff(outs[0], outs[1])
        del outs
        flax_s, new_s = time_interleaved(fns, args, repeats)
        rows.append(
            {
                "layer": label,
                "shape": list(x.shape),
                "dtype": str(x.dtype),
                "pass": pass_,
                "flax_ms": flax_s * 1e3,
                "normjax_ms": new_s * 1e3,
                "ratio": new_s / flax_s,
                "bytes": nbytes,
                "flax_gbps": nbytes / flax_s / 1e9,
                "normjax_gbps": nbytes / new_s / 1e9,
                "flax_bw_frac": nbytes / flax_s / copy_bw,
                "normjax_bw_frac": nbytes / new_s / copy_bw,
                "max_abs_diff": diff,
            }
        )
    return rows


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #

_COLUMNS = (
    ("layer", 21, "{}"),
    ("shape", 16, "{}"),
    ("dtype", 8, "{}"),
    ("pass", 7, "{}"),
    ("flax ms", 10, "{:.3f}"),
    ("normjax ms", 10, "{:.3f}"),
    ("ratio", 6, "{:.3f}"),
    ("flax bw", 7, "{:.3f}"),
    ("nj bw", 7, "{:.3f}"),
    ("max|diff|", 9, "{:.2e}"),
)


def format_row(row: dict[str, Any]) -> str:
    """Format one result row as a table line."""
    values = (
        row["layer"],
        "x".join(map(str, row["shape"])),
        row["dtype"],
        row["pass"],
        row["flax_ms"],
        row["normjax_ms"],
        row["ratio"],
        row["flax_bw_frac"],
        row["normjax_bw_frac"],
        row["max_abs_diff"],
    )
    cells = []
    for (_, width, fmt), value in zip(_COLUMNS, values, strict=True):
        text = fmt.format(value)
        cells.append(text.ljust(width) if isinstance(value, str) else text.rjust(width))
    return "  ".join(cells)


def format_header() -> str:
    """Column header line plus a rule."""
    cells = []
    for title, width, fmt in _COLUMNS:
        is_text = fmt == "{}"
        cells.append(title.ljust(width) if is_text else title.rjust(width))
    line = "  ".join(cells)
    return line + "\n" + "-" * len(line)


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Median ratio per pass: ``fwd``/``fwd+bwd`` over the flax.linen namesakes,
    ``research fwd``/``research fwd+bwd`` over the research norms (vs BatchNorm)."""
    out = {}
    for research in (False, True):
        for pass_ in PASSES:
            ratios = [
                r["ratio"]
                for r in rows
                if r["pass"] == pass_ and r["layer"].endswith("(vs BN)") == research
            ]
            if ratios:
                out[("research " if research else "") + pass_] = statistics.median(
                    ratios
                )
    return out


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, print the table, optionally write JSON; return rows."""
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    impl = importlib.import_module(args.impl)

    def out(line: str = "") -> None:
        print(line, flush=True)

    info = machine_info()
    copy_bw = measure_copy_bandwidth(args.copy_mib, args.repeats)
    out(
        f"normjax norm benchmark: flax.linen vs {args.impl}  "
        f"(jax {info['jax_version']}, flax {info['flax_version']}, "
        f"{info['backend']}:{info['device_kind']}, {info['cpu_count']} cpus)"
    )
    out(
        f"copy bandwidth (jit x + 1.0 donated, {args.copy_mib:g} MiB float32, "
        f"read+write): {copy_bw / 1e9:.2f} GB/s"
    )
    out(BYTES_DOC)
    out(
        f"times: median of {args.repeats} interleaved runs after 2 warm-up runs; "
        "ratio = normjax/flax (<1: normjax faster); "
        "bw = achieved bytes/s / copy bandwidth"
    )
    out(
        "modules: dtype=<input dtype>, param_dtype=float32; BatchNorm in train "
        "mode (batch stats + running-average update); fwd+bwd = VJP w.r.t. "
        "x and params; max|diff| = flax vs normjax outputs and grads"
    )
    out()
    out(format_header())

    rows: list[dict[str, Any]] = []
    key = jax.random.PRNGKey(args.seed)
    for shape in args.shapes:
        for dtype in args.dtypes:
            key, kx, kdy = jax.random.split(key, 3)
            x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
            dy = jax.random.normal(kdy, shape, jnp.float32).astype(dtype)
            jax.block_until_ready((x, dy))
            for layer in args.layers:
                for row in bench_case(layer, impl, x, dy, args.repeats, copy_bw):
                    rows.append(row)
                    out(format_row(row))
            del x, dy  # keep peak memory bounded to one shape/dtype at a time

    summary = summarize(rows)
    out()
    out(
        "median ratio normjax/flax: "
        + ", ".join(f"{p} {v:.3f}" for p, v in summary.items())
    )

    if args.json:
        payload = {
            "machine": info,
            "copy_bandwidth_bytes_per_s": copy_bw,
            "copy_bandwidth_gbps": copy_bw / 1e9,
            "bytes_definition": BYTES_DOC,
            "config": {
                "impl": args.impl,
                "repeats": args.repeats,
                "shapes": [list(s) for s in args.shapes],
                "layers": args.layers,
                "dtypes": args.dtypes,
                "copy_mib": args.copy_mib,
                "seed": args.seed,
            },
            "median_ratio": summary,
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
