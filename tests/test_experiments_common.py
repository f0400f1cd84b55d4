"""experiments.common: the command line every experiment shares."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each case parses flags in a subprocess

PRINT_CONFIG = (
    "from experiments import common\n"
    "common.run_with_flags('experiments/configs/cifar.py:tiny', "
    "lambda c, w: print(sorted(c.norm_kwargs.items()), c.learning_rate, "
    "c.is_locked))\n"
)


def _run(*args):
    return subprocess.run(
        [sys.executable, "-c", PRINT_CONFIG, "--workdir=unused", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_any_norm_option_can_be_set_from_the_command_line():
    done = _run(
        "--config.norm_kwargs.momentum=0.9",
        "--config.norm_kwargs.ghost_batch_size=16",
        "--config.learning_rate=0.2",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "[('ghost_batch_size', 16), ('momentum', 0.9)] 0.2 True"
    )


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
