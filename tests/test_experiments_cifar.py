"""experiments.cifar end to end on real CIFAR-10 (tiny model, few steps)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tfds_data
from conftest import xla_flags_with_devices
from run_metrics import jsonl_scalars, tensorboard_scalars, train_rows

from experiments import cifar as experiment
from experiments.configs import cifar as configs
from normjax.data.cifar import DataNotFoundError
from normjax.train.resume import ConfigMismatchError

DATA_DIR, _WHY = tfds_data.find("cifar10")
needs_data = tfds_data.needs("cifar10")


def tiny(**overrides):
    config = configs.get_config("tiny")
    config.data_dir = DATA_DIR
    config.update(overrides)
    return config


@needs_data
def test_tiny_run_writes_every_artifact_and_resumes_identically(tmp_path, monkeypatch):
    summary = experiment.run(tiny(), str(tmp_path / "whole"))
    whole = tmp_path / "whole"
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png"):
        assert (whole / name).stat().st_size > 0, name
    assert sorted(os.listdir(whole / "checkpoints")) == ["4", "6"]
    saved = json.loads((whole / "summary.json").read_text())
    for key in ("test_accuracy", "test_accuracy_batch", "test_accuracy_flip"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["num_params"] > 0 and saved["wall_seconds"] > 0
    assert saved == json.loads(json.dumps(summary))

    # Killed after the checkpoint at step 4, restarted: the same later metrics.
    original = experiment.CifarTask.train_batch

    def killed(self, step):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")
        return original(self, step)

    monkeypatch.setattr(experiment.CifarTask, "train_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(tiny(), str(tmp_path / "killed"))
    monkeypatch.setattr(experiment.CifarTask, "train_batch", original)
    resumed = experiment.run(tiny(), str(tmp_path / "killed"))
    assert train_rows(tmp_path / "killed") == train_rows(whole)
    assert resumed["test_accuracy"] == summary["test_accuracy"]
    # Live curves: TensorBoard scalars equal metrics.jsonl, after a resume too.
    for run in (whole, tmp_path / "killed"):
        events, expected = tensorboard_scalars(run / "tensorboard"), jsonl_scalars(run)
        assert events.keys() == expected.keys() and "train/loss" in {
            k for k, _ in events
        }
        np.testing.assert_allclose(
            [events[k] for k in expected], list(expected.values()), rtol=1e-6
        )

    # A changed configuration is refused, naming what differs; the files stay.
    before = {p.name: p.read_bytes() for p in whole.iterdir() if p.is_file()}
    for change, named in (
        ({"learning_rate": 0.2}, "learning_rate: 0.1 in the workdir, 0.2 now"),
        ({"norm": "layer"}, "norm: 'batch' in the workdir, 'layer' now"),
        ({"model": "resnet", "depth": 8}, "model: 'fast_cnn' in the workdir"),
    ):
        with pytest.raises(ConfigMismatchError, match=named) as refused:
            experiment.run(tiny(**change), str(whole))
        assert "--config.resume=force" in str(refused.value)
    after = {p.name: p.read_bytes() for p in whole.iterdir() if p.is_file()}
    assert after == before
    # Fields that cannot change the result may: the finished run, as it was.
    assert experiment.run(tiny(log_every=3, progress=True), str(whole)) == saved
    # A forced resume into another architecture: a clear error, not orbax's.
    with pytest.raises(ValueError, match="does not fit them"):
        experiment.run(tiny(model="resnet", depth=8, resume="force"), str(whole))


@needs_data
def test_unknown_norm_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown norm 'btach'; valid names are"):
        experiment.run(tiny(norm="btach"), str(tmp_path))


def test_missing_dataset_is_a_clear_error(tmp_path):
    config = tiny()
    config.data_dir, config.download = str(tmp_path / "empty"), False
    with pytest.raises(DataNotFoundError, match="TFDS_DATA_DIR"):
        experiment.run(config, str(tmp_path / "run"))


_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from experiments import cifar as experiment
    from experiments.configs import cifar as configs
    config = configs.get_config("tiny")
    config.data_dir, config.num_steps = sys.argv[2], 3
    experiment.run(config, sys.argv[1])
    """
)


def _losses(devices, workdir):
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags_with_devices(devices),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(workdir), DATA_DIR],
        env=env,
        check=True,
        capture_output=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    return [r["loss"] for r in train_rows(workdir)]


@needs_data
def test_eight_simulated_devices_match_one_device(tmp_path):
    one = _losses(1, tmp_path / "one")
    eight = _losses(8, tmp_path / "eight")
    np.testing.assert_allclose(eight, one, rtol=1e-4, atol=1e-5)


def test_ghost_and_per_device_statistics_reach_the_norm():
    config = configs.get_config("tiny")
    config.ghost_batch_size = 8
    model, _ = experiment.build_model(config)
    assert model.norm_kwargs["ghost_batch_size"] == 8
    config = configs.get_config("tiny")
    config.per_device_batch_stats = True
    model, _ = experiment.build_model(config)
    assert model.norm_kwargs["ghost_batch_size"] == config.batch_size  # 1 device
    config.norm = "layer"
    with pytest.raises(ValueError, match="no per-device or ghost batch statistics"):
        experiment.build_model(config)


def test_layers_follow_the_backend_unless_the_config_says():
    import flax.linen as nn

    from normjax.models import layers

    config = configs.get_config("tiny")
    model, _ = experiment.build_model(config)
    assert (model.conv, model.pool) == (layers.Conv, layers.max_pool_2x2)  # CPU
    config.layers = "flax"
    model, _ = experiment.build_model(config)
    assert model.conv is nn.Conv and model.pool is layers.flax_max_pool_2x2
    config.model = "resnet"
    assert experiment.build_model(config)[0].conv is nn.Conv


def test_weight_norm_wraps_every_trained_convolution():
    import jax

    config = configs.get_config("tiny")
    config.norm, config.weight_norm = "none", True
    model, _ = experiment.build_model(config)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    params = model.init(jax.random.key(0), x, train=False)["params"]
    for stage in ("conv1", "conv2", "conv3"):
        layer = params[stage]["weight_norm"]
        assert layer["layer_instance/kernel/scale"].shape == (
            layer["layer_instance"]["kernel"].shape[-1],
        )


def test_holdout_split_is_fixed_disjoint_and_refuses_bad_sizes():
    import dataclasses

    rng = np.random.default_rng(0)
    n = 50
    images = np.arange(n)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    data = experiment.cifar.Cifar10(
        train_images=images.astype(np.uint8),
        train_labels=rng.integers(0, 10, n).astype(np.int32),
        test_images=np.zeros((4, 2, 2, 3), np.uint8),
        test_labels=np.zeros(4, np.int32),
        mean=np.zeros(3, np.float32),
        std=np.ones(3, np.float32),
        class_names=tuple(map(str, range(10))),
        data_dir="",
    )
    split = experiment.holdout_split(data, 10)
    again = experiment.holdout_split(data, 10)
    train_ids = split.train_images[:, 0, 0, 0].tolist()
    held_ids = split.test_images[:, 0, 0, 0].tolist()
    assert len(train_ids) == 40 and len(held_ids) == 10
    assert sorted(train_ids + held_ids) == list(range(n))
    assert held_ids == again.test_images[:, 0, 0, 0].tolist()
    np.testing.assert_array_equal(split.test_labels, data.train_labels[held_ids])
    assert dataclasses.replace(split).mean is data.mean
    for bad in (n, -1):
        with pytest.raises(ValueError, match="holdout="):
            experiment.holdout_split(data, bad)
