"""normjax.functional.population: population norm, the mix norm and batch group
norm against float64 NumPy references written out here; gradients against finite
differences in float64."""

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

EPS = 1e-5


def as32(tree):
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), tree)


def running_for(rng, shape):
    return {
        "mean": rng.normal(size=shape),
        "var": rng.uniform(0.5, 2.0, size=shape),
    }


# ------------------------------------------------------------------ population


@pytest.mark.parametrize("masked", [False, True])
def test_population_norm_is_batch_norm_then_normalizes_with_running_statistics(masked):
    rng = np.random.default_rng(50)
    x = rng.normal(1.0, 2.0, size=(6, 3, 3, 4))
    mask = rng.random((6, 3, 3, 1)) < 0.7 if masked else np.ones((6, 3, 3, 1), bool)
    mask[0, 0, 0] = True
    params = params_for(rng, (4,))
    running = running_for(rng, (4,))
    xin = jnp.asarray(np.where(mask, x, np.nan), jnp.float32)
    m = mask if masked else None
    for steps, warm in ((0, True), (2, True), (3, False), (10, False)):
        state = {**as32(running), "steps": jnp.asarray(steps, jnp.int32)}
        out = F.population_norm(
            xin, params, state, train=True, warmup_steps=3, momentum=0.8, mask=m
        )
        bn = F.batch_norm(xin, params, as32(running), train=True, momentum=0.8, mask=m)
        if warm:
            np.testing.assert_allclose(out.y, bn.y, rtol=1e-5, atol=1e-5)
        else:
            want = (x - running["mean"]) / np.sqrt(running["var"] + EPS)
            want = want * np.asarray(params["scale"]) + np.asarray(params["bias"])
            want = np.where(mask, want, np.asarray(params["bias"]))
            np.testing.assert_allclose(out.y, want, rtol=1e-4, atol=1e-4)
        # the running statistics follow the batch as batch norm's do, either way
        for key in ("mean", "var"):
            np.testing.assert_allclose(
                out.batch_stats[key], bn.batch_stats[key], rtol=1e-5, atol=1e-6
            )
        assert int(out.batch_stats["steps"]) == steps + 1
    evaluated = F.population_norm(xin, params, state, train=False, mask=m)
    np.testing.assert_allclose(evaluated.y, out.y, rtol=1e-5, atol=1e-5)


def test_population_norm_after_warmup_sees_no_other_sample_and_no_statistics_gradient():
    rng = np.random.default_rng(51)
    x = jnp.asarray(rng.normal(size=(5, 4, 3)), jnp.float32)
    state = {**as32(running_for(rng, (3,))), "steps": jnp.asarray(9, jnp.int32)}
    params = params_for(rng, (3,))

    def first(x):
        return F.population_norm(x, params, state, train=True, warmup_steps=2).y[0]

    changed = x.at[1:].set(100.0 * x[1:])
    np.testing.assert_allclose(first(x), first(changed), rtol=1e-6)
    # d y_0 / d x_1 = 0: nothing flows through batch statistics
    jac = jax.jacrev(lambda x: first(x).sum())(x)
    assert float(jnp.abs(jac[1:]).max()) == 0.0


def test_population_norm_gradients_match_finite_differences():
    rng = np.random.default_rng(52)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(4, 3, 5)))
        params = {
            k: jnp.asarray(v, jnp.float64) for k, v in params_for(rng, (5,)).items()
        }
        for steps in (0, 5):
            state = {
                "mean": jnp.asarray(rng.normal(size=5)),
                "var": jnp.asarray(rng.uniform(0.5, 2, 5)),
                "steps": jnp.asarray(steps, jnp.int32),
            }

            def f(x, params, state=state):
                return F.population_norm(x, params, state, train=True, warmup_steps=3).y

            jax.test_util.check_grads(f, (x, params), order=1, modes=["rev"], eps=1e-6)


def test_population_norm_causal_reads_per_position_rows_after_warmup():
    rng = np.random.default_rng(53)
    x = rng.normal(size=(3, 5, 2))
    rows = running_for(rng, (7, 2))
    state = {**as32(rows), "steps": jnp.asarray(4, jnp.int32)}
    out = F.population_norm(
        jnp.asarray(x, jnp.float32),
        None,
        state,
        train=True,
        causal=True,
        warmup_steps=1,
    )
    want = (x - rows["mean"][:5]) / np.sqrt(rows["var"][:5] + EPS)
    np.testing.assert_allclose(out.y, want, rtol=1e-4, atol=1e-5)
    bn = F.batch_norm(
        jnp.asarray(x, jnp.float32), None, as32(rows), train=True, causal=True
    )
    np.testing.assert_allclose(out.batch_stats["mean"], bn.batch_stats["mean"])
    with pytest.raises(ValueError, match="causal modes are"):
        F.population_norm(jnp.asarray(x), None, state, train=True, causal="running")


