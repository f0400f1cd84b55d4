"""experiments.priors: the smoke study end to end on real data, and its pieces."""

import json
import pathlib
import re
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tfds_data

from experiments import priors
from experiments.configs import priors as configs
from experiments.priors import ablation, cifar_eval, report, runs
from experiments.priors import text as priors_text
from normjax.models import FastCNN, max_pool_2x2

CIFAR_DIR, _WHY_CIFAR = tfds_data.find("cifar10")
TEXT_DIR, _WHY_TEXT = tfds_data.find("tiny_shakespeare")
needs_data = pytest.mark.skipif(
    CIFAR_DIR is None or TEXT_DIR != CIFAR_DIR,
    reason=_WHY_CIFAR
    or _WHY_TEXT
    or "CIFAR-10 and tiny_shakespeare are in "
    "different data directories; the study reads both from one data_dir.",
)


@pytest.mark.slow
@needs_data
def test_smoke_study_writes_every_table_and_plot_and_resumes(
    tmp_path, monkeypatch, capsys
):
    config = configs.get_config("smoke")
    config.data_dir = CIFAR_DIR
    config.ablation_rows = ()  # the ablations have their own tests
    config.ablation_text_norms = ()
    results = priors.run_study(config, str(tmp_path))
    # progress: one bar over the 13 runs, a line per finished run with its number
    err = capsys.readouterr().err
    assert "finished before this call: probe 0/2, sweep 0/4, text 0/7" in err
    assert "13/13" in err
    assert re.search(r"probe_batch_s0: test accuracy \d+\.\d\d% \(running", err)
    assert re.search(r"sweep_layer_b4_s0: test accuracy [\d.]+% \(running\)", err)
    assert re.search(r"text_batch_byte_L8_s0: val bits/byte \d\.\d{3} \(pop", err)
    for name in ("results.json", "results.md", *priors.PLOTS):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) >= {"header", "probe", "stats", "sweep", "text"}
    finished = {"probe": "2/2", "sweep": "4/4", "text": "7/7"}
    assert saved["header"]["finished_runs"] == finished
    markdown = (tmp_path / "results.md").read_text()
    for heading in ("## 1.", "## 2.", "## 3-4.", "## 5.", "## 6."):
        assert heading in markdown

    # 1. every source for every norm; per-sample rows invariant across sources
    columns = report.probe_columns(config)
    for norm in config.probe_norms:
        sources = results["probe"][norm][0]
        assert list(sources) == columns
        if report.is_per_sample(norm):
            assert all(r["max_logit_change"] < 1e-4 for r in sources.values())
            assert len({r["accuracy"] for r in sources.values()}) == 1
    # batch norm's predictions do move with the batch (the probe has teeth)
    batch = results["probe"]["batch"][0]
    assert max(r["max_logit_change"] for r in batch.values()) > 1e-3
    # 2. a probe per norm layer and for all layers, accuracies in [0, 1]
    stats = results["stats"]["layer"][0]
    assert set(stats) == {"norm1", "norm2", "norm3", "all layers"}
    assert all(0.0 <= v <= 1.0 for v in stats.values())
    # 3-4. every (norm, batch size) with running and precise accuracy
    for norm in config.sweep_norms:
        for size in config.sweep_batch_sizes:
            record = results["sweep"][norm][size][0]
            assert 0.0 <= record["running"] <= 1.0
            assert 0.0 <= record["precise"] <= 1.0
    assert results["sweep"]["layer"][4][0]["running"] == pytest.approx(
        results["sweep"]["layer"][4][0]["precise"]
    )
    # 5. tokenizers x norms, small batches, the context sweep at a fixed batch
    # size and at fixed tokens per step (L=16 at the preset's batch size reuses
    # the tokenizer run)
    assert len(results["text"]) == 2 + 2 + 2 + 2
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert "text_batch_byte_L16_s0" not in runs and "text_batch_byte_L8_s0" in runs
    assert "text_batch_byte_L8_b2_s0" in runs and "text_batch_byte_b1_s0" in runs
    record = results["text"][priors_text.text_key("tokenizer", "batch", "byte", {})][0]
    assert set(record["val_loss_by_position"]) == {"running", "precise", "batch"}
    assert record["val_bits_per_byte_precise"] > 0
    assert "| batch | byte | " in markdown and "one seed: no interval" in markdown
    # the context sweep gives both evaluations, running (batch's causal stats)
    context = markdown.split("Context-length sweep")[1].split("## 6.")[0]
    row = next(line for line in context.splitlines() if line.startswith("| batch |"))
    assert row.count("(") == len(config.context_lengths) and "—" not in row

    # Resumable: a second call trains nothing and gives the same results.
    def no_training(*args, **kwargs):
        raise AssertionError("finished runs must be skipped")

    monkeypatch.setattr(cifar_eval.cifar_experiment, "train", no_training)
    monkeypatch.setattr(priors_text.text_experiment, "run", no_training)
    capsys.readouterr()
    again = priors.run_study(config, str(tmp_path))
    out, err = capsys.readouterr()
    assert "finished before this call: probe 2/2, sweep 4/4, text 7/7" in err
    assert "test accuracy" not in err  # no run finished in this call
    assert "finished runs on disk: probe 2/2, sweep 4/4, text 7/7" in out
    for part in ("probe", "stats", "sweep", "text"):
        assert again[part] == results[part]
    # ... also when reporting only, with no part to run
    config.parts = ""
    assert priors.run_study(config, str(tmp_path))["sweep"] == results["sweep"]
    # ... and a workdir with no finished run yet says so at the top
    empty = priors.run_study(config, str(tmp_path / "empty"))
    assert empty["header"]["finished_runs"] == {
        "probe": "0/2",
        "sweep": "0/4",
        "text": "0/7",
    }
    assert (
        "finished runs: probe 0/2, sweep 0/4, text 0/7"
        in (tmp_path / "empty" / "results.md").read_text()
    )


