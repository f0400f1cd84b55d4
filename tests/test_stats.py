"""normjax.stats against float64 NumPy written out here."""

import itertools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from normjax import stats


def ref_moments(x, axes, mask=None):
    """count, mean, m2 in float64, keepdims."""
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape) * 1.0
    count = w.sum(axes, keepdims=True)
    mean = np.where(
        count > 0, (x * w).sum(axes, keepdims=True) / np.maximum(count, 1), 0
    )
    m2 = (w * (x - mean) ** 2).sum(axes, keepdims=True)
    return count, mean, m2


def random_case(seed):
    rng = np.random.default_rng(seed)
    ndim = rng.integers(1, 5)
    shape = tuple(rng.integers(1, 6, size=ndim))
    naxes = rng.integers(1, ndim + 1)
    axes = tuple(sorted(rng.choice(ndim, size=naxes, replace=False).tolist()))
    x = rng.normal(rng.uniform(-5, 5), rng.uniform(0.1, 3), size=shape)
    mask = rng.random(shape) < 0.7
    return x.astype(np.float32), axes, mask


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("masked", [False, True])
def test_moments_match_float64_reference(seed, masked):
    x, axes, mask = random_case(seed)
    mask = mask if masked else None
    got = stats.moments(jnp.asarray(x), axes, mask=mask)
    want = ref_moments(x, axes, mask)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)


def test_moments_negative_axes_and_no_keepdims():
    x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    got = stats.moments(jnp.asarray(x), (-1, 0), keepdims=False)
    assert got.mean.shape == (4,)
    np.testing.assert_allclose(got.mean, x.mean((0, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        stats.variance(got), x.astype(np.float64).var((0, 2)), rtol=1e-5
    )


def test_uncentred_moments_are_sum_of_squares():
    x = np.random.default_rng(1).normal(3, 1, size=(4, 6)).astype(np.float32)
    got = stats.moments(jnp.asarray(x), -1, center=False)
    np.testing.assert_array_equal(got.mean, 0)
    np.testing.assert_allclose(
        got.m2, (x.astype(np.float64) ** 2).sum(-1, keepdims=True), rtol=1e-6
    )


def test_large_mean_small_spread_keeps_variance():
    # Mean 300, std 0.1 in float32: E[x^2] - E[x]^2 loses most of the variance.
    rng = np.random.default_rng(2)
    x = (300 + 0.1 * rng.normal(size=(4096,))).astype(np.float32)
    want = x.astype(np.float64).var()
    got = float(stats.variance(stats.moments(jnp.asarray(x), 0)).squeeze())
    assert abs(got / want - 1) < 1e-3
    xj = jnp.asarray(x)
    naive = float(jnp.mean(xj * xj) - jnp.mean(xj) ** 2)
    assert abs(naive / want - 1) > 0.02, "the naive formula should fail here"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float64])
