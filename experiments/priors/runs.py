"""Run scheduling: where each run lives, locks that let several processes share
one study, atomic JSON records, and the per-run configurations."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import ml_collections
import tqdm

from experiments.configs.priors import PARTS
from normjax.train.resume import differences

try:
    import fcntl
except ImportError:  # not POSIX: no run locks, run one study process at a time
    fcntl = None  # type: ignore[assignment]


def parts_of(config: ml_collections.ConfigDict) -> set[str]:
    parts = {p.strip() for p in str(config.parts).split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(
            f"unknown parts {sorted(unknown)}; use a comma-separated subset of "
            f"{', '.join(PARTS)}."
        )
    return parts


def read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def claimed(
    run_dir: pathlib.Path, run: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """``run(*args, **kwargs)`` while holding ``run_dir``'s lock, or None
    (without running) when another process holds it: several processes can work
    through one study, each run taken by one. The lock is ``flock``'s, so a
    killed process leaves none behind."""
    if fcntl is None:
        return run(*args, **kwargs)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "LOCK", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[priors] {run_dir.name}: another process runs it", flush=True)
            return None
        return run(*args, **kwargs)  # the lock goes with the file


def run_or_read(
    path: pathlib.Path,
    run_now: bool,
    run: Callable[..., Any],
    *args: Any,
    **kwargs: Any,
) -> Any:
    """A run's record: ``run(*args, **kwargs)`` when ``run_now`` and no other
    process holds the run, else what it wrote to ``path`` so far (None: nothing)."""
    record = claimed(path.parent, run, *args, **kwargs) if run_now else None
    return read_json(path) if record is None else record


def _exists(record: Any) -> bool:
    return record is not None


@dataclasses.dataclass
class Job:
    """One run of the study: its part, the record file it writes, whether this
    call runs it (its part was asked for), how to run it, where its record goes
    in the results, when a record on disk counts as finished, and the keys of
    its record in ``results.json``'s part (for ``restore_from``; empty: not
    restored this way)."""

    part: str
    record: pathlib.Path
    run_now: bool
    run: Callable[[], Any]
    keep: Callable[[Any], None]
    finished: Callable[[Any], bool] = _exists
    results_key: tuple[str, ...] = ()

    def done(self) -> bool:
        record = read_json(self.record)
        return record is not None and self.finished(record)


def headline(part: str, record: dict[str, Any]) -> str:
    """A finished run's main number, for its progress line."""
    if part == "probe":
        sources = record.get("sources") or {}
        if not sources:
            return "statistics probe written"
        name, result = next(iter(sources.items()))
        return f"test accuracy {result['accuracy']:.2%} ({name} statistics)"
    if part == "sweep":
        return (
            f"test accuracy {record['running']:.2%} (running), "
            f"{record['precise']:.2%} (precise)"
        )
    if part == "ablation_lr":
        return f"held-out accuracy {record['holdout_accuracy']:.2%}"
    if part == "ablation":
        return (
            f"test accuracy {record['accuracy']:.2%}, offset erased "
            f"{record['accuracy_offset_erased']:.2%}"
        )
    if part == "ablation_text" and "val_bits_per_byte_reference" in record:
        return (
            f"val bits/byte {record['val_bits_per_byte']:.3f} (population), "
            f"{record['val_bits_per_byte_reference']:.3f} (reference batch)"
        )
    bits = record.get("val_bits_per_byte")
    batch = record.get("val_bits_per_byte_batch")
    text = f"val bits/byte {bits:.3f} (population statistics)"
    return text + (f", {batch:.3f} (batch)" if batch is not None else "")


class Progress:
    """One bar across the study's parts — runs finished of the runs asked for
    (finished before this call included), elapsed time and an ETA from this
    call's runs — and a line per run finished with its headline number. Runs
    another process holds are left out of this bar (that process shows them)."""

    def __init__(self, jobs: list[Job], file: Any = None) -> None:
        wanted = {job.record: job for job in jobs if job.run_now}  # once per run
        done = sum(job.done() for job in wanted.values())
        self._file = sys.stderr if file is None else file
        self._bar = tqdm.tqdm(
            total=len(wanted),
            initial=done,
            desc="[priors] runs",
            unit="run",
            file=self._file,
            smoothing=0.0,  # ETA from the mean time per run of this call
            dynamic_ncols=True,
            disable=not wanted,
        )
        if wanted:
            counts: dict[str, tuple[int, int]] = {}
            for job in wanted.values():
                finished, total = counts.get(job.part, (0, 0))
                counts[job.part] = (finished + job.done(), total + 1)
            parts = ", ".join(f"{p} {d}/{t}" for p, (d, t) in counts.items())
            self.write(f"[priors] finished before this call: {parts}")

    def write(self, line: str) -> None:
        self._bar.write(line, file=self._file)

    def timed(self, job: Job) -> Callable[[], Any]:
        """``job.run``, advancing the bar and printing a line when it finishes
        a run that was not finished before."""

        def run() -> Any:
            if job.done():
                return job.run()  # reads (or completes) what is there
            start = time.monotonic()
            record = job.run()
            if record is not None and job.finished(record):
                minutes = (time.monotonic() - start) / 60
                name = job.record.parent.name
                self.write(
                    f"[priors] {name}: {headline(job.part, record)} ({minutes:.1f} min)"
                )
                self._bar.update(1)
            return record

        return run

    def close(self) -> None:
        self._bar.close()


