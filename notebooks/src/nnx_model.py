# %% [md]
# # normjax in a Flax NNX model
#
# A small CNN written by hand in Flax NNX with normjax norms as its layers
# (`normjax.nnx`): trained with `nnx.Optimizer` under `nnx.jit`, its running
# statistics read as `nnx.BatchStat` state, then evaluated with the statistics of
# its batch-norm layers taken from each source `normjax.nnx.Evaluator` offers —
# running averages, precise (recomputed) statistics, the current batch, and
# example weighting — without changing the model.

# %%
import os
import pathlib
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, no widgets

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import normjax.nnx as nj
from normjax.data import cifar

np.set_printoptions(precision=3, suppress=True)

SHARED = pathlib.Path("../../shared/tfds")
DATA_DIR = str(SHARED) if SHARED.exists() else os.environ.get("TFDS_DATA_DIR")
data = cifar.load_cifar10(DATA_DIR, train_subset=2048, test_subset=1000, download=True)
x_train = np.asarray(cifar.standardize_images(data.train_images, data.mean, data.std))
x_test = np.asarray(cifar.standardize_images(data.test_images, data.mean, data.std))
y_train, y_test = data.train_labels, data.test_labels
print(x_train.shape, x_test.shape)

# %% [md]
# ## The model
#
# Each norm is an NNX module: `nj.BatchNorm(num_features, ...)` with
# `flax.nnx.BatchNorm`'s arguments, or any registered norm by name with
# `nj.make_norm(name, num_features, ...)`. `scale`/`bias` are `nnx.Param`, the
# running `mean`/`var` are `nnx.BatchStat`, and `model.train()` /
# `model.eval()` switch every one of them between batch and running statistics.


