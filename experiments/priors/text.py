"""The text parts of the study (part 5): runs, their keys, and which
evaluation normalizes as training did."""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from experiments import text as text_experiment
from experiments.priors.runs import Study, read_json
from normjax import registry

HEADLINE_TEXT_NORMS = ("batch", "layer", "prior")


def text_key(kind: str, variant: str, tokenizer: str, extra: dict[str, Any]) -> str:
    return f"{kind}|{variant}|{tokenizer}|{json.dumps(extra)}"


def as_trained(variant: str) -> str:
    """The text evaluation that normalizes as training did: the running one for
    norms the registry lists as training on running statistics (power norm) and
    for causal='running', the evaluation batch's own causal statistics otherwise
    (the two are equal for per-sample norms)."""
    norm, _, causal = variant.partition(":")
    running = registry.entry(norm).statistics is registry.Statistics.RUNNING
    if running or causal == "running":
        return "val_bits_per_byte"
    return "val_bits_per_byte_batch"


def text_run(
    study: Study,
    variant: str,
    tokenizer: str,
    seed: int,
    *,
    max_len: int | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """One text run (``variant`` is a norm name, optionally ``:causal-mode``)."""
    workdir = study.text_dir(
        variant, tokenizer, seed, max_len=max_len, batch_size=batch_size
    )
    path = workdir / "summary.json"
    if path.exists():
        return read_json(path)
    print(f"[priors] text run: {workdir.name}", flush=True)
    run = text_config(
        study, variant, tokenizer, seed, max_len=max_len, batch_size=batch_size
    )
    return text_experiment.run(run, str(workdir))


def text_config(
    study: Study,
    variant: str,
    tokenizer: str,
    seed: int,
    *,
    max_len: int | None = None,
    batch_size: int | None = None,
) -> ml_collections.ConfigDict:
    """The text preset of the study with the run's norm (``variant``: a norm
    name, optionally ``:causal-mode``), tokenizer, seed, context and batch."""
    norm, _, causal = variant.partition(":")
    run = ml_collections.ConfigDict(study.config.text.to_dict())
    run.data_dir = study.config.data_dir
    run.norm, run.tokenizer, run.seed = norm, tokenizer, seed
    if causal:
        run.causal = causal
    if max_len is not None:
        run.max_len = max_len
    if batch_size is not None:
        run.batch_size = batch_size
    return run


def text_jobs(
    config: ml_collections.ConfigDict,
) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(kind, variant, tokenizer, extra config) of every text comparison: the
    tokenizer comparison, the small-batch runs, then the context sweeps, the
    most tokens per step last."""
    jobs = [
        ("tokenizer", variant, tokenizer, {})
        for variant in config.text_norms
        for tokenizer in config.text_tokenizers
    ]
    jobs += [
        ("small batch", variant, "byte", {"batch_size": config.text_small_batch_size})
        for variant in HEADLINE_TEXT_NORMS
        if variant in config.text_norms
    ]
    tokens = config.context_tokens_per_step
    for length in sorted(config.context_lengths):
        if tokens < length:
            raise ValueError(
                f"context_tokens_per_step={tokens} is below context length "
                f"{length}: no whole sequence fits in a step."
            )
    # The context sweep at the preset's batch size and at a fixed number of
    # tokens per step, cheapest runs (fewest tokens per step) first, so that a
    # study stopped part-way has whole columns of the cheaper ones.
    context = [
        (kind, variant, "byte", extra)
        for length in sorted(config.context_lengths)
        for kind, extra in (
            ("context", {"max_len": length}),
            ("context tokens", {"max_len": length, "batch_size": tokens // length}),
        )
        for variant in config.context_norms
    ]
    batch = config.text.batch_size

    def tokens_per_step(job: tuple[str, str, str, dict[str, Any]]) -> int:
        extra = job[3]
        return extra.get("batch_size", batch) * extra["max_len"]

    jobs += sorted(context, key=tokens_per_step)  # stable: shorter L first
    return jobs


def text_record(summary: dict[str, Any]) -> dict[str, Any]:
    """What the study keeps of a text run: bits per byte with running, precise
    and (leak-free) batch statistics, and the loss by position."""
    return {
        key: summary.get(key)
        for key in (
            "val_bits_per_byte",
            "val_bits_per_byte_precise",
            "val_bits_per_byte_batch",
            "val_loss_by_position",
        )
    }
