"""Tests for normjax.calibrate: precise statistics and statistics sources."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax import calibrate
from normjax import nn as norms

EPS = 1e-5


class Block(nn.Module):
    """relu -> Dense -> BatchNorm, nested so the layer sits deeper in the tree."""

    features: int

    @nn.compact
    def __call__(self, x, mask=None, *, train: bool):
        x = nn.Dense(self.features)(nn.relu(x))
        return norms.BatchNorm(use_running_average=not train)(x, mask=mask)


class MLP(nn.Module):
    """Dense -> BatchNorm -> [relu -> Dense -> BatchNorm]."""

    @nn.compact
    def __call__(self, x, mask=None, *, train: bool):
        x = nn.Dense(6)(x)
        x = norms.BatchNorm(use_running_average=not train)(x, mask=mask)
        return Block(5)(x, mask, train=train)


class ConvNet(nn.Module):
    """Conv -> BatchNorm -> relu -> Conv -> BatchNorm, NHWC."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.relu(norms.BatchNorm(use_running_average=not train)(x))
        x = nn.Conv(3, (3, 3))(x)
        return norms.BatchNorm(use_running_average=not train)(x)


class PerSample(nn.Module):
    """Only per-sample norms: nothing depends on the statistics source."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = norms.LayerNorm()(nn.Dense(6)(x))
        return norms.RMSNorm()(nn.Dense(5)(nn.relu(x)))


class Mixed(nn.Module):
    """A normjax BatchNorm, a flax.linen BatchNorm and a step counter."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = norms.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
        x = nn.BatchNorm(use_running_average=not train)(x)
        steps = self.variable("batch_stats", "steps", jnp.zeros, (), jnp.int32)
        if train and not self.is_initializing():
            steps.value += 1
        return x


def _variables(model, x, seed=0):
    """Random params (scale/bias too) and running statistics (off their init)."""

    @jax.jit
    def make(x):
        variables = model.init(jax.random.key(seed), x, train=False)
        leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        out = []
        for (path, a), k in zip(leaves, keys, strict=True):
            if jnp.issubdtype(a.dtype, jnp.floating):
                a = a + 0.5 * jax.random.normal(k, a.shape)
                if path[-1].key == "var":
                    a = jnp.abs(a)
            out.append(a)
        return jax.tree.unflatten(tree, out)

    return make(x)


def _batches(shape_tail, sizes, seed=0, shift=1.5):
    rng = np.random.default_rng(seed)
    # Different means per batch, so equal weight per element != per batch.
    return [
        (rng.normal(size=(n, *shape_tail)) * 2.0 + shift * i).astype(np.float32)
        for i, n in enumerate(sizes)
    ]


def _np_bn(h, scale, bias, axes, mask=None):
    """float64 batch norm with the batch's statistics over ``axes``."""
    w = np.ones(h.shape[:-1] + (1,)) if mask is None else mask.astype(np.float64)
    w = np.broadcast_to(w, h.shape)
    mean = (h * w).sum(axes) / w.sum(axes)
    var = (np.square(h - mean) * w).sum(axes) / w.sum(axes)
    return (h - mean) / np.sqrt(var + EPS) * scale + bias


def _np_stats(hs, axes, masks=None):
    """float64 mean and biased variance over the concatenated batches."""
    h = np.concatenate(hs)
    if masks is None:
        return h.mean(axes), h.var(axes)
    w = np.broadcast_to(np.concatenate(masks).astype(np.float64), h.shape)
    mean = (h * w).sum(axes) / w.sum(axes)
    return mean, (np.square(h - mean) * w).sum(axes) / w.sum(axes)


def _p64(params):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def _mlp_layer_inputs(params, x, mask=None):
    """Inputs of the MLP's two BatchNorms for one batch, by hand in float64."""
    p = _p64(params)
    x = np.asarray(x, np.float64)
    h1 = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    bn = p["BatchNorm_0"]
    a = np.maximum(_np_bn(h1, bn["scale"], bn["bias"], 0, mask), 0.0)
    dense = p["Block_0"]["Dense_0"]
    return h1, a @ dense["kernel"] + dense["bias"]


