"""normjax.train: the shared loop, on a synthetic task (CIFAR/text have their own)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags_with_devices
from run_metrics import jsonl_scalars, tensorboard_scalars
from synthetic_task import Net, SyntheticTask, config

from normjax import train
from normjax.train import loop, resume
from normjax.train.state import make_schedule


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    task = SyntheticTask(config())
    model = Net()
    tx = train.make_optimizer(config(schedule="constant"), 100)
    state = train.create_train_state(
        model, jax.random.key(0), task.init_args(), tx, train=False
    )
    step = jax.jit(loop.make_train_step(model, task))
    batch = task.train_batch(0)
    losses = []
    for i in range(20):
        state, metrics = step(state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 20
    assert np.any(state.batch_stats["BatchNorm_0"]["mean"] != 0)


def test_run_writes_every_artifact(tmp_path):
    summary = train.train_and_evaluate(
        config(), tmp_path, Net(), SyntheticTask(config())
    )
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 16
    records = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in records if r["split"] == "test"] == [4, 8]
    assert {"loss", "accuracy"} <= set(records[0])
    # throughput from the second logged interval on (the first compiles), and
    # never a NaN in the metrics file (strict JSON)
    assert "examples_per_second" not in records[0]
    assert all(
        r["examples_per_second"] > 0 for r in records[1:] if r["split"] == "train"
    )
    json.loads(
        "[" + ",".join((tmp_path / "metrics.jsonl").read_text().splitlines()) + "]",
        parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"),
    )
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert {
        "test_accuracy",
        "wall_seconds",
        "examples_per_second",
        "num_params",
    } <= set(saved)
    assert (
        saved["finalized"] and saved["num_params"] == 8 * 16 + 16 + 16 * 2 + 16 * 3 + 3
    )
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "8"]  # keep 2


def test_killed_run_resumes_and_matches_an_uninterrupted_run(tmp_path):
    whole = train.train_and_evaluate(
        config(), tmp_path / "whole", Net(), SyntheticTask(config())
    )
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(
            config(), tmp_path / "killed", Net(), SyntheticTask(config(), crash_at=5)
        )
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["2", "4"]
    resumed = train.train_and_evaluate(
        config(), tmp_path / "killed", Net(), SyntheticTask(config())
    )

    def rows(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [
            {k: v for k, v in json.loads(x).items() if k != "examples_per_second"}
            for x in lines
        ]

    assert rows("killed") == rows("whole")  # no duplicated or missing steps either
    assert resumed["test_accuracy"] == whole["test_accuracy"]


def test_a_finished_run_is_restored_as_it_was_and_its_files_left_alone(tmp_path):
    summary, state = train.train_and_evaluate(
        config(), tmp_path, Net(), SyntheticTask(config()), return_state=True
    )
    files = ("config.json", "metrics.jsonl", "summary.json")
    before = {name: (tmp_path / name).read_text() for name in files}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train or evaluate")

    task = SyntheticTask(config())
    task.train_batch = task.evaluate = no_training
    again, restored = train.train_and_evaluate(
        config(progress=False), tmp_path, Net(), task, return_state=True
    )
    assert again == json.loads(json.dumps(summary))  # the training's wall time too
    assert {name: (tmp_path / name).read_text() for name in files} == before
    for a, b in zip(
        jax.tree.leaves(state.variables()),
        jax.tree.leaves(restored.variables()),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_a_changed_configuration_is_refused_and_force_continues(tmp_path):
    train.train_and_evaluate(config(), tmp_path, Net(), SyntheticTask(config()))
    saved = (tmp_path / "config.json").read_text()
    changed = config(learning_rate=0.2, seed=1)
    with pytest.raises(resume.ConfigMismatchError) as refused:
        train.train_and_evaluate(changed, tmp_path, Net(), SyntheticTask(changed))
    message = str(refused.value)
    assert "learning_rate: 0.1 in the workdir, 0.2 now" in message
    assert "seed: 0 in the workdir, 1 now" in message
    assert "--config.resume=force" in message and "--workdir" in message
    assert (tmp_path / "config.json").read_text() == saved
    # intervals and progress bars cannot change the result
    neutral = config(log_every=3, checkpoint_every=4, progress=True)
    train.train_and_evaluate(neutral, tmp_path, Net(), SyntheticTask(neutral))
    # forced: two more steps with the new configuration, recorded as such
    forced = config(learning_rate=0.2, num_steps=10, resume="force")
    summary = train.train_and_evaluate(forced, tmp_path, Net(), SyntheticTask(forced))
    assert summary["final_step"] == 10
    assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 0.2
    with pytest.raises(ValueError, match="resume='bogus'"):
        bogus = config(resume="bogus")
        train.train_and_evaluate(bogus, tmp_path, Net(), SyntheticTask(bogus))


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    train.train_and_evaluate(config(), tmp_path, Net(), SyntheticTask(config()))
    # the same configuration, another network: orbax's tree mismatch, explained
    with pytest.raises(ValueError, match="not be restored into this model and"):
        train.train_and_evaluate(
            config(), tmp_path, Net(norm="layer"), SyntheticTask(config())
        )


def test_a_diverging_run_stops_with_a_clear_error(tmp_path):
    with pytest.raises(FloatingPointError, match="training diverged.*learning rate"):
        train.train_and_evaluate(
            config(learning_rate=1e30), tmp_path, Net(), SyntheticTask(config())
        )
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert "NaN" in records[-1] or "Infinity" in records[-1]
    assert not (tmp_path / "summary.json").exists()


def test_resume_differences_flatten_nested_keys():
    saved = {"norm": "batch", "norm_kwargs": {}, "log_every": 5, "cifar": {"lr": 1}}
    now = {"norm": "batch", "norm_kwargs": {"momentum": 0.9}, "log_every": 9}
    assert resume.differences(saved, now) == {
        "norm_kwargs.momentum": ("(absent)", 0.9),
        "cifar.lr": (1, "(absent)"),
    }


def test_keys_added_later_match_their_old_behaviour_when_absent():
    saved = {"norm": "batch", "cifar": {"lr": 1}}  # made before the keys existed
    now = {"norm": "batch", "holdout": 0, "cifar": {"lr": 1, "weight_norm": False}}
    assert resume.differences(saved, now) == {}
    now["cifar"]["weight_norm"] = True
    assert resume.differences(saved, now) == {"cifar.weight_norm": (False, True)}


def test_power_norm_state_is_updated_through_the_loop(tmp_path):
    model = Net(norm="power")
    task = SyntheticTask(config())
    tx = train.make_optimizer(config(), 10)
    state = train.create_train_state(
        model, jax.random.key(0), task.init_args(), tx, train=False
    )
    assert state.perturbations  # the side channel exists
    step = jax.jit(loop.make_train_step(model, task))
    state, _ = step(state, task.train_batch(0), jax.random.key(0))
    state, _ = step(state, task.train_batch(1), jax.random.key(1))
    assert np.any(np.asarray(state.batch_stats["PowerNorm_0"]["nu"]) != 0)


def test_batch_size_must_divide_over_devices():
    mesh = jax.make_mesh((1,), ("data",))
    loop.check_batch_size(16, mesh)
    fake = type("Mesh", (), {"devices": np.zeros(8)})()
    with pytest.raises(
        ValueError, match="batch_size=12 does not divide over 8 devices"
    ):
        loop.check_batch_size(12, fake)


def test_unknown_optimizer_and_schedule():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        train.make_optimizer(config(optimizer="lamb"), 10)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        train.make_optimizer(config(schedule="step"), 10)


def test_piecewise_boundaries_in_steps_or_as_fractions_of_the_run():
    steps = config(
        schedule="piecewise", learning_rate=1.0, decay_factor=0.1, warmup_steps=0
    )
    steps.boundaries = (50, 75)
    fractions = config(
        schedule="piecewise", learning_rate=1.0, decay_factor=0.1, warmup_steps=0
    )
    fractions.boundaries = (0.5, 0.75)
    for c in (steps, fractions):
        schedule = make_schedule(c, 100)
        lrs = [float(schedule(t)) for t in (0, 49, 50, 74, 75, 99)]
        np.testing.assert_allclose(lrs, [1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
    # fractions follow the run's length
    schedule = make_schedule(fractions, 1000)
    assert float(schedule(499)) == 1.0 and float(schedule(500)) == pytest.approx(0.1)
    # two boundaries on one step (a short run) decay twice there
    schedule = make_schedule(fractions, 2)
    assert float(schedule(0)) == 1.0 and float(schedule(1)) == pytest.approx(0.01)


_DEVICES_SCRIPT = textwrap.dedent(
    """
    import json, sys, jax, numpy as np
    sys.path.insert(0, {tests!r})
    from synthetic_task import Net, SyntheticTask, config
    from normjax import train
    c = config(batch_size=16, num_steps=4, eval_every=0)
    summary = train.train_and_evaluate(c, sys.argv[1], Net(), SyntheticTask(c))
    result = {{"devices": jax.device_count(), "accuracy": summary["test_accuracy"]}}
    print(json.dumps(result))
    """
)


def _run_on_devices(n, workdir):
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags_with_devices(n),
    }
    script = _DEVICES_SCRIPT.format(tests=os.path.dirname(__file__))
    out = subprocess.run(
        [sys.executable, "-c", script, str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == n
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.slow  # subprocesses with 1 and 8 simulated devices
def test_eight_simulated_devices_match_one_device(tmp_path):
    one = _run_on_devices(1, tmp_path / "one")
    eight = _run_on_devices(8, tmp_path / "eight")
    # Global-batch statistics: the same numbers up to float32 reduction order.
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-6)
    assert jnp.isfinite(jnp.asarray(one)).all()


def test_metrics_mirror_into_tensorboard_and_a_resume_rewrites_the_curves(tmp_path):
    log = train.MetricsLog(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        log.write(step, "train", loss=1.0 / step, note="text", flag=True)
    log.write(3, "test", accuracy=0.5)
    log.truncate_after(2)  # a resume from step 2: step 3 is gone everywhere
    log.write(3, "train", loss=0.25)
    log.close()
    events = tensorboard_scalars(tmp_path / "tensorboard")
    assert events == {
        ("train/loss", 1): 1.0,
        ("train/loss", 2): 0.5,
        ("train/loss", 3): 0.25,
    }
    assert events == jsonl_scalars(tmp_path)
    quiet = tmp_path / "quiet"
    train.MetricsLog(quiet).write(1, "train", loss=1.0)
    assert not (quiet / "tensorboard").exists()


def test_a_writer_reopened_within_the_same_second_keeps_the_earlier_events(tmp_path):
    # The training loop closes the log, then writes the final evaluation: event
    # files are named by the second they open in, so a second writer in that
    # second reopened (and truncated) the first one's file.
    log = train.MetricsLog(tmp_path, tensorboard=True)
    log.write(1, "train", loss=1.0)
    log.close()
    log.write(1, "test", accuracy=0.5)
    log.close()
    events = tensorboard_scalars(tmp_path / "tensorboard")
    assert events == {("train/loss", 1): 1.0, ("test/accuracy", 1): 0.5}
