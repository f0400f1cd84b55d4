"""normjax.registry: one name per norm, one call signature for all."""

import functools

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
from normjax import models, nn


@pytest.fixture(autouse=True)
def reference_rows():
    """'reference' takes each batch's first row as its reference batch (what
    nn.WithReference arranges in a model); the other norms ignore this."""
    with nn.reference_batch(1):
        yield


def refuses_causal(name, causal=True):
    """Norms without the causal mode: the refusal names why; the test ends."""
    mode = "cumulative" if causal is True else causal
    if not causal or mode in normjax.registry.causal_modes(name):
        return False
    with pytest.raises(ValueError, match="does not support causal"):
        normjax.make_norm(name, causal=causal)
    return True


def test_names():
    required = {"batch", "batch_renorm", "ghost_batch", "frozen_batch", "bln", "power"}
    required |= {"prior", "layer", "rms", "group", "instance", "evonorm_s0", "none"}
    assert required <= set(normjax.names())
    assert len(set(normjax.names())) == len(normjax.names())


@pytest.mark.parametrize("name", normjax.names())
@pytest.mark.parametrize("shape", [(4, 6, 6, 16), (3, 7, 32)])
def test_every_norm_has_the_common_call(name, shape):
    norm = normjax.make_norm(name)
    x = jax.random.normal(jax.random.key(0), shape) * 2 + 3
    mask = jnp.ones(shape[:-1] + (1,), bool).at[0].set(False)
    variables = norm.init(jax.random.key(1), x, use_running_average=False)
    y, state = norm.apply(
        variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
    )
    assert y.shape == x.shape and y.dtype == x.dtype and np.all(np.isfinite(y))
    y_eval = norm.apply(variables, x, use_running_average=True, mask=mask)
    assert y_eval.shape == x.shape
    has_running = bool(state.get("batch_stats"))
    kind = normjax.registry.entry(name).statistics
    keeps_nothing = ("per sample", "none", "reference batch + sample")
    assert has_running == (kind not in keeps_nothing)
    if name != "none":
        assert {"scale", "bias"} & set(variables["params"])


def test_overrides_reach_the_module():
    norm = normjax.make_norm("group", num_groups=4, epsilon=1e-3)
    assert isinstance(norm, nn.GroupNorm)
    assert (norm.num_groups, norm.epsilon) == (4, 1e-3)
    assert normjax.make_norm("batch", momentum=0.9).momentum == 0.9


def test_unknown_name_lists_valid_names():
    with pytest.raises(
        ValueError, match="unknown norm .btach.; valid names are: batch, batch_renorm"
    ):
        normjax.make_norm("btach")


def test_unknown_override_lists_accepted_options():
    with pytest.raises(TypeError, match="LayerNorm accepts: .*epsilon"):
        normjax.make_norm("layer", momentum=0.9)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _run(norm, variables, x, train, mask=None):
    y, _ = norm.apply(
        variables, x, use_running_average=not train, mask=mask, mutable=["batch_stats"]
    )
    return y


def _trained_variables(norm, x):
    """Variables after one training step, so running statistics are not trivial."""
    variables = norm.init(jax.random.key(1), x, use_running_average=False)
    _, updates = norm.apply(
        variables, x * 1.5 + 0.5, use_running_average=False, mutable=["batch_stats"]
    )
    return {**variables, **updates}


@pytest.mark.parametrize("name", normjax.names())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_causal_mode_never_lets_position_t_see_later_positions(name, train):
    if refuses_causal(name):
        return
    norm = normjax.make_norm(name, causal=True)
    x = jax.random.normal(jax.random.key(0), (4, 7, 16)) * 2 + 1
    variables = _trained_variables(norm, x)
    future = jax.random.normal(jax.random.key(2), x.shape) * 5 - 3
    for t in (0, 3, 5):
        changed = x.at[:, t + 1 :].set(future[:, t + 1 :])
        before, after = (
            _run(norm, variables, x, train),
            _run(norm, variables, changed, train),
        )
        np.testing.assert_allclose(
            before[:, : t + 1], after[:, : t + 1], rtol=1e-5, atol=1e-5
        )