def _close(actual, expected, tol=2e-5):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=tol, atol=tol)


# ------------------------------------------------------------- precise statistics


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    return model, _variables(model, jnp.zeros((8, 3)))


def test_precise_mlp_equals_float64_statistics_of_concatenated_batches(mlp):
    model, variables = mlp
    # Five batches (not a power of two: exercises the pairwise merge's leftovers)
    # of two sizes (one compile each).
    batches = _batches((3,), sizes=[7, 16, 7, 16, 7])
    precise = calibrate.precise_batch_stats(model, variables, batches, train=False)

    inputs = [_mlp_layer_inputs(variables["params"], x) for x in batches]
    for layer, stats in (
        (0, precise["BatchNorm_0"]),
        (1, precise["Block_0"]["BatchNorm_0"]),
    ):
        mean, var = _np_stats([h[layer] for h in inputs], 0)
        _close(stats["mean"], mean)
        _close(stats["var"], var)
        assert stats["mean"].dtype == jnp.float32
    # Equal weight per element, not per batch.
    per_batch = np.mean([h[0].mean(0) for h in inputs], 0)
    assert np.abs(per_batch - precise["BatchNorm_0"]["mean"]).max() > 1e-2
    # The running averages were something else, and are not modified in place.
    assert not np.allclose(
        variables["batch_stats"]["BatchNorm_0"]["mean"], precise["BatchNorm_0"]["mean"]
    )


def test_precise_conv_equals_float64_statistics():
    model = ConvNet()
    batches = _batches((5, 5, 2), sizes=[4, 6, 4, 6])
    variables = _variables(model, jnp.asarray(batches[0]))
    precise = calibrate.precise_batch_stats(model, variables, batches, train=False)

    params = variables["params"]
    p = _p64(params)

    def conv(name, features, h):
        out = nn.Conv(features, (3, 3)).apply(
            {"params": params[name]}, jnp.asarray(h, jnp.float32)
        )
        return np.asarray(out, np.float64)

    h1s, h2s = [], []
    for x in batches:
        h1 = conv("Conv_0", 4, x)
        bn = p["BatchNorm_0"]
        a = np.maximum(_np_bn(h1, bn["scale"], bn["bias"], (0, 1, 2)), 0.0)
        h1s.append(h1)
        h2s.append(conv("Conv_1", 3, a))
    for name, hs in (("BatchNorm_0", h1s), ("BatchNorm_1", h2s)):
        mean, var = _np_stats(hs, (0, 1, 2))
        _close(precise[name]["mean"], mean, tol=1e-4)
        _close(precise[name]["var"], var, tol=1e-4)


def test_precise_with_masks_counts_only_valid_elements(mlp):
    model, variables = mlp
    sizes = [6, 9, 6]
    batches = _batches((3,), sizes=sizes, seed=3)
    rng = np.random.default_rng(4)
    masks = [rng.random((n, 1)) < 0.6 for n in sizes]
    for m in masks:
        m[0] = True  # at least one valid row per batch
    moments = calibrate.precise_moments(
        model, variables, list(zip(batches, masks, strict=True)), train=False
    )
    precise = calibrate.batch_stats_from_moments(variables["batch_stats"], moments)
    inputs = [
        _mlp_layer_inputs(variables["params"], x, m)
        for x, m in zip(batches, masks, strict=True)
    ]
    for layer, stats in (
        (0, precise["BatchNorm_0"]),
        (1, precise["Block_0"]["BatchNorm_0"]),
    ):
        mean, var = _np_stats([h[layer] for h in inputs], 0, masks)
        _close(stats["mean"], mean)
        _close(stats["var"], var)
    count = sum(int(m.sum()) for m in masks)
    np.testing.assert_array_equal(moments["BatchNorm_0"]["count"], count)


