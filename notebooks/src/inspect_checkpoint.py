# %% [md]
# # Inspect a checkpoint
#
# Restore an orbax checkpoint written by `python -m experiments.cifar`, look at its
# `params` and `batch_stats` trees, plot every layer's running statistics, compare
# them with precise statistics recomputed over training images, and look at what
# batch statistics carry that per-sample statistics do not: how far the samples of
# each class sit from the population.
#
# Set `WORKDIR` to the workdir of a CIFAR run to inspect it; left at `None`, the
# notebook trains a tiny batch-norm model for a few steps first.

# %%
WORKDIR = None  # e.g. "../runs/cifar_bn"

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
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

import normjax
from experiments import cifar as cifar_experiment
from experiments import priors
from experiments.configs import cifar as cifar_configs
from normjax import calibrate
from normjax.data import cifar

# The TFDS data: ../shared/tfds beside the repository on our machines, else
# $TFDS_DATA_DIR, else TFDS's default directory (downloaded there).
SHARED = pathlib.Path("../../shared/tfds")
DATA_DIR = str(SHARED) if SHARED.exists() else os.environ.get("TFDS_DATA_DIR")

if WORKDIR is None:
    WORKDIR = tempfile.mkdtemp(prefix="normjax_inspect_")
    config = cifar_configs.get_config("tiny")
    config.update(
        data_dir=DATA_DIR,
        norm="batch",
        train_subset=2000,
        test_subset=500,
        eval_batch_size=500,
        num_steps=60,
        log_every=20,
        checkpoint_every=20,
    )
    cifar_experiment.run(config, WORKDIR)
print("workdir:", WORKDIR)

# %% [md]
# ## Restore
#
# `experiments.cifar.train` rebuilds the model and task from the run's
# `config.json` and, the run being finished, restores its last checkpoint
# instead of training (it evaluates it again on the way).

# %%
config = ml_collections.ConfigDict(
    json.loads((pathlib.Path(WORKDIR) / "config.json").read_text())
)
summary, model, task, state = cifar_experiment.train(config, WORKDIR)
variables = jax.device_get(state.variables())
print(f"step {int(state.step)}: test accuracy {summary['test_accuracy']:.3f}")
print("collections:", sorted(variables))

# %% [md]
# ## The trees
#
# Shapes of every collection, and Flax's own table of the model.

# %%
for collection in ("params", "batch_stats"):
    print(f"--- {collection}")
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        print(f"{name:40s} {str(leaf.shape):14s} {leaf.dtype}")

# %%
images = cifar.standardize_images(
    jnp.asarray(task.data.train_images[:2048]), task.mean, task.std
)
print(
    model.tabulate(
        jax.random.key(0),
        images[:2],
        train=False,
        depth=1,
        console_kwargs={"force_terminal": False, "width": 160},
    )
)

# %% [md]
# ## Running statistics, layer by layer

# %%
layers = sorted(variables["batch_stats"])
fig, axes = plt.subplots(len(layers), 2, figsize=(10, 2.2 * len(layers)), squeeze=False)
for row, layer in zip(axes, layers, strict=True):
    running = variables["batch_stats"][layer]
    row[0].bar(np.arange(running["mean"].size), running["mean"])
    row[0].set_title(f"{layer}: running mean")
    row[1].bar(np.arange(running["var"].size), running["var"], color="tab:orange")
    row[1].set_title(f"{layer}: running var")
fig.tight_layout()
plt.show()

# %% [md]
# ## Running vs precise statistics
#
# Precise statistics (Wu & Johnson 2021) pool each layer's input over training
# batches with the final weights; the running averages lag behind the weights.

# %%
batches = [images[i : i + 256] for i in range(0, len(images), 256)]
precise = calibrate.precise_batch_stats(model, variables, batches, train=False)
for layer in layers:
    run, pre = variables["batch_stats"][layer], precise[layer]
    dmean = np.abs(run["mean"] - pre["mean"]).mean() / np.sqrt(pre["var"]).mean()
    ratio = (run["var"] / pre["var"]).mean()
    print(
        f"{layer}: |running - precise| mean / std = {dmean:.3f}, "
        f"running / precise var = {ratio:.3f}"
    )

test_x = cifar.standardize_images(
    jnp.asarray(task.data.test_images), task.mean, task.std
)
test_y = task.data.test_labels
for source in calibrate.SOURCES:
    logits = calibrate.evaluate(
        model,
        variables,
        test_x,
        source=source,
        precise_stats=precise,
        example_weight=1 / config.batch_size,  # read by 'example_weighted' only
        train=False,
    )
    accuracy = np.mean(logits.argmax(-1) == test_y)
    print(f"{source:16s} statistics: accuracy {accuracy:.3f}")

# %% [md]
# ## What batch statistics carry: how far each class sits from the population
#
# Each batch-statistics layer sows the statistics it normalized with into the
# `'moments'` collection; `priors.norm_input_statistics` records, at every norm
# layer, each sample's
# per-channel mean and std of the layer's input. Batch norm normalizes every
# sample with the batch's (population's) statistics instead, so each sample keeps
# its offset from the typical sample. Below: the per-sample means against the
# population mean, and, per class, the average offset in population standard
# deviations — large where a class deviates from the population in its own way.

# %%
# The batch statistics each batch-statistics layer computed, sown into the
# 'moments' collection when it is mutable (here for one batch of 500 test images).
with normjax.nn.statistics_source("batch"):
    _, sown = model.apply(variables, test_x[:500], train=False, mutable=["moments"])
for layer, m in sorted(sown["moments"].items()):
    running = float(variables["batch_stats"][layer]["mean"][0])
    # pooled moments record a count; statistics averaged over batches (ghost
    # batches, per-position prefixes) a weight
    size = f"count {float(m['count'][0]):.0f}" if "count" in m else "one batch"
    print(
        f"{layer}: {size} per channel, batch mean of "
        f"channel 0 {float(m['mean'][0]):+.3f} (running {running:+.3f})"
    )

per_sample = priors.norm_input_statistics(model, variables, test_x)
offsets = np.zeros((len(per_sample), 10))
for i, (_, (mean, _)) in enumerate(sorted(per_sample.items())):
    pop_mean = np.asarray(mean).mean(0)
    pop_std = np.asarray(mean).std(0) + 1e-6
    z = (np.asarray(mean) - pop_mean) / pop_std
    for c in range(10):
        offsets[i, c] = np.sqrt(np.mean(z[test_y == c].mean(0) ** 2))

fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
first = sorted(per_sample)[0]
mean0 = np.asarray(per_sample[first][0])
axes[0].hist(mean0[:, 0], bins=40, alpha=0.7, label="each sample")
axes[0].axvline(variables["batch_stats"][first]["mean"][0], color="k", label="running")
axes[0].axvline(
    sown["moments"][first]["mean"][0], color="r", linestyle="--", label="this batch"
)
axes[0].set_title(f"{first}, channel 0: per-sample means vs population")
axes[0].legend()
image = axes[1].imshow(offsets, aspect="auto", cmap="viridis")
axes[1].set_yticks(range(len(per_sample)), sorted(per_sample))
axes[1].set_xticks(range(10), task.data.class_names, rotation=45, ha="right")
axes[1].set_title("class offset from the population (RMS z over channels)")
fig.colorbar(image, ax=axes[1])
fig.tight_layout()
plt.show()
