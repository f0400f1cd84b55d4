"""experiments.common: the command line every experiment shares."""

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each case parses flags in a subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRINT_CONFIG = (
    "from experiments import common\n"
    "common.run_with_flags('cifar', "
    "lambda c, w: print('RUN', sorted(c.norm_kwargs.items()), c.learning_rate, "
    "c.is_locked))\n"
)


def _run(*args, cwd=ROOT, module=None):
    # From another directory, the repository is on the path as for `pip -e`.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = ["-m", module] if module else ["-c", PRINT_CONFIG, "--workdir=unused"]
    return subprocess.run(
        [sys.executable, *command, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )


def _result(done):
    return next(line for line in done.stdout.splitlines() if line.startswith("RUN "))


def test_any_norm_option_can_be_set_from_the_command_line():
    done = _run(
        "--config=experiments/configs/cifar.py:tiny",
        "--config.norm_kwargs.momentum=0.9",
        "--config.norm_kwargs.ghost_batch_size=16",
        "--config.learning_rate=0.2",
    )
    assert done.returncode == 0, done.stderr
    assert _result(done) == "RUN [('ghost_batch_size', 16), ('momentum', 0.9)] 0.2 True"


def test_default_config_is_found_from_the_package_and_printed_first(tmp_path):
    done = _run("--config.norm=layer", cwd=tmp_path)  # no experiments/ here
    assert done.returncode == 0, done.stderr
    assert _result(done) == "RUN [] 0.4 True"  # the quick preset's learning rate
    printed = done.stdout.split("RUN ")[0]
    assert "configuration (" in printed and "experiments/configs/cifar.py:quick" in (
        printed
    )
    assert "norm: layer" in printed and "learning_rate: 0.4" in printed


@pytest.mark.parametrize(
    "experiment, presets, key",
    [
        ("cifar", ("quick", "full", "tiny"), "eval_sources"),
        ("text", ("quick", "full", "tiny"), "causal"),
        ("priors", ("quick", "full", "smoke"), "parts"),
    ],
)
def test_help_names_presets_and_main_keys(tmp_path, experiment, presets, key):
    done = _run("--help", cwd=tmp_path, module=f"experiments.{experiment}")
    text = done.stdout + done.stderr  # (absl exits with status 1 after --help)
    assert "Traceback" not in text, text
    assert f"presets (--config=experiments/configs/{experiment}.py:PRESET" in text
    for preset in presets:
        assert f"\n  {preset} " in text, preset
    assert "\n  norm " in text or experiment == "priors"
    assert f"\n  {key} " in text
    assert "--workdir" in text and "--config" in text


def test_a_misspelt_key_is_a_usage_error_naming_the_right_one():
    done = _run("--config.learning_rat=0.2")
    assert done.returncode != 0
    assert "has no key 'learning_rat'" in done.stderr
    assert "Did you mean learning_rate?" in done.stderr


def test_mix_summary_reports_each_mix_layers_mean_weight():
    import jax
    import jax.numpy as jnp

    from experiments import common
    from normjax.models import FastCNN

    model = FastCNN(widths=(4, 8, 8), norm="mix")
    variables = model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)
    summary = common.mix_summary(variables["params"])
    assert set(summary) == {"mix_weight"} and len(summary["mix_weight"]) == 3
    assert all(w == 0.5 for w in summary["mix_weight"].values())  # sigmoid(0)
    assert common.mix_summary({"dense": {"kernel": jnp.ones(3)}}) == {}
