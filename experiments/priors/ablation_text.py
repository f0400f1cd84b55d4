"""The text ablation (part ``ablation_text``): where a causal language model's
batch statistics come from, at each context length at a fixed number of tokens
per step.

Rows (``config.ablation_text_norms``): layer norm; causal batch norm, evaluated
with population statistics (running and precise), with leak-free batch
statistics, and with a fixed reference batch of training windows (each
evaluation window normalized, causally, with the statistics of the reference
windows and itself); batch norm trained on its running statistics
(``batch:running``); ``prior``, also with its learned offsets zeroed; ``mix``.
The runs are the text study's own (part ``text``, the context sweep at fixed
tokens per step) wherever the row is the same run; a run the study restored
from an earlier results file has no checkpoint to evaluate further, so it is
trained again beside it (``ablation_<run>``).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import text as text_experiment
from experiments.priors.ablation import zero_prior
from experiments.priors.runs import Job, Study, read_json, write_json
from experiments.priors.text import text_config, text_record
from normjax import nn as norms
from normjax import registry
from normjax.data import text
from normjax.train import loop


def lengths(config: ml_collections.ConfigDict) -> list[tuple[int, dict[str, int]]]:
    """(context length, the run's settings that differ from the text preset) at
    ``context_tokens_per_step`` tokens per step."""
    out = []
    for length in sorted(config.context_lengths):
        extra = {
            "max_len": length,
            "batch_size": config.context_tokens_per_step // length,
        }
        out.append((length, {k: v for k, v in extra.items() if config.text[k] != v}))
    return out


def uses_batch_statistics(variant: str) -> bool:
    """Whether the row normalizes with its batch's statistics in training (the
    rows a reference batch can stand in for)."""
    norm, _, causal = variant.partition(":")
    kind = registry.entry(norm).statistics
    return kind is registry.Statistics.BATCH and causal != "running"


def needs_model(variant: str) -> bool:
    """Whether the row is evaluated beyond its run's summary (reference batch,
    zeroed prior offsets): then its trained model is needed."""
    return uses_batch_statistics(variant) or variant.partition(":")[0] == "prior"


def run_dir(
    study: Study, variant: str, seed: int, extra: dict[str, int]
) -> pathlib.Path:
    """The text study's run, unless the row needs the trained model and that
    run was restored from a results file without a checkpoint: then a run of
    our own beside it."""
    shared = study.text_dir(variant, "byte", seed, **extra)
    restored = (shared / "summary.json").exists() and not any(
        (shared / "checkpoints").glob("*")
    )
    if restored and needs_model(variant):
        return study.run_dir(f"ablation_{shared.name}")
    return shared


def reference_windows(task: Any, count: int) -> np.ndarray:
    """``count`` training windows (inputs), fixed: the reference batch."""
    windows = text.random_windows(
        task.train_ids, 10_000 + task.config.seed, 0, count, task.config.max_len
    )
    return windows[:, :-1]


def reference_scores(
    model: Any, task: Any, variables: Any, count: int, batch_size: int = 16
) -> dict[str, Any]:
    """Validation scores with each window normalized, causally, by the batch
    statistics of ``count`` reference training windows and itself (never other
    validation windows: leak-free)."""
    ref = jnp.asarray(reference_windows(task, count))
    ones = jnp.ones(ref.shape, bool)

    def one(inputs: jax.Array, mask: jax.Array) -> jax.Array:
        tokens = jnp.concatenate([ref, inputs[None]])
        full = jnp.concatenate([ones, mask[None]])
        with norms.statistics_source("batch"):
            logits = model.apply(variables, tokens, train=False, mask=full)
        return logits[-1]

    forward = jax.jit(jax.vmap(one))
    windows = text.eval_windows(
        task.val_ids, task.config.max_len, task.stride, batch_size
    )
    return task.score(windows, lambda b: forward(b["inputs"], b["mask"]))


def ablation_text_run(
    study: Study, variant: str, seed: int, extra: dict[str, int]
) -> dict[str, Any]:
    """One row at one context length and seed: the run's scores, and the
    reference-batch (batch-statistics rows) or zeroed-offset (``prior``) ones."""
    workdir = run_dir(study, variant, seed, extra)
    path = study.text_dir(variant, "byte", seed, **extra) / "ablation_text.json"
    if path.exists():
        return read_json(path)
    print(f"[priors] text ablation: {workdir.name}", flush=True)
    summary_path = workdir / "summary.json"
    if not needs_model(variant) and summary_path.exists():
        # the summary is all this row reports (possibly restored, no checkpoint)
        record = {**text_record(read_json(summary_path)), "run": workdir.name}
        write_json(path, record)
        return record
    config = text_config(study, variant, "byte", seed, **extra)
    summary, model, task, state = text_experiment.train(config, str(workdir))
    record = {**text_record(summary), "run": workdir.name}
    record["val_loss_by_position"] = dict(record.get("val_loss_by_position") or {})
    variables = state.variables()
    if uses_batch_statistics(variant):
        scores = reference_scores(
            model, task, variables, study.config.ablation_text_reference
        )
        record["val_bits_per_byte_reference"] = scores["bits_per_byte"]
        record["val_loss_by_position"]["reference"] = scores["loss_by_position"]
    if variant.partition(":")[0] == "prior":
        evaluator = loop.make_evaluator(model, task, loop.make_mesh())
        zeroed = task.evaluate(
            evaluator, state.replace(params=zero_prior(state.params))
        )
        for key, value in zeroed.items():
            if key.startswith("val_bits_per_byte"):
                record[key.replace("val_bits_per_byte", "prior_zeroed")] = value
    if "mix_weight" in summary:
        record["mix_weight"] = summary["mix_weight"]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return record


def jobs(
    study: Study, parts: set[str], seeds: list[int], results: dict[str, Any]
) -> list[Job]:
    """Every (row, context length, seed), shortest contexts first."""
    c = study.config
    if not c.ablation_text_norms:
        return []
    for variant in c.ablation_text_norms:
        registry.entry(variant.partition(":")[0])
    table = results.setdefault("ablation_text", {})
    out = []
    for length, extra in lengths(c):
        for variant in c.ablation_text_norms:
            for seed in seeds:

                def keep(
                    record: Any, v: str = variant, n: int = length, s: int = seed
                ) -> None:
                    table.setdefault(v, {}).setdefault(str(n), {})[s] = record

                out.append(
                    Job(
                        "ablation_text",
                        study.text_dir(variant, "byte", seed, **extra)
                        / "ablation_text.json",
                        "ablation_text" in parts,
                        lambda v=variant, s=seed, e=extra: ablation_text_run(
                            study, v, s, e
                        ),
                        keep,
                        results_key=(variant, str(length), str(seed)),
                    )
                )
    return out
