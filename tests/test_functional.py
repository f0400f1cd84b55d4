"""normjax.functional against float64 NumPy references written out here."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from normjax import functional as F
from normjax import stats

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}


def ref_normalize(x, axes, mask=None, eps=1e-6, center=True):
    """Plain float64 normalization over ``axes``; masked elements do not count."""
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape) * 1.0
    n = w.sum(axes, keepdims=True)
    mean = (x * w).sum(axes, keepdims=True) / np.maximum(n, 1) if center else 0.0
    var = (w * (x - mean) ** 2).sum(axes, keepdims=True) / np.maximum(n, 1)
    return (x - mean) / np.sqrt(var + eps), mean, var


def ref_affine(y, scale, bias, feature_axes):
    shape = [y.shape[a] if a in feature_axes else 1 for a in range(y.ndim)]
    return y * np.reshape(scale, shape) + np.reshape(bias, shape)


def as_array(x, dtype):
    return jnp.asarray(x, jnp.float32).astype(dtype)


def params_for(rng, shape):
    return {
        "scale": jnp.asarray(rng.uniform(0.5, 2, size=shape), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=shape), jnp.float32),
    }


def check(got, want, dtype):
    assert got.dtype == dtype
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


def random_input(rng, shape, dtype):
    x = rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 3), size=shape)
    # The reference sees exactly what the norm sees: the input after rounding.
    return np.asarray(as_array(x, dtype), np.float64)


DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("masked", [False, True])
def test_layer_and_rms_norm(dtype, seed, masked):
    rng = np.random.default_rng(seed)
    ndim = rng.integers(2, 5)
    shape = tuple(rng.integers(2, 6, size=ndim))
    reduction_axes = tuple(sorted({-1, int(rng.integers(1, ndim)) - ndim}))
    feature_axes = (ndim - 1,)
    x = random_input(rng, shape, dtype)
    mask = rng.random(shape) < 0.8 if masked else None
    params = params_for(rng, shape[-1:])
    for fn, center in ((F.layer_norm, True), (F.rms_norm, False)):
        y = fn(
            as_array(x, dtype),
            params,
            reduction_axes=reduction_axes,
            feature_axes=-1,
            mask=mask,
        )
        ref, _, _ = ref_normalize(
            x, tuple(a % ndim for a in reduction_axes), mask, center=center
        )
        check(y, ref_affine(ref, params["scale"], params["bias"], feature_axes), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,groups,reduction_axes",
    [
        ((3, 4, 5, 8), 4, None),
        ((3, 4, 5, 8), 2, (2, 3)),  # statistics per row: a non-default choice
        ((2, 6, 12), 3, (-1,)),  # per position, per group of channels
        ((2, 6, 12), 12, None),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_group_norm(dtype, shape, groups, reduction_axes, masked):
    rng = np.random.default_rng(len(shape) + groups)
    x = random_input(rng, shape, dtype)
    mask = rng.random(shape) < 0.8 if masked else None
    params = params_for(rng, shape[-1:])
    y = F.group_norm(
        as_array(x, dtype),
        params,
        num_groups=groups,
        reduction_axes=reduction_axes,
        mask=mask,
    )
    ndim = len(shape)
    axes = tuple(range(1, ndim)) if reduction_axes is None else reduction_axes
    axes = tuple(a % ndim for a in axes)
    grouped = x.reshape(*shape[:-1], groups, shape[-1] // groups)
    gmask = None if mask is None else mask.reshape(grouped.shape)
    ref, _, _ = ref_normalize(grouped, (*axes[:-1], ndim), gmask)
    ref = ref.reshape(shape)
    check(y, ref_affine(ref, params["scale"], params["bias"], (ndim - 1,)), dtype)
    # group_size is the other way to say the same thing.
    y2 = F.group_norm(
        as_array(x, dtype),
        params,
        num_groups=None,
        group_size=shape[-1] // groups,
        reduction_axes=reduction_axes,
        mask=mask,
    )
    np.testing.assert_array_equal(np.asarray(y2, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,feature_axes",
    [((3, 5, 6, 4), (-1,)), ((2, 7, 3, 4), (1, 2)), ((2, 4, 5, 3), (1, -1))],
)
def test_instance_norm(dtype, shape, feature_axes):
    rng = np.random.default_rng(len(shape))
    x = random_input(rng, shape, dtype)
    ndim = len(shape)
    features = tuple(sorted(a % ndim for a in feature_axes))
    params = params_for(rng, tuple(shape[a] for a in features))
    y = F.instance_norm(as_array(x, dtype), params, feature_axes=feature_axes)
    axes = tuple(a for a in range(1, ndim) if a not in features)
    ref, _, _ = ref_normalize(x, axes)
    check(y, ref_affine(ref, params["scale"], params["bias"], features), dtype)


def ref_batch_norm_train(x, feature_axes, mask, eps, momentum, running):
    axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    y, mean, var = ref_normalize(x, axes, mask, eps)
    fshape = running["mean"].shape
    new_mean = momentum * running["mean"] + (1 - momentum) * mean.reshape(fshape)
    new_var = momentum * running["var"] + (1 - momentum) * var.reshape(fshape)
    return y, new_mean, new_var


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,axis",
    [((8, 4, 4, 6), -1), ((16, 5), -1), ((4, 6, 3), 1), ((4, 3, 5), (1, 2))],
)
@pytest.mark.parametrize("masked", [False, True])
def test_batch_norm_train_and_eval(dtype, shape, axis, masked):
    rng = np.random.default_rng(sum(shape))
    x = random_input(rng, shape, dtype)
    ndim = len(shape)
    features = tuple(sorted(a % ndim for a in np.atleast_1d(axis)))
    fshape = tuple(shape[a] for a in features)
    mask = rng.random(shape) < 0.7 if masked else None
    params = params_for(rng, fshape)
    running = {
        "mean": jnp.asarray(rng.normal(size=fshape), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2, size=fshape), jnp.float32),
    }
    y, new = F.batch_norm(
        as_array(x, dtype),
        params,
        running,
        train=True,
        axis=axis,
        mask=mask,
        momentum=0.9,
        epsilon=1e-5,
    )
    ref, ref_mean, ref_var = ref_batch_norm_train(
        x, features, mask, 1e-5, 0.9, jax.tree.map(np.asarray, running)
    )
    check(y, ref_affine(ref, params["scale"], params["bias"], features), dtype)
    np.testing.assert_allclose(
        new["mean"], ref_mean.reshape(fshape), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        new["var"], ref_var.reshape(fshape), rtol=1e-5, atol=1e-5
    )
    assert new["mean"].dtype == jnp.float32

    y_eval, same = F.batch_norm(
        as_array(x, dtype), params, new, train=False, axis=axis, epsilon=1e-5
    )
    assert same is new
    bshape = [shape[a] if a in features else 1 for a in range(ndim)]
    ref_eval = (x - np.reshape(new["mean"], bshape)) / np.sqrt(
        np.reshape(new["var"], bshape) + 1e-5
    )
    check(
        y_eval, ref_affine(ref_eval, params["scale"], params["bias"], features), dtype
    )


def test_batch_norm_running_update_exact_value():
    x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    running = {"mean": jnp.array([0.0, 1.0]), "var": jnp.array([1.0, 2.0])}
    _, new = F.batch_norm(x, None, running, train=True, momentum=0.99)
    np.testing.assert_allclose(
        new["mean"], [0.99 * 0 + 0.01 * 2, 0.99 * 1 + 0.01 * 20], rtol=1e-6
    )
    np.testing.assert_allclose(
        new["var"], [0.99 * 1 + 0.01 * 1, 0.99 * 2 + 0.01 * 100], rtol=1e-6
    )
    _, unbiased = F.batch_norm(
        x, None, running, train=True, momentum=0.99, unbiased_running_var=True
    )
    np.testing.assert_allclose(
        unbiased["var"], [0.99 + 0.01 * 2, 0.99 * 2 + 0.01 * 200], rtol=1e-6
    )


def test_batch_norm_without_valid_elements_keeps_running_stats():
    x = jnp.ones((4, 3))
    running = {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([4.0, 5.0, 6.0])}
    y, new = F.batch_norm(x, None, running, train=True, mask=jnp.zeros((4, 1), bool))
    assert np.all(np.isfinite(y))
    for k in running:
        np.testing.assert_array_equal(new[k], running[k])


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("ghost", [4, 5])  # 5: a last, shorter virtual batch of 2
def test_ghost_batch_norm(masked, ghost):
    rng = np.random.default_rng(11)
    x = rng.normal(2, 3, size=(12, 3, 5)).astype(np.float32)
    mask = rng.random(x.shape) < 0.8 if masked else None
    running = {"mean": jnp.zeros(5), "var": jnp.ones(5)}
    y, new = F.batch_norm(
        jnp.asarray(x),
        None,
        running,
        train=True,
        ghost_batch_size=ghost,
        mask=mask,
        momentum=0.0,
    )
    counts, sums, m2s = 0, 0, 0
    for start in range(0, 12, ghost):
        rows = slice(start, start + ghost)
        gm = None if mask is None else mask[rows]
        ref, mean, var = ref_normalize(x[rows], (0, 1), gm, eps=1e-5)
        np.testing.assert_allclose(y[rows], ref, rtol=1e-5, atol=1e-5)
        n = x[rows].shape[0] * 3 if gm is None else gm.sum((0, 1))
        counts = counts + n
        sums = sums + n * mean.reshape(-1)
        m2s = m2s + n * var.reshape(-1)
    # Running statistics: pooled mean, pooled within-group variance.
    np.testing.assert_allclose(new["mean"], sums / counts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], m2s / counts, rtol=1e-5, atol=1e-6)


def test_masked_equals_unmasked_on_valid_subset():
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.normal(size=(10, 4, 6)), jnp.float32)
    valid = jnp.asarray(rng.random(10) < 0.6)
    running = {"mean": jnp.zeros(6), "var": jnp.ones(6)}
    y_masked, s_masked = F.batch_norm(
        x, None, running, train=True, mask=valid[:, None, None]
    )
    y_subset, s_subset = F.batch_norm(x[valid], None, running, train=True)
    np.testing.assert_allclose(y_masked[valid], y_subset, rtol=1e-5, atol=1e-5)
    for k in running:
        np.testing.assert_allclose(s_masked[k], s_subset[k], rtol=1e-6)
    # Per-sample norms: a mask over the features equals dropping those features.
    features = jnp.asarray(rng.random(6) < 0.5).at[0].set(True)
    for fn in (F.layer_norm, F.rms_norm):
        y = fn(x, mask=features)
        np.testing.assert_allclose(
            y[..., features], fn(x[..., features]), rtol=1e-5, atol=1e-5
        )
    y = F.instance_norm(x, mask=valid[None, :4, None])
    np.testing.assert_allclose(
        y[:, valid[:4]], F.instance_norm(x[:, valid[:4]]), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, m: F.layer_norm(x, mask=m),
        lambda x, m: F.rms_norm(x, mask=m),
        lambda x, m: F.group_norm(x, num_groups=2, mask=m),
        lambda x, m: F.instance_norm(x, mask=m),
        lambda x, m: F.batch_norm(
            x, None, {"mean": jnp.zeros(4), "var": jnp.ones(4)}, train=True, mask=m
        )[0],
    ],
    ids=["layer", "rms", "group", "instance", "batch"],
)
def test_fully_masked_gives_finite_values_and_gradients(fn):
    x = jnp.asarray(np.random.default_rng(13).normal(size=(3, 5, 4)), jnp.float32)
    mask = jnp.zeros(x.shape, bool).at[0].set(True)  # samples 1, 2 fully masked
    mask_none = jnp.zeros(x.shape, bool)
    for m in (mask, mask_none):
        y, grad = jax.value_and_grad(lambda x, m=m: jnp.sum(fn(x, m) ** 2))(x)
        assert np.isfinite(y) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_large_mean_small_spread_normalizes_to_unit_std(dtype):
    rng = np.random.default_rng(14)
    x = as_array(300 + 0.1 * rng.normal(size=(64, 512)), dtype)
    for y in (
        F.layer_norm(x, epsilon=0.0),
        F.batch_norm(x.T, train=True, epsilon=0.0)[0].T,
    ):
        assert y.dtype == dtype
        std = np.asarray(y, np.float64).std(-1)
        np.testing.assert_allclose(std, 1.0, rtol=0.02)
    # The trap this guards against: E[x^2] - E[x]^2 in float32 is off by far more.
    x32 = x.astype(jnp.float32)
    naive = jnp.mean(x32**2, -1) - jnp.mean(x32, -1) ** 2
    exact = np.asarray(x32, np.float64).var(-1)
    assert np.max(np.abs(np.asarray(naive) / exact - 1)) > 0.02


def test_bfloat16_cannot_hold_std_point_one_at_300_and_stays_finite():
    # bfloat16's spacing at 300 is 2: 300 + 0.1 z rounds to 300 everywhere, so
    # the honest output is 0, not noise amplified by cancellation.
    x = as_array(
        300 + 0.1 * np.random.default_rng(15).normal(size=(8, 256)), jnp.bfloat16
    )
    assert np.all(np.asarray(x, np.float32) == 300)
    y = F.layer_norm(x)
    assert y.dtype == jnp.bfloat16 and np.all(np.asarray(y, np.float32) == 0)


@given(
    shift=st.floats(-100, 100),
    log_scale=st.floats(-3, 3),
    seed=st.integers(0, 2**16),
)
def test_layer_norm_invariant_to_per_sample_shift_and_scale(shift, log_scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, 32))
    per_sample_shift = shift * rng.uniform(-1, 1, size=(4, 1))
    per_sample_scale = np.exp(log_scale * rng.uniform(0, 1, size=(4, 1)))
    y = F.layer_norm(jnp.asarray(x, jnp.float32), epsilon=0.0)
    y2 = F.layer_norm(
        jnp.asarray(x * per_sample_scale + per_sample_shift, jnp.float32), epsilon=0.0
    )
    np.testing.assert_allclose(y, y2, rtol=1e-3, atol=1e-3)


@given(
    shift=st.floats(-100, 100),
    log_scale=st.floats(-3, 3),
    seed=st.integers(0, 2**16),
)
def test_batch_norm_invariant_to_per_channel_shift_and_scale(shift, log_scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16, 3, 5))
    per_channel_shift = shift * rng.uniform(-1, 1, size=(5,))
    per_channel_scale = np.exp(log_scale * rng.uniform(0, 1, size=(5,)))
    y, _ = F.batch_norm(jnp.asarray(x, jnp.float32), train=True, epsilon=0.0)
    y2, _ = F.batch_norm(
        jnp.asarray(x * per_channel_scale + per_channel_shift, jnp.float32),
        train=True,
        epsilon=0.0,
    )
    np.testing.assert_allclose(y, y2, rtol=1e-3, atol=1e-3)


NORMS_FOR_GRADS = {
    "layer": lambda x, p: F.layer_norm(x, p),
    "rms": lambda x, p: F.rms_norm(x, p),
    "group": lambda x, p: F.group_norm(x, p, num_groups=2),
    "instance": lambda x, p: F.instance_norm(x, p),
    "batch": lambda x, p: F.batch_norm(x, p, train=True)[0],
    "batch_masked": lambda x, p: F.batch_norm(x, p, train=True, mask=x > -0.5)[0],
}


@pytest.mark.parametrize("name", sorted(NORMS_FOR_GRADS))
def test_gradients_match_finite_differences_float64(name):
    with jax.enable_x64(True):
        rng = np.random.default_rng(16)
        x = jnp.asarray(rng.normal(size=(3, 4, 4)))
        p = {
            "scale": jnp.asarray(rng.uniform(0.5, 2, 4)),
            "bias": jnp.asarray(rng.normal(size=4)),
        }
        weights = jnp.asarray(rng.normal(size=(3, 4, 4)))
        fn = NORMS_FOR_GRADS[name]
        if name == "batch_masked":
            mask = jnp.asarray(rng.random((3, 4, 4)) < 0.7)
            fn = lambda x, p: F.batch_norm(x, p, train=True, mask=mask)[0]  # noqa: E731
        assert fn(x, p).dtype == jnp.float64
        jax.test_util.check_grads(
            lambda x, p: jnp.sum(fn(x, p) * weights),
            (x, p),
            order=2,
            modes=["rev"],
            eps=1e-6,
        )


def test_jit_and_vmap_agree_with_eager():
    x = jnp.asarray(np.random.default_rng(17).normal(size=(5, 3, 4, 8)), jnp.float32)
    for fn in (F.layer_norm, F.rms_norm, lambda x: F.group_norm(x, num_groups=4)):
        eager = fn(x)
        np.testing.assert_allclose(jax.jit(fn)(x), eager, rtol=1e-6, atol=1e-6)
    # vmap over an extra leading axis equals a loop over it.
    y = jax.vmap(lambda xi: F.batch_norm(xi, train=True)[0])(x)
    for i in range(5):
        np.testing.assert_allclose(
            y[i], F.batch_norm(x[i], train=True)[0], rtol=1e-5, atol=1e-5
        )


def test_dtype_argument_sets_output_dtype():
    x = jnp.ones((2, 4), jnp.bfloat16)
    assert F.layer_norm(x).dtype == jnp.bfloat16
    assert F.layer_norm(x, dtype=jnp.float32).dtype == jnp.float32
    assert F.batch_norm(x, train=True, dtype=jnp.float32)[0].dtype == jnp.float32


def test_bad_input_gives_clear_errors():
    x = jnp.zeros((4, 6, 8))
    with pytest.raises(ValueError, match="out of range"):
        F.layer_norm(x, reduction_axes=3)
    with pytest.raises(ValueError, match="out of range"):
        F.batch_norm(x, train=True, axis=-4)
    with pytest.raises(
        ValueError,
        match=r"batch_stats\['mean'\] has shape \(4,\).*feature shape \(8,\)",
    ):
        F.batch_norm(x, None, {"mean": jnp.zeros(4), "var": jnp.ones(4)}, train=True)
    with pytest.raises(
        ValueError, match=r"num_groups=3 does not divide the 8 channels"
    ):
        F.group_norm(x, num_groups=3)
    with pytest.raises(ValueError, match="exactly one of num_groups and group_size"):
        F.group_norm(x, num_groups=2, group_size=4)
    with pytest.raises(ValueError, match="must include the last axis"):
        F.group_norm(x, num_groups=2, reduction_axes=(1,))
    with pytest.raises(ValueError, match=r"params\['scale'\] has shape \(6,\)"):
        F.layer_norm(x, {"scale": jnp.ones(6)})
    with pytest.raises(ValueError, match="batch_stats is None"):
        F.batch_norm(x, train=False)
    with pytest.raises(ValueError, match="does not broadcast"):
        F.layer_norm(x, mask=jnp.ones((3,), bool))
    with pytest.raises(ValueError, match="feature_axes may not include axis 0"):
        F.instance_norm(x, feature_axes=0)


# ------------------------------------------------------------- research norms


def ref_batch_stats(x, feature_axes):
    axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    return x.mean(axes, keepdims=True), x.var(axes, keepdims=True)


@pytest.mark.parametrize("r_max,d_max", [(1.0, 0.0), (1.5, 0.5), (3.0, 5.0)])
def test_batch_renorm_matches_paper_formula(r_max, d_max):
    rng = np.random.default_rng(20)
    x = rng.normal(1.0, 2.0, size=(16, 3, 6))
    running = {"mean": rng.normal(size=6), "var": rng.uniform(0.5, 3, size=6)}
    eps = 1e-5
    y, new = F.batch_renorm(
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
            y, F.batch_norm(jnp.asarray(x, jnp.float32), train=True)[0], atol=1e-5
        )
    y_eval, _ = F.batch_renorm(
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
            y, _ = F.batch_renorm(x, None, running, train=True, r_max=1.2, d_max=0.3)
            return jnp.sum(w * y)

        np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(reference)(x), rtol=1e-8)


def test_renorm_limits_schedule():
    limits = [
        F.renorm_limits(s, 3.0, 5.0, (10, 50, 30)) for s in (0, 10, 20, 30, 50, 99)
    ]
    r, d = np.array(limits).T
    np.testing.assert_allclose(r, [1, 1, 1.5, 2, 3, 3])
    np.testing.assert_allclose(d, [0, 0, 2.5, 5, 5, 5])


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

    y, new = F.batch_layer_norm(
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
    y_eval, same = F.batch_layer_norm(
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
        lambda x: jnp.sum(F.batch_layer_norm(x, None, running, train=True)[0] ** 3)
    )(x)
    assert np.isfinite(y) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(
        F.batch_layer_norm(x, None, running, train=True)[0],
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
    padded, _ = F.batch_layer_norm(x, None, running, train=True, mask=mask)
    alone, _ = F.batch_layer_norm(x[valid], None, running, train=True)
    np.testing.assert_allclose(padded[valid], alone, rtol=1e-5, atol=1e-5)


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
    y, new = F.prior_norm(
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
    y_eval, _ = F.prior_norm(
        jnp.asarray(x, jnp.float32),
        as32(all_params),
        as32(pop),
        train=False,
        num_groups=2,
    )
    np.testing.assert_allclose(y_eval, y, atol=1e-6)
    x2 = x.copy()
    x2[1:] = rng.normal(size=x2[1:].shape) * 10
    y2, _ = F.prior_norm(
        jnp.asarray(x2, jnp.float32),
        as32(all_params),
        as32(pop),
        train=True,
        num_groups=2,
    )
    np.testing.assert_allclose(y2[0], y[0], atol=1e-6)
    # Zero coefficients: group norm.
    y0, _ = F.prior_norm(
        jnp.asarray(x, jnp.float32), as32(params), as32(pop), train=True, num_groups=2
    )
    np.testing.assert_allclose(
        y0,
        F.group_norm(
            jnp.asarray(x, jnp.float32), as32(params), num_groups=2, epsilon=1e-5
        ),
        atol=1e-5,
    )


def test_evonorm_s0_matches_its_formula():
    rng = np.random.default_rng(25)
    x = rng.normal(0.5, 2.0, size=(3, 4, 4, 8))
    params = {
        "v": rng.normal(size=8),
        "scale": rng.uniform(0.5, 2, 8),
        "bias": rng.normal(size=8),
    }
    y = F.evonorm_s0(
        jnp.asarray(x, jnp.float32), jax.tree.map(jnp.asarray, params), num_groups=4
    )
    xg = x.reshape(3, 16, 4, 2)
    std = np.sqrt(xg.var((1, 3), keepdims=True) + 1e-5)
    numerator = x * (1 / (1 + np.exp(-params["v"] * x)))
    want = (numerator.reshape(xg.shape) / std).reshape(x.shape) * params[
        "scale"
    ] + params["bias"]
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_batch_norm_causal_modes_match_references():
    rng = np.random.default_rng(26)
    x = rng.normal(1.0, 2.0, size=(3, 5, 4))
    mask = rng.random((3, 5, 1)) < 0.8
    mask[:, 0] = True
    running = {
        "mean": jnp.asarray(rng.normal(size=4), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32),
    }
    x32 = jnp.asarray(x, jnp.float32)
    eps = 1e-5
    y, new = F.batch_norm(
        x32, None, running, train=True, causal=True, mask=mask, momentum=0.0
    )
    for t in range(5):
        ref, _, _ = ref_normalize(x[:, : t + 1], (0, 1), mask[:, : t + 1], eps)
        np.testing.assert_allclose(y[:, t], ref[:, t], rtol=1e-4, atol=1e-4)
    _, pooled_mean, pooled_var = ref_normalize(x, (0, 1), mask, eps)
    np.testing.assert_allclose(new["mean"], pooled_mean.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], pooled_var.ravel(), rtol=1e-5)
    y, new_pp = F.batch_norm(
        x32, None, running, train=True, causal="per_position", mask=mask, momentum=0.0
    )
    ref, _, _ = ref_normalize(x, (0,), mask, eps)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new_pp["mean"], new["mean"], rtol=1e-5, atol=1e-6)
    y, new_run = F.batch_norm(
        x32, None, running, train=True, causal="running", mask=mask, momentum=0.0
    )
    np.testing.assert_allclose(y, F.batch_norm(x32, None, running, train=False)[0])
    np.testing.assert_allclose(new_run["var"], new["var"], rtol=1e-5)
    with pytest.raises(ValueError, match="not a causal mode"):
        F.batch_norm(x32, None, running, train=True, causal="future")


NORMALIZE_CASES = [
    ((4, 5, 6), (0, 1)),
    ((3, 7), (1,)),
    ((2, 3, 4, 5), (1, 2)),
    ((2, 3, 4, 5), (0, 1, 2)),
    ((6, 1, 8), (0, 2)),
]


def _reference_normalize(x, axes, mask, center, epsilon):
    m = stats.moments(x, axes, mask=mask, center=center)
    return F.standardize(x, m, epsilon), m


@pytest.mark.parametrize("shape,axes", NORMALIZE_CASES)
@pytest.mark.parametrize("center", [True, False], ids=["centred", "uncentred"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_normalize_backward_equals_autodiff_of_the_two_pass_forward(
    shape, axes, center, masked, dtype
):
    rng = np.random.default_rng(hash((shape, axes, center, masked)) % 2**32)
    x = jnp.asarray(rng.normal(2, 3, size=shape), dtype)
    mask = jnp.asarray(rng.random(shape) > 0.3) if masked else None
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def loss(fn, x):
        y, m = fn(x)
        # uses the output and both moments, so every cotangent path is checked
        return (
            jnp.sum(w * y)
            + jnp.sum(jnp.sin(m.mean))
            + 0.1 * jnp.sum(jnp.cos(m.m2 / 10))
        )

    def fast(x):
        return F.normalize(x, axes, epsilon=1e-5, mask=mask, center=center)

    def reference(x):
        return _reference_normalize(x, axes, mask, center, 1e-5)

    (y, m), (y_ref, m_ref) = fast(x), reference(x)
    np.testing.assert_array_equal(y, y_ref)
    for a, b in zip(m, m_ref, strict=True):
        np.testing.assert_array_equal(a, b)
    g = jax.jit(jax.grad(lambda x: loss(fast, x)))(x)
    g_ref = jax.grad(lambda x: loss(reference, x))(x)
    assert g.dtype == x.dtype
    scale = float(jnp.max(jnp.abs(g_ref.astype(jnp.float32))))
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(
        np.asarray(g, np.float32) / scale,
        np.asarray(g_ref, np.float32) / scale,
        atol=tolerance,
    )


def test_normalize_fully_masked_slots_and_axis_name_path():
    x = jax.random.normal(jax.random.key(0), (4, 3, 5))
    mask = jnp.ones(x.shape, bool).at[:, :, 2].set(False)  # feature 2 empty

    def loss(x):
        y, _ = F.normalize(x, (0, 1), epsilon=1e-5, mask=mask)
        return jnp.sum(jnp.sin(y))

    g = jax.grad(loss)(x)
    assert np.all(np.isfinite(g))
    # masked-out elements never reach the statistics of their slot
    assert np.all(np.asarray(g[:, :, 2]) != 0)  # y still depends on x there
    # with axis_name (vmap over 2 "devices"): the same as one device on the whole
    parts = x.reshape(2, 2, 3, 5)
    pooled = jax.vmap(
        lambda p: F.normalize(p, (0, 1), epsilon=1e-5, axis_name="d")[0],
        axis_name="d",
    )(parts)
    whole, _ = F.normalize(x, (0, 1), epsilon=1e-5)
    np.testing.assert_allclose(pooled.reshape(x.shape), whole, rtol=1e-5, atol=1e-5)


def test_normalize_rejects_negative_epsilon():
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        F.normalize(jnp.ones((2, 3)), -1, epsilon=-1.0)
