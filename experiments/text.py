r"""Train a GPT-style decoder on text with any norm and any tokenization.

    python -m experiments.text --config=experiments/configs/text.py:quick \
        --config.norm=batch --config.tokenizer=bpe --workdir=runs/text_bn_bpe

Writes to the workdir: config.json, tokenizer.json (reused on resume),
metrics.jsonl, checkpoints/, summary.json, curves.png and sample.txt (a sample
generated one sequence at a time with population statistics, also printed).
summary.json holds ``val_loss`` in nats per token and ``val_bits_per_byte`` over
the whole validation split with population statistics (the running averages;
per position for causal batch statistics), the same with precise population
statistics (``_precise``) and with each evaluation batch's own statistics
(``_batch``: batches of the training batch size whose windows lie far apart,
so no scored token leaks into another window's statistics), the loss by
position bucket for each (``val_loss_by_position``), wall time, tokens/s and
parameter count. Bits per byte of the original UTF-8 text put every
tokenization on one scale.
"""

from __future__ import annotations

import json
import math
import pathlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import common
from normjax import calibrate, models, registry
from normjax.data import text
from normjax.functional import CAUSAL_MODES, Causal
from normjax.train import TrainState, train_and_evaluate
from normjax.train.plots import plot_curves
from normjax.train.resume import check_config

Array = jax.Array


def _causal(config: ml_collections.ConfigDict) -> Causal:
    """The norms' causal mode: 'off' (False) or one of ``CAUSAL_MODES``."""
    if config.causal == "off":
        return False
    if config.causal not in CAUSAL_MODES:
        raise ValueError(
            f"unknown causal mode {config.causal!r}; use one of "
            f"{', '.join([*CAUSAL_MODES, 'off'])}."
        )
    return config.causal


def build_model(
    config: ml_collections.ConfigDict, vocab_size: int
) -> models.Transformer:
    """The decoder of ``config`` with every norm named ``config.norm``; a norm
    option or causal mode the norm does not take is refused here, by name."""
    causal = _causal(config)
    registry.make_norm(config.norm, causal=causal, **common.norm_kwargs(config))
    return models.Transformer(
        vocab_size=vocab_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        d_model=config.d_model,
        max_len=config.max_len,
        norm=config.norm,
        norm_kwargs=common.norm_kwargs(config),
        causal=causal,
        mlp_ratio=config.mlp_ratio,
        dropout_rate=config.dropout_rate,
        tie_embeddings=config.tie_embeddings,
    )


