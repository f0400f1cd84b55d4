# %% [md]
# # Batch norm in a character-level MLP
#
# The language model of Karpathy's *makemore* lectures (part 3, "Activations,
# gradients, BatchNorm"): three characters of context, each embedded in 10
# dimensions, a hidden layer of 200 units without bias, batch norm, tanh, and
# logits over the next character — here on the characters of tiny_shakespeare,
# written as pure functions with `normjax.functional` and trained in a jitted
# optax step with the running statistics threaded through it explicitly.
#
# After training we compare the validation loss with (a) the running statistics,
# (b) statistics recomputed once over the whole training set (the lecture's
# "calibrate the batch norm at the end of training"), and (c) the same network
# trained identically without batch norm, and look at what batch norm does to
# the tanh inputs.

# %%
import functools
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from normjax import calibrate, stats
from normjax import functional as F
from normjax.data import text

np.set_printoptions(precision=3, suppress=True)

SHARED = pathlib.Path("../../shared/tfds")
DATA_DIR = str(SHARED) if SHARED.exists() else os.environ.get("TFDS_DATA_DIR")
corpus = text.load_corpus(DATA_DIR, download=True)  # TFDS tiny_shakespeare
tokenizer = text.make_tokenizer("char", corpus)
BLOCK = 3  # characters of context


def examples(ids):
    """Every (3 characters, next character) pair of a split."""
    windows = np.lib.stride_tricks.sliding_window_view(ids, BLOCK + 1)
    return windows[:, :BLOCK], windows[:, BLOCK]


x_train, y_train = examples(tokenizer.encode(corpus.train))
x_val, y_val = examples(tokenizer.encode(corpus.validation))
VOCAB = tokenizer.vocab_size
print(f"vocabulary {VOCAB}: {tokenizer.chars!r}")
print(f"{len(x_train):,} training and {len(x_val):,} validation examples")
print(repr(tokenizer.decode(x_train[0])), "->", repr(tokenizer.decode(y_train[:1])))

# %% [md]
# ## The model, as pure functions
#
# Initialization as in the lecture: Kaiming-scaled `W1` for tanh, small output
# weights. `F.batch_norm(h, params, batch_stats, train=...)` normalizes with the
# batch's statistics in training and returns the new running averages (momentum
# 0.999, the lecture's 0.001 update); with `train=False` it reads `batch_stats`.
# Without batch norm the hidden layer gets its bias back.

# %%
EMBED, HIDDEN, MOMENTUM = 10, 200, 0.999


def init(key, batch_norm: bool):
    k_embed, k_hidden, k_out, k_bias = jax.random.split(key, 4)
    fan_in = BLOCK * EMBED
    params = {
        "embed": jax.random.normal(k_embed, (VOCAB, EMBED)),
        "w1": jax.random.normal(k_hidden, (fan_in, HIDDEN)) * (5 / 3) / fan_in**0.5,
        "w2": jax.random.normal(k_out, (HIDDEN, VOCAB)) * 0.01,
        "b2": jnp.zeros(VOCAB),
    }
    if batch_norm:
        params["bn"] = {"scale": jnp.ones(HIDDEN), "bias": jnp.zeros(HIDDEN)}
        return params, {"mean": jnp.zeros(HIDDEN), "var": jnp.ones(HIDDEN)}
    params["b1"] = jax.random.normal(k_bias, (HIDDEN,)) * 0.01
    return params, None


def hidden(params, x_BxT):
    """The hidden layer's input to batch norm (or, without it, to tanh)."""
    emb_BxTE = params["embed"][x_BxT].reshape(len(x_BxT), -1)
    return emb_BxTE @ params["w1"] + params.get("b1", 0.0)


def forward(params, batch_stats, x_BxT, train):
    """Logits, the new running statistics and the tanh inputs."""
    pre_BxH = hidden(params, x_BxT)
    if "bn" in params:
        out = F.batch_norm(
            pre_BxH, params["bn"], batch_stats, train=train, momentum=MOMENTUM
        )
        pre_BxH, batch_stats = out.y, out.batch_stats
    logits_BxV = jnp.tanh(pre_BxH) @ params["w2"] + params["b2"]
    return logits_BxV, batch_stats, pre_BxH


def cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# %% [md]
# ## Training
#
# SGD with the lecture's learning rates (0.1, then 0.01 for the last quarter),
# batches of 32 sampled at random, 4000 steps — far fewer than the lecture's
# 200,000, enough to compare the three variants.

