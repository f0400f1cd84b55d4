"""normjax.functional.batch: batch norm, ghost batches, masks and causal modes
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
    y, new, _ = F.batch_norm(
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

    y_eval, same, _ = F.batch_norm(
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
    _, new, _ = F.batch_norm(x, None, running, train=True, momentum=0.99)
    np.testing.assert_allclose(
        new["mean"], [0.99 * 0 + 0.01 * 2, 0.99 * 1 + 0.01 * 20], rtol=1e-6
    )
    np.testing.assert_allclose(
        new["var"], [0.99 * 1 + 0.01 * 1, 0.99 * 2 + 0.01 * 100], rtol=1e-6
    )
    _, unbiased, _ = F.batch_norm(
        x, None, running, train=True, momentum=0.99, unbiased_running_var=True
    )
    np.testing.assert_allclose(
        unbiased["var"], [0.99 + 0.01 * 2, 0.99 * 2 + 0.01 * 200], rtol=1e-6
    )


def test_batch_norm_without_valid_elements_keeps_running_stats():
    x = jnp.ones((4, 3))
    running = {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([4.0, 5.0, 6.0])}
    y, new, _ = F.batch_norm(x, None, running, train=True, mask=jnp.zeros((4, 1), bool))
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
    y, new, _ = F.batch_norm(
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
    y_masked, s_masked, _ = F.batch_norm(
        x, None, running, train=True, mask=valid[:, None, None]
    )
    y_subset, s_subset, _ = F.batch_norm(x[valid], None, running, train=True)
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
    y, _, _ = F.batch_norm(jnp.asarray(x, jnp.float32), train=True, epsilon=0.0)
    y2, _, _ = F.batch_norm(
        jnp.asarray(x * per_channel_scale + per_channel_shift, jnp.float32),
        train=True,
        epsilon=0.0,
    )
    np.testing.assert_allclose(y, y2, rtol=1e-3, atol=1e-3)


def test_pooled_causal_statistics_match_references():
    """per_position_stats=False: one row, updated from the whole window."""
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
    y, new, _ = F.batch_norm(
        x32,
        None,
        running,
        train=True,
        causal=True,
        mask=mask,
        momentum=0.0,
        per_position_stats=False,
    )
    for t in range(5):
        ref, _, _ = ref_normalize(x[:, : t + 1], (0, 1), mask[:, : t + 1], eps)
        np.testing.assert_allclose(y[:, t], ref[:, t], rtol=1e-4, atol=1e-4)
    _, pooled_mean, pooled_var = ref_normalize(x, (0, 1), mask, eps)
    np.testing.assert_allclose(new["mean"], pooled_mean.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], pooled_var.ravel(), rtol=1e-5)
    y, new_pp, _ = F.batch_norm(
        x32,
        None,
        running,
        train=True,
        causal="per_position",
        mask=mask,
        momentum=0.0,
        per_position_stats=False,
    )
    ref, _, _ = ref_normalize(x, (0,), mask, eps)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new_pp["mean"], new["mean"], rtol=1e-5, atol=1e-6)
    y, new_run, _ = F.batch_norm(
        x32,
        None,
        running,
        train=True,
        causal="running",
        mask=mask,
        momentum=0.0,
        per_position_stats=False,
    )
    evaluated = F.batch_norm(x32, None, running, train=False, mask=mask).y
    np.testing.assert_allclose(y, evaluated)
    np.testing.assert_allclose(new_run["var"], new["var"], rtol=1e-5)
    with pytest.raises(ValueError, match="not a causal mode"):
        F.batch_norm(x32, None, running, train=True, causal="future")


def ref_position_stats(x, mask, mode, groups=1):
    """Float64 (L, D) mean and within-batch variance that position t is
    normalized with: over (batch, positions <= t) or (batch, position t); with
    ``groups`` ghost batches, the count-weighted mean of the groups' means and
    their summed squared deviations over the total count."""
    b, length, _ = x.shape
    w = np.broadcast_to(mask, x.shape) * 1.0
    x = np.where(w > 0, x, 0.0)
    means, variances = [], []
    for t in range(length):
        lo = 0 if mode == "cumulative" else t
        xs, ws = x[:, lo : t + 1], w[:, lo : t + 1]
        count = total = m2 = 0.0
        group_stats = []
        for g in np.array_split(np.arange(b), groups):
            n = ws[g].sum((0, 1))
            mu = (xs[g] * ws[g]).sum((0, 1)) / np.maximum(n, 1)
            group_stats.append((n, mu, (ws[g] * (xs[g] - mu) ** 2).sum((0, 1))))
        count = sum(n for n, _, _ in group_stats)
        total = sum(n * mu for n, mu, _ in group_stats)
        m2 = sum(m for _, _, m in group_stats)
        means.append(total / np.maximum(count, 1))
        variances.append(m2 / np.maximum(count, 1))
    return np.stack(means), np.stack(variances)


@pytest.mark.parametrize("mode", ["cumulative", "per_position", "running"])
@pytest.mark.parametrize("ghost", [None, 2])
def test_per_position_running_statistics_follow_what_each_position_used(mode, ghost):
    if ghost and mode == "running":
        pytest.skip("causal='running' normalizes with running statistics")
    rng = np.random.default_rng(41)
    b, length, d, max_len = 4, 5, 3, 7
    x = rng.normal(1.0, 2.0, size=(b, length, d)) + np.arange(length)[:, None]
    mask = rng.random((b, length, 1)) < 0.8
    mask[:, 0] = True
    mask[:, 3] = False  # a position no sample has: its row keeps its value
    x = np.where(mask, x, np.nan)  # padding may hold anything
    old = {
        "mean": jnp.asarray(rng.normal(size=(max_len, d)), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2, (max_len, d)), jnp.float32),
    }
    momentum = 0.75
    out = F.batch_norm(
        jnp.asarray(x, jnp.float32),
        None,
        old,
        train=True,
        causal=mode,
        mask=mask,
        momentum=momentum,
        ghost_batch_size=ghost,
    )
    stat_mode = "per_position" if mode == "running" else mode
    mean, var = ref_position_stats(x, mask, stat_mode, groups=b // (ghost or b))
    want_mean = np.array(old["mean"], np.float64)
    want_var = np.array(old["var"], np.float64)
    seen = np.broadcast_to(mask, x.shape).any(0)  # (L, D) for per_position
    if stat_mode == "cumulative":
        seen = np.logical_or.accumulate(seen, axis=0)
    rows = slice(0, length)
    want_mean[rows] = np.where(
        seen, momentum * want_mean[rows] + (1 - momentum) * mean, want_mean[rows]
    )
    want_var[rows] = np.where(
        seen, momentum * want_var[rows] + (1 - momentum) * var, want_var[rows]
    )
    np.testing.assert_allclose(out.batch_stats["mean"], want_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.batch_stats["var"], want_var, rtol=1e-5, atol=1e-5)
    # Evaluation (and causal='running' training) reads row t at position t.
    evaluated = F.batch_norm(
        jnp.asarray(x, jnp.float32), None, old, train=False, causal=mode, mask=mask
    ).y
    ref = (x - np.asarray(old["mean"])[:length]) / np.sqrt(
        np.asarray(old["var"])[:length] + 1e-5
    )
    np.testing.assert_allclose(
        evaluated, np.where(mask, ref, 0.0), rtol=1e-5, atol=1e-5
    )
    if mode == "running":
        np.testing.assert_allclose(out.y, evaluated)


def test_per_position_statistics_past_max_len_reuse_the_last_row():
    rng = np.random.default_rng(43)
    max_len, d = 3, 2
    old = {
        "mean": jnp.asarray(rng.normal(size=(max_len, d)), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2, (max_len, d)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(2, 6, d)), jnp.float32)
    y = F.batch_norm(x, None, old, train=False, causal=True).y
    rows = np.minimum(np.arange(6), max_len - 1)
    mean, var = np.asarray(old["mean"])[rows], np.asarray(old["var"])[rows]
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5)
    # shorter sequences use the first rows
    y = F.batch_norm(x[:, :2], None, old, train=False, causal=True).y
    np.testing.assert_allclose(
        y, (x[:, :2] - mean[:2]) / np.sqrt(var[:2] + 1e-5), rtol=1e-5
    )
    with pytest.raises(ValueError, match="max_len >= 6"):
        F.batch_norm(x, None, old, train=True, causal=True)
    with pytest.raises(ValueError, match="per_position_stats=False"):
        F.batch_norm(
            x,
            None,
            {"mean": old["mean"][0], "var": old["var"][0]},
            train=False,
            causal=True,
        )


def test_per_position_statistics_with_time_after_the_features():
    """(B, D, L) with time last: rows are still (max_len, D)."""
    rng = np.random.default_rng(44)
    x = rng.normal(size=(3, 2, 4))  # features on axis 1, time on axis 2
    old = {"mean": jnp.zeros((4, 2)), "var": jnp.ones((4, 2))}
    out = F.batch_norm(
        jnp.asarray(x, jnp.float32),
        None,
        old,
        train=True,
        axis=1,
        causal=True,
        time_axis=2,
        momentum=0.0,
    )
    mean, var = ref_position_stats(
        np.moveaxis(x, 1, 2), np.ones((3, 4, 1), bool), "cumulative"
    )
    np.testing.assert_allclose(out.batch_stats["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.batch_stats["var"], var, rtol=1e-5, atol=1e-6)
    y = F.batch_norm(
        jnp.asarray(x, jnp.float32),
        None,
        out.batch_stats,
        train=False,
        axis=1,
        causal=True,
        time_axis=2,
    ).y
    want = (x - mean.T[None]) / np.sqrt(var.T[None] + 1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_complex_batch_norm_matches_float64_reference(masked):
    rng = np.random.default_rng(31)
    shape = (6, 5, 3)
    x = rng.normal(1, 2, size=shape) + 1j * rng.normal(-1, 0.5, size=shape)
    mask = rng.random((6, 5, 1)) < 0.7 if masked else np.ones((6, 5, 1), bool)
    mask[0, 0] = True
    w = np.broadcast_to(mask, shape)
    n = w.sum((0, 1))
    mean = (np.where(w, x, 0)).sum((0, 1)) / n
    var = (np.where(w, np.abs(x - mean) ** 2, 0)).sum((0, 1)) / n  # real
    want = np.where(w, (x - mean) / np.sqrt(var + 1e-5), 0)
    running = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
    x64 = jnp.asarray(np.where(w, x, np.nan), jnp.complex64)
    y, new, _ = F.batch_norm(
        x64, None, running, train=True, momentum=0.9, mask=mask if masked else None
    )
    assert y.dtype == jnp.complex64
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    assert jnp.iscomplexobj(new["mean"]) and not jnp.iscomplexobj(new["var"])
    np.testing.assert_allclose(new["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * var, rtol=1e-5)
    # evaluation with the complex running mean
    y_eval, _, _ = F.batch_norm(x64, None, new, train=False, mask=mask)
    want_eval = np.where(w, (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-5), 0)
    np.testing.assert_allclose(y_eval, want_eval, rtol=1e-4, atol=1e-4)


def test_per_position_rows_of_a_complex_input_become_complex():
    rng = np.random.default_rng(49)
    x = rng.normal(size=(3, 4, 2)) + 1j * rng.normal(size=(3, 4, 2))
    rows = {"mean": jnp.zeros((4, 2)), "var": jnp.ones((4, 2))}
    new = F.batch_norm(
        jnp.asarray(x, jnp.complex64), None, rows, train=True, causal=True
    ).batch_stats
    assert jnp.iscomplexobj(new["mean"]) and not jnp.iscomplexobj(new["var"])
    want = 0.01 * np.stack([x[:, : t + 1].mean((0, 1)) for t in range(4)])
    np.testing.assert_allclose(new["mean"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [F.batch_norm, F.batch_renorm])
def test_example_weighting_leaves_causal_running_mode_as_trained(fn):
    """causal='running' trains on running statistics: example weighting, which
    stands in for batch statistics, does not apply to it."""
    rng = np.random.default_rng(62)
    x = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
    rows = {"mean": jnp.ones((5, 3)), "var": 2 * jnp.ones((5, 3))}
    plain = fn(x, None, rows, train=False, causal="running").y
    weighted = fn(x, None, rows, train=False, causal="running", example_weight=0.25).y
    np.testing.assert_array_equal(plain, weighted)
    other = fn(x, None, rows, train=False, causal=True, example_weight=0.25).y
    assert not np.allclose(plain, other)