def test_batch_norm_over_batch_and_time_leaks_without_causal_mode():
    norm = normjax.make_norm("batch")
    x = jax.random.normal(jax.random.key(0), (4, 7, 16))
    variables = _trained_variables(norm, x)
    changed = x.at[:, 4:].set(10.0)
    before, after = _run(norm, variables, x, True), _run(norm, variables, changed, True)
    assert np.max(np.abs(before[:, :4] - after[:, :4])) > 0.1


@pytest.mark.parametrize("name", normjax.names())
@pytest.mark.parametrize("causal", [False, True], ids=["pooled", "causal"])
def test_padded_positions_never_enter_the_statistics(name, causal):
    if refuses_causal(name, causal):
        return
    norm = normjax.make_norm(name, causal=causal)
    x = jax.random.normal(jax.random.key(0), (4, 7, 16)) * 2 + 1
    valid = jnp.arange(7)[None, :, None] < jnp.array([7, 5, 3, 6])[:, None, None]
    variables = _trained_variables(norm, x)
    garbage = jnp.where(valid, x, 1e4)
    before = _run(norm, variables, x, True, mask=valid)
    after = _run(norm, variables, garbage, True, mask=valid)
    v = np.broadcast_to(np.asarray(valid), x.shape)
    np.testing.assert_allclose(
        np.asarray(before)[v], np.asarray(after)[v], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", normjax.names())
def test_finite_gradients_at_batch_size_one(name):
    norm = normjax.make_norm(name)
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 16))
    variables = norm.init(jax.random.key(1), x, use_running_average=False)

    def loss(params, x):
        y = _run(norm, {**variables, "params": params}, x, True)
        return jnp.sum(jnp.sin(y))

    grads = jax.grad(loss, argnums=(0, 1))(variables.get("params", {}), x)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_register_a_norm_and_use_it_in_a_model():
    class Halve(flax_nn.Module):
        factor: float = 0.5

        @flax_nn.compact
        def __call__(self, x, use_running_average=None, mask=None):
            return x * self.factor

    normjax.registry.register("halve", Halve, defaults={"factor": 0.25})
    try:
        assert "halve" in normjax.names()
        x = jnp.ones((2, 3))
        y = normjax.make_norm("halve").apply({}, x)
        np.testing.assert_allclose(y, 0.25 * x)
        y = normjax.make_norm("halve", factor=2.0).apply({}, x)
        np.testing.assert_allclose(y, 2.0 * x)
        with pytest.raises(ValueError, match="already registered; pass replace=True"):
            normjax.registry.register("halve", Halve)
        normjax.registry.register("halve", Halve, replace=True)
        model = models.FastCNN(widths=(4, 4, 4), norm="halve")
        images = jnp.ones((2, 32, 32, 3))
        variables = model.init(jax.random.key(0), images, train=False)
        assert model.apply(variables, images, train=False).shape == (2, 10)
    finally:
        normjax.registry.unregister("halve")
    assert "halve" not in normjax.names()
    with pytest.raises(ValueError, match="unknown norm 'halve'"):
        normjax.registry.unregister("halve")
    with pytest.raises(ValueError, match="non-empty string"):
        normjax.registry.register("", Halve)


def test_statistics_are_an_enum_that_reads_as_text():
    batch = normjax.registry.entry("batch").statistics
    assert batch is normjax.registry.Statistics.BATCH and batch == "batch"
    assert str(normjax.registry.entry("prior").statistics) == "per sample + population"
    assert normjax.registry.entry("layer").statistics.per_sample
    assert normjax.registry.entry("none").statistics.per_sample
    assert not normjax.registry.entry("power").statistics.per_sample
    with pytest.raises(ValueError, match="'sometimes' is not one of 'batch', "):
        normjax.registry.register("odd", nn.LayerNorm, statistics="sometimes")
    assert "odd" not in normjax.names()


def test_make_norm_passes_flax_name_through():
    class Net(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            return normjax.make_norm("layer", name="my_norm")(x)

    variables = Net().init(jax.random.key(0), jnp.ones((2, 4)))
    assert set(variables["params"]) == {"my_norm"}


@pytest.mark.parametrize(
    "name,causal,supported",
    [
        ("layer", "per_position", "False, 'cumulative'"),
        ("instance", "running", "False, 'cumulative'"),
        ("group", "per_position", "False, 'cumulative'"),
        ("prior", "running", "False, 'cumulative'"),
        ("prior", "per_position", "False, 'cumulative'"),
    ],
)
def test_a_causal_mode_a_norm_does_not_support_is_refused_by_name(
    name, causal, supported
):
    with pytest.raises(ValueError, match=f"its causal modes are: {supported}"):
        normjax.make_norm(name, causal=causal)
    # the module built directly refuses it too, when called
    module = normjax.registry.entry(name).module(causal=causal)
    x = jnp.ones((2, 5, 16))
    with pytest.raises(ValueError, match=f"its causal modes are: {supported}"):
        module.init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match="not a causal mode"):
        normjax.make_norm(name, causal="future")


