"""experiments.text end to end on real tiny_shakespeare and on a text file."""

import json
import math
import os

import numpy as np
import pytest
import tfds_data
from run_metrics import train_rows

from experiments import text as experiment
from experiments.configs import text as configs
from normjax.data.text import DataNotFoundError
from normjax.train.resume import ConfigMismatchError

DATA_DIR, _WHY = tfds_data.find("tiny_shakespeare")
needs_data = tfds_data.needs("tiny_shakespeare")

ARTIFACTS = (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "curves.png",
    "sample.txt",
    "tokenizer.json",
)


def tiny(**overrides):
    config = configs.get_config("tiny")
    config.data_dir = DATA_DIR
    config.update(overrides)
    return config


@needs_data
def test_tiny_bpe_run_writes_every_artifact_and_resumes_identically(
    tmp_path, monkeypatch, capsys
):
    config = tiny(tokenizer="bpe", norm="batch")
    summary = experiment.run(config, str(tmp_path / "whole"))
    whole = tmp_path / "whole"
    for name in ARTIFACTS:
        assert (whole / name).stat().st_size > 0, name
    assert sorted(os.listdir(whole / "checkpoints")) == ["4", "6"]
    saved = json.loads((whole / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["vocab_size"] == 300 and saved["tokenizer"] == "bpe"
    # the whole validation split is scored: 55770 bytes less the first token's
    assert 55_760 < saved["val_bytes"] < 55_770
    for key in ("val_bits_per_byte", "val_bits_per_byte_batch"):
        assert 0 < saved[key] < 12
    bytes_per_token = saved["val_bytes"] / saved["val_tokens"]
    assert saved["val_bits_per_byte"] == pytest.approx(
        saved["val_loss"] / math.log(2) / bytes_per_token
    )
    sample = (whole / "sample.txt").read_text()
    assert sample.startswith("\n") and len(sample) > 20
    assert sample in capsys.readouterr().out

    # Killed after the checkpoint at step 4, restarted: the same later metrics,
    # with the saved tokenizer reused (not retrained).
    original = experiment.TextTask.train_batch

    def killed(self, step):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")
        return original(self, step)

    monkeypatch.setattr(experiment.TextTask, "train_batch", killed)
    killed_dir = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        experiment.run(tiny(tokenizer="bpe", norm="batch"), str(killed_dir))
    monkeypatch.setattr(experiment.TextTask, "train_batch", original)
    tokenizer_file = (killed_dir / "tokenizer.json").read_text()
    trained = experiment.text.BpeTokenizer.train

    def no_retraining(*args, **kwargs):
        raise AssertionError("the saved tokenizer must be reused on resume")

    monkeypatch.setattr(experiment.text.BpeTokenizer, "train", no_retraining)
    resumed = experiment.run(tiny(tokenizer="bpe", norm="batch"), str(killed_dir))
    monkeypatch.setattr(experiment.text.BpeTokenizer, "train", trained)
    assert (killed_dir / "tokenizer.json").read_text() == tokenizer_file
    assert train_rows(killed_dir) == train_rows(whole)
    assert resumed["val_loss"] == summary["val_loss"]
    # Another tokenizer or norm in the same workdir: refused before the tokenizer
    # or the model is touched.
    for change, named in (
        ({"tokenizer": "byte"}, "tokenizer: 'bpe' in the workdir, 'byte' now"),
        ({"norm": "layer"}, "norm: 'batch' in the workdir, 'layer' now"),
    ):
        with pytest.raises(ConfigMismatchError, match=named):
            experiment.run(
                tiny(**{**dict(tokenizer="bpe", norm="batch"), **change}), str(whole)
            )
    assert (whole / "tokenizer.json").read_text() == (
        killed_dir / "tokenizer.json"
    ).read_text()


@needs_data
def test_char_level_bits_per_byte_is_nats_per_char_over_ln2(tmp_path):
    summary = experiment.run(tiny(num_steps=2), str(tmp_path))
    assert summary["val_bytes"] == summary["val_tokens"] == 55_769
    assert summary["val_bits_per_byte"] == pytest.approx(
        summary["val_loss"] / math.log(2)
    )


@pytest.mark.slow  # a whole training run
def test_a_text_file_runs_end_to_end_without_tfds(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    config = tiny(text_file=str(path), tokenizer="byte", num_steps=2)
    config.data_dir = str(tmp_path / "no_tfds_here")
    summary = experiment.run(config, str(tmp_path / "run"))
    assert summary["corpus"] == f"file:{path}"
    assert summary["val_bytes"] == 180 - 1  # the last 10 %, less the first byte


def test_missing_or_empty_text_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        experiment.run(tiny(text_file=str(tmp_path / "nope.txt")), str(tmp_path / "a"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        experiment.run(tiny(text_file=str(tmp_path / "empty.txt")), str(tmp_path / "b"))


def test_missing_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    config = tiny()
    config.data_dir, config.download = str(tmp_path / "empty"), False
    with pytest.raises(DataNotFoundError, match="TFDS_DATA_DIR"):
        experiment.run(config, str(tmp_path / "run"))


def test_bad_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown norm 'btach'"):
        experiment.run(tiny(norm="btach"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="unknown causal mode 'future'"):
        experiment.build_model(tiny(causal="future"), 10)
    with pytest.raises(ValueError, match="its causal modes are: False, 'cumulative'"):
        experiment.build_model(tiny(norm="layer", causal="per_position"), 10)
    model = experiment.build_model(tiny(norm="batch", causal="per_position"), 10)
    assert model.causal == "per_position"


def test_presets():
    quick, full = configs.get_config("quick"), configs.get_config("full")
    assert (quick.num_layers, quick.d_model, quick.max_len) == (4, 128, 64)
    assert (full.num_layers, full.d_model, full.max_len) == (6, 384, 256)
    assert quick.optimizer == full.optimizer == "adamw"
    assert quick.schedule == full.schedule == "cosine"
    with pytest.raises(ValueError, match="unknown preset"):
        configs.get_config("huge")


@pytest.mark.parametrize("norm", ["batch", "bln"])
def test_population_statistics_evaluate_alike_in_batches_of_1_and_64(tmp_path, norm):
    """The same windows, evaluated with population statistics (running and
    precise, per position; and example-weighted) in batches of 1 and of 64: the
    same loss; the leak-free batch evaluation runs in batches of the training
    batch size."""
    import jax

    from normjax.train import train_and_evaluate
    from normjax.train.loop import make_evaluator

    path = tmp_path / "text.txt"
    path.write_text("To be, or not to be, that is the question:\n" * 40)
    config = tiny(
        text_file=str(path),
        tokenizer="byte",
        norm=norm,
        num_steps=4,
        validation_fraction=0.2,
        eval_sources=("running", "precise", "batch", "example_weighted"),
    )
    task = experiment.TextTask(config, str(tmp_path / "run"))
    model = experiment.build_model(config, task.tokenizer.vocab_size)
    summary, state = train_and_evaluate(
        config, str(tmp_path / "run"), model, task, return_state=True
    )
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    evaluator = make_evaluator(model, task, mesh)
    results = {}
    for size in (1, 64):
        task.config.unlock()
        task.config.eval_batch_size = size
        results[size] = task.evaluate(evaluator, state)
    for key in ("val_loss", "val_loss_precise", "val_loss_example_weighted"):
        np.testing.assert_allclose(results[1][key], results[64][key], rtol=2e-6)
    assert results[1]["val_loss"] != results[1]["val_loss_precise"]
    np.testing.assert_allclose(summary["val_loss"], results[64]["val_loss"], rtol=2e-6)
    by_position = summary["val_loss_by_position"]
    assert set(by_position) == {"running", "precise", "batch", "example_weighted"}
    assert list(by_position["running"]) == ["0-7", "8-15"]
    assert all(math.isfinite(v) for d in by_position.values() for v in d.values())