def test_statistics_are_at_least_float32(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        x = jnp.ones((4, 3), dtype)
        m = stats.moments(x, 0)
        assert m.mean.dtype == jnp.promote_types(dtype, jnp.float32)


def test_merge_equals_moments_of_union():
    rng = np.random.default_rng(3)
    a = rng.normal(10, 2, size=(7, 3)).astype(np.float32)
    b = rng.normal(-4, 5, size=(11, 3)).astype(np.float32)
    merged = stats.merge(stats.moments(a, 0), stats.moments(b, 0))
    want = ref_moments(np.concatenate([a, b]), 0)
    for g, w in zip(merged, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def test_merge_with_empty_side_is_identity():
    a = stats.moments(jnp.arange(5.0), 0)
    empty = stats.Moments(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1))
    for merged in (stats.merge(a, empty), stats.merge(empty, a)):
        for g, w in zip(merged, a, strict=True):
            np.testing.assert_allclose(g, w)


def test_merge_over_and_prefix_merge():
    rng = np.random.default_rng(4)
    x = rng.normal(2, 3, size=(5, 6, 4)).astype(np.float32)
    mask = rng.random(x.shape) < 0.6
    mask[2] = False  # one slot empty: it must merge as nothing.
    per_slot = stats.moments(jnp.asarray(x), 1, mask=mask)  # (5, 1, 4)
    pooled = stats.merge_over(per_slot, 0)
    for g, w in zip(pooled, ref_moments(x, (0, 1), mask), strict=True):
        np.testing.assert_allclose(g, np.squeeze(w, 0), rtol=1e-5, atol=1e-4)
    prefix = stats.prefix_merge(per_slot, 0)
    for t in range(5):
        want = ref_moments(x[: t + 1], (0, 1), mask[: t + 1])
        for g, w in zip(prefix, want, strict=True):
            np.testing.assert_allclose(g[t : t + 1], w, rtol=1e-5, atol=1e-4)


def test_variance_ddof_clamp_and_empty():
    m = stats.Moments(
        jnp.array([0.0, 1.0, 4.0, 4.0]), jnp.zeros(4), jnp.array([0.0, 0.0, 6.0, -1e-9])
    )
    np.testing.assert_allclose(stats.variance(m), [0, 0, 1.5, 0])
    np.testing.assert_allclose(stats.variance(m, ddof=1), [0, 0, 2.0, 0])


def test_ema_one_step_exact():
    running = jnp.array([1.0, 2.0])
    value = jnp.array([3.0, -2.0])
    np.testing.assert_allclose(
        stats.ema(running, value, 0.9), [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2]
    )
    assert stats.from_pytorch_momentum(0.1) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="momentum"):
        stats.from_pytorch_momentum(1.5)


def test_axis_name_pools_unequal_valid_counts_exactly():
    # 4 "devices" under vmap; each holds 6 rows, with 6, 1, 0 and 3 of them valid.
    rng = np.random.default_rng(5)
    x = (
        rng.normal(size=(4, 6, 3)).astype(np.float32)
        * np.array([1, 10, 100, 3])[:, None, None]
    )
    valid = np.array([6, 1, 0, 3])
    mask = (np.arange(6)[None, :] < valid[:, None])[..., None]
    per_device = jax.vmap(
        lambda xi, mi: stats.moments(xi, 0, mask=mi, axis_name="d"), axis_name="d"
    )(jnp.asarray(x), jnp.asarray(mask))
    want = ref_moments(x, (0, 1), mask)
    for g, w in zip(per_device, want, strict=True):
        for device in range(4):  # every device holds the pooled result
            np.testing.assert_allclose(g[device], w[0], rtol=1e-5, atol=1e-3)


def test_fully_masked_gives_zero_statistics_and_finite_gradients():
    x = jnp.arange(6.0).reshape(2, 3)
    mask = jnp.zeros((2, 3), bool)
    m = stats.moments(x, 1, mask=mask)
    assert all(np.all(np.asarray(s) == 0) for s in m)
    grad = jax.grad(lambda x: stats.variance(stats.moments(x, 1, mask=mask)).sum())(x)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("axes", [3, -4, (0, 5)])
def test_axes_out_of_range_is_a_clear_error(axes):
    with pytest.raises(ValueError, match="out of range"):
        stats.moments(jnp.zeros((2, 3, 4)), axes)


def test_split_groups():
    x = jnp.arange(24).reshape(2, 12)
    assert stats.split_groups(x, 1, 4, name="g").shape == (2, 3, 4)
    assert stats.split_groups(x, 0, 1, name="g").shape == (2, 1, 12)
    with pytest.raises(ValueError, match="divisor of 12"):
        stats.split_groups(x, -1, 5, name="group_size")


def test_moments_grad_matches_finite_differences_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        x = jnp.asarray(rng.normal(size=(4, 5)))
        mask = jnp.asarray(rng.random((4, 5)) < 0.7)

        def f(x):
            m = stats.moments(x, 0, mask=mask)
            return jnp.sum(m.mean * 3) + jnp.sum(stats.variance(m) ** 2)

        jax.test_util.check_grads(f, (x,), order=2, modes=["rev"], eps=1e-5)