@pytest.mark.parametrize("causal", [True, "cumulative", "per_position", "running"])
def test_batch_statistics_norms_take_every_causal_mode(causal):
    for name in ("batch", "batch_renorm", "bln", "power", "none"):
        norm = normjax.make_norm(name, causal=causal)
        assert norm.causal == ("cumulative" if causal is True else causal)


def test_a_custom_norm_without_a_causal_field_refuses_causal_modes():
    class Plain(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x, use_running_average=None, mask=None):
            return x

    normjax.registry.register("plain_test", Plain)
    try:
        assert isinstance(normjax.make_norm("plain_test"), Plain)
        with pytest.raises(ValueError, match="its causal modes are: False."):
            normjax.make_norm("plain_test", causal=True)
    finally:
        normjax.registry.unregister("plain_test")


POISONS = {"nan": jnp.nan, "inf": jnp.inf, "-inf": -jnp.inf}


def _grads(norm, variables, x, mask, train):
    """Output, new statistics and the gradients of a loss over the valid outputs
    w.r.t. the parameters and the input."""

    def loss(params, x):
        y, state = norm.apply(
            {**variables, "params": params},
            x,
            use_running_average=not train,
            mask=mask,
            mutable=["batch_stats"],
        )
        valid = jnp.broadcast_to(mask, y.shape)
        return jnp.sum(jnp.where(valid, jnp.sin(y), 0.0)), (y, state)

    (_, (y, state)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables.get("params", {}), x
    )
    return y, state, grads


@pytest.mark.parametrize("name", normjax.names())
@pytest.mark.parametrize(
    "shape,causal",
    [((4, 5, 5, 16), False), ((3, 7, 16), False), ((3, 7, 16), "cumulative")],
    ids=["images", "tokens", "tokens-causal"],
)
def test_nan_and_inf_in_padding_reach_nothing(name, shape, causal):
    if refuses_causal(name, causal):
        return
    norm = normjax.make_norm(name, causal=causal)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=shape), jnp.float32)
    mask = (
        jnp.asarray(rng.random(shape[:-1] + (1,)) < 0.6).at[(0,) * len(shape)].set(True)
    )
    variables = _trained_variables(norm, x)
    for train in (True, False):
        clean = _grads(norm, variables, jnp.where(mask, x, 0.0), mask, train)
        valid = np.broadcast_to(np.asarray(mask), shape)
        for poison in POISONS.values():
            y, state, grads = _grads(
                norm, variables, jnp.where(mask, x, poison), mask, train
            )
            assert np.all(np.isfinite(y))  # padding's own outputs too
            np.testing.assert_allclose(
                np.asarray(y)[valid], np.asarray(clean[0])[valid]
            )
            jax.tree.map(np.testing.assert_array_equal, state, clean[1])
            for got, want in zip(
                jax.tree.leaves(grads), jax.tree.leaves(clean[2]), strict=True
            ):
                assert np.all(np.isfinite(got))
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["batch", "batch_renorm", "bln", "power"])
def test_nan_in_padding_reaches_nothing_per_position(name):
    norm = normjax.make_norm(name, causal="per_position")
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(4, 6, 16)), jnp.float32)
    mask = jnp.asarray(rng.random((4, 6, 1)) < 0.6).at[0].set(True)
    variables = _trained_variables(norm, x)
    clean = _grads(norm, variables, jnp.where(mask, x, 0.0), mask, True)
    y, state, grads = _grads(norm, variables, jnp.where(mask, x, jnp.nan), mask, True)
    assert np.all(np.isfinite(y))
    jax.tree.map(np.testing.assert_array_equal, state, clean[1])
    for got, want in zip(
        jax.tree.leaves(grads), jax.tree.leaves(clean[2]), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