# ------------------------------------------------------------------------- mix


def ref_mix(x, sample_axes, feature_axis, alpha, pop_mean, pop_var, mask):
    w = np.broadcast_to(mask, x.shape) * 1.0
    xs = np.where(w > 0, x, 0.0)
    n = w.sum(sample_axes, keepdims=True)
    mu = (xs * w).sum(sample_axes, keepdims=True) / np.maximum(n, 1)
    var = (w * (xs - mu) ** 2).sum(sample_axes, keepdims=True) / np.maximum(n, 1)
    shape = [1] * x.ndim
    shape[feature_axis] = x.shape[feature_axis]
    a = np.reshape(alpha, shape)
    pm, pv = np.reshape(pop_mean, shape), np.reshape(pop_var, shape)
    mean = a * mu + (1 - a) * pm
    mixed = a * var + (1 - a) * pv + a * (1 - a) * (mu - pm) ** 2
    return np.where(w > 0, (xs - mean) / np.sqrt(mixed + EPS), 0.0)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "shape,reduction_axes,sample_axes",
    [((4, 3, 3, 6), None, (1, 2)), ((4, 6), None, (1,)), ((4, 5, 6), -1, (2,))],
)
def test_mix_norm_is_the_mixture_of_sample_and_population_statistics(
    masked, shape, reduction_axes, sample_axes
):
    rng = np.random.default_rng(54)
    x = rng.normal(0.5, 2.0, size=shape)
    mask = rng.random(shape[:-1] + (1,)) < 0.7 if masked else np.ones(x.shape, bool)
    logit = rng.normal(size=6)
    pop = running_for(rng, (6,))
    out = F.mix_norm(
        jnp.asarray(np.where(mask, x, np.inf), jnp.float32),
        {"mix_logit": jnp.asarray(logit, jnp.float32)},
        as32(pop),
        train=True,
        reduction_axes=reduction_axes,
        mask=mask if masked else None,
        momentum=0.5,
    )
    alpha = 1 / (1 + np.exp(-logit))
    want = ref_mix(x, sample_axes, x.ndim - 1, alpha, pop["mean"], pop["var"], mask)
    np.testing.assert_allclose(out.y, want, rtol=1e-4, atol=1e-4)
    # the population statistics follow the batch's, as batch norm's
    bn = F.batch_norm(
        jnp.asarray(np.where(mask, x, 0.0), jnp.float32),
        None,
        as32(pop),
        train=True,
        momentum=0.5,
        mask=mask if masked else None,
    )
    np.testing.assert_allclose(
        out.batch_stats["mean"], bn.batch_stats["mean"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        out.batch_stats["var"], bn.batch_stats["var"], rtol=1e-5, atol=1e-6
    )


def test_mix_norm_limits_and_sample_independence():
    rng = np.random.default_rng(55)
    x = jnp.asarray(rng.normal(1.0, 3.0, size=(5, 4, 4, 3)), jnp.float32)
    pop = as32(running_for(rng, (3,)))
    one = F.mix_norm(x, None, pop, train=False, alpha=1.0).y
    np.testing.assert_allclose(one, F.instance_norm(x, epsilon=EPS), atol=1e-5)
    zero = F.mix_norm(x, None, pop, train=False, alpha=0.0).y
    want = (x - pop["mean"]) / jnp.sqrt(pop["var"] + EPS)
    np.testing.assert_allclose(zero, want, rtol=1e-5, atol=1e-5)
    params = {"mix_logit": jnp.asarray(rng.normal(size=3), jnp.float32)}
    y = F.mix_norm(x, params, pop, train=True).y
    y2 = F.mix_norm(x.at[1:].set(-x[1:] * 7), params, pop, train=True).y
    np.testing.assert_allclose(y[0], y2[0], rtol=1e-6)
    np.testing.assert_allclose(F.mix_norm(x, params, pop, train=False).y, y, atol=1e-6)


def test_mix_norm_gradients_match_finite_differences():
    rng = np.random.default_rng(56)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(3, 4, 5)))
        params = {
            "scale": jnp.asarray(rng.uniform(0.5, 2, 5)),
            "bias": jnp.asarray(rng.normal(size=5)),
            "mix_logit": jnp.asarray(rng.normal(size=5)),
        }
        pop = {
            "mean": jnp.asarray(rng.normal(size=5)),
            "var": jnp.asarray(rng.uniform(0.5, 2, 5)),
        }

        def f(x, params):
            return F.mix_norm(x, params, pop, train=True).y

        jax.test_util.check_grads(f, (x, params), order=1, modes=["rev"], eps=1e-6)


