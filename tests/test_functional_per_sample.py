"""normjax.functional.per_sample (layer, RMS, group, instance norm, EvoNorm-S0)
against float64 NumPy references written out here."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from functional_refs import (
    DTYPES,
    as_array,
    check,
    params_for,
    random_input,
    ref_affine,
    ref_normalize,
)
from hypothesis import given
from hypothesis import strategies as st

from normjax import functional as F


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


@pytest.mark.parametrize("shape, groups", [((3, 4, 2, 6), 3), ((4, 5, 8), 2)])
def test_evonorm_s0_gradients_match_the_formula_with_masks_float64(shape, groups):
    # The hand-derived backward against autodiff of the formula written plainly
    # (and finite differences), padding holding NaN.
    with jax.enable_x64(True):
        rng = np.random.default_rng(sum(shape))
        n, c, eps = shape[0], shape[-1], 1e-5
        x = rng.normal(0.5, 2.0, size=shape)
        mask = np.broadcast_to(rng.random(shape[:-1] + (1,)) < 0.7, shape).copy()
        mask[:, 0] = True
        x[~mask] = np.nan
        x = jnp.asarray(x)
        params = {
            "v": jnp.asarray(rng.normal(size=c)),
            "scale": jnp.asarray(rng.uniform(0.5, 2, c)),
            "bias": jnp.asarray(rng.normal(size=c)),
        }
        w = jnp.asarray(rng.normal(size=shape))

        def reference(x, p):
            x0 = jnp.where(mask, x, 0.0)
            xg = x0.reshape(n, -1, groups, c // groups)
            mg = mask.reshape(xg.shape)
            count = mg.sum((1, 3), keepdims=True)
            mu = xg.sum((1, 3), keepdims=True) / count
            var = (jnp.where(mg, xg - mu, 0) ** 2).sum((1, 3), keepdims=True) / count
            std = jnp.sqrt(var + eps)
            y = (xg * jax.nn.sigmoid(xg * p["v"].reshape(groups, -1)) / std).reshape(
                shape
            )
            return jnp.sum(w * (y * p["scale"] + p["bias"]))

        def ours(x, p):
            return jnp.sum(w * F.evonorm_s0(x, p, num_groups=groups, mask=mask))

        np.testing.assert_allclose(ours(x, params), reference(x, params), rtol=1e-10)
        got = jax.grad(ours, argnums=(0, 1))(x, params)
        want = jax.grad(reference, argnums=(0, 1))(x, params)
        assert np.isfinite(np.asarray(got[0])).all()
        np.testing.assert_allclose(got[0], want[0], rtol=1e-8, atol=1e-12)
        for k in params:
            np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-8, atol=1e-12)
        clean = jnp.where(mask, x, 1.0)
        jax.test_util.check_grads(
            ours, (clean, params), order=1, modes=["rev"], eps=1e-6
        )