# %%
STEPS, BATCH = 4000, 32
# 0.1, multiplied by 0.1 at three quarters of the steps.
tx = optax.sgd(optax.piecewise_constant_schedule(0.1, {STEPS * 3 // 4: 0.1}))


@jax.jit
def train_step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
        logits, new_stats, _ = forward(params, batch_stats, x, train=True)
        return cross_entropy(logits, y), new_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss


def train(batch_norm: bool):
    params, batch_stats = init(jax.random.key(0), batch_norm)
    opt_state = tx.init(params)
    rows = np.random.default_rng(0).integers(0, len(x_train), (STEPS, BATCH))
    losses = []
    for batch in rows:
        params, batch_stats, opt_state, loss = train_step(
            params, batch_stats, opt_state, x_train[batch], y_train[batch]
        )
        losses.append(loss)
    return params, batch_stats, np.asarray(losses)


start = time.perf_counter()
bn_params, running_stats, bn_losses = train(batch_norm=True)
print(f"with batch norm: {time.perf_counter() - start:.1f} s")
start = time.perf_counter()
plain_params, _, plain_losses = train(batch_norm=False)
print(f"without batch norm: {time.perf_counter() - start:.1f} s")

# %% [md]
# ## Calibrating the statistics over the whole training set
#
# `normjax.calibrate.precise_batch_stats` recomputes statistics by running a
# Flax (Linen or NNX) model; this model is a pure function, so we feed
# calibrate the moments ourselves: in training mode `F.batch_norm` also returns
# the batch's `Moments(count, mean, m2)` (`out.moments[""]`), which merge exactly
# (`normjax.stats.merge`), so 16 chunks of the training set give the statistics
# of all of it at once; `calibrate.batch_stats_from_moments` turns them into
# `batch_stats` (biased variance, as over a population).


# %%
@jax.jit
def chunk_moments(params, x_BxT):
    pre_BxH = hidden(params, x_BxT)
    return F.batch_norm(pre_BxH, params["bn"], None, train=True).moments[""]


chunks = np.array_split(np.arange(len(x_train)), 16)
moments = functools.reduce(
    stats.merge, (chunk_moments(bn_params, x_train[rows]) for rows in chunks)
)
calibrated_stats = calibrate.batch_stats_from_moments(running_stats, moments._asdict())
print(f"pooled over {int(moments.count[0]):,} examples")
for name in ("mean", "var"):
    running, calibrated = running_stats[name], calibrated_stats[name]
    print(f"{name}: running {np.asarray(running[:5])}")
    print(f"{' ' * len(name)}  calibrated {np.asarray(calibrated[:5])}")
    gap = float(jnp.max(jnp.abs(running - calibrated)))
    print(f"{' ' * len(name)}  max |running - calibrated| = {gap:.3f}")

# %% [md]
# ## Validation loss
#
# On every one of the validation split's examples, and on the whole training
# set (in chunks, with the batch statistics fixed).


# %%
@functools.partial(jax.jit, static_argnames="train")
def loss_sum(params, batch_stats, x, y, train=False):
    logits, _, _ = forward(params, batch_stats, x, train=train)
    return cross_entropy(logits, y) * len(y)


def mean_loss(params, batch_stats, x, y):
    parts = np.array_split(np.arange(len(x)), max(1, len(x) // 65536))
    return sum(float(loss_sum(params, batch_stats, x[r], y[r])) for r in parts) / len(x)


variants = {
    "(a) batch norm, running statistics": (bn_params, running_stats),
    "(b) batch norm, calibrated on the training set": (bn_params, calibrated_stats),
    "(c) no batch norm (hidden bias)": (plain_params, None),
}
print(f"{'model':48s} {'train':>6s} {'val':>6s}")
for name, (params, batch_stats) in variants.items():
    train_loss = mean_loss(params, batch_stats, x_train, y_train)
    val_loss = mean_loss(params, batch_stats, x_val, y_val)
    print(f"{name:48s} {train_loss:6.4f} {val_loss:6.4f}")

# %% [md]
# Calibration moves the statistics by a few percent — the running averages lag
# the weights (momentum 0.999 averages over the last ~1000 steps), and their
# variance averages the variances of batches of 32, on average 31/32 of the
# population's. The three losses above come from one run (one seed each): no
# difference between the variants is claimed from them — that would take
# several seeds, paired, with an interval. What batch norm visibly changes is
# the scale of the tanh inputs, below.

# %% [md]
# ## The tanh inputs
#
# Histograms of the hidden pre-activations on the validation set after training:
# batch norm's output (calibrated statistics) and, without it, `emb @ W1 + b1`.
# A unit with |tanh| > 0.97 is saturated: its gradient `1 - tanh²` is below 6 %.

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
for ax, (name, (params, batch_stats)) in zip(
    axes[:2],
    [(n, variants[n]) for n in list(variants)[1:]],
    strict=True,
):
    _, _, pre = forward(params, batch_stats, x_val, train=False)
    pre = np.asarray(pre).ravel()
    saturated = np.mean(np.abs(np.tanh(pre)) > 0.97)
    print(f"{name:48s} saturated tanh: {saturated:.1%}, std {pre.std():.2f}")
    ax.hist(np.clip(pre, -8, 8), bins=100, range=(-8, 8), color="C0")
    ax.axvline(np.arctanh(0.97), color="k", ls="--", lw=0.8)
    ax.axvline(-np.arctanh(0.97), color="k", ls="--", lw=0.8)
    ax.set_title(f"{name[4:]}\n|tanh| > 0.97: {saturated:.1%}", fontsize=9)
    ax.set_xlabel("tanh input (clipped to ±8)")
window = 100
for losses, label in ((bn_losses, "batch norm"), (plain_losses, "no batch norm")):
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    axes[2].plot(smooth, label=label)
axes[2].set_xlabel("step")
axes[2].set_ylabel(f"training loss ({window}-step mean)")
axes[2].legend()
plt.tight_layout()
plt.show()
