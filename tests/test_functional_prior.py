"""normjax.functional.prior: the prior norm against its formula."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
from functional_refs import params_for

from normjax import functional as F


def ref_prior(x, groups, coef_mean, coef_scale, pop_mean, pop_var, eps, params):
    n, c = x.shape[0], x.shape[-1]
    xg = x.reshape(n, -1, groups, c // groups)
    mu = xg.mean((1, 3), keepdims=True)
    var = xg.var((1, 3), keepdims=True)
    pm = pop_mean.reshape(1, 1, groups, 1)
    pv = pop_var.reshape(1, 1, groups, 1)
    y = (xg - mu) / np.sqrt(var + eps)
    y = y * params["scale"].reshape(groups, -1) + params["bias"].reshape(groups, -1)
    y = y + coef_mean.reshape(groups, -1) * (mu - pm) / np.sqrt(pv + eps)
    y = y + coef_scale.reshape(groups, -1) * 0.5 * np.log((var + eps) / (pv + eps))
    return y.reshape(x.shape)


def test_prior_norm_matches_its_formula_and_updates_population_stats():
    rng = np.random.default_rng(24)
    x = rng.normal(1.0, 2.0, size=(4, 3, 3, 8)) * rng.uniform(0.5, 2, size=(4, 1, 1, 1))
    params = {k: np.asarray(v, np.float64) for k, v in params_for(rng, (8,)).items()}
    coef_mean, coef_scale = rng.normal(size=8), rng.normal(size=8)
    pop = {"mean": rng.normal(size=2), "var": rng.uniform(0.5, 2, size=2)}
    all_params = {**params, "prior_mean": coef_mean, "prior_scale": coef_scale}
    as32 = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), t)  # noqa: E731
    y, new, _ = F.prior_norm(
        jnp.asarray(x, jnp.float32),
        as32(all_params),
        as32(pop),
        train=True,
        num_groups=2,
        momentum=0.9,
    )
    want = ref_prior(x, 2, coef_mean, coef_scale, pop["mean"], pop["var"], 1e-5, params)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    xg = x.reshape(4, 9, 2, 4)
    np.testing.assert_allclose(
        new["mean"], 0.9 * pop["mean"] + 0.1 * xg.mean((0, 1, 3)), rtol=1e-5
    )
    np.testing.assert_allclose(
        new["var"], 0.9 * pop["var"] + 0.1 * xg.var((0, 1, 3)), rtol=1e-5
    )
    # Per sample: identical in training and evaluation, and sample 0 does not see
    # the others.
    y_eval, _, _ = F.prior_norm(
        jnp.asarray(x, jnp.float32),
        as32(all_params),
        as32(pop),
        train=False,
        num_groups=2,
    )
    np.testing.assert_allclose(y_eval, y, atol=1e-6)
    x2 = x.copy()
    x2[1:] = rng.normal(size=x2[1:].shape) * 10
    y2, _, _ = F.prior_norm(
        jnp.asarray(x2, jnp.float32),
        as32(all_params),
        as32(pop),
        train=True,
        num_groups=2,
    )
    np.testing.assert_allclose(y2[0], y[0], atol=1e-6)
    # Zero coefficients: group norm.
    y0, _, _ = F.prior_norm(
        jnp.asarray(x, jnp.float32), as32(params), as32(pop), train=True, num_groups=2
    )
    np.testing.assert_allclose(
        y0,
        F.group_norm(
            jnp.asarray(x, jnp.float32), as32(params), num_groups=2, epsilon=1e-5
        ),
        atol=1e-5,
    )


def test_prior_norm_gradients_match_the_formula_with_masks_float64():
    # The fused group-norm backward (offsets through the moments' cotangent)
    # against autodiff of the formula written plainly, and finite differences.
    with jax.enable_x64(True):
        rng = np.random.default_rng(31)
        n, h, c, groups, eps = 3, 5, 6, 3, 1e-5
        x = jnp.asarray(rng.normal(1.0, 2.0, size=(n, h, c)))
        mask = jnp.asarray(rng.random((n, h, 1)) < 0.75).at[:, 0].set(True)
        pop = {"mean": jnp.asarray(rng.normal(size=groups)), "var": jnp.ones(groups)}
        params = {
            "scale": jnp.asarray(rng.uniform(0.5, 2, c)),
            "bias": jnp.asarray(rng.normal(size=c)),
            "prior_mean": jnp.asarray(rng.normal(size=c)),
            "prior_scale": jnp.asarray(rng.normal(size=c)),
        }
        w = jnp.asarray(rng.normal(size=(n, h, c)))

        def reference(x, p):
            xg = x.reshape(n, h, groups, c // groups)
            mg = jnp.broadcast_to(mask[..., None], xg.shape)
            count = mg.sum((1, 3), keepdims=True)
            mu = jnp.where(mg, xg, 0).sum((1, 3), keepdims=True) / count
            var = jnp.where(mg, (xg - mu) ** 2, 0).sum((1, 3), keepdims=True) / count
            pm = pop["mean"].reshape(1, 1, groups, 1)
            pv = pop["var"].reshape(1, 1, groups, 1)
            g = lambda k: p[k].reshape(groups, -1)  # noqa: E731
            y = jnp.where(mg, (xg - mu) / jnp.sqrt(var + eps), 0) * g("scale")
            y = y + g("bias")
            shift = g("prior_mean") * (mu - pm) / jnp.sqrt(pv + eps)
            shift = shift + g("prior_scale") * 0.5 * jnp.log((var + eps) / (pv + eps))
            y = y + jnp.where(mg, shift, 0)
            return jnp.sum(w * y.reshape(x.shape))

        def ours(x, p):
            y, _, _ = F.prior_norm(x, p, pop, train=True, num_groups=groups, mask=mask)
            return jnp.sum(w * y)

        np.testing.assert_allclose(ours(x, params), reference(x, params), rtol=1e-10)
        got = jax.grad(ours, argnums=(0, 1))(x, params)
        want = jax.grad(reference, argnums=(0, 1))(x, params)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-8, atol=1e-12)
        for k in params:
            np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-8, atol=1e-12)
        jax.test_util.check_grads(ours, (x, params), order=1, modes=["rev"], eps=1e-6)