@pytest.mark.parametrize("poison", [np.nan, np.inf], ids=["nan", "inf"])
def test_precise_statistics_and_every_source_ignore_what_padding_holds(mlp, poison):
    model, variables = mlp
    sizes = [6, 9]
    batches = _batches((3,), sizes=sizes, seed=5)
    rng = np.random.default_rng(6)
    masks = [rng.random((n, 1)) < 0.6 for n in sizes]
    for m in masks:
        m[0] = True

    def planted(value):
        return [np.where(m, x, value) for x, m in zip(batches, masks, strict=True)]

    def precise(batches):
        return calibrate.precise_batch_stats(
            model, variables, list(zip(batches, masks, strict=True)), train=False
        )

    clean, poisoned = precise(planted(0.0)), precise(planted(poison))
    jax.tree.map(np.testing.assert_array_equal, poisoned, clean)
    evaluator = calibrate.Evaluator(model, train=False)
    for source in calibrate.SOURCES:
        outputs = [
            evaluator(
                variables,
                (jnp.asarray(x), masks[0]),
                source=source,
                precise_stats=clean,
                example_weight=0.25,
            )
            for x in (planted(0.0)[0], planted(poison)[0])
        ]
        valid = np.broadcast_to(masks[0], outputs[0].shape)
        assert np.all(np.isfinite(outputs[1]))
        np.testing.assert_array_equal(
            np.asarray(outputs[1])[valid], np.asarray(outputs[0])[valid]
        )


def test_num_batches_takes_the_first_batches_of_any_iterable(mlp):
    model, variables = mlp
    batches = _batches((3,), sizes=[8, 8, 8, 8], seed=5)
    first_two = calibrate.precise_batch_stats(
        model, variables, batches[:2], train=False
    )
    from_cycle = calibrate.precise_batch_stats(
        model, variables, itertools.cycle(batches), num_batches=2, train=False
    )
    jax.tree.map(np.testing.assert_array_equal, first_two, from_cycle)


def test_precise_keeps_other_state_and_warns_about_foreign_layers():
    model = Mixed()
    batches = _batches((3,), sizes=[6, 6], seed=6)
    variables = _variables(model, jnp.asarray(batches[0]))
    old = {**variables["batch_stats"], "steps": jnp.asarray(3)}
    variables = {**variables, "batch_stats": old}
    with pytest.warns(UserWarning, match="BatchNorm_1/"):
        precise = calibrate.precise_batch_stats(model, variables, batches, train=False)
    assert int(precise["steps"]) == 3
    jax.tree.map(
        np.testing.assert_array_equal, precise["BatchNorm_1"], old["BatchNorm_1"]
    )
    dense = _p64(variables["params"])["Dense_0"]
    h = [np.asarray(x, np.float64) @ dense["kernel"] + dense["bias"] for x in batches]
    mean, var = _np_stats(h, 0)
    _close(precise["BatchNorm_0"]["mean"], mean)
    _close(precise["BatchNorm_0"]["var"], var)


def test_rngs_are_folded_with_the_batch_index():
    class DropoutNet(nn.Module):
        @nn.compact
        def __call__(self, x, *, train: bool):
            x = nn.Dropout(0.5, deterministic=not train)(nn.Dense(4)(x))
            return norms.BatchNorm(use_running_average=not train)(x)

    model = DropoutNet()
    x = _batches((3,), sizes=[16], seed=7)[0]
    variables = _variables(model, jnp.asarray(x))
    rngs = {"dropout": jax.random.key(1)}
    once = calibrate.precise_moments(model, variables, [x], train=True, rngs=rngs)
    twice = calibrate.precise_moments(model, variables, [x, x], train=True, rngs=rngs)
    # Same batch twice: the same dropout mask would give the same mean.
    assert np.abs(once["BatchNorm_0"]["mean"] - twice["BatchNorm_0"]["mean"]).max()
    assert float(twice["BatchNorm_0"]["count"][0]) == 32


