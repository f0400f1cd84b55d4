"""normjax.functional.core: the fused ``normalize`` and its hand-derived backward
pass against autodiff of the plain two-pass forward."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from normjax import functional as F
from normjax import stats

NORMALIZE_CASES = [
    ((4, 5, 6), (0, 1)),
    ((3, 7), (1,)),
    ((2, 3, 4, 5), (1, 2)),
    ((2, 3, 4, 5), (0, 1, 2)),
    ((6, 1, 8), (0, 2)),
]


def _reference_normalize(x, axes, mask, center, epsilon):
    # Masked elements standardize to 0: the reference selects them out too.
    m = stats.moments(x, axes, mask=mask, center=center)
    return F.standardize(x, stats.mean_var(m), epsilon, mask), m


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
    # a masked element's output is the bias alone: no gradient reaches it
    assert np.all(np.asarray(g[:, :, 2]) == 0)
    # with axis_name (vmap over 2 "devices"): the same as one device on the whole
    parts = x.reshape(2, 2, 3, 5)
    pooled = jax.vmap(
        lambda p: F.normalize(p, (0, 1), epsilon=1e-5, axis_name="d").y,
        axis_name="d",
    )(parts)
    whole, _ = F.normalize(x, (0, 1), epsilon=1e-5)
    np.testing.assert_allclose(pooled.reshape(x.shape), whole, rtol=1e-5, atol=1e-5)


def test_normalize_rejects_negative_epsilon():
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        F.normalize(jnp.ones((2, 3)), -1, epsilon=-1.0)


@pytest.mark.parametrize("shape,axes", NORMALIZE_CASES)
@pytest.mark.parametrize("center", [True, False], ids=["centred", "uncentred"])
@pytest.mark.parametrize("poison", [jnp.nan, jnp.inf, -jnp.inf])
def test_normalize_backward_ignores_what_padding_holds(shape, axes, center, poison):
    rng = np.random.default_rng(hash((shape, axes, center)) % 2**32)
    x = jnp.asarray(rng.normal(2, 3, size=shape), jnp.float32)
    mask = jnp.asarray(rng.random(shape) > 0.3)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def loss(x):
        y, m = F.normalize(x, axes, epsilon=1e-5, mask=mask, center=center)
        return (
            jnp.sum(jnp.where(mask, w * y, 0.0))
            + jnp.sum(jnp.sin(m.mean))
            + 0.1 * jnp.sum(jnp.cos(m.m2 / 10))
        )

    clean = jax.jit(jax.value_and_grad(loss))(jnp.where(mask, x, 0.0))
    poisoned = jax.jit(jax.value_and_grad(loss))(jnp.where(mask, x, poison))
    for got, want in zip(poisoned, clean, strict=True):
        assert np.all(np.isfinite(got))
        np.testing.assert_array_equal(got, want)
    y, _ = F.normalize(jnp.where(mask, x, poison), axes, epsilon=1e-5, mask=mask)
    np.testing.assert_array_equal(np.asarray(y)[~np.asarray(mask)], 0.0)


@pytest.mark.parametrize("shape,axes", NORMALIZE_CASES)
@pytest.mark.parametrize("center", [True, False], ids=["centred", "uncentred"])
def test_masked_normalize_with_parameters_equals_autodiff(shape, axes, center):
    """Scale and bias, a loss that reads the padded outputs too (they are the
    bias), cotangents on both moments: the fused backward against autodiff of
    the selected two-pass forward, float64."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(hash((shape, axes, center, "p")) % 2**32)
        x = jnp.asarray(rng.normal(2, 3, size=shape))
        mask = jnp.asarray(rng.random(shape) > 0.3)
        w = jnp.asarray(rng.normal(size=shape))
        features = tuple(a for a in range(len(shape)) if a not in axes)[-1:]
        pshape = tuple(shape[a] for a in features)
        params = {
            "scale": jnp.asarray(rng.uniform(0.5, 2, size=pshape)),
            "bias": jnp.asarray(rng.normal(size=pshape)),
        }

        def loss(normalized, x, params):
            y, m = normalized(x, params)
            return (
                jnp.sum(w * y)
                + jnp.sum(jnp.sin(m.mean))
                + 0.1 * jnp.sum(jnp.cos(m.m2 / 10))
            )

        def fast(x, params):
            return F.normalize(
                x,
                axes,
                epsilon=1e-5,
                mask=mask,
                center=center,
                params=params,
                feature_axes=features,
            )

        def reference(x, params):
            y, m = _reference_normalize(x, axes, mask, center, 1e-5)
            return F.affine(y, params, features), m

        got = jax.grad(lambda *a: loss(fast, *a), argnums=(0, 1))(x, params)
        want = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1))(x, params)
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-10)


