"""normjax.functional.renorm: batch renormalization against the paper's formula."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from functional_refs import ref_batch_stats

from normjax import functional as F


@pytest.mark.parametrize("r_max,d_max", [(1.0, 0.0), (1.5, 0.5), (3.0, 5.0)])
def test_batch_renorm_matches_paper_formula(r_max, d_max):
    rng = np.random.default_rng(20)
    x = rng.normal(1.0, 2.0, size=(16, 3, 6))
    running = {"mean": rng.normal(size=6), "var": rng.uniform(0.5, 3, size=6)}
    eps = 1e-5
    y, new, _ = F.batch_renorm(
        jnp.asarray(x, jnp.float32),
        None,
        jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), running),
        train=True,
        r_max=r_max,
        d_max=d_max,
        momentum=0.9,
    )
    mu_b, var_b = ref_batch_stats(x, (2,))
    sigma_b, sigma = np.sqrt(var_b + eps), np.sqrt(running["var"] + eps)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu_b - running["mean"]) / sigma, -d_max, d_max)
    np.testing.assert_allclose(y, (x - mu_b) / sigma_b * r + d, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        new["mean"], 0.9 * running["mean"] + 0.1 * mu_b.ravel(), rtol=1e-5
    )
    np.testing.assert_allclose(
        new["var"], 0.9 * running["var"] + 0.1 * var_b.ravel(), rtol=1e-5
    )
    if r_max == 1.0:  # r = 1, d = 0: batch norm
        np.testing.assert_allclose(
            y, F.batch_norm(jnp.asarray(x, jnp.float32), train=True).y, atol=1e-5
        )
    y_eval, _, _ = F.batch_renorm(
        jnp.asarray(x, jnp.float32), None, new, train=False, r_max=r_max
    )
    ref_eval = (x - np.asarray(new["mean"])) / np.sqrt(np.asarray(new["var"]) + eps)
    np.testing.assert_allclose(y_eval, ref_eval, rtol=1e-4, atol=1e-4)


def test_batch_renorm_gradient_treats_r_and_d_as_constants():
    with jax.enable_x64(True):
        rng = np.random.default_rng(21)
        x = jnp.asarray(rng.normal(1.0, 2.0, size=(8, 5)))
        running = {"mean": jnp.zeros(5), "var": jnp.full(5, 0.5)}
        w = jnp.asarray(rng.normal(size=(8, 5)))
        eps = 1e-5
        mu = np.asarray(x).mean(0)
        sigma_b = np.sqrt(np.asarray(x).var(0) + eps)
        r = np.clip(sigma_b / np.sqrt(0.5 + eps), 1 / 1.2, 1.2)  # constants
        d = np.clip(mu / np.sqrt(0.5 + eps), -0.3, 0.3)

        def reference(x):
            mean = x.mean(0)
            return jnp.sum(w * ((x - mean) / jnp.sqrt(x.var(0) + eps) * r + d))

        def ours(x):
            y, _, _ = F.batch_renorm(x, None, running, train=True, r_max=1.2, d_max=0.3)
            return jnp.sum(w * y)

        np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(reference)(x), rtol=1e-8)


def test_renorm_limits_schedule():
    limits = [
        F.renorm_limits(s, 3.0, 5.0, (10, 50, 30)) for s in (0, 10, 20, 30, 50, 99)
    ]
    r, d = np.array(limits).T
    np.testing.assert_allclose(r, [1, 1, 1.5, 2, 3, 3])
    np.testing.assert_allclose(d, [0, 0, 2.5, 5, 5, 5])


def test_causal_batch_renorm_compares_each_position_with_its_row():
    """Unclipped, batch renorm's training output is the normalization by the
    per-position running statistics (row t at position t); the rows follow the
    prefix statistics as batch norm's do."""
    rng = np.random.default_rng(45)
    b, length, d = 6, 4, 3
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(b, length, d)), jnp.float32)
    rows = {
        "mean": jnp.asarray(rng.normal(size=(length + 2, d)), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2.0, (length + 2, d)), jnp.float32),
    }
    out = F.batch_renorm(
        x, None, rows, train=True, causal=True, r_max=1e6, d_max=1e6, momentum=0.5
    )
    evaluated = F.batch_renorm(x, None, rows, train=False, causal=True).y
    np.testing.assert_allclose(out.y, evaluated, rtol=1e-4, atol=1e-4)
    bn = F.batch_norm(x, None, rows, train=True, causal=True, momentum=0.5)
    for key in ("mean", "var"):
        np.testing.assert_allclose(out.batch_stats[key], bn.batch_stats[key])
        np.testing.assert_array_equal(out.batch_stats[key][length:], rows[key][length:])


@pytest.mark.parametrize("shape", [(6, 3, 2, 4), (9, 5)])
def test_batch_renorm_gradients_with_masks_and_params_match_the_plain_formula(shape):
    # The fused backward (r, d constants) against autodiff of the formula written
    # plainly, in float64, with padding that holds NaN.
    with jax.enable_x64(True):
        rng = np.random.default_rng(sum(shape))
        x = rng.normal(3.0, 2.0, size=shape)
        mask = np.ones(shape, bool)
        mask[-2:] = False
        x[-1] = np.nan
        c = shape[-1]
        running = {"mean": jnp.asarray(rng.normal(size=c)), "var": jnp.full(c, 2.0)}
        params = {"scale": jnp.asarray(rng.normal(size=c)), "bias": jnp.ones(c)}
        w = jnp.asarray(rng.normal(size=shape))
        axes = tuple(range(len(shape) - 1))
        eps = 1e-5

        def reference(x, params):
            valid = jnp.where(mask, x, 0.0)
            n = mask.sum(axes)
            mean = valid.sum(axes) / n
            var = (jnp.where(mask, x - mean, 0.0) ** 2).sum(axes) / n
            sigma_b = jnp.sqrt(var + eps)
            sigma = jnp.sqrt(running["var"] + eps)
            r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / 1.5, 1.5))
            d = jax.lax.stop_gradient(
                jnp.clip((mean - running["mean"]) / sigma, -0.5, 0.5)
            )
            x_hat = jnp.where(mask, (valid - mean) / sigma_b * r + d, 0.0)
            y = x_hat * params["scale"] + params["bias"]
            return jnp.sum(jnp.where(mask, w * y, 0.0))

        def ours(x, params):
            y, _, _ = F.batch_renorm(
                x, params, running, train=True, r_max=1.5, d_max=0.5, mask=mask
            )
            return jnp.sum(jnp.where(mask, w * y, 0.0))

        x = jnp.asarray(x)
        got = jax.grad(ours, argnums=(0, 1))(x, params)
        want = jax.grad(reference, argnums=(0, 1))(x, params)
        assert np.isfinite(np.asarray(got[0])).all()
        np.testing.assert_allclose(got[0], want[0], rtol=1e-7, atol=1e-10)
        for k in ("scale", "bias"):
            np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(ours(x, params), reference(x, params), rtol=1e-10)
