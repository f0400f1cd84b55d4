"""normjax.functional as a whole: properties every norm shares (finite values
when fully masked, exactness at large means, gradients against finite
differences, jit/vmap, dtypes, clear errors)."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from functional_refs import as_array

from normjax import functional as F


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, m: F.layer_norm(x, mask=m),
        lambda x, m: F.rms_norm(x, mask=m),
        lambda x, m: F.group_norm(x, num_groups=2, mask=m),
        lambda x, m: F.instance_norm(x, mask=m),
        lambda x, m: (
            F.batch_norm(
                x, None, {"mean": jnp.zeros(4), "var": jnp.ones(4)}, train=True, mask=m
            ).y
        ),
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
        F.batch_norm(x.T, train=True, epsilon=0.0).y.T,
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


NORMS_FOR_GRADS = {
    "layer": lambda x, p: F.layer_norm(x, p),
    "rms": lambda x, p: F.rms_norm(x, p),
    "group": lambda x, p: F.group_norm(x, p, num_groups=2),
    "instance": lambda x, p: F.instance_norm(x, p),
    "batch": lambda x, p: F.batch_norm(x, p, train=True).y,
    "batch_masked": lambda x, p: F.batch_norm(x, p, train=True, mask=x > -0.5).y,
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
            fn = lambda x, p: F.batch_norm(x, p, train=True, mask=mask).y  # noqa: E731
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
    y = jax.vmap(lambda xi: F.batch_norm(xi, train=True).y)(x)
    for i in range(5):
        np.testing.assert_allclose(
            y[i], F.batch_norm(x[i], train=True).y, rtol=1e-5, atol=1e-5
        )


def test_dtype_argument_sets_output_dtype():
    x = jnp.ones((2, 4), jnp.bfloat16)
    assert F.layer_norm(x).dtype == jnp.bfloat16
    assert F.layer_norm(x, dtype=jnp.float32).dtype == jnp.float32
    assert F.batch_norm(x, train=True, dtype=jnp.float32).y.dtype == jnp.float32


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
    with pytest.raises(
        ValueError,
        match="The channel axes cannot include the leading dimension as this is "
        "assumed to be the batch axis.",
    ):
        F.instance_norm(x, feature_axes=0)


def _running(features, *extra):
    stats_ = {"mean": jnp.zeros(features), "var": jnp.ones(features)}
    for key in extra:
        stats_[key] = jnp.zeros(()) if key.endswith("mean") else jnp.ones(())
    return stats_


POOLED_OVER_DEVICES = {
    "batch_norm": lambda x, m, a: F.batch_norm(
        x, None, _running(4), train=True, mask=m, axis_name=a
    ),
    "batch_renorm": lambda x, m, a: F.batch_renorm(
        x, None, _running(4), train=True, mask=m, axis_name=a
    ),
    "batch_layer_norm": lambda x, m, a: F.batch_layer_norm(
        x,
        None,
        _running(4, "feature_mean", "feature_var"),
        train=True,
        mask=m,
        axis_name=a,
    ),
    "prior_norm": lambda x, m, a: F.prior_norm(
        x, None, _running(2), train=True, num_groups=2, mask=m, axis_name=a
    ),
    "power_norm": lambda x, m, a: F.power_norm(
        x, None, {"psi2": jnp.ones(4)}, train=True, variant="pn-v", mask=m, axis_name=a
    ),
    "layer_norm": lambda x, m, a: (F.layer_norm(x, mask=m, axis_name=a), None),
}


def _valid_loss_and_grads(fn, x, mask):
    """Output, new statistics, and the gradient w.r.t. x of a loss over the valid
    outputs, on one "device" of a vmap with axis_name 'd'."""

    def loss(x):
        out = fn(x, mask, "d")
        y, new = (out.y, out.batch_stats) if hasattr(out, "y") else out
        return jnp.sum(jnp.where(mask, jnp.sin(y), 0.0)), (y, new)

    (_, (y, new)), grad = jax.value_and_grad(loss, has_aux=True)(x)
    return y, new, grad


@pytest.mark.parametrize("name", sorted(POOLED_OVER_DEVICES))
@pytest.mark.parametrize("poison", [jnp.nan, jnp.inf], ids=["nan", "inf"])
def test_padding_pooled_over_devices_reaches_nothing(name, poison):
    """Two "devices" (vmap with axis_name) holding different numbers of valid
    elements, NaN or inf planted in the padding: outputs, statistics and
    gradients as with zeros planted, and finite."""
    fn = POOLED_OVER_DEVICES[name]
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(1, 2, size=(2, 4, 3, 4)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 4, 3, 1)) < 0.6).at[:, 0].set(True)
    devices = jax.vmap(
        lambda x, m: _valid_loss_and_grads(fn, x, m), axis_name="d", in_axes=(0, 0)
    )
    clean = devices(jnp.where(mask, x, 0.0), mask)
    poisoned = devices(jnp.where(mask, x, poison), mask)
    for got, want in zip(
        jax.tree.leaves(poisoned), jax.tree.leaves(clean), strict=True
    ):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