class TextTask:
    """Next-token prediction for ``normjax.train.train_and_evaluate``."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str) -> None:
        self.config = config
        workdir_path = pathlib.Path(workdir)
        workdir_path.mkdir(parents=True, exist_ok=True)
        self.corpus = text.load_corpus(
            config.data_dir,
            text_file=config.text_file,
            validation_fraction=config.validation_fraction,
            download=config.download,
        )
        self.tokenizer = text.make_tokenizer(
            config.tokenizer,
            self.corpus,
            vocab_size=config.vocab_size,
            path=workdir_path / "tokenizer.json",
        )
        self.train_ids = self.tokenizer.encode(self.corpus.train)
        self.val_ids = self.tokenizer.encode(self.corpus.validation)
        if len(self.train_ids) < config.max_len + 1:
            raise ValueError(
                f"the training split has {len(self.train_ids)} tokens, fewer than "
                f"max_len + 1 = {config.max_len + 1}; use a smaller max_len or a "
                "longer text."
            )
        self.token_bytes = jnp.asarray(self.tokenizer.token_bytes, jnp.float32)
        self.stride = config.eval_stride or max(1, config.max_len // 2)

    # ----------------------------------------------------------------- Task API

    def init_args(self) -> tuple[Any, ...]:
        return (jnp.zeros((2, self.config.max_len), jnp.int32),)

    def prepare_variables(self, variables: dict[str, Any]) -> dict[str, Any]:
        return variables

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        windows = text.random_windows(
            self.train_ids,
            self.config.seed,
            step,
            self.config.batch_size,
            self.config.max_len,
        )
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}

    def model_inputs(
        self, batch: dict[str, Array], rng: Array, train: bool
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (batch["inputs"],), {"mask": batch.get("mask")}

    def loss(
        self, logits: Array, batch: dict[str, Array]
    ) -> tuple[Array, dict[str, Array]]:
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        weights = batch.get("weights")
        weights = jnp.ones_like(nll) if weights is None else weights.astype(nll.dtype)
        total = jnp.sum(nll * weights)
        loss = total / jnp.maximum(jnp.sum(weights), 1.0)
        nbytes = jnp.sum(self.token_bytes[batch["targets"]] * weights)
        return loss, {"bits_per_byte": total / math.log(2.0) / nbytes}

    def evaluate(
        self, evaluator: calibrate.Evaluator, state: TrainState
    ) -> dict[str, float]:
        """Loss per token and bits per byte over the whole validation split, for
        each statistics source in ``config.eval_sources`` (suffixes name all but
        the first), and the loss by position bucket (kept for ``finalize``).

        * 'running': the population statistics kept while training (per
          position for causal batch statistics), windows in text order;
        * 'precise': population statistics recomputed over
          ``config.precise_batches`` training batches
          (``normjax.calibrate.precise_batch_stats``);
        * 'batch': each evaluation batch's own statistics, as in training: batches
          of the training batch size (``config.batch_eval_batch_size`` overrides
          it) whose windows lie far apart (``text.eval_windows(isolated=True)``),
          so that no scored token is seen by any other window's statistics.

        * 'example_weighted': each window by 1 / batch_size of its own causal
          statistics mixed with the population's (precise ones when 'precise'
          is evaluated too, else running).

        With population statistics the result does not depend on the evaluation
        batch (a sequence is normalized alone). The loss by position averages
        every valid position of every window, scored or not (windows overlap),
        so its buckets do not add up to ``val_loss``.
        """
        size = self.config.eval_batch_size
        if size % jax.device_count():
            raise ValueError(
                f"eval_batch_size={size} must be a multiple of the "
                f"{jax.device_count()} devices."
            )
        variables = state.variables()
        precise = None
        if "precise" in self.config.eval_sources:
            precise = self.precise_stats(evaluator.model, variables)
        out: dict[str, float] = {}
        self.loss_by_position = {}
        for i, source in enumerate(self.config.eval_sources):
            if source == "batch":
                batch_size = self.config.batch_eval_batch_size or self.config.batch_size
                if batch_size % jax.device_count():
                    raise ValueError(
                        f"batch statistics are evaluated in batches of {batch_size} "
                        f"(the training batch size), not a multiple of the "
                        f"{jax.device_count()} devices; set "
                        "--config.batch_eval_batch_size."
                    )
                windows = text.eval_windows(
                    self.val_ids,
                    self.config.max_len,
                    self.stride,
                    batch_size,
                    isolated=True,
                )
            else:
                windows = text.eval_windows(
                    self.val_ids, self.config.max_len, self.stride, size
                )

            def logits_of(batch: dict[str, np.ndarray], source: str = source) -> Any:
                return evaluator(
                    variables,
                    {"inputs": batch["inputs"], "mask": batch["mask"]},
                    source=source,
                    precise_stats=precise,
                    example_weight=1.0 / self.config.batch_size,
                )

            scores = self.score(windows, logits_of)
            suffix = "" if i == 0 else f"_{source}"
            out[f"val_loss{suffix}"] = scores["loss"]
            out[f"val_bits_per_byte{suffix}"] = scores["bits_per_byte"]
            self.loss_by_position[source] = scores["loss_by_position"]
            tokens, nbytes = scores["tokens"], scores["bytes"]
        out["val_tokens"] = tokens
        out["val_bytes"] = nbytes
        return out

    def score(
        self,
        windows: Iterable[dict[str, np.ndarray]],
        logits_of: Callable[[dict[str, np.ndarray]], Any],
    ) -> dict[str, Any]:
        """Loss per scored token, bits per byte and the loss by position bucket
        of ``logits_of(batch)`` over evaluation ``windows``
        (``text.eval_windows``)."""
        token_bytes = np.asarray(self.tokenizer.token_bytes)
        buckets = text.position_buckets(self.config.max_len)
        nats, tokens, nbytes = 0.0, 0, 0
        bucket_nats = np.zeros(len(buckets))
        bucket_count = np.zeros(len(buckets))
        for batch in windows:
            logits = np.asarray(logits_of(batch), np.float64)
            weights = batch["weights"]
            top = logits.max(-1, keepdims=True)
            lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
            picked = np.take_along_axis(logits, batch["targets"][..., None], -1)
            nll = lse - picked[..., 0]
            nats += float(np.sum(nll[weights]))
            tokens += int(weights.sum())
            nbytes += int(token_bytes[batch["targets"][weights]].sum())
            for j, (lo, hi) in enumerate(buckets):
                valid = batch["mask"][:, lo:hi]
                bucket_nats[j] += float(np.sum(nll[:, lo:hi][valid]))
                bucket_count[j] += int(valid.sum())
        return {
            "loss": nats / tokens,
            "bits_per_byte": text.bits_per_byte(nats, nbytes),
            "tokens": tokens,
            "bytes": nbytes,
            "loss_by_position": {
                f"{lo}-{hi - 1}": float(n / max(c, 1))
                for (lo, hi), n, c in zip(
                    buckets, bucket_nats, bucket_count, strict=True
                )
            },
        }

    def precise_stats(self, model: models.Transformer, variables: Any) -> Any:
        """Population statistics recomputed over the first
        ``config.precise_batches`` training batches (per position for causal
        batch statistics: the average of each batch's prefix moments)."""
        batches = (
            (self.train_batch(step)["inputs"],)
            for step in range(self.config.precise_batches)
        )
        with warnings.catch_warnings():  # per-sample norms: nothing to recompute
            warnings.simplefilter("ignore")
            return calibrate.precise_batch_stats(
                model, jax.device_get(variables), batches, train=False
            )

    def generate(
        self,
        model: models.Transformer,
        state: TrainState,
        prompt: str,
        num_tokens: int,
        temperature: float,
        seed: int = 0,
    ) -> str:
        """Samples ``num_tokens`` tokens after ``prompt`` (the norms' running or
        per-sample statistics), one sequence with the last ``max_len`` tokens as
        context; returns prompt + continuation."""
        length = self.config.max_len
        # One sequence, not spread over devices: an evaluator of its own.
        forward = calibrate.Evaluator(
            model,
            inputs=lambda batch: self.model_inputs(batch, jax.random.key(0), False),
            train=False,
        )
        variables = jax.device_get(state.variables())
        ids = list(self.tokenizer.encode(prompt)) or [int(self.val_ids[0])]
        rng = np.random.default_rng(seed)
        for _ in range(num_tokens):
            context = ids[-length:]
            tokens = np.zeros((1, length), np.int32)
            tokens[0, : len(context)] = context
            mask = np.arange(length)[None] < len(context)
            logits = np.asarray(
                forward(variables, {"inputs": tokens, "mask": mask}), np.float64
            )
            logits = logits[0, len(context) - 1] / max(temperature, 1e-6)
            probs = np.exp(logits - logits.max())
            ids.append(int(rng.choice(len(probs), p=probs / probs.sum())))
        return self.tokenizer.decode(ids)

    def finalize(
        self, evaluator: calibrate.Evaluator, state: TrainState, workdir: pathlib.Path
    ) -> dict[str, Any]:
        plot_curves(
            workdir / "metrics.jsonl",
            workdir / "curves.png",
            panels=("loss", "bits_per_byte"),
        )
        sample = self.generate(
            evaluator.model,
            state,
            self.config.sample_prompt,
            self.config.sample_tokens,
            self.config.sample_temperature,
            seed=self.config.seed,
        )
        (workdir / "sample.txt").write_text(sample)
        print(f"--- sample ({self.config.sample_tokens} tokens) ---\n{sample}\n---")
        return {
            "val_loss_by_position": getattr(self, "loss_by_position", {}),
            **common.mix_summary(state.params),
            "norm": self.config.norm,
            "tokenizer": self.config.tokenizer,
            "vocab_size": self.tokenizer.vocab_size,
            "causal": self.config.causal,
            "corpus": self.corpus.source,
            "tokens_per_second": None,
        }


def train(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[dict[str, Any], models.Transformer, TextTask, TrainState]:
    """Builds the tokenizer, model and task and trains (or resumes, or restores
    a finished run); returns the summary, the model, the task and the final
    state."""
    # A wrong norm, norm option or causal mode, or another run's workdir: said
    # before the tokenizer is read or trained.
    registry.make_norm(
        config.norm, causal=_causal(config), **common.norm_kwargs(config)
    )
    check_config(workdir, config)
    task = TextTask(config, workdir)
    model = build_model(config, task.tokenizer.vocab_size)
    summary, state = train_and_evaluate(config, workdir, model, task, return_state=True)
    if summary.get("examples_per_second"):
        summary["tokens_per_second"] = summary["examples_per_second"] * config.max_len
        path = pathlib.Path(workdir) / "summary.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary, model, task, state


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Builds the tokenizer, model and task and trains; returns the summary."""
    return train(config, workdir)[0]


def main() -> None:
    """``python -m experiments.text --config=...:quick --workdir=...``."""
    common.run_with_flags(
        "text",
        lambda config, workdir: print(json.dumps(run(config, workdir), indent=2)),
    )


if __name__ == "__main__":
    main()