def test_mix_norm_causal_is_per_token_with_per_position_population_rows():
    rng = np.random.default_rng(57)
    x = rng.normal(size=(2, 5, 4))
    rows = running_for(rng, (6, 4))
    out = F.mix_norm(
        jnp.asarray(x, jnp.float32),
        None,
        as32(rows),
        train=False,
        causal=True,
        alpha=0.25,
    )
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    pm, pv = rows["mean"][:5], rows["var"][:5]
    mean = 0.25 * mu + 0.75 * pm
    mixed = 0.25 * var + 0.75 * pv + 0.25 * 0.75 * (mu - pm) ** 2
    np.testing.assert_allclose(
        out.y, (x - mean) / np.sqrt(mixed + EPS), rtol=1e-4, atol=1e-5
    )


# ----------------------------------------------------------------- batch group


@pytest.mark.parametrize("masked", [False, True])
def test_batch_group_norm_pools_batch_space_and_a_group_of_channels(masked):
    rng = np.random.default_rng(58)
    x = rng.normal(1.0, 2.0, size=(4, 3, 3, 8))
    mask = rng.random((4, 3, 3, 1)) < 0.7 if masked else np.ones((4, 3, 3, 1), bool)
    params = params_for(rng, (8,))
    running = running_for(rng, (2,))
    out = F.batch_group_norm(
        jnp.asarray(np.where(mask, x, np.nan), jnp.float32),
        params,
        as32(running),
        train=True,
        num_groups=2,
        momentum=0.75,
        mask=mask if masked else None,
    )
    xg = x.reshape(4, 3, 3, 2, 4)
    w = np.broadcast_to(mask[..., None], xg.shape)
    n = w.sum((0, 1, 2, 4))
    mean = np.where(w, xg, 0).sum((0, 1, 2, 4)) / n
    var = np.where(w, (xg - mean[:, None]) ** 2, 0).sum((0, 1, 2, 4)) / n
    y = (xg - mean[:, None]) / np.sqrt(var[:, None] + EPS)
    y = y.reshape(x.shape) * np.asarray(params["scale"]) + np.asarray(params["bias"])
    want = np.where(mask, y, np.asarray(params["bias"]))
    np.testing.assert_allclose(out.y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        out.batch_stats["mean"], 0.75 * running["mean"] + 0.25 * mean, rtol=1e-5
    )
    np.testing.assert_allclose(
        out.batch_stats["var"], 0.75 * running["var"] + 0.25 * var, rtol=1e-5
    )
    # one group per channel is batch norm
    bn = F.batch_norm(
        jnp.asarray(x, jnp.float32), params, as32(running_for(rng, (8,))), train=True
    )
    bgn = F.batch_group_norm(
        jnp.asarray(x, jnp.float32),
        params,
        as32(running_for(rng, (8,))),
        train=True,
        group_size=1,
        num_groups=None,
    )
    np.testing.assert_allclose(bgn.y, bn.y, rtol=1e-5, atol=1e-5)


def test_batch_group_norm_gradients_match_finite_differences():
    rng = np.random.default_rng(59)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(3, 2, 6)))
        params = {
            "scale": jnp.asarray(rng.uniform(0.5, 2, 6)),
            "bias": jnp.asarray(rng.normal(size=6)),
        }

        def f(x, params):
            return F.batch_group_norm(x, params, None, train=True, num_groups=3).y

        jax.test_util.check_grads(f, (x, params), order=1, modes=["rev"], eps=1e-6)


# ------------------------------------------------------------------ modules


class TinyCNN(nn.Module):
    norm: str
    norm_kwargs: tuple = ()

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)
        norm = normjax.make_norm(self.norm, momentum=0.9, **dict(self.norm_kwargs))
        x = norm(x, use_running_average=not train)
        x = nn.relu(x).mean((1, 2))
        return nn.Dense(2)(x)


