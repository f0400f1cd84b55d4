"""normjax.nnx: NNX modules for every registered norm, bridged models, and
calibrate for NNX models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import normjax
import normjax.nnx as nj
from normjax import registry
from normjax.functional.power import apply_nu_updates
from normjax.models import FastCNN, Transformer


def _x(shape, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=shape) * 2.0 + shift, jnp.float32)


@pytest.mark.parametrize("name", registry.names())
def test_every_norm_equals_its_linen_module_train_and_eval(name):
    """Same variables, same outputs, same gradients, same updated state; params
    are nnx.Param and running statistics nnx.BatchStat."""
    x = _x((4, 3, 3, 16), shift=1.0)
    cot = _x((4, 3, 3, 16), seed=1)
    norm = nj.make_norm(name, 16, rngs=nnx.Rngs(3))
    linen = registry.make_norm(name)
    variables = norm.linen_variables()
    flat = nnx.to_flat_state(nnx.state(norm))
    kinds = {path[0]: type(v) for path, v in flat if len(path) == 1}
    for key in variables.get("params", {}):
        assert issubclass(kinds[key], nnx.Param), (name, key)
    for key in variables.get("batch_stats", {}):
        assert issubclass(kinds[key], nnx.BatchStat), (name, key)
    ref = registry.needs_reference(name)

    def linen_loss(params, x):
        v = {**variables, "params": params}
        y, updates = linen.apply(
            v, x, use_running_average=False, mutable=["batch_stats"]
        )
        return jnp.sum(y * cot), (y, updates)

    def nnx_loss(model, x):
        y = model(x)
        return jnp.sum(y * cot), y

    if ref:
        with normjax.nn.reference_batch(1):
            (_, (y_linen, updates)), g_linen = jax.value_and_grad(
                linen_loss, has_aux=True
            )(variables.get("params", {}), x)
            (_, y_nnx), g_nnx = nnx.value_and_grad(nnx_loss, has_aux=True)(norm, x)
    else:
        (_, (y_linen, updates)), g_linen = jax.value_and_grad(linen_loss, has_aux=True)(
            variables.get("params", {}), x
        )
        (_, y_nnx), g_nnx = nnx.value_and_grad(nnx_loss, has_aux=True)(norm, x)
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-6, atol=1e-6)
    grads = nnx.to_pure_dict(nnx.state(g_nnx, nnx.Param))
    for key, value in g_linen.items():
        np.testing.assert_allclose(grads[key], value, rtol=1e-5, atol=1e-5)
    stats = norm.linen_variables().get("batch_stats", {})
    for key, value in updates.get("batch_stats", {}).items():
        np.testing.assert_allclose(stats[key], value, rtol=1e-6, atol=1e-6)

    norm.eval()
    assert norm.use_running_average
    after = norm.linen_variables()
    if ref:
        with normjax.nn.reference_batch(1):
            y_eval = norm(x)
            want = linen.apply(after, x, use_running_average=True)
    else:
        y_eval = norm(x)
        want = linen.apply(after, x, use_running_average=True)
    np.testing.assert_allclose(y_eval, want, rtol=1e-6, atol=1e-6)
    # Evaluation leaves the running statistics as they were.
    jax.tree.map(np.testing.assert_array_equal, norm.linen_variables(), after)


@pytest.mark.parametrize(
    "ours, theirs, kwargs, shape",
    [
        (nj.BatchNorm, nnx.BatchNorm, {"momentum": 0.9}, (8, 4, 4, 6)),
        (nj.BatchNorm, nnx.BatchNorm, {"axis": 1, "epsilon": 1e-3}, (5, 6, 3)),
        (nj.LayerNorm, nnx.LayerNorm, {}, (4, 7, 6)),
        (nj.LayerNorm, nnx.LayerNorm, {"use_bias": False, "epsilon": 1e-5}, (3, 6)),
        (nj.RMSNorm, nnx.RMSNorm, {}, (4, 5, 6)),
        (nj.GroupNorm, nnx.GroupNorm, {"num_groups": 3}, (4, 5, 5, 6)),
        (nj.GroupNorm, nnx.GroupNorm, {"num_groups": 2, "epsilon": 1e-3}, (3, 7, 6)),
    ],
)
def test_flax_nnx_state_loads_and_gives_the_same_outputs(ours, theirs, kwargs, shape):
    """State made by flax.nnx's namesake loads into the normjax module: the
    same outputs in training and evaluation, the same running statistics."""
    theirs = theirs(6, rngs=nnx.Rngs(0), **kwargs)
    ours = ours(6, rngs=nnx.Rngs(1), **kwargs)
    x = _x(shape, shift=3.0)
    params = nnx.state(theirs, nnx.Param)
    nnx.update(params, jax.tree.map(lambda p: p + _x(p.shape, 5) * 0.1, params))
    nnx.update(theirs, params)
    theirs(x * 0.5 + 1.0)  # running statistics away from their initial values
    nnx.update(ours, nnx.state(theirs))
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.to_pure_dict(nnx.state(ours)),
        nnx.to_pure_dict(nnx.state(theirs)),
    )
    np.testing.assert_allclose(ours(x), theirs(x), rtol=2e-5, atol=2e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        nnx.to_pure_dict(nnx.state(ours)),
        nnx.to_pure_dict(nnx.state(theirs)),
    )
    ours.eval()
    theirs.eval()
    np.testing.assert_allclose(ours(x), theirs(x), rtol=2e-5, atol=2e-5)


def test_train_and_eval_flags_and_the_per_call_override():
    norm = nj.BatchNorm(4, rngs=nnx.Rngs(0))
    x = _x((16, 4), shift=5.0)
    y_train = norm(x)
    np.testing.assert_allclose(jnp.mean(y_train, 0), 0.0, atol=1e-5)
    assert not np.allclose(norm.mean[...], 0.0)
    norm.eval()
    mean = norm.mean[...]
    y_eval = norm(x)
    assert not np.allclose(y_eval, y_train, atol=1e-3)
    np.testing.assert_array_equal(norm.mean[...], mean)
    np.testing.assert_allclose(norm(x, use_running_average=False), y_train, atol=1e-5)
    assert not np.array_equal(norm.mean[...], mean)  # the call trained
    norm.train()
    assert not norm.use_running_average


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        nj.make_norm("batchnorm", 8)
    with pytest.raises(ValueError, match="max_len"):
        nj.BatchNorm(8, causal="per_position")
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        nj.LayerNorm(0)
    with pytest.raises(ValueError, match="use normjax.nnx.make_norm"):
        nj.BatchNorm(8, norm="layer")
    norm = nj.BatchNorm(8, causal="per_position", max_len=5)
    assert norm.mean[...].shape == (5, 8)


class SmallCNN(nnx.Module):
    def __init__(self, norm: str, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.norm1 = nj.make_norm(norm, 8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.norm2 = nj.make_norm(norm, 8, rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm1(self.conv1(x)))
        x = nnx.relu(self.norm2(self.conv2(x)))
        return self.head(jnp.mean(x, axis=(1, 2)))


def _task(n=64):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, n)
    images = rng.normal(size=(n, 6, 6, 3)) + labels[:, None, None, None] * 0.5
    return jnp.asarray(images * 3 + 2, jnp.float32), jnp.asarray(labels)


def _train(model, images, labels, steps, batch=16, wrt=nnx.Param):
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, nnx.state(grads, nnx.Param))
        if wrt is not nnx.Param:
            nj.apply_perturbation_grads(model, grads)
        return loss

    losses = []
    for i in range(steps):
        s = slice((i * batch) % len(images), (i * batch) % len(images) + batch)
        losses.append(float(step(model, optimizer, images[s], labels[s])))
    return losses


class ListedNorms(nnx.Module):
    """Norms held in an nnx.List: integer keys in the state's paths."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.norms = nnx.List([nj.BatchNorm(3, rngs=rngs) for _ in range(2)])

    def __call__(self, x):
        for norm in self.norms:
            x = norm(x) * 2.0 + 1.0
        return x