@pytest.mark.slow
@needs_data
def test_smoke_ablation_writes_its_tables_and_plot(tmp_path, capsys):
    config = configs.get_config("smoke")
    config.data_dir = CIFAR_DIR
    config.parts = "ablation"  # runs the learning-rate grid it needs first
    results = priors.run_study(config, str(tmp_path))
    assert results["header"]["finished_runs"]["ablation_lr"] == "8/8"
    assert results["header"]["finished_runs"]["ablation"] == "10/10"
    assert (tmp_path / "ablation.png").stat().st_size > 0
    grid = results["ablation_lr"]
    assert set(grid) == set(config.ablation_rows)
    assert all(set(per) == {"0.1", "0.4"} for per in grid.values())
    table = results["ablation"]
    assert list(table) == ["short b32", "long b32", "short b8"]
    assert set(table["short b8"]) == {"batch", "mix"}
    for setting in table.values():
        for name, per_seed in setting.items():
            r = per_seed[0]
            # one image at a time gives the inference-statistics logits
            assert r["single_max_logit_change"] < 1e-4, name
            for key in ("accuracy", "precise", "accuracy_offset_erased"):
                assert 0.0 <= r[key] <= 1.0
            batch_columns = [
                r["random_batch"],
                r["class_homogeneous"],
                r["nuisance_homogeneous"],
                r["skewed_batch"],
            ]
            if name != "batch":  # per-sample rows ignore the evaluation batch
                assert batch_columns == [r["accuracy"]] * 4, name
            assert r["class_distance"] > 0 and r["nuisance_distance"] > 0
    # the learning rate chosen on the held-out split, scaled at batch 8
    best = table["short b32"]["batch"][0]["learning_rate"]
    by_rate = {float(k): v for k, v in grid["batch"].items()}
    assert best == ablation.choose_learning_rate(by_rate)
    assert table["short b8"]["batch"][0]["learning_rate"] == pytest.approx(
        best * 8 / 32
    )
    assert "mix_weight" in table["short b32"]["mix"][0]
    markdown = (tmp_path / "results.md").read_text()
    section = markdown.split("## 7. Ablation")[1]
    assert "| layer_chw | sample | — | — | sample |" in section
    for heading in ("### short budget", "### long budget", "batch 8"):
        assert heading in section
    assert "one seed: no interval" in section and "learned α" in section
    headline = section.split("### Headline: every row in every setting")[1]
    assert "short b32: test | short b32: Δ vs batch | long b32: test" in headline
    assert re.search(r"\| batch \| batch \| yes \| yes \| channel \| [\d.]+ ", headline)
    reading = section.split("### Reading the outcome")[1].split("\n## ")[0]
    assert "| optimization | none_wn − batch |" in reading
    assert "| prior; optimization | layer_chw − batch |" in reading
    assert "`mix`'s learned α" in reading
    err = capsys.readouterr().err
    assert re.search(r"ablation_mix_short_b8_s0: test accuracy [\d.]+%", err)
    # A later session (a fresh workdir) restores every finished run from the
    # results file instead of training it again, each record marked.
    config.parts = ""
    config.restore_from = str(tmp_path / "results.json")
    again = priors.run_study(config, str(tmp_path / "later"))
    assert again["header"]["finished_runs"]["ablation_lr"] == "8/8"
    assert again["header"]["finished_runs"]["ablation"] == "10/10"
    assert without_marks(again["ablation"]) == table
    assert without_marks(again["ablation_lr"]) == grid
    record = tmp_path / "later" / "runs" / "ablation_mix_short_b8_s0" / "ablation.json"
    assert json.loads(record.read_text())["restored_from"] == config.restore_from
    # runs made with other settings are refused, by field, when the part is
    # asked for; otherwise left out (not mixed in), saying so
    config.ablation_learning_rates = (0.1, 0.2, 0.4)  # another grid: another best
    again = priors.run_study(config, str(tmp_path / "other"))
    assert again["ablation"] == {} and set(again["ablation_lr"]) == set(grid)
    assert "not restored: restore_from=" in capsys.readouterr().out
    config.parts = "ablation"
    refused = r"made with other settings \(differs in ablation_learning_rates"
    with pytest.raises(ValueError, match=refused):
        priors.run_study(config, str(tmp_path / "other2"))
    config.ablation_holdout += 1
    refused = r"made with other settings \(differs in ablation_holdout"
    with pytest.raises(ValueError, match=refused):
        priors.run_study(config, str(tmp_path / "other3"))