# Study settings that do not shape a part's runs: a results file made with other
# values of these still stands for the part (rows and seeds are restored one by
# one; the other parts' settings do not reach it).
_NOT_CIFAR_ABLATION = frozenset(
    {
        "parts",
        "restore_from",
        "seeds",
        "ablation_rows",
        "ablation_small_batch_rows",
        "ablation_small_batch_budgets",
        "probe_norms",
        "probe_batch_sizes",
        "stats_train_images",
        "stats_steps",
        "stats_l2",
        "sweep_norms",
        "sweep_batch_sizes",
        "sweep_base_batch_size",
        "sweep_epochs",
        "sweep_train_subset",
        "text",
        "text_norms",
        "text_tokenizers",
        "text_small_batch_size",
        "context_norms",
        "context_lengths",
        "context_tokens_per_step",
        "headline_small_batch",
        "ablation_text_norms",
        "ablation_text_reference",
    }
)
_SHAPES_ABLATION_TEXT = ("text", "context_tokens_per_step", "ablation_text_reference")


def restore_source(path: str) -> dict[str, Any]:
    """The results of an earlier call of the study (its ``results.json``)."""
    previous = read_json(pathlib.Path(path))
    if previous is None:
        raise FileNotFoundError(
            f"restore_from={path!r}: no such file; give the results.json of an "
            "earlier run of this study, or leave restore_from unset."
        )
    return previous


def restorable(
    config: ml_collections.ConfigDict,
    previous: dict[str, Any],
    path: str,
    part: str,
) -> dict[str, Any]:
    """The records of ``part`` ('text', 'ablation_lr', 'ablation' or
    'ablation_text') in ``previous`` (the results at ``path``), after checking
    they were made with the same settings for that part as ``config``: runs
    trained otherwise would mix two studies in one table. The text part is
    checked whatever the file holds; an ablation part only when the file holds
    records of it."""
    records = previous.get(part) or {}
    if not records and part != "text":
        return {}
    old = previous.get("config", {})
    new = json.loads(config.to_json_best_effort())
    if part == "text":  # the text preset alone shapes the text runs
        old, new = old.get("text", {}), new["text"]
    elif part == "ablation_text":
        old = {k: old.get(k) for k in _SHAPES_ABLATION_TEXT}
        new = {k: new.get(k) for k in _SHAPES_ABLATION_TEXT}
    else:
        # The paired runs' learning rate is the grid's best: the grid shapes
        # them (part ablation), not each grid point (part ablation_lr).
        neutral = _NOT_CIFAR_ABLATION | (
            {"ablation_learning_rates", "ablation_lr_extend"}
            if part == "ablation_lr"
            else set()
        )
        old = {k: v for k, v in old.items() if k not in neutral}
        new = {k: v for k, v in new.items() if k not in neutral}
    differ = sorted(differences(old, new))  # what logging and paths change not
    if differ:
        raise ValueError(
            f"restore_from={path!r}: its {part} runs were made with other "
            f"settings (differs in {', '.join(differ)}); they cannot stand for "
            "this study's. Use the same preset, or leave restore_from unset."
        )
    return records


def restore_record(path: pathlib.Path, record: Any, source: str) -> None:
    """Writes a finished run's record (from an earlier results.json) where the
    run would write it, marked with where it came from; an existing record is
    kept (the run on disk is newer)."""
    if path.exists() or record is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**record, "restored_from": source})


def write_json(path: pathlib.Path, value: Any) -> None:
    """Atomic: a killed study never leaves a half-written results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, allow_nan=True) + "\n")
    tmp.replace(path)


def cifar_config(
    config: ml_collections.ConfigDict, norm: str, seed: int
) -> ml_collections.ConfigDict:
    run = ml_collections.ConfigDict(config.cifar.to_dict())
    run.data_dir = config.data_dir
    run.norm = norm
    run.seed = seed
    return run


def train_for_epochs(run: ml_collections.ConfigDict, epochs: float) -> None:
    """Sets ``run`` to train ``epochs`` epochs (not the preset's step count).
    A piecewise schedule's step boundaries become fractions of the preset's run
    (ResNet-20's 32k and 48k of 64k: 1/2 and 3/4), so that they fall at the
    same point of any budget; a boundary at or past the preset's end, which
    its run never reached, is dropped."""
    if run.get("schedule") == "piecewise" and run.get("num_steps"):
        total = run.num_steps
        run.boundaries = tuple(
            b / total if b >= 1 else b for b in run.boundaries if b < total
        )
    run.num_epochs = epochs
    run.num_steps = None


def seeds_of(config: ml_collections.ConfigDict) -> list[int]:
    seeds = list(config.seeds)
    if not seeds:
        raise ValueError("config.seeds is empty; give at least one seed.")
    return seeds


@dataclasses.dataclass
class Study:
    """A study's configuration and workdir; each run in ``runs/<name>/``."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path

    def run_dir(self, name: str) -> pathlib.Path:
        return self.workdir / "runs" / name

    def probe_dir(self, norm: str, seed: int) -> pathlib.Path:
        return self.run_dir(f"probe_{norm}_s{seed}")

    def sweep_dir(self, norm: str, batch_size: int, seed: int) -> pathlib.Path:
        return self.run_dir(f"sweep_{norm}_b{batch_size}_s{seed}")

    def text_dir(
        self,
        variant: str,
        tokenizer: str,
        seed: int,
        *,
        max_len: int | None = None,
        batch_size: int | None = None,
    ) -> pathlib.Path:
        norm, _, causal = variant.partition(":")
        tags = [f"text_{norm}{'_' + causal if causal else ''}_{tokenizer}"]
        if max_len is not None:
            tags.append(f"L{max_len}")
        if batch_size is not None:
            tags.append(f"b{batch_size}")
        return self.run_dir("_".join([*tags, f"s{seed}"]))
