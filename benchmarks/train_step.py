"""Benchmark whole jitted training steps: normjax norms against flax.linen's.

Run from the repository root::

    python -m benchmarks.train_step                       # ResNet-20 and the text model
    python -m benchmarks.train_step --cases resnet20:batch --repeats 3
    python -m benchmarks.train_step --devices 8           # 8 simulated CPU devices

Each case is one model built twice through the norm registry: once with the
normjax norm and once with its ``flax.linen`` namesake behind the same call
(``flax.batch``, ``flax.layer``, ... registered here). Both are trained by the
same jitted step (forward with batch statistics, backward, optax update, running
statistics updated; the state donated), timed interleaved after a warm-up step,
median of ``--repeats``. Peak memory is XLA's own account of the compiled step
(``compiled.memory_analysis()``): arguments + outputs - donated aliases +
temporaries.

With ``--devices N`` (N > 1; the flag is set before JAX starts, as
``--xla_force_host_platform_device_count``) the batch is sharded over a
``data`` mesh and a second table times the synchronization of global-batch
statistics: ``batch`` (statistics pooled over the whole global batch, an
all-reduce per norm layer) against per-device statistics (``ghost_batch`` with
one virtual batch per device, which needs no communication).
"""

from __future__ import annotations

import os
import sys


def _devices_from_argv(argv: list[str]) -> int:
    for i, arg in enumerate(argv):
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
    return 1


if __name__ == "__main__":  # before JAX starts: simulated devices need the flag
    _n = _devices_from_argv(sys.argv[1:])
    if _n > 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={_n}"
        ).strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import flax  # noqa: E402
import flax.linen as flax_nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks.norms import machine_info  # noqa: E402
from experiments import text as text_experiment  # noqa: E402
from experiments.configs import cifar as cifar_configs  # noqa: E402
from experiments.configs import text as text_configs  # noqa: E402
from normjax import models, registry  # noqa: E402
from normjax import nn as norms  # noqa: E402

Array = jax.Array


# ------------------------------------------------------------ flax.linen norms


class FlaxNorm(flax_nn.Module):
    """A ``flax.linen`` norm behind the registry's call,
    ``norm(x, use_running_average=..., mask=...)``, with the defaults of the
    normjax namesake (epsilon, momentum, groups) read from normjax itself."""

    kind: str = "batch"
    scale_init: Callable[..., Array] = flax_nn.initializers.ones
    num_groups: int = registry.entry("group").defaults["num_groups"]
    momentum: float = norms.BatchNorm.momentum
    # Layer and RMS norm are per token, causal as they are; flax.linen's batch
    # and group norm have no causal mode.
    causal: bool | str = False
    # The research rows' baseline in a causal model: batch norm pooled over the
    # whole batch and every position (what batch statistics cost without
    # causality), not a causal model.
    noncausal: bool = False

    @flax_nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, mask: Any = None
    ) -> Array:
        if self.causal and self.kind in ("batch", "group") and not self.noncausal:
            raise ValueError(f"flax.linen's {self.kind} norm has no causal mode.")
        epsilon = registry.entry(self.kind).module.epsilon
        if self.kind == "batch":
            if mask is not None:
                mask = jnp.broadcast_to(mask, x.shape)
            return flax_nn.BatchNorm(
                momentum=self.momentum, epsilon=epsilon, scale_init=self.scale_init
            )(x, use_running_average=use_running_average, mask=mask)
        if self.kind == "layer":
            return flax_nn.LayerNorm(epsilon=epsilon, scale_init=self.scale_init)(x)
        if self.kind == "rms":
            return flax_nn.RMSNorm(epsilon=epsilon, scale_init=self.scale_init)(x)
        if self.kind == "group":
            return flax_nn.GroupNorm(
                num_groups=self.num_groups, epsilon=epsilon, scale_init=self.scale_init
            )(x)
        raise ValueError(f"FlaxNorm: no flax.linen namesake for {self.kind!r}.")


FLAX_KINDS = ("batch", "layer", "rms", "group")


def register_flax_norms() -> None:
    """Registers ``flax.batch``, ``flax.layer``, ``flax.rms``, ``flax.group``."""
    for kind in FLAX_KINDS:
        registry.register(
            f"flax.{kind}",
            FlaxNorm,
            defaults={"kind": kind},
            statistics="batch" if kind == "batch" else "per sample",
            summary=f"flax.linen's {kind} norm (benchmark baseline)",
            replace=True,
        )
    registry.register(
        "flax.batch_noncausal",
        FlaxNorm,
        defaults={"kind": "batch", "noncausal": True},
        statistics="batch",
        summary="flax.linen's batch norm, non-causal in any model (the baseline "
        "of the research norms' rows)",
        replace=True,
    )