def without_marks(table: Any) -> Any:
    """A results table without the restored records' ``restored_from``."""
    if isinstance(table, dict):
        return {k: without_marks(v) for k, v in table.items() if k != "restored_from"}
    return table


@pytest.mark.slow
@needs_data
def test_smoke_text_ablation_evaluates_with_a_reference_batch(tmp_path):
    config = configs.get_config("smoke")
    config.data_dir = CIFAR_DIR
    config.parts = "ablation_text"
    config.ablation_text_norms = ("layer", "batch")
    results = priors.run_study(config, str(tmp_path))
    assert results["header"]["finished_runs"]["ablation_text"] == "4/4"
    table = results["ablation_text"]
    assert set(table) == {"layer", "batch"} and set(table["batch"]) == {"8", "16"}
    batch = table["batch"]["8"][0]
    assert batch["val_bits_per_byte_reference"] > 0
    assert set(batch["val_loss_by_position"]) >= {"running", "batch", "reference"}
    assert "val_bits_per_byte_reference" not in table["layer"]["8"][0]
    # the text study's own run directories (reused by part text)
    assert (tmp_path / "runs" / "text_batch_byte_L8_b2_s0" / "summary.json").exists()
    section = (tmp_path / "results.md").read_text().split("## 8. Text ablation")[1]
    assert "| batch | reference batch |" in section
    by_position = section.split("by position, L=8")[1]
    assert "| batch | as trained |" in by_position
    assert "| batch | reference batch |" in by_position
    assert "As trained minus layer norm, nats per byte by position, L=8" in section
    assert (tmp_path / "ablation_text.png").stat().st_size > 0
    config.parts = ""  # a later session restores the rows from the results
    config.restore_from = str(tmp_path / "results.json")
    again = priors.run_study(config, str(tmp_path / "later"))
    assert again["header"]["finished_runs"]["ablation_text"] == "4/4"
    assert without_marks(again["ablation_text"]) == table


def test_zero_prior_zeroes_only_the_prior_offsets():
    params = {
        "block": {
            "norm": {
                "prior_mean": jnp.ones(3),
                "prior_scale": jnp.ones(3),
                "scale": jnp.ones(3),
            }
        }
    }
    zeroed = ablation.zero_prior(params)["block"]["norm"]
    assert float(zeroed["prior_mean"].sum()) == 0 == float(zeroed["prior_scale"].sum())
    assert float(zeroed["scale"].sum()) == 3


def test_nuisance_batches_match_the_target_distance_without_class():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(400, 4, 4, 3)) + rng.normal(size=(400, 1, 1, 1))
    for target in (0.1, 0.4):
        batches, info = ablation.nuisance_homogeneous_batches(images, target, 50, 0)
        covered = np.sort(batches.indices[batches.mask])
        np.testing.assert_array_equal(covered, np.arange(400))
        assert info["distance"] == pytest.approx(
            ablation.batch_distance(images, batches)
        )
        assert abs(info["distance"] - target) < 0.05
    # brightness alone: the brightest batch holds the brightest images
    batches, info = ablation.nuisance_homogeneous_batches(images, 10.0, 50, 0)
    assert info["brightness_fraction"] == 1.0
    brightness = images.mean((1, 2, 3))
    assert set(batches.indices[-1]) == set(np.argsort(brightness)[-50:])


