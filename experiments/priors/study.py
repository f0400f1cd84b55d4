"""The study itself: run the parts asked for, then rebuild every table and plot
from what is on disk."""

from __future__ import annotations

import datetime
import functools
import json
import pathlib
import sys
from typing import Any

import ml_collections

from experiments import common
from experiments.priors import ablation, ablation_text
from experiments.priors.cifar_eval import probe_run, sweep_run
from experiments.priors.plots import write_plots
from experiments.priors.report import machine, write_markdown
from experiments.priors.runs import (
    Job,
    Progress,
    Study,
    parts_of,
    read_json,
    restorable,
    restore_record,
    restore_source,
    run_or_read,
    seeds_of,
    write_json,
)
from experiments.priors.text import (
    text_jobs,
    text_key,
    text_record,
    text_run,
)
from normjax import registry


def run_study(
    config: ml_collections.ConfigDict, workdir: str, command: str | None = None
) -> dict[str, Any]:
    """Runs the parts in ``config.parts`` (skipping finished runs), then rebuilds
    ``results.json``, ``results.md`` and the plots from every run on disk.
    ``command`` is recorded at the top of the results (default: this call)."""
    for name in [*config.probe_norms, *config.sweep_norms]:
        registry.entry(name)
    for variant in [*config.text_norms, *config.context_norms]:
        registry.entry(variant.partition(":")[0])
    ablation.selected_rows(config)  # an unknown row, named, before any run
    parts = parts_of(config)
    study = Study(config, pathlib.Path(workdir))
    study.workdir.mkdir(parents=True, exist_ok=True)
    seeds = seeds_of(config)
    results: dict[str, Any] = {
        "probe": {},
        "stats": {},
        "sweep": {},
        "text": {},
        "ablation_lr": {},
        "ablation": {},
        "ablation_text": {},
    }
    # Text runs (finished or not) by directory: reused runs count once.
    text_runs: dict[pathlib.Path, bool] = {}

    # Every run of the study in order, then run (those of the parts asked for)
    # or read: planning first gives the progress bar its total.
    jobs: list[Job] = []
    # 1-2.
    for norm in config.probe_norms:
        for seed in seeds:

            def keep_probe(record: dict[str, Any], norm: str = norm, seed: int = seed):
                if "sources" in record:
                    results["probe"].setdefault(norm, {})[seed] = record["sources"]
                if "statistics" in record:
                    results["stats"].setdefault(norm, {})[seed] = record["statistics"]

            want = {"sources"} if "probe" in parts else set()
            want |= {"statistics"} if "stats" in parts else set()
            jobs.append(
                Job(
                    "probe",
                    study.probe_dir(norm, seed) / "probe.json",
                    bool(want),
                    functools.partial(probe_run, study, norm, seed, parts),
                    keep_probe,
                    # probe.json may hold one part only
                    lambda record, want=want: want <= set(record),
                )
            )
    # 3-4.
    for norm in config.sweep_norms:
        for size in config.sweep_batch_sizes:
            for seed in seeds:

                def keep_sweep(record, norm: str = norm, size: int = size, seed=seed):
                    results["sweep"].setdefault(norm, {}).setdefault(size, {})[seed] = (
                        record
                    )

                jobs.append(
                    Job(
                        "sweep",
                        study.sweep_dir(norm, size, seed) / "sweep.json",
                        "sweep" in parts,
                        functools.partial(sweep_run, study, norm, size, seed),
                        keep_sweep,
                    )
                )
    # 5. The longest runs (the context sweep) last.
    for kind, variant, tokenizer, extra in text_jobs(config):
        # A context length or batch size equal to the text preset's is the
        # tokenizer comparison's run: reuse it.
        same = {k: v for k, v in extra.items() if config.text[k] == v}
        extra_run = {k: v for k, v in extra.items() if k not in same}
        for seed in seeds:
            run_dir = study.text_dir(variant, tokenizer, seed, **extra_run)
            key = text_key(kind, variant, tokenizer, extra)

            def keep_text(summary, key: str = key, seed: int = seed):
                results["text"].setdefault(key, {})[seed] = text_record(summary)

            jobs.append(
                Job(
                    "text",
                    run_dir / "summary.json",
                    "text" in parts,
                    functools.partial(
                        text_run, study, variant, tokenizer, seed, **extra_run
                    ),
                    keep_text,
                    results_key=(key, str(seed)),
                )
            )

    # 7. The ablation, last: the longest part.
    jobs += ablation.jobs(study, parts, seeds, results)
    jobs += ablation_text.jobs(study, parts, seeds, results)
    restorable_records: dict[str, dict[str, Any]] = {}
    if config.restore_from:
        # The finished runs of the earlier results, where each run would write
        # its record (each job keeps the results key it fills).
        previous = restore_source(config.restore_from)
        for part in ("text", "ablation_lr", "ablation", "ablation_text"):
            try:
                records = restorable(config, previous, config.restore_from, part)
            except ValueError as error:
                asked = part in parts or (part == "ablation_lr" and "ablation" in parts)
                if part == "text" or asked:
                    raise
                # Not asked for now: its runs are left out, not mixed in.
                print(f"[priors] not restored: {error}", flush=True)
                continue
            restorable_records[part] = records

    def restore(planned: list[Job]) -> None:
        for job in planned:
            if job.part in restorable_records and job.results_key:
                record: Any = restorable_records[job.part]
                for key in job.results_key:
                    record = (record or {}).get(key)
                restore_record(job.record, record, config.restore_from)

    def replan_ablation(planned: list[Job]) -> list[Job]:
        """The ablation's jobs planned again from what is on disk now: a row's
        learning-rate grid grows past an edge once its rates are in, and the
        paired runs take the rate the grid then chooses."""
        new = ablation.jobs(study, parts, seeds, results)
        restore(new)
        cut = [job for job in planned if job.part not in ("ablation_lr", "ablation")]
        at = next(
            (i for i, job in enumerate(cut) if job.part == "ablation_text"),
            len(cut),
        )
        return cut[:at] + new + cut[at:]

    restore(jobs)
    # Restored grid records may grow a grid (and fix a row's rate): plan again
    # until nothing new is planned (each pass adds a rate per row at most).
    for _ in range(2 * int(config.get("ablation_lr_extend", 0)) + 1):
        replanned = replan_ablation(jobs)
        same = [j.record for j in replanned] == [j.record for j in jobs]
        jobs = replanned
        if same:
            break

    progress = Progress(jobs)
    kept: set[pathlib.Path] = set()

    def run_all(planned: list[Job], progress: Progress) -> None:
        for job in planned:
            record = run_or_read(job.record, job.run_now, progress.timed(job))
            if job.part == "text":  # runs reused by two comparisons count once
                text_runs[job.record.parent] = bool(record)
            if record:
                job.keep(record)
                kept.add(job.record)

    run_all(jobs, progress)
    progress.close()
    # A grid that finished during this call may grow past an edge, and the
    # paired runs that waited for it can run now: more passes while they finish
    # runs (each at most one more rate per row and direction).
    for _ in range(2 * int(config.get("ablation_lr_extend", 0))):
        jobs = replan_ablation(jobs)
        pending = [j for j in jobs if j.run_now and not j.done()]
        if not pending:
            break
        before = sum(j.done() for j in jobs)
        progress = Progress(pending)
        run_all(pending, progress)
        progress.close()
        if sum(j.done() for j in jobs) == before:
            break
    jobs = replan_ablation(jobs)
    # Runs that another process held (or had not finished) when this one passed
    # them may have finished since: the tables take every record on disk now.
    for job in jobs:
        if job.record in kept and job.part not in ("ablation_lr", "ablation"):
            continue  # (the ablation's records are kept by its latest plan)
        record = read_json(job.record)
        if record:
            if job.part == "text":
                text_runs[job.record.parent] = True
            job.keep(record)
    probe_done = sum(map(len, results["probe"].values()))
    sweep_done = sum(len(r) for n in results["sweep"].values() for r in n.values())
    sweep_planned = len(config.sweep_norms) * len(config.sweep_batch_sizes) * len(seeds)
    header = {
        "command": command or f"experiments.priors.run_study(config, {workdir!r})",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "seeds": seeds,
        # Finished of planned runs per part, for the header of partial results.
        "finished_runs": {
            "probe": f"{probe_done}/{len(config.probe_norms) * len(seeds)}",
            "sweep": f"{sweep_done}/{sweep_planned}",
            "text": f"{sum(text_runs.values())}/{len(text_runs)}",
        },
    }
    for part in ("ablation_lr", "ablation", "ablation_text"):
        mine = [job for job in jobs if job.part == part]
        if mine:
            done = sum(job.done() for job in mine)
            header["finished_runs"][part] = f"{done}/{len(mine)}"
    finished = ", ".join(f"{k} {v}" for k, v in header["finished_runs"].items())
    print(f"[priors] finished runs on disk: {finished}", flush=True)
    out = {
        "header": header,
        "config": json.loads(config.to_json_best_effort()),
        **results,
    }
    write_json(study.workdir / "results.json", out)
    write_markdown(out, config, study.workdir / "results.md")
    write_plots(out, config, study.workdir)
    return out


def main() -> None:
    """``python -m experiments.priors --config=...:quick --workdir=...``."""

    def run(config: ml_collections.ConfigDict, workdir: str) -> None:
        # The command without --config.parts: the parts are run (and the tables
        # rebuilt) by the same command with the parts named.
        args, argv = [], iter(sys.argv[1:])
        for arg in argv:
            if arg == "--config.parts":
                next(argv, None)  # its value, given as the next argument
            elif not arg.startswith("--config.parts="):
                args.append(arg)
        command = "python -m experiments.priors " + " ".join(args)
        run_study(config, workdir, command=command)
        print((pathlib.Path(workdir) / "results.md").read_text())

    common.run_with_flags("priors", run)