# ----------------------------------------------------------------- the models


@dataclasses.dataclass(frozen=True)
class Case:
    """One model and norm; ``batch_size`` is the global batch."""

    model: str
    norm: str
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.model}:{self.norm}"


DEFAULT_CASES = ("resnet20:batch", "resnet20:group", "text:layer", "text:rms")
# With simulated devices: XLA:CPU's in-process all-reduce gives up after 40 s
# waiting for every device's thread, which ResNet-20 at batch 128 on 8 simulated
# devices sharing 2 cores exceeds (the process aborts); the smaller CIFAR model
# and the text model finish.
DEFAULT_DEVICE_CASES = ("fast_cnn:batch", "text:layer")
# The experiments' own presets: ResNet-20 as in CIFAR `full`, FastCNN as in CIFAR
# `quick`, the text model as in text `quick` (byte vocabulary).
TEXT = text_configs.quick()
BATCH_SIZES = {
    "resnet20": cifar_configs.full().batch_size,
    "fast_cnn": cifar_configs.quick().batch_size,
    "text": TEXT.batch_size,
}
TEXT_VOCAB = 256


def parse_cases(spec: str) -> list[Case]:
    cases = []
    for item in spec.split(","):
        model, _, norm = item.strip().partition(":")
        if model not in BATCH_SIZES or not norm:
            raise ValueError(
                f"bad case {item!r}; use MODEL:NORM with MODEL one of "
                f"{', '.join(BATCH_SIZES)}, e.g. resnet20:batch or text:layer."
            )
        registry.entry(norm)
        cases.append(Case(model, norm, BATCH_SIZES[model]))
    return cases


def build(
    case: Case, norm: str, norm_kwargs: dict[str, Any] | None = None
) -> tuple[flax_nn.Module, Callable[[int], dict[str, np.ndarray]]]:
    """The model with ``norm`` and a deterministic batch maker."""
    if case.model in ("resnet20", "fast_cnn"):
        if case.model == "resnet20":
            model = models.ResNet(depth=20, norm=norm, norm_kwargs=norm_kwargs)
        else:  # the CIFAR `quick` model
            model = models.FastCNN(
                widths=tuple(cifar_configs.quick().widths),
                norm=norm,
                norm_kwargs=norm_kwargs,
            )

        def batch(seed: int) -> dict[str, np.ndarray]:
            rng = np.random.default_rng(seed)
            return {
                "inputs": rng.normal(size=(case.batch_size, 32, 32, 3)).astype(
                    np.float32
                ),
                "labels": rng.integers(0, 10, case.batch_size).astype(np.int32),
            }

        return model, batch
    config = ml_collections.ConfigDict(TEXT.to_dict())
    config.norm, config.norm_kwargs = norm, dict(norm_kwargs or {})
    model = text_experiment.build_model(config, TEXT_VOCAB)
    length = config.max_len

    def text_batch(seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, TEXT_VOCAB, (case.batch_size, length + 1))
        return {
            "inputs": tokens[:, :-1].astype(np.int32),
            "labels": tokens[:, 1:].astype(np.int32),
        }

    return model, text_batch


def make_step(model: flax_nn.Module, optimizer: optax.GradientTransformation) -> Any:
    """The jitted training step ``(state, batch) -> (state, loss)``, state donated."""

    def loss_fn(
        params: Any, batch_stats: Any, constants: Any, batch: dict[str, Array]
    ) -> Any:
        variables = {"params": params, **constants}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits, updates = model.apply(
            variables, batch["inputs"], train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["labels"]
        ).mean()
        return loss, updates.get("batch_stats", {})

    def step(state: tuple[Any, ...], batch: dict[str, Array]) -> Any:
        params, batch_stats, constants, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, constants, batch
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, batch_stats, constants, opt_state), loss

    return jax.jit(step, donate_argnums=0)


@dataclasses.dataclass
class Runner:
    """One compiled variant: its step, live state and the batch on the mesh."""

    step: Any
    state: Any
    batch: Any
    memory: dict[str, float]
    losses: list[float] = dataclasses.field(default_factory=list)

    def __call__(self) -> float:
        start = time.perf_counter()
        self.state, loss = self.step(self.state, self.batch)
        jax.block_until_ready(loss)
        elapsed = time.perf_counter() - start
        self.losses.append(float(loss))
        return elapsed