def test_a_diverged_grid_point_is_recorded_and_ranks_last(tmp_path, monkeypatch):
    config = configs.get_config("smoke")
    study = runs.Study(config, tmp_path)

    def diverges(run, workdir):
        raise FloatingPointError("training diverged: the mean loss is nan")

    monkeypatch.setattr(ablation.cifar_experiment, "train", diverges)
    record = ablation.lr_run(study, "batch", 0.4)
    assert record["diverged"] and np.isnan(record["train_loss"])
    assert ablation.lr_run(study, "batch", 0.4)["diverged"]  # read, not rerun
    runs.write_json(
        ablation.lr_dir(study, "batch", 0.1) / "lr.json",
        {"holdout_accuracy": 0.2, "train_loss": 2.0},
    )
    assert ablation.best_learning_rate(study, "batch") == 0.1
    markdown = report.ablation_section(
        {
            "ablation_lr": {
                "batch": {
                    "0.1": {"holdout_accuracy": 0.2, "train_loss": 2},
                    "0.4": record,
                }
            }
        },
        config,
    )
    assert any("| batch | 20.00 | diverged | 0.1 (grid edge) |" in x for x in markdown)


def test_tables_take_runs_another_process_finished_while_this_one_ran(
    tmp_path, monkeypatch
):
    # Two processes share a workdir: a run the other process held when this one
    # passed it (no record yet) and finished before this one's end belongs in
    # this one's tables as it does in the count of finished runs.
    from experiments.priors import study as priors_study

    config = configs.get_config("smoke")
    config.parts = "ablation_lr"
    config.ablation_rows = ("batch",)
    config.ablation_learning_rates = (0.1, 0.4)

    def run_or_read(path, run_now, run):
        if "ablation_lr_" not in str(path):  # other parts: none finished
            return None
        record = {"holdout_accuracy": 0.5, "train_loss": 1.0}
        runs.write_json(path, record)
        # lr 0.4: held by the other process when passed, on disk at the end
        return None if "lr0.4" in str(path) else record

    monkeypatch.setattr(priors_study, "run_or_read", run_or_read)
    results = priors.run_study(config, str(tmp_path))
    assert set(results["ablation_lr"]["batch"]) == {"0.1", "0.4"}
    assert results["header"]["finished_runs"]["ablation_lr"] == "2/2"
    markdown = (tmp_path / "results.md").read_text()
    assert "| batch | 50.00 | 50.00 | 0.1 (grid edge) |" in markdown
    # the parts this workdir has no run of get one line, not empty tables
    assert "Sections 1-6 (parts probe, stats, sweep, text): no finished runs" in (
        markdown
    )
    assert "## 1. Test accuracy" not in markdown
    assert "Section 8 (part ablation_text): no finished runs" in markdown
    assert "## 8. Text ablation" not in markdown


def _lr_record(accuracy):
    if accuracy is None:
        return {"holdout_accuracy": float("nan"), "train_loss": float("nan")}
    return {"holdout_accuracy": accuracy, "train_loss": 1.0}


def test_a_grid_grows_past_the_edge_its_best_rate_is_at():
    base = (0.2, 0.4, 0.8)

    def state(accuracies, extend=2):
        records = {r: _lr_record(a) for r, a in accuracies.items()}
        return ablation.grid_rates(base, records, extend)

    assert state({}) == ([0.2, 0.4, 0.8], False)
    # interior best: complete as it is
    assert state({0.2: 0.5, 0.4: 0.7, 0.8: 0.6}) == ([0.2, 0.4, 0.8], True)
    # best at the top: one more rate up, at the grid's ratio
    assert state({0.2: 0.5, 0.4: 0.6, 0.8: 0.7}) == ([0.2, 0.4, 0.8, 1.6], False)
    assert state({0.2: 0.5, 0.4: 0.6, 0.8: 0.7, 1.6: 0.65}) == (
        [0.2, 0.4, 0.8, 1.6],
        True,
    )
    # still the best at the edge: at most `extend` more, then complete there
    grown = {0.2: 0.5, 0.4: 0.6, 0.8: 0.7, 1.6: 0.8, 3.2: 0.9}
    assert state(grown) == ([0.2, 0.4, 0.8, 1.6, 3.2], True)
    assert state(grown, extend=0)[0] == [0.2, 0.4, 0.8]
    # best at the bottom, or every rate diverged: down
    assert state({0.2: 0.7, 0.4: 0.6, 0.8: 0.5})[0] == [0.1, 0.2, 0.4, 0.8]
    diverged = {0.2: None, 0.4: None, 0.8: None, 0.1: None, 0.05: None}
    assert state(diverged) == ([0.05, 0.1, 0.2, 0.4, 0.8], True)
    assert ablation.grid_rates((0.1, 0.4), {0.1: _lr_record(0.6)}, 2) == (
        [0.1, 0.4],
        False,
    )
    assert ablation.grid_rates(
        (0.1, 0.4), {0.1: _lr_record(0.6), 0.4: _lr_record(0.5)}, 1
    ) == ([0.025, 0.1, 0.4], False)