def test_an_empty_slot_with_no_epsilon_stays_finite():
    x = jax.random.normal(jax.random.key(0), (4, 3, 5))
    mask = jnp.ones(x.shape, bool).at[:, :, 2].set(False)  # feature 2 empty

    def loss(x, scale):
        y, _ = F.normalize(
            x, (0, 1), epsilon=0.0, mask=mask, params={"scale": scale}, feature_axes=-1
        )
        causal = F.layer_norm(
            x,
            reduction_axes=(1, 2),
            epsilon=0.0,
            mask=mask.at[:, 0].set(False),
            causal="cumulative",
            time_axis=1,
        )
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.sin(causal))

    grads = jax.grad(loss, argnums=(0, 1))(x, jnp.ones(5))
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize(
    "shape,axes,features",
    [
        ((1024, 4, 4), (0, 1), (2,)),  # batch norm
        ((8, 32, 32, 4, 2), (1, 2, 4), (3, 4)),  # group norm, groups of 2 channels
        ((4, 32, 32, 3), (1, 2), (3,)),  # instance norm
    ],
    ids=["batch", "group", "instance"],
)
@pytest.mark.parametrize("offset", [0.0, 1.6, 2.0, 1e4], ids=lambda o: f"mean{o}std")
def test_float32_backward_is_exact_at_any_mean(shape, axes, features, offset):
    """Unmasked batch, group and instance norm sum dy x - mean sum dy where every
    slot's |mean| <= sqrt(3) std and the centred sums otherwise: either way the
    float32 gradients match float64 autodiff of the formula to float32 rounding,
    below the bound (0, 1.6 std), above it (2 std) and far above (1e4 std, where
    float32 rounds x itself to ~1e-3 of its std, and sum dy x - mean sum dy over
    thousands of elements would be 5-20x further from float64 than this allows:
    measured with the guard forced open)."""
    rng = np.random.default_rng(len(shape) + int(offset))
    x64 = rng.normal(size=shape) * 0.5 + offset * 0.5
    w64 = rng.normal(size=shape)
    pshape = tuple(shape[a] for a in features)
    scale64 = rng.uniform(0.5, 2, size=pshape)

    def loss(x, scale, w):
        y, m = F.normalize(
            x, axes, epsilon=1e-5, params={"scale": scale}, feature_axes=features
        )
        return jnp.sum(w * y) + jnp.sum(jnp.sin(m.mean)) + 1e-3 * jnp.sum(m.m2)

    def reference(x, scale, w):
        mean = jnp.mean(x, axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-5)
        shape_b = [shape[a] if a in features else 1 for a in range(len(shape))]
        n = np.prod([shape[a] for a in axes])
        return (
            jnp.sum(w * y * scale.reshape(shape_b))
            + jnp.sum(jnp.sin(mean))
            + 1e-3 * jnp.sum(var * n)
        )

    args32 = [jnp.asarray(a, jnp.float32) for a in (x64, scale64, w64)]
    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(*args32)
    with jax.enable_x64(True):
        want = jax.grad(reference, argnums=(0, 1))(
            *(
                jnp.asarray(a.astype(np.float32), jnp.float64)
                for a in (x64, scale64, w64)
            )
        )
        want = [np.asarray(w) for w in want]
    for g, r in zip(got, want, strict=True):
        size = np.max(np.abs(r))
        np.testing.assert_allclose(
            np.asarray(g) / size, r / size, atol=2e-6 + 8e-8 * offset
        )
