"""normjax.functional.reference and nn.ReferenceNorm / nn.WithReference:
reference (virtual) batch norm against a float64 NumPy reference, its gradients,
masks, the model wrapper, and training at batch size 1."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
from functional_refs import params_for

import normjax
from normjax import functional as F
from normjax import models


def ref_reference_norm(x, r, mask, params, eps=1e-5):
    """Float64, one sample at a time: R's statistics over every axis but the
    features; the sample's over R's elements and its own together."""
    x = np.asarray(x, np.float64)
    mask = np.broadcast_to(np.ones((), bool) if mask is None else mask, x.shape)
    features = x.shape[-1]

    def stats_of(values, valid):
        values = np.moveaxis(values, -1, 0).reshape(features, -1)
        valid = np.moveaxis(valid, -1, 0).reshape(features, -1)
        mean = np.array(
            [
                v[m].mean() if m.any() else 0.0
                for v, m in zip(values, valid, strict=True)
            ]
        )
        var = np.array(
            [v[m].var() if m.any() else 0.0 for v, m in zip(values, valid, strict=True)]
        )
        return mean, var

    out = np.zeros_like(x)
    mean, var = stats_of(x[:r], mask[:r])
    out[:r] = (x[:r] - mean) / np.sqrt(var + eps)
    for i in range(r, x.shape[0]):
        both = np.concatenate([x[:r].reshape(-1, features), x[i].reshape(-1, features)])
        valid = np.concatenate(
            [mask[:r].reshape(-1, features), mask[i].reshape(-1, features)]
        )
        mean, var = stats_of(both, valid)
        out[i] = (x[i] - mean) / np.sqrt(var + eps)
    out = out * params["scale"] + params["bias"]
    return np.where(mask, out, 0.0)


@pytest.mark.parametrize(
    "shape,r", [((6, 4, 5, 3), 2), ((5, 7, 8), 3), ((9, 4), 4), ((3, 2, 2, 5), 3)]
)
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_reference_norm_matches_float64_reference(shape, r, masked):
    rng = np.random.default_rng(sum(shape) + r)
    x = rng.normal(1.5, 2.0, size=shape)
    params = params_for(rng, shape[-1:])
    mask = None
    if masked:
        mask = rng.random(shape[:-1] + (1,)) < 0.7
        mask.reshape(shape[0], -1)[:, 0] = True  # nothing all padding here
    expected = ref_reference_norm(x, r, mask, params)
    y = F.reference_norm(
        jnp.asarray(x, jnp.float32),
        {k: jnp.asarray(v, jnp.float32) for k, v in params.items()},
        reference_size=r,
        mask=mask,
    )
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(
        np.where(mask, y, 0) if masked else y, expected, rtol=2e-5, atol=2e-5
    )


def test_sample_weighs_one_over_reference_size_plus_one():
    # x_NxD: a sample is one element per feature against R's r elements.
    x = jnp.array([[0.0], [2.0], [10.0]])
    y = F.reference_norm(x, reference_size=2, epsilon=0.0)
    values = np.array([0.0, 2.0, 10.0])  # R = {0, 2}, the sample 10
    expected = (10.0 - values.mean()) / values.std()
    np.testing.assert_allclose(y[2, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(y[:2, 0], [-1.0, 1.0], rtol=1e-6)


def test_each_sample_sees_the_reference_and_itself_only():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(7, 3, 3, 4)), jnp.float32)
    y = F.reference_norm(x, reference_size=3)
    other = x.at[4:].set(jnp.asarray(rng.normal(5, 3, size=(3, 3, 3, 4)), jnp.float32))
    np.testing.assert_array_equal(F.reference_norm(other, reference_size=3)[:4], y[:4])
    moved_ref = x.at[0].add(1.0)
    assert (
        float(jnp.abs(F.reference_norm(moved_ref, reference_size=3)[3:] - y[3:]).max())
        > 1e-3
    )


def test_gradients_match_finite_differences_and_flow_through_the_reference():
    rng = np.random.default_rng(11)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(5, 3, 2, 4)))
        params = {
            k: jnp.asarray(v, jnp.float64) for k, v in params_for(rng, (4,)).items()
        }
        mask = jnp.asarray(rng.random((5, 3, 2, 1)) < 0.8).at[:, 0].set(True)

        def f(x, params):
            return F.reference_norm(x, params, reference_size=2, mask=mask)

        jax.test_util.check_grads(f, (x, params), order=1, modes=["rev"], eps=1e-6)
        # a loss on the samples' outputs alone reaches R's inputs
        g = jax.grad(lambda x: jnp.sum(jnp.sin(f(x, params)[2:])))(x)
        assert float(jnp.abs(g[:2]).max()) > 1e-3


def test_padding_with_nan_reaches_nothing_and_all_padding_rows_stay_finite():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(5, 4, 4, 3)), jnp.float32)
    mask = jnp.asarray(rng.random((5, 4, 4, 1)) < 0.6).at[3].set(False).at[0].set(False)

    def loss(x):
        y = F.reference_norm(x, reference_size=2, mask=mask)
        return jnp.sum(jnp.where(mask, jnp.sin(y), 0.0)), y

    (_, clean), g_clean = jax.value_and_grad(loss, has_aux=True)(
        jnp.where(mask, x, 0.0)
    )
    for poison in (jnp.nan, jnp.inf):
        (_, y), g = jax.value_and_grad(loss, has_aux=True)(jnp.where(mask, x, poison))
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(g))
        np.testing.assert_array_equal(y, clean)
        np.testing.assert_array_equal(g, g_clean)


def test_bad_reference_sizes_and_causal_modes_are_refused_with_the_fix():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="WithReference"):
        F.reference_norm(x, reference_size=None)
    with pytest.raises(ValueError, match=r"must lie in \[1, 4\]"):
        F.reference_norm(x, reference_size=5)
    with pytest.raises(TypeError, match="must be an int"):
        F.reference_norm(x, reference_size=2.0)
    with pytest.raises(ValueError, match="per-position reference statistics"):
        normjax.make_norm("reference", causal=True)
    with pytest.raises(ValueError, match="WithReference"):
        normjax.make_norm("reference").init(jax.random.key(0), x)


def test_module_keeps_flax_params_only_and_reads_the_size_from_the_context():
    norm = normjax.make_norm("reference")
    x = jax.random.normal(jax.random.key(0), (5, 4, 4, 8)).astype(jnp.bfloat16)
    with normjax.nn.reference_batch(2):
        variables = norm.init(jax.random.key(1), x)
        y = norm.apply(variables, x, use_running_average=True)
    assert jax.tree.map(jnp.shape, variables) == {
        "params": {"scale": (8,), "bias": (8,)}
    }
    assert y.dtype == jnp.bfloat16
    expected = F.reference_norm(x, reference_size=2)
    np.testing.assert_array_equal(y, expected)
    fixed = normjax.make_norm("reference", reference_size=3)
    np.testing.assert_array_equal(
        fixed.apply(variables, x), F.reference_norm(x, reference_size=3)
    )
    assert normjax.nn.current_reference_size() is None
    assert normjax.registry.needs_reference("reference")
    assert not normjax.registry.needs_reference("batch")


def test_with_reference_keeps_the_model_tree_and_cuts_the_reference_rows():
    model = models.FastCNN(widths=(4, 8, 8), num_classes=3, norm="reference")
    images = jax.random.normal(jax.random.key(0), (6, 16, 16, 3))
    wrapped = normjax.nn.WithReference(model, reference_size=4)
    variables = wrapped.init(jax.random.key(1), images, train=False)
    with normjax.nn.reference_batch(4):
        bare = model.init(jax.random.key(1), images, train=False)
    shapes = jax.tree.map(jnp.shape, variables)
    assert shapes["reference"] == {"inputs": (4, 16, 16, 3)}
    assert {k: v for k, v in shapes.items() if k != "reference"} == jax.tree.map(
        jnp.shape, bare
    )
    np.testing.assert_array_equal(variables["reference"]["inputs"], images[:4])
    # the wrapper is the model run on [R, x], minus R's rows
    logits = wrapped.apply(variables, images[4:], train=False)
    with normjax.nn.reference_batch(4):
        direct = model.apply(variables, images, train=False)
    np.testing.assert_allclose(logits, direct[4:], rtol=1e-6, atol=1e-6)
    # a per-image mask gets R's rows (valid) in front
    mask = jnp.array([True, False])
    masked = wrapped.apply(variables, images[4:], train=True, mask=mask)
    np.testing.assert_allclose(masked[0], logits[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fewer than reference_size=4"):
        wrapped.init(jax.random.key(1), images[:3], train=False)
    with pytest.raises(ValueError, match="do not match the reference"):
        wrapped.apply(variables, images[:, :8, :8], train=False)


class TinyCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)
        x = normjax.make_norm("reference")(x, use_running_average=not train)
        x = nn.relu(x).mean((1, 2))
        return nn.Dense(2)(x)


def test_a_tiny_cnn_trains_at_batch_size_1_and_evaluates_sample_by_sample():
    rng = np.random.default_rng(60)
    images = rng.normal(size=(64, 6, 6, 3)).astype(np.float32)
    labels = (images[..., 0].mean((1, 2)) > 0).astype(np.int32)
    images[labels == 1] += 0.5
    model = normjax.nn.WithReference(TinyCNN(), reference_size=8)
    variables = model.init(jax.random.key(0), images[:8], train=False)
    opt = optax.adam(3e-3)
    params = variables["params"]
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        def loss_fn(params):
            logits = model.apply({**variables, "params": params}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(3):
        for i in range(64):  # batch size 1
            params, state, loss = step(
                params, state, images[i : i + 1], labels[i : i + 1]
            )
            losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-64:]) < np.mean(losses[:64])
    variables = {**variables, "params": params}
    together = model.apply(variables, images[:8], train=False)
    alone = np.concatenate(
        [model.apply(variables, images[i : i + 1], train=False) for i in range(8)]
    )
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