def test_a_study_grows_a_grid_within_one_call(tmp_path, monkeypatch):
    # The grid's edge runs finish, the grid grows, and the new rates run in the
    # same call (not only the next), restored runs included.
    config = configs.get_config("smoke")
    config.parts = "ablation_lr"
    config.ablation_rows = ("batch",)
    config.ablation_learning_rates = (0.1, 0.4)
    config.ablation_lr_extend = 2
    config.ablation_text_norms = ("layer",)  # planned after the grid, not run
    accuracy = {0.1: 0.5, 0.4: 0.6, 1.6: 0.7, 6.4: 0.65}
    ran = []

    def lr_run(study, name, lr):  # as ablation.lr_run: a finished run is read
        path = ablation.lr_dir(study, name, lr) / "lr.json"
        if path.exists():
            return runs.read_json(path)
        ran.append(lr)
        record = _lr_record(accuracy[lr])
        runs.write_json(ablation.lr_dir(study, name, lr) / "lr.json", record)
        return record

    monkeypatch.setattr(ablation, "lr_run", lr_run)
    results = priors.run_study(config, str(tmp_path / "a"))
    assert sorted(ran) == [0.1, 0.4, 1.6, 6.4]
    assert set(results["ablation_lr"]["batch"]) == {"0.1", "0.4", "1.6", "6.4"}
    assert results["header"]["finished_runs"]["ablation_lr"] == "4/4"
    assert ablation.best_learning_rate(runs.Study(config, tmp_path / "a"), "batch") == (
        1.6
    )
    markdown = (tmp_path / "a" / "results.md").read_text()
    assert "| batch | 50.00 | 60.00 | 70.00 | 65.00 | 1.6 |" in markdown
    # a fresh workdir restores every rate, the grown ones too, and runs none
    ran.clear()
    config.restore_from = str(tmp_path / "a" / "results.json")
    again = priors.run_study(config, str(tmp_path / "b"))
    assert ran == []
    assert (
        again["ablation_lr"]["batch"].keys() == results["ablation_lr"]["batch"].keys()
    )


def test_a_paired_run_at_a_rate_the_grid_no_longer_chooses_is_set_aside(tmp_path):
    workdir = tmp_path / "ablation_batch_short_b256_s0"
    runs.write_json(workdir / "ablation.json", {"learning_rate": 0.8})
    ablation.set_aside_other_rate(workdir, 0.8)  # the same rate: kept
    assert (workdir / "ablation.json").exists()
    ablation.set_aside_other_rate(workdir, 1.6)
    assert not workdir.exists()
    moved = tmp_path / "ablation_batch_short_b256_s0.lr0.8"
    assert runs.read_json(moved / "ablation.json") == {"learning_rate": 0.8}
    # an unfinished run (config.json only) at another rate is set aside too
    runs.write_json(workdir / "config.json", {"learning_rate": 0.8})
    ablation.set_aside_other_rate(workdir, 1.6)
    assert (tmp_path / "ablation_batch_short_b256_s0.lr0.8.2").exists()


def test_learning_rate_choice_skips_diverged_runs_and_prefers_smaller_on_ties():
    records = {
        0.1: {"holdout_accuracy": 0.5, "train_loss": 1.0},
        0.4: {"holdout_accuracy": 0.7, "train_loss": float("nan")},
        0.2: {"holdout_accuracy": 0.5, "train_loss": 1.0},
    }
    assert ablation.choose_learning_rate(records) == 0.1
    records[0.2]["holdout_accuracy"] = 0.6
    assert ablation.choose_learning_rate(records) == 0.2


@pytest.mark.slow  # 17 models initialized
def test_ablation_rows_build_their_models():
    from experiments import cifar as cifar_experiment

    config = configs.get_config("quick")
    study = runs.Study(config, pathlib.Path("unused"))
    for name in config.ablation_rows:
        run = ablation.run_config(
            study, name, 0, learning_rate=0.1, epochs=1.0, batch_size=8
        )
        model, _ = cifar_experiment.build_model(run)
        x = np.random.default_rng(0).normal(size=(64, 32, 32, 3)).astype(np.float32)
        variables = model.init(jax.random.key(0), x, train=False)
        assert variables["params"], name
    with pytest.raises(ValueError, match="unknown ablation rows"):
        config.ablation_rows = ("batch", "batchh")
        ablation.selected_rows(config)