def test_calibrate_with_norms_in_a_list():
    model = ListedNorms(rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 3)) * 4 + 1)
    precise = nj.calibrate(model, [x[:16], x[16:]])
    assert set(precise["norms"]) == {0, 1}
    np.testing.assert_allclose(precise["norms"][0]["mean"], x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(precise["norms"][0]["var"], x.var(0), rtol=1e-4)
    # the second norm's input is the first one's output, normalized to 2 y + 1
    np.testing.assert_allclose(precise["norms"][1]["mean"], 1.0, atol=1e-4)
    np.testing.assert_allclose(precise["norms"][1]["var"], 4.0, rtol=1e-3)


def test_nnx_cnn_trains_under_jit_and_precise_statistics_replace_the_running_ones():
    images, labels = _task()
    model = SmallCNN("batch", rngs=nnx.Rngs(0))
    initial = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    losses = _train(model, images, labels, steps=24)
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    running = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    assert set(running) == {"norm1", "norm2"}
    assert not np.allclose(running["norm1"]["mean"], initial["norm1"]["mean"])

    model.eval()
    batches = [images[i : i + 16] for i in range(0, 64, 16)]
    precise = nj.calibrate(model, batches)
    # The first norm's input is conv1's output: its precise statistics are the
    # moments of conv1 over the 64 images (the batches concatenated).
    features = np.asarray(model.conv1(images), np.float64).reshape(-1, 8)
    state = nnx.state(model, nnx.BatchStat)
    for got in (precise["norm1"], nnx.to_pure_dict(state)["norm1"]):
        np.testing.assert_allclose(got["mean"], features.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["var"], features.var(0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(precise["norm2"]["mean"], running["norm2"]["mean"])

    # Statistics sources, as normjax.calibrate gives them for Linen models.
    evaluator = nj.Evaluator(model)
    x = images[:16]
    np.testing.assert_allclose(evaluator(x), model(x), rtol=1e-5, atol=1e-5)
    y_batch = evaluator(x, source="batch")
    with_batch = SmallCNN("batch", rngs=nnx.Rngs(0))
    nnx.update(with_batch, nnx.state(model))
    with_batch.train()
    np.testing.assert_allclose(y_batch, with_batch(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        evaluator(x, source="precise", precise_stats=precise),
        model(x),
        rtol=1e-5,
        atol=1e-5,
    )
    one = evaluator(x[:1], source="example_weighted", example_weight=1 / 16)
    assert one.shape == (1, 4) and np.isfinite(one).all()
    with pytest.raises(ValueError, match="needs precise_stats"):
        nj.evaluate(model, x, source="precise")
    # Evaluation never wrote the state.
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
        nnx.to_pure_dict(state),
    )


def test_online_norm_trains_at_batch_size_one_with_its_control_process():
    images, labels = _task(16)
    model = SmallCNN("online", rngs=nnx.Rngs(0))
    state0 = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    losses = _train(
        model, images, labels, steps=16, batch=1, wrt=(nnx.Param, nnx.Perturbation)
    )
    assert np.isfinite(losses).all()
    state = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    assert not np.allclose(state["norm1"]["u"], state0["norm1"]["u"])
    with pytest.raises(ValueError, match="no gradient for the perturbations"):
        nj.apply_perturbation_grads(model, nnx.state(model, nnx.Param))


def test_perturbation_grads_update_the_state_as_the_linen_loop_does():
    norm = nj.OnlineNorm(6, rngs=nnx.Rngs(0))
    x = _x((1, 3, 3, 6), shift=2.0)
    cot = _x((1, 3, 3, 6), seed=2)
    linen = registry.make_norm("online")
    variables = norm.linen_variables()

    def linen_loss(perturbations):
        y, updates = linen.apply(
            {**variables, "perturbations": perturbations},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        return jnp.sum(y * cot), updates

    g_pert, updates = jax.grad(linen_loss, has_aux=True)(variables["perturbations"])
    want = apply_nu_updates(updates["batch_stats"], g_pert)
    grads = nnx.grad(
        lambda m: jnp.sum(m(x) * cot), argnums=nnx.DiffState(0, nnx.Perturbation)
    )(norm)
    nj.apply_perturbation_grads(norm, grads)
    got = norm.linen_variables()["batch_stats"]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want
    )


def test_bridged_fastcnn_trains_with_nnx_and_matches_linen():
    images, labels = _task(32)
    images = jnp.pad(images, ((0, 0), (5, 5), (5, 5), (0, 0)))  # 16 x 16
    linen = FastCNN(widths=(8, 8, 8), norm="batch")
    model = nj.bridge(linen, images[:16], rngs=nnx.Rngs(0))
    assert "whiten" in nnx.to_pure_dict(nnx.state(model))["constants"]
    losses = _train(model, images, labels, steps=6)
    assert np.isfinite(losses).all()
    stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    assert stats  # the norms' running statistics, at their Linen paths
    model.eval()
    variables = model.linen_variables()
    np.testing.assert_allclose(
        model(images[:8]),
        linen.apply(variables, images[:8], train=False),
        rtol=1e-5,
        atol=1e-5,
    )
    # calibrate through the bridge equals normjax.calibrate on the Linen model.
    batches = [images[:16], images[16:]]
    precise = nj.calibrate(model, batches)
    want = normjax.calibrate.precise_batch_stats(linen, variables, batches, train=False)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        precise,
        want,
    )


def test_bridged_transformer_matches_linen():
    linen = Transformer(
        vocab_size=11, num_layers=1, num_heads=2, d_model=8, max_len=6, norm="batch"
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (3, 6)))
    model = nj.bridge(linen, tokens, rngs=nnx.Rngs(0))
    y = model(tokens)  # training: batch statistics, running ones updated
    variables = model.linen_variables()
    model.eval()
    np.testing.assert_allclose(
        model(tokens), linen.apply(variables, tokens, train=False), atol=1e-5
    )
    assert np.isfinite(y).all()


def test_reference_norm_in_nnx_samples_independent_at_evaluation():
    images, _ = _task(8)
    model = nj.WithReference(SmallCNN("reference", rngs=nnx.Rngs(0)), images[:4])
    model.eval()
    out = model(images[4:])
    swapped = model(jnp.concatenate([images[4:5], images[:3]]))
    assert out.shape == (4, 4)
    np.testing.assert_allclose(out[0], swapped[0], rtol=1e-5, atol=1e-5)
    assert isinstance(model.reference, nj.ReferenceInputs)