# %%
class CNN(nnx.Module):
    def __init__(self, norm: str = "batch", *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
        self.norm1 = nj.make_norm(norm, 16, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
        self.norm2 = nj.make_norm(norm, 32, rngs=rngs)
        self.conv3 = nnx.Conv(32, 64, (3, 3), strides=(2, 2), rngs=rngs)
        self.norm3 = nj.make_norm(norm, 64, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x_BxHxWxC):
        x = nnx.relu(self.norm1(self.conv1(x_BxHxWxC)))
        x = nnx.relu(self.norm2(self.conv2(x)))  # 16 x 16
        x = nnx.relu(self.norm3(self.conv3(x)))  # 8 x 8
        return self.head(jnp.mean(x, axis=(1, 2)))


model = CNN("batch", rngs=nnx.Rngs(0))
print(type(model.norm1).__name__, "momentum", model.norm1.linen_module.momentum)

# %% [md]
# ## Training
#
# The usual NNX step: `nnx.value_and_grad` differentiates with respect to the
# `nnx.Param`s, and the running statistics the forward pass updates are written
# back into the model by `nnx.jit`. 48 steps of 128 images (3 epochs of the
# 2048-image subset).

# %%
BATCH = 128
optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


initial_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
rng = np.random.default_rng(0)
model.train()
start, losses = time.perf_counter(), []
for _epoch in range(3):
    order = rng.permutation(len(x_train))
    for rows in order.reshape(-1, BATCH):
        losses.append(float(train_step(model, optimizer, x_train[rows], y_train[rows])))
print(f"{len(losses)} steps in {time.perf_counter() - start:.1f} s")
print(
    "loss, first and last 4 steps:", np.round(losses[:4], 3), np.round(losses[-4:], 3)
)

# %% [md]
# ## The `nnx.BatchStat` state
#
# The running statistics live in the model, one `mean`/`var` pair per norm, at
# the attribute paths of the modules that hold them.

# %%
batch_stats = nnx.state(model, nnx.BatchStat)
print(jax.tree.map(jnp.shape, nnx.to_pure_dict(batch_stats)))
running = nnx.to_pure_dict(batch_stats)
for layer in sorted(running):
    stats = running[layer]
    init = initial_stats[layer]
    print(
        f"{layer}: mean[:4] {np.asarray(stats['mean'][:4])} "
        f"var[:4] {np.asarray(stats['var'][:4])} "
        f"(initial mean {float(init['mean'][0]):.0f}, var {float(init['var'][0]):.0f})"
    )

# %% [md]
# ## Precise statistics
#
# With the default momentum of 0.99, 48 steps leave the running averages with
# 0.99⁴⁸ ≈ 62 % of their initial values (mean 0, variance 1) — and what remains
# averages features from the weights of earlier steps. Precise statistics
# (Wu & Johnson 2021) recompute each layer's population statistics with the
# final weights: the moments of its input over 16 training batches of the
# training size, merged exactly. `nj.precise_batch_stats` returns them as a pure
# dict of the `nnx.BatchStat` state; `nj.calibrate` would also write them into
# the model.

# %%
model.eval()
train_batches = [x_train[i : i + BATCH] for i in range(0, len(x_train), BATCH)]
precise = nj.precise_batch_stats(model, train_batches)
for layer in sorted(precise):
    gap = np.abs(precise[layer]["mean"] - running[layer]["mean"])
    ratio = precise[layer]["var"] / running[layer]["var"]
    print(
        f"{layer}: max |precise - running| mean {gap.max():.3f}, "
        f"precise / running var: median {np.median(ratio):.2f}"
    )

# %% [md]
# ## Every statistics source
#
# `nj.Evaluator(model)` runs the model with its batch-norm layers reading
# `'running'` statistics, `'precise'` ones, the statistics of the current
# `'batch'` (here batches of 125 test images, and the whole 1000 as one batch),
# or `'example_weighted'`: each test image normalized by 1/128 of its own
# statistics and 127/128 of the population's (running, or precise if given) —
# in expectation what training normalized it with (Summers & Dinneen 2020). It
# reads the model's current state and never writes it.

# %%
evaluator = nj.Evaluator(model)
test_batches = np.split(np.arange(len(x_test)), 8)


def accuracy(source, batches=test_batches, **kwargs):
    correct = 0
    for rows in batches:
        logits = evaluator(x_test[rows], source=source, **kwargs)
        correct += int(np.sum(np.asarray(logits).argmax(-1) == y_test[rows]))
    return correct / len(x_test)


weight = 1 / BATCH
results = {
    "running": accuracy("running"),
    "precise": accuracy("precise", precise_stats=precise),
    "batch (125 images)": accuracy("batch"),
    "batch (1000 images)": accuracy("batch", batches=[np.arange(len(x_test))]),
    "example_weighted (running)": accuracy("example_weighted", example_weight=weight),
    "example_weighted (precise)": accuracy(
        "example_weighted", example_weight=weight, precise_stats=precise
    ),
}
print(f"{'statistics source':28s} test accuracy")
for source, value in results.items():
    print(f"{source:28s} {value:.3f}")

# %% [md]
# `nj.load_batch_stats` writes the precise statistics into the model
# (`nj.calibrate(model, train_batches)` is `precise_batch_stats` then this),
# after which the plain running-statistics evaluation, `model(x)` in eval mode,
# uses them:

# %%
nj.load_batch_stats(model, precise)
print(f"running statistics after load_batch_stats: {accuracy('running'):.3f}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.barh(list(results), list(results.values()), color="tab:blue")
ax1.invert_yaxis()
ax1.set_xlabel("test accuracy (1000 images)")
ax1.set_title("one trained model, six statistics sources")
for layer, color in zip(sorted(running), ("C0", "C1", "C2"), strict=True):
    ax2.scatter(
        running[layer]["mean"],
        precise[layer]["mean"],
        s=8,
        color=color,
        label=layer,
    )
lims = ax2.get_xlim()
ax2.plot(lims, lims, "k--", lw=0.8)
ax2.set_xlabel("running mean")
ax2.set_ylabel("precise mean")
ax2.set_title("per-channel means after 48 steps")
ax2.legend()
plt.tight_layout()
plt.show()