@pytest.mark.parametrize("norm", ["population", "mix", "online"])
def test_a_tiny_cnn_trains_at_batch_size_1_and_evaluates_sample_by_sample(norm):
    rng = np.random.default_rng(60)
    images = rng.normal(size=(64, 6, 6, 3)).astype(np.float32)
    labels = (images[..., 0].mean((1, 2)) > 0).astype(np.int32)
    images[labels == 1] += 0.5
    overrides = (("warmup_steps", 8),) if norm == "population" else ()
    model = TinyCNN(norm, overrides)
    variables = model.init(jax.random.key(0), images[:1], train=False)
    opt = optax.adam(3e-3)
    params, stats = variables["params"], variables["batch_stats"]
    perturbations = variables.get("perturbations", {})
    assert bool(perturbations) == (norm == "online")  # the control process's u, v
    state = opt.init(params)

    @jax.jit
    def step(params, stats, state, x, y):
        def loss_fn(params, perturbations):
            logits, updates = model.apply(
                {
                    "params": params,
                    "batch_stats": stats,
                    "perturbations": perturbations,
                },
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (loss, stats), (grads, increments) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(params, perturbations)
        stats = F.apply_nu_updates(stats, increments) if perturbations else stats
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), stats, state, loss

    losses = []
    for _ in range(3):
        for i in range(64):  # batch size 1
            params, stats, state, loss = step(
                params, stats, state, images[i : i + 1], labels[i : i + 1]
            )
            losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-64:]) < np.mean(losses[:64])
    if norm == "online":  # the control process ran: u and v moved
        layer = next(v for v in stats.values() if "u" in v)
        assert float(jnp.abs(layer["u"]).max()) > 0
        assert float(jnp.abs(layer["v"]).max()) > 0
    if norm == "mix":  # the learned weight of the sample's own statistics
        (weights,) = normjax.nn.mix_weights(params).values()
        assert weights.shape == (8,) and np.all((weights > 0) & (weights < 1))
        assert float(jnp.abs(weights - 0.5).max()) > 1e-3  # it learned
    variables = {"params": params, "batch_stats": stats}
    together = model.apply(variables, images[:8], train=False)
    alone = np.concatenate(
        [model.apply(variables, images[i : i + 1], train=False) for i in range(8)]
    )
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


def test_mix_norm_hand_derived_backward_matches_autodiff_of_its_formula_with_masks():
    rng = np.random.default_rng(64)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(1.0, 2.0, size=(4, 3, 3, 5)))
        mask = jnp.asarray(rng.random((4, 3, 3, 1)) < 0.6).at[:, 0, 0].set(True)
        mask = mask.at[3].set(False)  # a sample with nothing valid
        params = {
            "scale": jnp.asarray(rng.uniform(0.5, 2, 5)),
            "bias": jnp.asarray(rng.normal(size=5)),
            "mix_logit": jnp.asarray(rng.normal(size=5)),
        }
        pop = {
            "mean": jnp.asarray(rng.normal(size=5)),
            "var": jnp.asarray(rng.uniform(0.5, 2, 5)),
        }
        cot = jnp.asarray(rng.normal(size=x.shape))

        def plain(x, params):
            w = jnp.broadcast_to(mask, x.shape)
            n = jnp.maximum(w.sum((1, 2), keepdims=True), 1)
            xs = jnp.where(w, x, 0.0)
            mu = xs.sum((1, 2), keepdims=True) / n
            var = (jnp.where(w, xs - mu, 0.0) ** 2).sum((1, 2), keepdims=True) / n
            a = jax.nn.sigmoid(params["mix_logit"])
            d = mu - pop["mean"]
            m = pop["mean"] + a * d
            v = a * var + (1 - a) * pop["var"] + a * (1 - a) * d**2
            y = jnp.where(w, (xs - m) / jnp.sqrt(v + EPS), 0.0)
            return y * params["scale"] + params["bias"]

        def fused(x, params):
            return F.mix_norm(x, params, pop, train=True, mask=mask).y

        y_plain, vjp_plain = jax.vjp(plain, x, params)
        y_fused, vjp_fused = jax.vjp(fused, x, params)
        np.testing.assert_allclose(y_fused, y_plain, rtol=1e-10, atol=1e-12)
        for got, want in zip(
            jax.tree.leaves(vjp_fused(cot)),
            jax.tree.leaves(vjp_plain(cot)),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