def test_jit_and_vmap_agree_with_eager():
    x = jnp.asarray(np.random.default_rng(7).normal(size=(3, 4, 5)), jnp.float32)
    eager = stats.moments(x, (1, 2))
    jitted = jax.jit(lambda x: stats.moments(x, (1, 2)))(x)
    mapped = jax.vmap(lambda xi: stats.moments(xi, (0, 1)))(x)
    for a, b, c in itertools.zip_longest(eager, jitted, mapped):
        np.testing.assert_allclose(a, b, rtol=1e-6)
        np.testing.assert_allclose(a.reshape(c.shape), c, rtol=1e-6)


@pytest.mark.parametrize("offset", [0.0, 1.5, 1e2, 1e3])
@pytest.mark.parametrize("masked", [False, True])
def test_moments_exact_whichever_pass_runs(offset, masked):
    """One fused pass where |mean| <= sqrt(3) std, the two-pass sums beyond: the
    variance stays float32-exact even when |mean| >> std (Flax's one-pass
    E[x^2] - E[x]^2 loses it), under vmap too (where cond runs both)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 5, 3)) * [1.0, 0.1, 3.0] + offset * np.array([1, 1, -1])
    mask = rng.random((64, 5, 1)) < 0.7 if masked else None
    x32 = jnp.asarray(x, jnp.float32)
    m = stats.moments(x32, (0, 1), mask=None if mask is None else jnp.asarray(mask))
    want = ref_moments(np.asarray(x32, np.float64), (0, 1), mask)
    np.testing.assert_allclose(m.mean, want[1], rtol=1e-6, atol=1e-6 * (1 + offset))
    var, want_var = np.asarray(stats.variance(m)), want[2] / want[0]
    np.testing.assert_allclose(var, want_var, rtol=2e-5)
    batched = jax.vmap(lambda v: stats.variance(stats.moments(v, (0,))))(
        jnp.moveaxis(x32, 1, 0)[:, :, None, :]
    )
    np.testing.assert_allclose(
        batched[:, 0, 0, :], np.var(np.asarray(x32, np.float64), 0), rtol=2e-5
    )


def test_mean_var_of_moments_and_masked_sum_select_out_padding():
    x = np.array([[1.0, 2.0, np.nan], [4.0, np.inf, 6.0]], np.float32)
    mask = np.isfinite(x)
    total = stats.masked_sum(jnp.asarray(x), 1, mask=jnp.asarray(mask))
    np.testing.assert_array_equal(total, [[3.0], [10.0]])
    m = stats.moments(np.where(mask, x, 0.0), 1, mask=mask)
    mv = stats.mean_var(m)
    assert isinstance(mv, stats.MeanVar)
    np.testing.assert_allclose(mv.mean, [[1.5], [5.0]])
    np.testing.assert_allclose(mv.var, [[0.25], [1.0]])
    np.testing.assert_allclose(stats.mean_var(m, ddof=1).var, [[0.5], [2.0]])
    # pooled over a mapped axis: the sum over both "devices"
    parts = jnp.arange(6.0).reshape(2, 3)
    pooled = jax.vmap(lambda p: stats.masked_sum(p, 0, axis_name="d"), axis_name="d")
    np.testing.assert_array_equal(pooled(parts), [[15.0], [15.0]])


def test_safe_div_and_masked_ema():
    np.testing.assert_array_equal(
        stats.safe_div(jnp.array([1.0, 2.0]), jnp.array([2.0, 0.0])), [0.5, 0.0]
    )
    grad = jax.grad(lambda d: stats.safe_div(1.0, d))(0.0)
    assert np.isfinite(grad)
    running = jnp.array([1.0, 1.0])
    new = stats.ema(
        running, jnp.array([3.0, 3.0]), 0.75, valid=jnp.array([True, False])
    )
    np.testing.assert_allclose(new, [1.5, 1.0])
