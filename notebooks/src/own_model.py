# %% [md]
# # normjax in your own model
#
# Two ways in: the functional API, with the running statistics as an explicit
# pytree you thread through your own jitted train step; and the drop-in Flax
# layers, replacing `flax.linen` norms in a model you define — including loading
# variables that Flax's own layers made.

# %%
import os
import pathlib
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, no widgets

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import normjax
from normjax import functional as F
from normjax.data import cifar

SHARED = pathlib.Path("../../shared/tfds")
DATA_DIR = str(SHARED) if SHARED.exists() else os.environ.get("TFDS_DATA_DIR")
data = cifar.load_cifar10(DATA_DIR, train_subset=4096, test_subset=1000, download=True)
x_train = np.asarray(cifar.standardize_images(data.train_images, data.mean, data.std))
x_test = np.asarray(cifar.standardize_images(data.test_images, data.mean, data.std))
x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
y_train, y_test = data.train_labels, data.test_labels
print(x_train.shape, x_test.shape)

# %% [md]
# ## 1. The functional API: batch statistics in your hands
#
# A two-layer MLP written by hand. `F.batch_norm(x, params, batch_stats,
# train=...)` returns the output `y`, the new running statistics `batch_stats`
# and the batch `moments` behind them; the train step carries the statistics
# explicitly, so nothing is hidden in a framework's state.


# %%
def init(key, sizes=(3072, 256, 10)):
    k1, k2 = jax.random.split(key)
    params = {
        "w1": jax.random.normal(k1, sizes[:2]) / np.sqrt(sizes[0]),
        "bn": {"scale": jnp.ones(sizes[1]), "bias": jnp.zeros(sizes[1])},
        "w2": jax.random.normal(k2, sizes[1:]) / np.sqrt(sizes[1]),
    }
    batch_stats = {"mean": jnp.zeros(sizes[1]), "var": jnp.ones(sizes[1])}
    return params, batch_stats


def forward(params, batch_stats, x, train):
    h = x @ params["w1"]
    out = F.batch_norm(h, params["bn"], batch_stats, train=train, momentum=0.9)
    return jax.nn.relu(out.y) @ params["w2"], out.batch_stats


tx = optax.adam(1e-3)


@jax.jit
def train_step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
        logits, new_stats = forward(params, batch_stats, x, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss


params, batch_stats = init(jax.random.key(0))
opt_state = tx.init(params)
rng = np.random.default_rng(0)
losses = []
for _ in range(300):
    rows = rng.integers(0, len(x_train), 128)
    params, batch_stats, opt_state, loss = train_step(
        params, batch_stats, opt_state, x_train[rows], y_train[rows]
    )
    losses.append(float(loss))

logits, _ = forward(params, batch_stats, x_test, train=False)
accuracy = np.mean(logits.argmax(-1) == y_test)
print(f"test accuracy with running statistics: {accuracy:.3f}")
plt.figure(figsize=(5, 3))
plt.plot(losses)
plt.xlabel("step")
plt.ylabel("training loss")
plt.show()

# %% [md]
# ## 2. Drop-in layers
#
# A small Flax model that takes its norm as an argument. Built with
# `flax.linen.BatchNorm` and with `normjax.nn.BatchNorm`, it has the same
# variable tree, so variables initialized (or trained) with Flax's layer load
# into normjax's and give the same outputs, in training and in evaluation.


# %%
class SmallNet(nn.Module):
    norm: type = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(128)(x)
        x = self.norm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        return nn.Dense(10)(x)


flax_net = SmallNet(norm=nn.BatchNorm)
ours = SmallNet(norm=normjax.nn.BatchNorm)
variables = flax_net.init(jax.random.key(1), x_train[:8], train=False)
batch = jnp.asarray(x_train[:256])
for train in (True, False):
    a, _ = flax_net.apply(variables, batch, train=train, mutable=["batch_stats"])
    b, _ = ours.apply(variables, batch, train=train, mutable=["batch_stats"])
    print(f"train={train}: max |flax - normjax| = {float(jnp.max(jnp.abs(a - b))):.2e}")
print(jax.tree.map(jnp.shape, variables))

# %% [md]
# What the drop-in adds: masks (padding gets no weight in the statistics), ghost
# batches, precise statistics through `normjax.calibrate`, and every other norm by
# name through `normjax.make_norm`.

# %%
mask = jnp.arange(256) < 200  # the last 56 rows are padding
padded = batch.at[200:].set(1e4)


class MaskedNet(nn.Module):
    norm: str = "batch"

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        x = nn.Dense(128)(x)
        x = normjax.make_norm(self.norm)(x, use_running_average=not train, mask=mask)
        return nn.Dense(10)(nn.relu(x))


for name in ("batch", "ghost_batch", "bln", "layer", "prior"):
    net = MaskedNet(norm=name)
    v = net.init(jax.random.key(2), batch, train=False)
    clean, _ = net.apply(v, batch[:200], train=True, mutable=["batch_stats"])
    dirty, _ = net.apply(
        v, padded, train=True, mask=mask[:, None], mutable=["batch_stats"]
    )
    diff = float(jnp.max(jnp.abs(clean - dirty[:200])))
    print(f"{name:12s} padding ignored: max |difference| = {diff:.1e}")
