# %% [md]
# # Replay the priors study
#
# Load the `results.json` of `python -m experiments.priors`, redraw its tables and
# plots, and evaluate one of its models under each statistics source through
# `normjax.calibrate`.
#
# `RESULTS` is a study's `results.json`: by default the `quick` study committed
# under `results/priors_quick/`. Set it to `None` to run a small part of the
# `smoke` study (the statistics-source probe and the statistics classifier, two
# norms) here first.

# %%
RESULTS = "../results/priors_quick/results.json"

# %%
import json
import os
import pathlib
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, no widgets
# experiments/ runs from the repository (pip installs only normjax): its root.
sys.path.insert(0, str(pathlib.Path.cwd().parent))

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from IPython.display import Image, Markdown, display

from experiments import cifar as cifar_experiment
from experiments import priors
from experiments.configs import cifar as cifar_configs
from experiments.configs import priors as priors_configs
from normjax import calibrate
from normjax.data import cifar, samplers

SHARED = pathlib.Path("../../shared/tfds")
DATA_DIR = str(SHARED) if SHARED.exists() else os.environ.get("TFDS_DATA_DIR")
OUT = pathlib.Path(tempfile.mkdtemp(prefix="normjax_priors_"))  # what we write

if RESULTS is not None and not pathlib.Path(RESULTS).exists():
    raise FileNotFoundError(
        f"{RESULTS} does not exist: point RESULTS at a study's results.json "
        "(python -m experiments.priors ... --workdir=DIR writes DIR/results.json), "
        "or set it to None to run the smoke study here."
    )
if RESULTS is None:
    config = priors_configs.get_config("smoke")
    config.data_dir = DATA_DIR
    config.parts = "probe,stats"
    config.probe_norms = ("batch", "layer")
    config.sweep_norms = ()
    config.text_norms = ()
    config.context_norms = ()
    priors.run_study(config, str(OUT))
    RESULTS = OUT / "results.json"
RESULTS = pathlib.Path(RESULTS)
results = json.loads(RESULTS.read_text())
config = ml_collections.ConfigDict(results["config"])
print(RESULTS)
print(json.dumps(results["header"], indent=1))

# %% [md]
# ## The tables
#
# `priors.write_markdown` rebuilds `results.md` from the results; here it is
# rendered in place. Per-sample norms (layer, group, ...) must read the same in
# every column of table 1.

# %%
replayed = OUT / "replayed.md"
priors.write_markdown(results, config, replayed)
display(Markdown(replayed.read_text()))

# %% [md]
# ## The plots

# %%
priors.write_plots(results, config, OUT)
for name in priors.PLOTS:
    display(Image(filename=str(OUT / name)))

# %% [md]
# ## One model, every statistics source
#
# The probe's batch-norm model of the first seed, restored from its checkpoint and
# evaluated through `normjax.calibrate` with running, precise and current-batch
# statistics — and with batches that hold a single class, where the batch's
# statistics are no longer those of the population. The committed study keeps its
# results, not its checkpoints (`results/*/runs/` is not in git): where the
# checkpoint is missing, a small batch-norm model (the CIFAR `tiny` preset's
# network, 300 steps on 10,000 images) is trained here instead, in seconds.

# %%
seed = results["header"]["seeds"][0]
run_dir = RESULTS.parent / "runs" / f"probe_batch_s{seed}"
if (run_dir / "checkpoints").exists():
    run_config = ml_collections.ConfigDict(
        json.loads((run_dir / "config.json").read_text())
    )
    # The run's data_dir may be relative to where the study ran: ours first.
    run_config.data_dir = DATA_DIR or run_config.data_dir
else:
    print(f"no checkpoint in {run_dir}: training the tiny preset's batch-norm model")
    run_dir = OUT / "tiny_batch"
    run_config = cifar_configs.get_config("tiny")
    run_config.data_dir = DATA_DIR
    run_config.norm = "batch"
    run_config.train_subset, run_config.test_subset = 10_000, 1_000
    run_config.num_steps, run_config.eval_batch_size = 300, 500
_, model, task, state = cifar_experiment.train(run_config, str(run_dir))
variables = jax.device_get(state.variables())
test_x = cifar.standardize_images(
    jnp.asarray(task.data.test_images), task.mean, task.std
)
test_y = task.data.test_labels
train_x = cifar.standardize_images(
    jnp.asarray(task.data.train_images[:1024]), task.mean, task.std
)
precise = calibrate.precise_batch_stats(
    model, variables, [train_x[i : i + 256] for i in range(0, 1024, 256)], train=False
)


# One evaluator for every statistics source: it jits the model once per source.
evaluator = calibrate.Evaluator(
    model, method=lambda m, x, mask: m(x, train=False, mask=mask)
)


def accuracy(source, batches):
    logits = np.zeros((len(test_y), 10), np.float32)
    for idx, mask in zip(batches.indices, batches.mask, strict=True):
        out = evaluator(
            variables,
            (test_x[idx], mask),
            source=source,
            precise_stats=precise,
            example_weight=1 / config.cifar.batch_size,
        )
        logits[idx[mask]] = np.asarray(out)[mask]
    return float(np.mean(logits.argmax(-1) == test_y))


mixed = samplers.eval_batches(len(test_y), 50)
homogeneous = samplers.class_homogeneous_eval_batches(test_y, 10, seed=0)
for source in calibrate.SOURCES:
    print(f"{source:16s} statistics, batches of 50: {accuracy(source, mixed):.3f}")
print(f"batch statistics, single-class batches: {accuracy('batch', homogeneous):.3f}")