def test_ablation_population_rows_share_a_warm_up_scaled_with_the_batch():
    config = configs.get_config("quick")
    study = runs.Study(config, pathlib.Path("unused"))
    for batch_size, warmup in ((256, 100), (8, 3200)):
        run = {
            name: ablation.run_config(
                study, name, 0, learning_rate=0.1, epochs=2.0, batch_size=batch_size
            )
            for name in ("renorm_free", "population")
        }
        assert run["population"].norm_kwargs.warmup_steps == warmup
        assert run["renorm_free"].norm_kwargs.relax[0] == warmup


def test_ablation_full_preset_decays_at_the_same_point_of_every_budget():
    config = configs.get_config("full")
    study = runs.Study(config, pathlib.Path("unused"))
    for epochs in config.ablation_budgets.values():
        run = ablation.run_config(
            study, "batch", 0, learning_rate=0.1, epochs=epochs, batch_size=128
        )
        # ResNet-20's 32k and 48k of 64k steps, whatever the budget
        assert run.boundaries == (0.5, 0.75) and run.num_steps is None
    # the batch-size sweep alike; a boundary the preset's run never reached is
    # dropped (not read as step 1)
    run = runs.cifar_config(config, "batch", 0)
    run.boundaries = (32_000, 64_000, 70_000)
    runs.train_for_epochs(run, 30.0)
    assert run.boundaries == (0.5,) and run.num_epochs == 30.0


def test_norm_input_statistics_are_each_norm_layers_input():
    model = FastCNN(widths=(4, 8, 8), norm="layer")
    x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
    variables = model.init(jax.random.key(1), x, train=False)
    captured = priors.norm_input_statistics(model, variables, x)
    assert set(captured) == {"norm1", "norm2", "norm3"}
    _, state = model.apply(
        variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    conv1 = state["intermediates"]["conv1"]["__call__"][0]
    pooled = max_pool_2x2(conv1)
    mean, std = captured["norm1"]
    np.testing.assert_allclose(mean, pooled.mean((1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, pooled.std((1, 2)), rtol=1e-5, atol=1e-6)
    assert mean.shape == (3, 4)


def test_linear_probe_finds_class_information_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 600)
    informative = rng.normal(size=(600, 20)) + 6 * np.eye(10, 20)[y]
    acc = priors.fit_linear_probe(
        informative[:400], y[:400], informative[400:], y[400:], steps=200, l2=1e-4
    )
    assert acc > 0.9
    noise = rng.normal(size=(600, 20))
    acc = priors.fit_linear_probe(
        noise[:400], y[:400], noise[400:], y[400:], steps=200, l2=1e-4
    )
    assert acc < 0.25


def test_mean_std():
    assert priors.mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)), 2)
    assert priors.mean_std([5.0]) == (5.0, 0.0, 1)
    mean, _, n = priors.mean_std([])
    assert np.isnan(mean) and n == 0


def test_bad_config_is_a_clear_error(tmp_path):
    config = configs.get_config("smoke")
    config.parts = "probe,tokens"
    with pytest.raises(ValueError, match="unknown parts .'tokens'."):
        priors.run_study(config, str(tmp_path))
    config = configs.get_config("smoke")
    config.probe_norms = ("btach",)
    with pytest.raises(ValueError, match="unknown norm 'btach'"):
        priors.run_study(config, str(tmp_path))
    config = configs.get_config("smoke")
    config.seeds = ()
    with pytest.raises(ValueError, match="seeds is empty"):
        priors.run_study(config, str(tmp_path))


def test_presets_give_three_seeds_outside_smoke():
    for preset in ("quick", "full"):
        assert len(configs.get_config(preset).seeds) >= 3
    with pytest.raises(ValueError, match="unknown preset"):
        configs.get_config("medium")


