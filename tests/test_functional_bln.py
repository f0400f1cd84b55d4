"""normjax.functional.bln: batch-layer normalization against the paper's formula."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from functional_refs import (
    params_for,
    ref_affine,
    ref_batch_stats,
)

from normjax import functional as F

SOURCES = ("running", "batch")


@pytest.mark.parametrize(
    "inference",
    [(a, b, c, d) for a in SOURCES for b in SOURCES for c in SOURCES for d in SOURCES],
)
def test_bln_matches_paper_formula_in_all_16_inference_configs(inference):
    rng = np.random.default_rng(22)
    x = rng.normal(0.5, 2.0, size=(4, 3, 6))
    params = params_for(rng, (6,))
    running = {
        "mean": rng.normal(size=6),
        "var": rng.uniform(0.5, 2, size=6),
        "feature_mean": np.float64(0.3),
        "feature_var": np.float64(1.7),
    }
    run32 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), running)
    eps, B = 1e-5, 4
    mu_b, var_b = ref_batch_stats(x, (2,))
    mu_f, var_f = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)

    def expected(sources):
        pick = lambda s, batch, run: batch if s == "batch" else run  # noqa: E731
        xb = (x - pick(sources[0], mu_b, running["mean"])) / np.sqrt(
            pick(sources[1], var_b, running["var"]) + eps
        )
        xf = (x - pick(sources[2], mu_f, running["feature_mean"])) / np.sqrt(
            pick(sources[3], var_f, running["feature_var"]) + eps
        )
        y = xf / B + (1 - 1 / B) * xb
        return ref_affine(y, params["scale"], params["bias"], (2,))

    y, new, _ = F.batch_layer_norm(
        jnp.asarray(x, jnp.float32), params, run32, train=True, momentum=0.9
    )
    np.testing.assert_allclose(y, expected(("batch",) * 4), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        new["mean"], 0.9 * running["mean"] + 0.1 * mu_b.ravel(), rtol=1e-5
    )
    np.testing.assert_allclose(
        new["var"], 0.9 * running["var"] + 0.1 * var_b.ravel(), rtol=1e-5
    )
    np.testing.assert_allclose(
        new["feature_mean"], 0.9 * 0.3 + 0.1 * mu_f.mean(), rtol=1e-5
    )
    np.testing.assert_allclose(
        new["feature_var"], 0.9 * 1.7 + 0.1 * var_f.mean(), rtol=1e-5
    )
    y_eval, same, _ = F.batch_layer_norm(
        jnp.asarray(x, jnp.float32), params, run32, train=False, inference=inference
    )
    assert same is run32
    np.testing.assert_allclose(y_eval, expected(inference), rtol=1e-4, atol=1e-4)


def test_bln_at_batch_size_one_is_finite_and_equals_feature_part():
    x = jnp.asarray(np.random.default_rng(23).normal(size=(1, 5, 6)), jnp.float32)
    running = {
        "mean": jnp.zeros(6),
        "var": jnp.ones(6),
        "feature_mean": jnp.zeros(()),
        "feature_var": jnp.ones(()),
    }
    y, grad = jax.value_and_grad(
        lambda x: jnp.sum(F.batch_layer_norm(x, None, running, train=True).y ** 3)
    )(x)
    assert np.isfinite(y) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(
        F.batch_layer_norm(x, None, running, train=True).y,
        F.layer_norm(x, epsilon=1e-5),
        atol=1e-5,
    )


def test_bln_counts_only_valid_samples_as_the_batch():
    rng = np.random.default_rng(24)
    x = jnp.asarray(rng.normal(0.5, 2.0, size=(6, 3, 8)), jnp.float32)
    running = {
        "mean": jnp.zeros(8),
        "var": jnp.ones(8),
        "feature_mean": jnp.zeros(()),
        "feature_var": jnp.ones(()),
    }
    valid = np.array([True, False, True, True, False, True])
    mask = jnp.asarray(valid)[:, None, None]
    padded, _, _ = F.batch_layer_norm(x, None, running, train=True, mask=mask)
    alone, _, _ = F.batch_layer_norm(x[valid], None, running, train=True)
    np.testing.assert_allclose(padded[valid], alone, rtol=1e-5, atol=1e-5)


def test_bln_pools_its_statistics_over_devices_as_over_one_batch():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(8, 5, 6)), jnp.float32)
    mask = jnp.asarray(rng.random((8, 5, 1)) < 0.7)
    running = {
        "mean": jnp.zeros(6),
        "var": jnp.ones(6),
        "feature_mean": jnp.zeros(()),
        "feature_var": jnp.ones(()),
    }

    def bln(x, mask, axis_name=None):
        out = F.batch_layer_norm(
            x, None, running, train=True, mask=mask, momentum=0.5, axis_name=axis_name
        )
        return out.y, out.batch_stats

    y, whole = bln(x, mask)
    parts = jax.vmap(lambda x, m: bln(x, m, "d"), axis_name="d")(
        x.reshape(2, 4, 5, 6), mask.reshape(2, 4, 5, 1)
    )
    np.testing.assert_allclose(parts[0].reshape(x.shape), y, rtol=1e-5, atol=1e-5)
    for key, value in whole.items():  # every device holds the whole batch's
        np.testing.assert_allclose(parts[1][key][0], value, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(parts[1][key][1], value, rtol=1e-5, atol=1e-6)


def test_causal_bln_keeps_four_statistics_per_position_and_the_training_batch_size():
    rng = np.random.default_rng(46)
    b, length, d, max_len = 4, 5, 6, 7
    x = rng.normal(0.5, 2.0, size=(b, length, d)) + np.arange(length)[:, None]
    state = {
        "mean": jnp.zeros((max_len, d)),
        "var": jnp.ones((max_len, d)),
        "feature_mean": jnp.zeros((max_len,)),
        "feature_var": jnp.ones((max_len,)),
        "samples": jnp.ones(()),
    }
    out = F.batch_layer_norm(
        jnp.asarray(x, jnp.float32), None, state, train=True, causal=True, momentum=0.0
    )
    new = out.batch_stats
    for t in range(length):  # batch part: prefix statistics; feature part: per token
        prefix = x[:, : t + 1].reshape(-1, d)
        np.testing.assert_allclose(new["mean"][t], prefix.mean(0), rtol=1e-5)
        np.testing.assert_allclose(new["var"][t], prefix.var(0), rtol=1e-4)
        np.testing.assert_allclose(
            new["feature_mean"][t], x[:, t].mean(-1).mean(), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            new["feature_var"][t], x[:, t].var(-1).mean(), rtol=1e-5
        )
    np.testing.assert_array_equal(new["mean"][length:], 0.0)
    assert float(new["samples"]) == b
    # Evaluation mixes with the training B, row t at position t: one sequence
    # alone gives what it gives in a batch.
    eps = 1e-5
    x_b = (x - np.asarray(new["mean"])[:length]) / np.sqrt(
        np.asarray(new["var"])[:length] + eps
    )
    x_f = (x - np.asarray(new["feature_mean"])[:length, None]) / np.sqrt(
        np.asarray(new["feature_var"])[:length, None] + eps
    )
    want = x_f / b + (1 - 1 / b) * x_b
    batch = F.batch_layer_norm(
        jnp.asarray(x, jnp.float32), None, new, train=False, causal=True
    ).y
    alone = F.batch_layer_norm(
        jnp.asarray(x[1:2], jnp.float32), None, new, train=False, causal=True
    ).y
    np.testing.assert_allclose(batch, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(alone, want[1:2], rtol=1e-4, atol=1e-4)


def test_bln_in_causal_running_mode_mixes_with_the_training_batch_size():
    rng = np.random.default_rng(63)
    x = jnp.asarray(rng.normal(size=(4, 5, 6)), jnp.float32)
    state = {
        "mean": jnp.ones((5, 6)),
        "var": jnp.ones((5, 6)) * 2,
        "feature_mean": jnp.zeros((5,)),
        "feature_var": jnp.ones((5,)),
        "samples": jnp.asarray(8.0),
    }
    kwargs = dict(train=False, causal="running", inference=("batch",) * 4)
    batch = F.batch_layer_norm(x, None, state, **kwargs).y
    alone = F.batch_layer_norm(x[2:3], None, state, **kwargs).y
    np.testing.assert_allclose(alone, batch[2:3], rtol=1e-5, atol=1e-6)


def test_bln_variables_made_before_the_samples_key_still_load():
    import normjax

    layer = normjax.nn.BatchLayerNorm()
    x = jax.random.normal(jax.random.key(0), (4, 6))
    variables = layer.init(jax.random.key(1), x, use_running_average=False)
    old = {
        "params": variables["params"],
        "batch_stats": {
            k: v for k, v in variables["batch_stats"].items() if k != "samples"
        },
    }
    y, updates = layer.apply(old, x, use_running_average=False, mutable=["batch_stats"])
    assert "samples" not in updates["batch_stats"]
    assert np.all(np.isfinite(layer.apply(old, x, use_running_average=True)))


@pytest.mark.parametrize("shape", [(5, 3, 4), (6, 7), (4, 3, 2, 5)])
def test_bln_training_gradients_match_the_formula_with_masks_float64(shape):
    # The fused backward of both parts against autodiff of the formula written
    # plainly (batch part per channel over the rest, feature part per sample
    # over the last axis, B = samples with a valid element), padding holding NaN.
    with jax.enable_x64(True):
        rng = np.random.default_rng(sum(shape))
        x = rng.normal(2.0, 3.0, size=shape)
        mask = rng.random(shape) < 0.7
        mask[:, ..., 0] = True
        mask[-1] = False  # a padding sample: not counted in B
        x[~mask] = np.nan
        x = jnp.asarray(x)
        c, eps = shape[-1], 1e-5
        params = {
            "scale": jnp.asarray(rng.uniform(0.5, 2, c)),
            "bias": jnp.asarray(rng.normal(size=c)),
        }
        stats0 = {
            "mean": jnp.zeros(c),
            "var": jnp.ones(c),
            "feature_mean": jnp.zeros(()),
            "feature_var": jnp.ones(()),
        }
        w = jnp.asarray(rng.normal(size=shape))
        batch_axes = tuple(range(len(shape) - 1))

        def part(x, axes):
            x = jnp.where(mask, x, 0)  # before any arithmetic: padding is NaN
            n = np.maximum(mask.sum(axes, keepdims=True), 1)
            mu = x.sum(axes, keepdims=True) / n
            centred = jnp.where(mask, x - mu, 0)
            var = (centred**2).sum(axes, keepdims=True) / n
            return centred / jnp.sqrt(var + eps)

        def reference(x, p):
            b = mask.reshape(shape[0], -1).any(1).sum()
            y = part(x, (len(shape) - 1,)) / b + (1 - 1 / b) * part(x, batch_axes)
            return jnp.sum(jnp.where(mask, w * (y * p["scale"] + p["bias"]), 0))

        def ours(x, p):
            y, _, _ = F.batch_layer_norm(x, p, stats0, train=True, mask=mask)
            return jnp.sum(jnp.where(mask, w * y, 0))

        np.testing.assert_allclose(ours(x, params), reference(x, params), rtol=1e-10)
        got = jax.grad(ours, argnums=(0, 1))(x, params)
        want = jax.grad(reference, argnums=(0, 1))(x, params)
        assert np.isfinite(np.asarray(got[0])).all()
        np.testing.assert_allclose(got[0], want[0], rtol=1e-8, atol=1e-12)
        for k in params:
            np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-8, atol=1e-12)


def test_bln_training_refuses_unknown_or_misshapen_parameters():
    x = jnp.ones((4, 5))
    stats0 = {
        "mean": jnp.zeros(5),
        "var": jnp.ones(5),
        "feature_mean": jnp.zeros(()),
        "feature_var": jnp.ones(()),
    }
    with pytest.raises(ValueError, match="bais"):
        F.batch_layer_norm(x, {"bais": jnp.ones(5)}, stats0, train=True)
    with pytest.raises(ValueError, match="shape"):
        F.batch_layer_norm(x, {"scale": jnp.ones((1, 5))}, stats0, train=True)