def test_batch_stats_from_moments_uses_prefixes():
    batch_stats = {
        "L": {
            "feature_mean": jnp.zeros(3),
            "feature_var": jnp.ones(3),
            "mean": jnp.full(3, 7.0),
            "var": jnp.full(3, 8.0),
            "steps": jnp.asarray(4),
        }
    }
    moments = {
        "L": {
            "feature_count": jnp.full(3, 4.0),
            "feature_mean": jnp.asarray([1.0, 2.0, 3.0]),
            "feature_m2": jnp.asarray([4.0, 8.0, 0.0]),
        }
    }
    with pytest.warns(UserWarning, match=r"L/\{mean,var\}"):
        out = calibrate.batch_stats_from_moments(batch_stats, moments)
    np.testing.assert_array_equal(out["L"]["feature_mean"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(out["L"]["feature_var"], [1.0, 2.0, 0.0])
    for key in ("mean", "var", "steps"):
        np.testing.assert_array_equal(out["L"][key], batch_stats["L"][key])
    with pytest.raises(ValueError, match="shape"):
        calibrate.batch_stats_from_moments(
            batch_stats,
            {"L": {k: v[:2] for k, v in moments["L"].items()}},
            warn=False,
        )
    with pytest.raises(ValueError, match="feature_m2"):
        calibrate.batch_stats_from_moments(
            batch_stats,
            {"L": {k: v for k, v in moments["L"].items() if k != "feature_m2"}},
        )


# ------------------------------------------------------------------------ sources


@pytest.fixture(scope="module")
def mlp_setup(mlp):
    model, variables = mlp
    batches = _batches((3,), sizes=[8, 8, 8], seed=8)
    precise = calibrate.precise_batch_stats(model, variables, batches, train=False)
    x = jnp.asarray(_batches((3,), sizes=[6], seed=9, shift=0.0)[0])
    return model, variables, precise, x


def test_batch_source_uses_the_batch_and_updates_nothing(mlp_setup):
    model, variables, _, x = mlp_setup
    expected, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    for train in (False, True):
        y = calibrate.evaluate(model, variables, x, source="batch", train=train)
        np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    y, state = calibrate.evaluate(
        model, variables, x, source="batch", train=True, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    jax.tree.map(
        np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"]
    )


def test_running_source_is_the_plain_eval(mlp_setup):
    model, variables, _, x = mlp_setup
    expected = model.apply(variables, x, train=False)
    for train in (False, True):
        y = calibrate.evaluate(model, variables, x, source="running", train=train)
        np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_precise_source_uses_the_precise_statistics(mlp_setup):
    model, variables, precise, x = mlp_setup
    expected = model.apply({**variables, "batch_stats": precise}, x, train=False)
    y = calibrate.evaluate(
        model, variables, x, source="precise", precise_stats=precise, train=False
    )
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    running = model.apply(variables, x, train=False)
    assert np.abs(np.asarray(y) - np.asarray(running)).max() > 1e-3


def test_jitted_eval_fns_keep_their_source(mlp_setup):
    model, variables, precise, x = mlp_setup
    # A function jitted and traced outside any source keeps the plain eval path.
    plain = jax.jit(lambda v, x: model.apply(v, x, train=False))
    expected = {
        "running": plain(variables, x),
        "precise": plain({**variables, "batch_stats": precise}, x),
        "batch": model.apply(variables, x, train=True, mutable=["batch_stats"])[0],
        "example_weighted": calibrate.evaluate(
            model,
            variables,
            x,
            source="example_weighted",
            example_weight=0.25,
            train=False,
        ),
    }
    fns = {
        s: calibrate.make_eval_fn(
            model,
            source=s,
            precise_stats=None if s == "example_weighted" else precise,
            example_weight=0.25,
            train=False,
        )
        for s in calibrate.SOURCES
    }
    for _ in range(2):  # second round: cached traces
        for source, fn in fns.items():
            np.testing.assert_allclose(
                fn(variables, x), expected[source], rtol=1e-5, atol=1e-5
            )
    np.testing.assert_allclose(plain(variables, x), expected["running"])


def test_one_evaluator_serves_every_source_with_inputs_and_placement(mlp_setup):
    model, variables, precise, x = mlp_setup
    placed = []

    def place(batch):
        placed.append(batch["x"].shape)
        return batch

    traced = []

    def inputs(batch):  # runs inside jit: a traced shift of the raw batch
        traced.append(type(batch["x"]))
        return (batch["x"] + batch["shift"],), {"train": False}

    evaluator = calibrate.Evaluator(model, inputs=inputs, place_batch=place)
    batch = {"x": x - 1.0, "shift": jnp.float32(1.0)}
    for source in calibrate.SOURCES:
        y = evaluator(
            variables, batch, source=source, precise_stats=precise, example_weight=0.5
        )
        want = calibrate.evaluate(
            model,
            variables,
            x,
            source=source,
            precise_stats=precise,
            example_weight=0.5,
            train=False,
        )
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert placed == [x.shape] * 4
    # traced once per statistics context ('precise' reuses 'running'), never eagerly
    assert len(traced) == 3
    assert all(issubclass(t, jax.core.Tracer) for t in traced)
    evaluator(variables, batch, source="batch")
    assert len(traced) == 3


def test_per_sample_model_is_the_same_under_every_source():
    model = PerSample()
    batches = _batches((3,), sizes=[5, 5], seed=10)
    variables = _variables(model, jnp.asarray(batches[0]))
    assert "batch_stats" not in variables
    precise = calibrate.precise_batch_stats(model, variables, batches, train=False)
    assert precise == {}
    x = jnp.asarray(batches[0])
    expected = model.apply(variables, x, train=False)
    for source in calibrate.SOURCES:
        y = calibrate.evaluate(
            model,
            variables,
            x,
            source=source,
            precise_stats=precise,
            example_weight=0.5,
            train=False,
        )
        np.testing.assert_array_equal(y, expected)


# ------------------------------------------------------------------------- errors


def test_errors(mlp_setup):
    model, variables, precise, x = mlp_setup
    with pytest.raises(ValueError, match="running, precise, batch"):
        calibrate.evaluate(model, variables, x, source="ema", train=False)
    with pytest.raises(ValueError, match="running, precise, batch"):
        calibrate.make_eval_fn(model, source="train")
    with pytest.raises(ValueError, match="precise_batch_stats"):
        calibrate.evaluate(model, variables, x, source="precise", train=False)
    with pytest.raises(ValueError, match="does not match"):
        calibrate.evaluate(
            model, variables, x, source="precise", precise_stats=variables
        )
    with pytest.raises(ValueError, match="empty"):
        calibrate.precise_batch_stats(model, variables, [], train=False)
    with pytest.raises(ValueError, match="num_batches"):
        calibrate.precise_batch_stats(model, variables, [x], num_batches=0)
    with pytest.raises(ValueError, match="mutable"):
        calibrate.precise_batch_stats(
            model, variables, [x], train=False, mutable=["batch_stats"]
        )


class CausalNet(nn.Module):
    """Dense -> causal BatchNorm (per-position statistics) on (B, L, D)."""

    ghost: int | None = None

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Dense(3)(x)
        return norms.BatchNorm(use_running_average=not train, causal=True, max_len=6)(x)


def test_precise_per_position_statistics_average_each_batch_prefix_moments():
    """Row t: the average over batches of each batch's prefix mean and
    within-batch prefix variance — what the EMA estimates — not the pooled
    variance (which adds the spread of the batch means)."""
    rng = np.random.default_rng(47)
    model = CausalNet()
    batches = [
        jnp.asarray(rng.normal(k, 1.0 + k, size=(4, 5, 2)), jnp.float32)
        for k in range(3)
    ]
    variables = model.init(jax.random.key(0), batches[0], train=False)
    precise = calibrate.precise_batch_stats(model, variables, batches, train=False)
    kernel = np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)
    bias = np.asarray(variables["params"]["Dense_0"]["bias"], np.float64)
    means, variances = [], []
    for batch in batches:
        h = np.asarray(batch, np.float64) @ kernel + bias
        means.append([h[:, : t + 1].reshape(-1, 3).mean(0) for t in range(5)])
        variances.append([h[:, : t + 1].reshape(-1, 3).var(0) for t in range(5)])
    got = precise["BatchNorm_0"]
    assert got["mean"].shape == (6, 3)
    np.testing.assert_allclose(got["mean"][:5], np.mean(means, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["var"][:5], np.mean(variances, 0), rtol=1e-4)
    # Row 5 saw no batch: it keeps its running value.
    np.testing.assert_array_equal(
        got["mean"][5], variables["batch_stats"]["BatchNorm_0"]["mean"][5]
    )
    np.testing.assert_array_equal(
        got["var"][5], variables["batch_stats"]["BatchNorm_0"]["var"][5]
    )


def test_precise_ghost_statistics_average_the_within_ghost_variance():
    rng = np.random.default_rng(48)
    model = norms.BatchNorm(use_running_average=False, ghost_batch_size=2)
    batches = [
        jnp.asarray(rng.normal(k, 1.0, size=(4, 3)), jnp.float32) for k in range(3)
    ]
    variables = model.init(jax.random.key(0), batches[0])
    precise = calibrate.precise_batch_stats(model, variables, batches)
    within = [
        np.mean([np.asarray(b[g : g + 2], np.float64).var(0) for g in (0, 2)], 0)
        for b in batches
    ]
    np.testing.assert_allclose(
        precise["mean"],
        np.mean([np.asarray(b).mean(0) for b in batches], 0),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(precise["var"], np.mean(within, 0), rtol=1e-5)


@pytest.mark.parametrize("causal", [False, "cumulative", "per_position"])
def test_example_weighting_mixes_each_sample_with_the_population(causal):
    """'example_weighted': each sample normalized by w * its own statistics +
    (1 - w) * the running ones (a two-component mixture), independently of the
    other samples; no model edit, no retraining."""
    rng = np.random.default_rng(61)
    if causal:
        x = rng.normal(1.0, 2.0, size=(3, 5, 4))
        layer = norms.BatchNorm(use_running_average=True, causal=causal)
    else:
        x = rng.normal(1.0, 2.0, size=(3, 2, 2, 4))
        layer = norms.BatchNorm(use_running_average=True)
    variables = layer.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    shape = variables["batch_stats"]["mean"].shape
    stats_ = {"mean": rng.normal(size=shape), "var": rng.uniform(0.5, 2, shape)}
    variables = {**variables, "batch_stats": jax.tree.map(jnp.asarray, stats_)}
    w = 0.25
    y = calibrate.evaluate(
        layer,
        variables,
        jnp.asarray(x, jnp.float32),
        source="example_weighted",
        example_weight=w,
    )
    if causal == "cumulative":
        mu = np.stack([x[:, : t + 1].mean(1) for t in range(5)], 1)
        var = np.stack([x[:, : t + 1].var(1) for t in range(5)], 1)
    elif causal == "per_position":
        mu, var = x, np.zeros_like(x)
    else:
        mu, var = x.mean((1, 2), keepdims=True), x.var((1, 2), keepdims=True)
    pm, pv = stats_["mean"], stats_["var"]
    mean = w * mu + (1 - w) * pm
    mixed = w * var + (1 - w) * pv + w * (1 - w) * (mu - pm) ** 2
    np.testing.assert_allclose(
        y, (x - mean) / np.sqrt(mixed + EPS), rtol=1e-4, atol=1e-5
    )
    alone = calibrate.evaluate(
        layer,
        variables,
        jnp.asarray(x[:1], jnp.float32),
        source="example_weighted",
        example_weight=w,
    )
    np.testing.assert_allclose(alone, y[:1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="example_weight=1 / the training batch"):
        calibrate.evaluate(layer, variables, jnp.asarray(x), source="example_weighted")