@pytest.mark.slow  # a subprocess holds the lock
@pytest.mark.skipif(runs.fcntl is None, reason="run locks need POSIX flock")
def test_a_run_another_process_holds_is_skipped_until_that_process_dies(tmp_path):
    run_dir = tmp_path / "runs" / "sweep_batch_b2_s0"
    calls = []

    def run(tag):
        calls.append(tag)
        return {"tag": tag}

    assert runs.claimed(run_dir, run, "first") == {"tag": "first"}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            "lock = open(sys.argv[1], 'w')\n"
            "fcntl.flock(lock, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n",
            str(run_dir / "LOCK"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert runs.claimed(run_dir, run, "while held") is None
    finally:
        holder.kill()  # SIGKILL: no clean-up, the kernel drops the lock
        holder.wait()
    assert runs.claimed(run_dir, run, "after") == {"tag": "after"}
    assert calls == ["first", "after"]


def test_text_plots_and_headline_use_the_evaluation_that_matches_training():
    # batch norm and bln normalize with the batch's causal statistics in training;
    # power norm (and causal='running') with running statistics.
    assert priors_text.as_trained("batch") == "val_bits_per_byte_batch"
    assert priors_text.as_trained("batch:per_position") == "val_bits_per_byte_batch"
    assert priors_text.as_trained("bln") == "val_bits_per_byte_batch"
    assert priors_text.as_trained("power") == "val_bits_per_byte"
    assert priors_text.as_trained("batch:running") == "val_bits_per_byte"


def test_the_reading_table_pairs_rows_by_seed_and_bounds_small_differences():
    def runs(*accuracies, **extra):
        return {
            str(s): {"accuracy": a, **{k: v[s] for k, v in extra.items()}}
            for s, a in enumerate(accuracies)
        }

    table = {
        "short b256": {
            "batch": runs(0.80, 0.79, 0.81, accuracy_offset_erased=[0.2, 0.2, 0.2]),
            # +0.1, +0.2, 0.0 points: bounded within ±1 point
            "renorm_free": runs(0.801, 0.792, 0.81),
            # -5, -6, -4 points: a difference
            "population": runs(0.75, 0.73, 0.77),
            "group8": runs(0.70, 0.69, 0.72, accuracy_offset_erased=[0.69, 0.69, 0.71]),
            "mix": runs(0.7, 0.7, mix_weight=[{"a": 0.2, "b": 0.4}, {"a": 0.3}]),
        },
    }
    table = {  # the long budget first, as a results file may hold it
        "long b256": {"batch": runs(0.85), "population": runs(0.80, diverged=[True])},
        **table,
    }
    table["long b256"]["group8"] = runs(0.82, 0.80)  # gap -3, -5 (short -10, -10)
    table["long b256"]["batch"] = runs(0.85, 0.85)
    names = ("batch", "renorm_free", "population", "group8", "mix", "ghost4")
    epochs = {"short": 2.0, "long": 6.0}
    text = "\n".join(report.reading_section(table, names, epochs))
    row = next(x for x in text.splitlines() if "| renorm_free − batch |" in x)
    assert "+0.10 [" in row and "no difference" in row and "within ±1" in row
    assert row.endswith("| — |")  # no seed of the long budget is shared
    row = next(x for x in text.splitlines() if "| population − batch |" in x)
    assert "-5.00 [" in row and "no difference" not in row and "±1" not in row
    assert row.endswith("| — |")  # its long-budget run diverged: not compared
    assert "ghost4" not in text and "online" not in text  # rows not in the study
    assert "mean over layers: seed 0: 0.30, seed 1: 0.30" in text
    # reliance (test - erased): batch 60, 59, 61 points; group8 1, 0, 1
    assert "batch minus group8: +59.33 [" in text
    # the gap to batch norm narrows with the budget: +7, +5 points
    change = next(x for x in text.splitlines() if x.startswith("| group8 | +"))
    assert (
        change.startswith("| group8 | +6.00 [") and "(per seed +7.00, +5.00)" in change
    )
    assert "| row | long b256 vs short b256 |" in text
    assert not any(x.startswith("| population |") for x in text.splitlines())
    # columns by batch size, then budget, whatever order the runs came in
    assert "| reading | a − b | short b256 | long b256 |" in text
    assert report.reading_section({}, names, epochs) == []


def test_the_ablation_headline_leaves_diverged_runs_out_of_n_and_differences():
    config = configs.get_config("smoke")
    known = ablation.rows(config)

    def runs(*accuracies, diverged=()):
        return {
            str(s): {"accuracy": a, **({"diverged": True} if s in diverged else {})}
            for s, a in enumerate(accuracies)
        }

    table = {
        "short b8": {"batch": runs(0.5, 0.6)},
        "short b32": {
            "batch": runs(0.80, 0.79, 0.81),
            "mix": runs(0.70, 0.10, 0.72, diverged=(1,)),  # seed 1 diverged
        },
    }
    names = ("batch", "mix", "none_wn")
    lines = report.ablation_headline(table, names, known, {"short": 1.0})
    header = next(x for x in lines if x.startswith("| row |"))
    separator = next(x for x in lines if x.startswith("| ---"))
    assert header.count("|") == separator.count("|")
    assert "| short b32: test | short b32: Δ vs batch | short b8: test |" in header
    mix = next(x for x in lines if x.startswith("| mix |"))
    assert "71.00 ± 1.41 (n=3, 1 diverged)" in mix
    assert "-9.50 [" in mix and "(per seed -10.00, -9.00)" in mix
    assert mix.endswith("| — | — |")  # not run at batch 8
    assert not any(x.startswith("| none_wn |") for x in lines)  # no runs at all
    batch = next(x for x in lines if x.startswith("| batch |"))
    assert "(baseline)" in batch and "(n=2)" in batch


def test_text_losses_by_position_in_position_order_paired_against_layer():
    def runs(*by_seed):
        return {
            str(s): {"val_loss_by_position": sources}
            for s, sources in enumerate(by_seed)
        }

    def buckets(base):  # out of position order, as a dict may hold them
        return {"16-31": base, "0-7": base + 0.5, "8-15": base + 0.2}

    table = {
        "layer": {"64": runs(*({"batch": buckets(b)} for b in (1.0, 1.1, 1.2)))},
        "batch": {
            "64": runs(
                *(
                    {"batch": buckets(b), "running": buckets(b + 1), "reference": {}}
                    for b in (0.9, 1.0, 1.15)
                )
            )
        },
    }
    text = "\n".join(report._position_tables(table, ("layer", "batch"), ["64", "128"]))
    assert "L=128" not in text  # no runs there
    header = next(x for x in text.splitlines() if x.startswith("| row | evaluation"))
    assert header == "| row | evaluation | 0-7 | 8-15 | 16-31 | n |"
    assert "| layer | as trained | 1.600 ± 0.100 |" in text  # one row per-sample
    assert "| 1.100 ± 0.100 | 3 |" in text  # the layer row's last bucket, 3 seeds
    assert "| layer | population |" not in text
    assert "| batch | population | 2.517 ± 0.126 |" in text
    assert "| batch | reference batch |" not in text  # no buckets recorded: no row
    diff = text.split("As trained minus layer norm")[1]
    # -0.1, -0.1, -0.05 in every bucket: a difference, per seed
    assert "| batch | -0.083 [" in diff and "(per seed -0.100, -0.100, -0.050)" in diff
    assert "no difference" not in diff


def test_paired_differences_with_their_95_percent_interval():
    a = {0: {"x": 1.0}, 1: {"x": 2.0}, 2: {"x": 4.0}, 3: {"x": 9.0}}
    b = {0: {"x": 0.5}, 1: {"x": 1.0}, 2: {"x": 3.0}}  # seed 3 missing: unpaired
    d = report.paired_difference(a, b, "x")
    diffs = np.array([0.5, 1.0, 1.0])
    half = 4.303 * diffs.std(ddof=1) / np.sqrt(3)
    assert d["diffs"] == [0.5, 1.0, 1.0]
    assert d["mean"] == pytest.approx(diffs.mean())
    assert d["interval"] == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    cell = report.difference_cell(d)
    assert cell.startswith("+0.833 [") and "no difference" not in cell
    noisy = report.paired_difference(
        {0: {"x": 1.0}, 1: {"x": -1.0}}, {0: {"x": 0.0}, 1: {"x": 0.0}}, "x"
    )
    assert "no difference" in report.difference_cell(noisy)
    assert report.paired_difference(a, {}, "x") is None
    assert report.difference_cell(None) == "—"


def test_a_study_restores_finished_text_runs_from_earlier_results(tmp_path):
    config = configs.get_config("smoke")
    config.parts = ""  # nothing runs: the tables are rebuilt from what is on disk
    record = {
        "val_bits_per_byte": 2.5,
        "val_bits_per_byte_precise": 2.4,
        "val_bits_per_byte_batch": 2.45,
        "val_loss_by_position": {"running": {"0-7": 1.9}},
    }
    key = priors_text.text_key("tokenizer", "layer", "byte", {})
    previous = tmp_path / "old.json"
    previous.write_text(
        json.dumps(
            {
                "config": json.loads(config.to_json_best_effort()),
                "text": {key: {"0": record}},
            }
        )
    )
    config.restore_from = str(previous)
    out = priors.run_study(config, str(tmp_path / "study"))
    assert out["text"] == {key: {0: record}}
    assert out["header"]["finished_runs"]["text"].startswith("1/")
    summary = tmp_path / "study" / "runs" / "text_layer_byte_s0" / "summary.json"
    assert json.loads(summary.read_text())["restored_from"] == str(previous)
    # sections of parts with no finished run are one line each; the text's shown
    markdown = (tmp_path / "study" / "results.md").read_text()
    assert "Sections 1-2 (parts probe, stats): no finished runs" in markdown
    assert "Sections 3-4 (part sweep): no finished runs" in markdown
    assert "## 5. Text" in markdown and "## 6. Headline" in markdown
    assert "## 1. Test" not in markdown and "## 3-4. Batch-size" not in markdown
    # runs trained with another text configuration are refused, by field
    config.text.num_steps += 1
    with pytest.raises(ValueError, match="differs in num_steps"):
        priors.run_study(config, str(tmp_path / "other"))
    config.restore_from = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        priors.run_study(config, str(tmp_path / "other"))