def memory_of(compiled: Any) -> dict[str, float]:
    """XLA's memory account of a compiled step, in MiB (nan where unavailable)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        m = None
    if m is None:
        return {"temp_mib": float("nan"), "peak_mib": float("nan")}
    mib = 2.0**20
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return {"temp_mib": m.temp_size_in_bytes / mib, "peak_mib": peak / mib}


def make_runner(
    case: Case,
    norm: str,
    mesh: jax.sharding.Mesh,
    norm_kwargs: dict[str, Any] | None = None,
) -> Runner:
    model, make_batch = build(case, norm, norm_kwargs)
    batch = make_batch(0)
    variables = model.init(jax.random.key(0), batch["inputs"][:2], train=False)
    optimizer = (
        optax.sgd(0.1, momentum=0.9)
        if case.model != "text"
        else optax.adamw(2e-3, weight_decay=0.1)
    )
    params = variables["params"]
    replicated = NamedSharding(mesh, P())
    # Collections other than params and batch_stats (FastCNN's whitening
    # "constants") ride along unchanged.
    constants = {
        k: v for k, v in variables.items() if k not in ("params", "batch_stats")
    }
    state = jax.device_put(
        (params, variables.get("batch_stats", {}), constants, optimizer.init(params)),
        replicated,
    )
    data = NamedSharding(mesh, P("data"))
    batch = jax.device_put(batch, data)
    step = make_step(model, optimizer)
    compiled = step.lower(state, batch).compile()
    return Runner(compiled, state, batch, memory_of(compiled))


def time_runners(runners: Sequence[Runner], repeats: int) -> list[float]:
    """Median seconds per step of each runner, interleaved, after one warm-up."""
    for runner in runners:
        runner()
    times: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    for r in range(repeats):
        for i in order if r % 2 == 0 else reversed(order):
            times[i].append(runners[i]())
    return [statistics.median(t) for t in times]


# ------------------------------------------------------------------- the tables


def compare_flax(
    cases: Sequence[Case], mesh: jax.sharding.Mesh, repeats: int, out: Any
) -> list[dict[str, Any]]:
    out(
        f"{'model:norm':<18}{'batch':>6}{'flax ex/s':>11}{'normjax ex/s':>14}"
        f"{'speed-up':>10}{'flax peak MiB':>15}{'nj peak MiB':>13}{'mem ratio':>11}"
    )
    out("-" * 98)
    rows = []
    for case in cases:
        # A norm without a flax.linen namesake runs against Flax's batch norm
        # (non-causal in the text model): what its extra statistics cost.
        # (flax.linen's batch and group norm have no causal mode: in the text
        # model, causal batch norm runs against the non-causal one too)
        namesake = case.norm in FLAX_KINDS and not (
            case.model == "text" and case.norm in ("batch", "group")
        )
        flax_name = f"flax.{case.norm}" if namesake else "flax.batch_noncausal"
        runners = [
            make_runner(case, flax_name, mesh),
            make_runner(case, case.norm, mesh),
        ]
        t_flax, t_nj = time_runners(runners, repeats)
        row = {
            "case": case.name,
            "baseline": flax_name,
            "batch_size": case.batch_size,
            "devices": mesh.devices.size,
            "flax_step_s": t_flax,
            "normjax_step_s": t_nj,
            "flax_examples_per_s": case.batch_size / t_flax,
            "normjax_examples_per_s": case.batch_size / t_nj,
            "speedup": t_flax / t_nj,
            "flax_peak_mib": runners[0].memory["peak_mib"],
            "normjax_peak_mib": runners[1].memory["peak_mib"],
            "flax_temp_mib": runners[0].memory["temp_mib"],
            "normjax_temp_mib": runners[1].memory["temp_mib"],
            # the same model, initialization and batch: the first step's loss
            # must agree (a check that like is timed against like; another
            # norm's need not)
            "first_loss_diff": abs(runners[0].losses[0] - runners[1].losses[0])
            if namesake
            else None,
        }
        row["memory_ratio"] = row["normjax_peak_mib"] / row["flax_peak_mib"]
        rows.append(row)
        label = case.name if namesake else f"{case.name} (vs BN)"
        out(
            f"{label:<18}{case.batch_size:>6}{row['flax_examples_per_s']:>11.1f}"
            f"{row['normjax_examples_per_s']:>14.1f}{row['speedup']:>10.3f}"
            f"{row['flax_peak_mib']:>15.1f}{row['normjax_peak_mib']:>13.1f}"
            f"{row['memory_ratio']:>11.3f}"
        )
    return rows


def compare_sync(
    cases: Sequence[Case], mesh: jax.sharding.Mesh, repeats: int, out: Any
) -> list[dict[str, Any]]:
    devices = mesh.devices.size
    out(
        f"{'model':<10}{'batch':>6}{'devices':>8}{'per-device ms':>15}"
        f"{'global ms':>11}{'overhead':>10}"
    )
    out("-" * 60)
    rows = []
    seen = set()
    for case in cases:
        if case.model in seen:
            continue
        seen.add(case.model)
        local = case.batch_size // devices
        causal_ok = case.model != "text"  # ghost batches split the batch axis
        if not causal_ok:
            out(f"{case.model:<10} (text: per-device statistics not timed)")
            continue
        runners = [
            make_runner(case, "ghost_batch", mesh, {"ghost_batch_size": local}),
            make_runner(case, "batch", mesh),
        ]
        t_local, t_global = time_runners(runners, repeats)
        row = {
            "model": case.model,
            "batch_size": case.batch_size,
            "devices": devices,
            "per_device_step_s": t_local,
            "global_step_s": t_global,
            "overhead": t_global / t_local - 1.0,
        }
        rows.append(row)
        out(
            f"{case.model:<10}{case.batch_size:>6}{devices:>8}{1e3 * t_local:>15.1f}"
            f"{1e3 * t_global:>11.1f}{100 * row['overhead']:>9.1f}%"
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step",
        description="Time jitted training steps with normjax vs flax.linen norms.",
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="comma-separated MODEL:NORM (models: resnet20 batch 128, fast_cnn "
        "(the CIFAR quick model) batch 256, text = the quick transformer batch 32 "
        "x 64 tokens); default: {} (with --devices > 1: {})".format(
            ",".join(DEFAULT_CASES), ",".join(DEFAULT_DEVICE_CASES)
        ),
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median)")
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="simulated CPU devices (sets XLA_FLAGS before JAX starts; run as a "
        "module for N > 1)",
    )
    parser.add_argument(
        "--batch-scale",
        type=float,
        default=1.0,
        help="multiply every case's batch size (smoke tests)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1.")
    if args.devices < 1:
        raise SystemExit("--devices must be >= 1.")
    if jax.device_count() < args.devices:
        raise SystemExit(
            f"--devices {args.devices} but JAX sees {jax.device_count()} device(s): "
            "run as `python -m benchmarks.train_step --devices N`, which sets "
            "--xla_force_host_platform_device_count before JAX starts."
        )
    register_flax_norms()
    cases = [
        dataclasses.replace(
            c, batch_size=max(args.devices, int(c.batch_size * args.batch_scale))
        )
        for c in parse_cases(
            args.cases
            or ",".join(DEFAULT_CASES if args.devices == 1 else DEFAULT_DEVICE_CASES)
        )
    ]
    for case in cases:
        if case.batch_size % args.devices:
            raise SystemExit(
                f"{case.name}: batch {case.batch_size} does not divide over "
                f"{args.devices} devices; choose --batch-scale to make it divide."
            )
    mesh = jax.make_mesh(
        (args.devices,),
        ("data",),
        axis_types=(jax.sharding.AxisType.Auto,),  # as normjax.train.make_mesh
        devices=jax.devices()[: args.devices],
    )

    def out(line: str = "") -> None:
        print(line, flush=True)

    info = machine_info()
    out(
        f"normjax training-step benchmark (jax {jax.__version__}, flax "
        f"{flax.__version__}, {info['backend']}, {info['cpu_count']} cpus, "
        f"{args.devices} device(s))"
    )
    out(
        f"median of {args.repeats} interleaved steps after one warm-up; "
        "examples/s = batch / step time; peak = XLA memory_analysis of the "
        "compiled step "
        "(args + outputs - donated + temps)"
    )
    out()
    result: dict[str, Any] = {"machine": info, "devices": args.devices}
    result["flax"] = compare_flax(cases, mesh, args.repeats, out)
    if args.devices > 1:
        out()
        out(
            "synchronization of global-batch statistics: BatchNorm over the global "
            "batch vs per-device statistics (ghost batches of batch/devices)"
        )
        result["sync"] = compare_sync(cases, mesh, args.repeats, out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
