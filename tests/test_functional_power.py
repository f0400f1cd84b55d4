"""normjax.functional.power (PowerNorm) against float64 NumPy references."""

import functools

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from normjax import nn
from normjax.functional import power

EPS = 1e-5


# ----------------------------------------------------------------- NumPy references


def ref_psi2(x, valid=None):
    """Per-channel mean of x^2 over every axis but the last, valid elements only."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    w = np.ones((x.shape[0], 1)) if valid is None else np.reshape(valid, (-1, 1))
    return (w * x**2).sum(0) / np.maximum(w.sum(), 1)


def ref_forward(x, scale, bias, psi2, valid=None):
    """y = scale * x / sqrt(psi2 + eps) + bias, channels last; the bias alone
    where not ``valid``."""
    x = np.asarray(x, np.float64)
    if valid is not None:
        x = np.where(np.broadcast_to(valid, x.shape), x, 0.0)
    return scale * x / np.sqrt(psi2 + EPS) + bias


def ref_algorithm2(x, dy, scale, psi2, nu, alpha, valid=None):
    """Shen et al. 2020, Algorithm 2 backward, channels last, float64.

    Returns dL/dx, dL/dscale, dL/dbias and the new nu.
    """
    shape = np.shape(x)
    x = np.asarray(x, np.float64).reshape(-1, shape[-1])
    dy = np.asarray(dy, np.float64).reshape(-1, shape[-1])
    w = np.ones((x.shape[0], 1)) if valid is None else np.reshape(valid, (-1, 1)) * 1.0
    psi = np.sqrt(psi2 + EPS)
    x_hat = w * x / psi  # a padded output is the bias alone
    g = scale * dy  # dL/dx_hat
    n = w.sum()
    gamma = (w * x_hat**2).sum(0) / n
    lam = (w * g * x_hat).sum(0) / n
    dx = w * (g - nu * x_hat) / psi  # no gradient reaches padding
    nu_new = nu * (1 - (1 - alpha) * gamma) + (1 - alpha) * lam
    return dx.reshape(shape), (dy * x_hat).sum(0), dy.sum(0), nu_new


def random_setup(seed, shape=(3, 5, 4), dtype=np.float32):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.normal(0.5, 2.0, size=shape).astype(dtype)
    params = {
        "scale": rng.uniform(0.5, 2, c).astype(dtype),
        "bias": rng.normal(size=c).astype(dtype),
    }
    state = {
        "psi2": rng.uniform(0.5, 3, c).astype(dtype),
        "nu": rng.normal(0, 0.3, c).astype(dtype),
        "steps": np.int32(0),
    }
    dy = rng.normal(size=shape).astype(dtype)
    valid = rng.random(shape[:-1] + (1,)) < 0.7
    valid.flat[0] = True
    return rng, jax.tree.map(jnp.asarray, (x, params, state, dy)), valid


# Each configuration is compiled once under jit: far faster than op-by-op eager
# dispatch on a small CPU (test_jit_agrees_with_eager covers eager mode).


@functools.cache
def _norm_fn(**static):
    def run(x, p, s, m):
        out = power.power_norm(x, p, s, mask=m, **static)
        return out.y, out.batch_stats

    return jax.jit(run)


def norm(x, params, state, *, mask=None, **static):
    """power.power_norm under jit."""
    return _norm_fn(**static)(x, params, state, mask)


def vjp_eager(x, params, state, dy, mask=None, **static):
    """y, new state, dL/dx, dL/dparams and nu's cotangent (the nu increment) for
    L = sum(y * dy)."""

    def f(x, params, nu):
        new = {**state, "nu": nu}
        out = power.power_norm(x, params, new, train=True, mask=mask, **static)
        return out.y, out.batch_stats

    (y, new_state), pullback = jax.vjp(f, x, params, state["nu"])
    dx, dparams, dnu = pullback((dy, jax.tree.map(jnp.zeros_like, new_state)))
    return y, new_state, dx, dparams, dnu


@functools.cache
def _vjp_fn(**static):
    return jax.jit(lambda x, p, s, dy, m: vjp_eager(x, p, s, dy, m, **static))


def vjp_all(x, params, state, dy, *, mask=None, **static):
    """vjp_eager under jit."""
    return _vjp_fn(**static)(x, params, state, dy, mask)


# ---------------------------------------------------------------------- forward


def test_eval_forward_uses_running_psi2_and_keeps_state():
    _, (x, params, state, _), _ = random_setup(0)
    y, new_state, _ = power.power_norm(x, params, state, train=False)
    want = ref_forward(x, params["scale"], params["bias"], state["psi2"])
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    assert new_state is state


@pytest.mark.parametrize("masked", [False, True])
def test_train_forward_uses_previous_running_psi2_then_updates_it(masked):
    _, (x, params, state, _), valid = random_setup(1)
    mask = valid if masked else None
    y, new_state = norm(x, params, state, train=True, momentum=0.9, mask=mask)
    # The forward divides by psi_{t-1}, the state passed in, not the batch's psi.
    want = ref_forward(x, params["scale"], params["bias"], state["psi2"], mask)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    psi2 = np.asarray(state["psi2"], np.float64)
    want_psi2 = 0.9 * psi2 + 0.1 * ref_psi2(x, mask)
    np.testing.assert_allclose(new_state["psi2"], want_psi2, rtol=1e-6)
    np.testing.assert_array_equal(new_state["nu"], state["nu"])
    assert new_state["steps"] == 1 and new_state["steps"].dtype == jnp.int32


def test_axis_option_reduces_over_the_other_axes():
    _, (x, _, state, _), _ = random_setup(2)
    _, s_last = norm(x, None, state, train=True)
    _, s_axis1 = norm(jnp.moveaxis(x, -1, 1), None, state, train=True, axis=1)
    np.testing.assert_allclose(s_axis1["psi2"], s_last["psi2"], rtol=1e-6)


# --------------------------------------------------------------------- backward


@pytest.mark.parametrize("masked", [False, True])
def test_backward_matches_algorithm2_float64(masked):
    with jax.enable_x64(True):
        _, (x, params, state, dy), valid = random_setup(3, dtype=np.float64)
        mask = valid if masked else None
        _, _, dx, dparams, dnu = vjp_all(x, params, state, dy, momentum=0.9, mask=mask)
        want_dx, want_dscale, want_dbias, want_nu = ref_algorithm2(
            x, dy, params["scale"], state["psi2"], state["nu"], 0.9, valid=mask
        )
        assert dx.dtype == jnp.float64
        np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dparams["scale"], want_dscale, rtol=1e-12)
        np.testing.assert_allclose(dparams["bias"], want_dbias, rtol=1e-12)
        # The cotangent of nu is the increment nu_t - nu_{t-1}.
        np.testing.assert_allclose(state["nu"] + dnu, want_nu, rtol=1e-12)
        applied = power.apply_nu_updates(state, {"nu": dnu})
        np.testing.assert_allclose(applied["nu"], want_nu, rtol=1e-12)
        # nu_momentum, when given, is the alpha of the nu update alone.
        *_, dnu = vjp_all(x, params, state, dy, mask=mask, nu_momentum=0.5)
        *_, want_nu = ref_algorithm2(
            x, dy, params["scale"], state["psi2"], state["nu"], 0.5, valid=mask
        )
        np.testing.assert_allclose(state["nu"] + dnu, want_nu, rtol=1e-12)


def test_pn_v_gradient_matches_finite_differences_float64():
    with jax.enable_x64(True):
        _, (x, params, _, dy), valid = random_setup(5, dtype=np.float64)
        for mask, causal in ((None, False), (valid, True)):

            @jax.jit
            def loss(x, params, mask=mask, causal=causal):
                y, _, _ = power.power_norm(
                    x,
                    params,
                    None,
                    train=True,
                    variant="pn-v",
                    mask=mask,
                    causal=causal,
                )
                return jnp.sum(y * dy)

            jax.test_util.check_grads(
                loss, (x, params), order=1, modes=["rev"], eps=1e-6
            )


# ---------------------------------------------------------------------- warm-up


def test_warmup_uses_batch_psi_then_switches_to_running():
    _, (x, params, state, _), _ = random_setup(6)
    xs = [x, 2.0 * x + 1.0, x - 0.5]
    kw = dict(train=True, momentum=0.9, warmup_steps=2)
    psi2_batches = []
    for step in range(2):
        y, state = norm(xs[step], params, state, **kw)
        psi2_batches.append(ref_psi2(xs[step]))
        want = ref_forward(xs[step], params["scale"], params["bias"], psi2_batches[-1])
        np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
        assert state["steps"] == step + 1
    # During warm-up the running psi2 is the mean of the warm-up batches' psi_B^2.
    np.testing.assert_allclose(state["psi2"], np.mean(psi2_batches, 0), rtol=1e-6)
    y, new_state = norm(xs[2], params, state, **kw)
    want = ref_forward(xs[2], params["scale"], params["bias"], state["psi2"])
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    want_psi2 = 0.9 * np.asarray(state["psi2"], np.float64) + 0.1 * ref_psi2(xs[2])
    np.testing.assert_allclose(new_state["psi2"], want_psi2, rtol=1e-6)


def test_warmup_gradient_exact_and_approximate_float64():
    with jax.enable_x64(True):
        _, (x, params, state, dy), valid = random_setup(7, dtype=np.float64)
        for mask, causal in ((None, False), (valid, True)):

            @jax.jit
            def loss(x, params, mask=mask, causal=causal):
                y, _, _ = power.power_norm(
                    x,
                    params,
                    state,
                    train=True,
                    warmup_steps=1,
                    mask=mask,
                    causal=causal,
                )
                return jnp.sum(y * dy)

            jax.test_util.check_grads(
                loss, (x, params), order=1, modes=["rev"], eps=1e-6
            )
        # 'approximate' is Algorithm 2 with the batch psi_B in place of psi_{t-1}
        # (the authors' code during warm-up); nu is updated in both modes.
        want = ref_algorithm2(x, dy, params["scale"], ref_psi2(x), state["nu"], 0.9)
        for mode in ("exact", "approximate"):  # dx below: approximate
            _, _, dx, dparams, dnu = vjp_all(
                x,
                params,
                state,
                dy,
                momentum=0.9,
                warmup_steps=1,
                warmup_gradient=mode,
            )
            np.testing.assert_allclose(state["nu"] + dnu, want[3], rtol=1e-12)
            np.testing.assert_allclose(dparams["scale"], want[1], rtol=1e-12)
        np.testing.assert_allclose(dx, want[0], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------- causal


MODES = {
    "pn": dict(variant="pn"),
    "pn_warmup_exact": dict(variant="pn", warmup_steps=3),
    "pn_warmup_approximate": dict(
        variant="pn", warmup_steps=3, warmup_gradient="approximate"
    ),
    "pn_v": dict(variant="pn-v"),
}


# The two warm-up gradients share one forward: one of them is enough here.
@pytest.mark.parametrize("mode", ["pn", "pn_warmup_exact", "pn_v"])
def test_causal_outputs_do_not_see_later_positions(mode):
    rng, (x, params, state, _), valid = random_setup(8)
    t = 2
    future = jnp.asarray(rng.normal(5, 3, x[:, t + 1 :].shape), jnp.float32)
    x_future = x.at[:, t + 1 :].set(future)
    for causal in (True, "per_position", "running"):
        kw = dict(train=True, mask=valid, causal=causal, **MODES[mode])
        y, _ = norm(x, params, state, **kw)
        y_future, _ = norm(x_future, params, state, **kw)
        np.testing.assert_allclose(y[:, : t + 1], y_future[:, : t + 1], rtol=1e-6)
        assert not np.allclose(y[:, t + 1 :], y_future[:, t + 1 :])
    # The check can fail: without a causal mode batch statistics leak the future.
    if mode != "pn":
        kw = dict(train=True, mask=valid, **MODES[mode])
        y, _ = norm(x, params, state, **kw)
        y_future, _ = norm(x_future, params, state, **kw)
        assert not np.allclose(y[:, : t + 1], y_future[:, : t + 1])


def test_causal_modes_forward_statistics():
    _, (x, _, state, _), _ = random_setup(9)
    x64 = np.asarray(x, np.float64)
    kw = dict(train=True, warmup_steps=1)
    y_cumulative, new_cumulative = norm(x, None, state, causal=True, **kw)
    y_position, new_position = norm(x, None, state, causal="per_position", **kw)
    for t in range(x.shape[1]):
        psi2_t = ref_psi2(x64[:, : t + 1])  # batch and positions <= t
        want = x64[:, t] / np.sqrt(psi2_t + EPS)
        np.testing.assert_allclose(y_cumulative[:, t], want, rtol=2e-5, atol=2e-5)
        psi2_t = ref_psi2(x64[:, t])  # position t across the batch
        want = x64[:, t] / np.sqrt(psi2_t + EPS)
        np.testing.assert_allclose(y_position[:, t], want, rtol=2e-5, atol=2e-5)
    # The running update uses the whole batch.
    for new in (new_cumulative, new_position):
        np.testing.assert_allclose(new["psi2"], ref_psi2(x64), rtol=1e-6)
    # 'running' always divides by the running psi, in warm-up and PN-V too.
    want = ref_forward(x, 1.0, 0.0, state["psi2"])
    for kwargs in (kw, dict(train=True, variant="pn-v")):
        y, new = norm(x, None, state, causal="running", **kwargs)
        np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
        _, new_not_causal = norm(x, None, state, **kwargs)
        np.testing.assert_allclose(new["psi2"], new_not_causal["psi2"], rtol=1e-6)


# ------------------------------------------------------------------------ masks


@pytest.mark.parametrize("mode", ["pn", "pn_warmup_exact", "pn_v"])
def test_padded_positions_never_enter_statistics(mode):
    rng, (x, params, state, dy), valid = random_setup(10)
    padded = ~np.broadcast_to(valid, x.shape)
    x_junk = jnp.where(padded, jnp.asarray(rng.normal(50, 30, x.shape)), x)
    # dL/dy at padded positions is zero, as a masked loss gives.
    dy = jnp.where(padded, 0.0, dy)
    kw = dict(mask=valid, **MODES[mode])
    a = all_grads(x, params, state, dy, **kw)
    b = all_grads(x_junk, params, state, dy, **kw)
    keep = ~padded
    np.testing.assert_allclose(a[0][keep], b[0][keep], rtol=1e-6)  # y
    np.testing.assert_allclose(a[2][keep], b[2][keep], rtol=1e-6)  # dx
    for got, want in zip(jax.tree.leaves(b[1]), jax.tree.leaves(a[1]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)  # new state
    for got, want in zip(jax.tree.leaves(b[3:]), jax.tree.leaves(a[3:]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # params, nu
    if mode == "pn":
        # Padded elements get dL/dx = dL/dx_hat / psi: no nu term.
        psi = np.sqrt(np.asarray(state["psi2"], np.float64) + EPS)
        g = np.asarray(params["scale"]) * np.asarray(dy)
        np.testing.assert_allclose(a[2][padded], (g / psi)[padded], atol=1e-7)


# --------------------------------------------------------------- edge cases, dtype


@functools.cache
def _grads_fn(**static):
    def run(x, params, state, dy, mask):
        def f(x, params, floats):
            new = {**state, **floats}
            out = power.power_norm(x, params, new, train=True, mask=mask, **static)
            return out.y, out.batch_stats

        floats = {k: v for k, v in state.items() if k != "steps"}
        (y, new_state), pullback = jax.vjp(f, x, params, floats)
        grads = pullback((dy, jax.tree.map(jnp.zeros_like, new_state)))
        return y, new_state, *grads

    return jax.jit(run)


def all_grads(x, params, state, dy, *, mask=None, **static):
    """y, new state, dL/dx, dL/dparams, dL/d(float state) for L = sum(y * dy); any
    variant (PN-V states have no nu)."""
    return _grads_fn(**static)(x, params, state, dy, mask)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_batch_size_one_and_zero_input_give_finite_gradients(mode):
    kwargs = MODES[mode]
    params = {"scale": jnp.ones(4), "bias": jnp.zeros(4)}
    state = power.init_state((4,), kwargs["variant"])
    if "nu" in state:
        state["nu"] = jnp.full((4,), 0.1)
    dy = jnp.ones((1, 1, 4))
    for x in (jnp.full((1, 1, 4), -1.5), jnp.zeros((1, 1, 4))):
        _, _, dx, *grads = all_grads(x, params, state, dy, **kwargs)
        for leaf in jax.tree.leaves((dx, grads)):
            assert np.all(np.isfinite(leaf))
        assert np.all(dx != 0)
    # A batch with no valid element gives finite outputs and leaves psi2 as is.
    mask = jnp.zeros((1, 1, 1), bool)
    y, new = norm(jnp.ones((1, 1, 4)), None, state, train=True, mask=mask, **kwargs)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(new["psi2"], 1.0)


def test_bfloat16_input_float32_statistics():
    _, (x, params, state, dy), _ = random_setup(11)
    xb = x.astype(jnp.bfloat16)
    for mode in ("pn", "pn_warmup_exact", "pn_v"):
        kwargs = MODES[mode]
        dyb = dy.astype(jnp.bfloat16)
        y, new_state, dx, *_ = all_grads(xb, params, state, dyb, **kwargs)
        y32, new32 = norm(xb.astype(jnp.float32), params, state, train=True, **kwargs)
        assert y.dtype == jnp.bfloat16 and new_state["psi2"].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(new_state["psi2"], new32["psi2"], rtol=1e-6)
        assert dx.dtype == jnp.bfloat16 and np.all(np.isfinite(dx))
    y, _ = norm(xb, params, state, train=False, dtype=jnp.float32)
    assert y.dtype == jnp.float32


def test_jit_agrees_with_eager():
    _, (x, params, state, dy), _ = random_setup(12)
    kw = dict(momentum=0.9)
    for got, want in zip(
        jax.tree.leaves(vjp_all(x, params, state, dy, **kw)),
        jax.tree.leaves(vjp_eager(x, params, state, dy, **kw)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_axis_name_pools_statistics_and_nu_over_devices():
    _, (x, params, state, dy), valid = random_setup(16, shape=(4, 5, 4))
    mask = np.broadcast_to(valid, x.shape[:-1] + (1,))
    whole = vjp_all(x, params, state, dy, mask=mask, warmup_steps=1)
    split = lambda a: a.reshape(2, 2, *a.shape[1:])  # noqa: E731
    per_device = jax.jit(
        jax.vmap(
            lambda x, dy, m: vjp_eager(
                x, params, state, dy, m, warmup_steps=1, axis_name="devices"
            ),
            axis_name="devices",
        )
    )(split(x), split(dy), split(jnp.asarray(mask)))
    y, new_state, dx, _, dnu = per_device
    np.testing.assert_allclose(y.reshape(x.shape), whole[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx.reshape(x.shape), whole[2], rtol=1e-5, atol=1e-6)
    for device in range(2):
        # Every device holds the pooled psi2 and the same, pooled nu increment.
        np.testing.assert_allclose(new_state["psi2"][device], whole[1]["psi2"])
        np.testing.assert_allclose(dnu[device], whole[4], rtol=1e-5, atol=1e-7)


def test_bad_input_gives_clear_errors():
    x = jnp.zeros((2, 3, 4))
    state = power.init_state((4,))
    cases = [
        ("variant must be one of", dict(variant="pnv")),
        ("needs state keys", dict(state={"psi2": jnp.ones(4)})),
        ("state is None", dict(state=None)),
        ("does not broadcast", dict(mask=jnp.ones((3, 2), bool))),
        ("time_axis 2 is a feature axis", dict(causal=True, time_axis=-1)),
        ("momentum must lie", dict(momentum=1.5)),
        ("warmup_gradient", dict(warmup_gradient="none")),
        ("warmup_steps applies to variant 'pn'", dict(variant="pn-v", warmup_steps=2)),
        (r"state\['psi2'\] has shape \(3,\)", dict(state=power.init_state((3,)))),
        (r"state\['steps'\] has shape", dict(state={**state, "steps": jnp.zeros(2)})),
        ("out of range", dict(axis=3)),
        ("not a causal mode", dict(causal="future")),
    ]
    for match, kwargs in cases:
        kwargs = {"state": state, **kwargs}
        with pytest.raises(ValueError, match=match):
            power.power_norm(x, None, kwargs.pop("state"), train=True, **kwargs)
    with pytest.raises(ValueError, match="no matching 'nu'"):
        power.apply_nu_updates({"PowerNorm_0": state}, {"Dense_0": {"nu": 1.0}})


# ------------------------------------------------------------------ Flax module


def test_module_variable_tree_and_no_update_at_init():
    x = jnp.ones((3, 5, 4))
    for train in (False, True):
        variables = nn.PowerNorm().init(jax.random.key(0), x, not train)
        shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), variables)
        assert shapes == {
            "params": {"scale": ((4,), "float32"), "bias": ((4,), "float32")},
            "batch_stats": {
                "psi2": ((4,), "float32"),
                "nu": ((4,), "float32"),
                "steps": ((), "int32"),
            },
            "perturbations": {"nu": ((4,), "float32")},
        }
        assert variables["batch_stats"]["steps"] == 0
        np.testing.assert_array_equal(variables["batch_stats"]["psi2"], 1.0)
    pnv = nn.PowerNorm(variant="pn-v").init(jax.random.key(0), x, True)
    assert jax.tree.map(jnp.shape, pnv) == {
        "params": {"scale": (4,), "bias": (4,)},
        "batch_stats": {"psi2": (4,)},
    }


def test_module_matches_functional_and_updates_state():
    _, (x, params, state, _), valid = random_setup(13)
    layer = nn.PowerNorm(momentum=0.9, warmup_steps=1, causal=True)
    variables = {"params": params, "batch_stats": state}
    y, updates = jax.jit(
        lambda v: layer.apply(
            v, x, use_running_average=False, mask=valid, mutable=["batch_stats"]
        )
    )(variables)
    want_y, want_state = norm(
        x,
        params,
        state,
        train=True,
        momentum=0.9,
        warmup_steps=1,
        causal=True,
        mask=valid,
    )
    np.testing.assert_allclose(y, want_y, rtol=1e-6)
    for key in ("psi2", "nu", "steps"):
        np.testing.assert_allclose(updates["batch_stats"][key], want_state[key])
    y_eval = layer.apply(variables, x, use_running_average=True)
    want = ref_forward(x, params["scale"], params["bias"], state["psi2"])
    np.testing.assert_allclose(y_eval, want, rtol=2e-5, atol=2e-5)


def test_module_honours_statistics_source():
    _, (x, params, state, _), _ = random_setup(17)
    layer = nn.PowerNorm()
    variables = {"params": params, "batch_stats": state}
    with nn.statistics_source("batch"):
        y, updates = jax.jit(
            lambda v: layer.apply(v, x, True, mutable=["batch_stats"])
        )(variables)
    want = ref_forward(x, params["scale"], params["bias"], ref_psi2(x))
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    with nn.statistics_source("running"):
        y, updates_running = layer.apply(variables, x, False, mutable=["batch_stats"])
    want = ref_forward(x, params["scale"], params["bias"], state["psi2"])
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    for new in (updates, updates_running):
        for key in ("psi2", "nu", "steps"):
            np.testing.assert_array_equal(new["batch_stats"][key], state[key])


class Net(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, x, train: bool):
        x = nn.PowerNorm(name="first", momentum=0.9)(x, use_running_average=not train)
        x = flax_nn.Dense(4)(x)
        return nn.PowerNorm(use_scale=False)(x, use_running_average=not train)


def train_step(model, variables, x, dy, train_flag):
    """The documented pattern: grads w.r.t. params and perturbations together.
    ``train_flag`` is the model's positional train argument (for a bare PowerNorm,
    use_running_average=False)."""

    def loss_fn(params, perturbations):
        out, updates = model.apply(
            {**variables, "params": params, "perturbations": perturbations},
            x,
            train_flag,
            mutable=["batch_stats"],
        )
        return jnp.sum(out * dy), updates["batch_stats"]

    (grads, nu_grads), batch_stats = jax.grad(loss_fn, (0, 1), has_aux=True)(
        variables["params"], variables["perturbations"]
    )
    return grads, nu_grads, power.apply_nu_updates(batch_stats, nu_grads)


def test_perturbations_deliver_nu_increments_to_batch_stats():
    _, (x, params, state, dy), _ = random_setup(14)
    model = nn.PowerNorm(momentum=0.9)
    variables = model.init(jax.random.key(0), x, True)
    variables = {**variables, "params": params, "batch_stats": state}
    grads, nu_grads, new_stats = jax.jit(lambda v: train_step(model, v, x, dy, False))(
        variables
    )
    _, want_dscale, want_dbias, want_nu = ref_algorithm2(
        x, dy, params["scale"], state["psi2"], state["nu"], 0.9
    )
    np.testing.assert_allclose(new_stats["nu"], want_nu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["scale"], want_dscale, rtol=1e-5)
    np.testing.assert_allclose(grads["bias"], want_dbias, rtol=1e-5)
    assert new_stats["steps"] == 1

    # A plain train step (no perturbations): the same parameter gradients, the
    # same psi2 and steps, and nu keeps its value.
    def plain_loss(params):
        variables = {"params": params, "batch_stats": state}
        out, updates = model.apply(variables, x, False, mutable=["batch_stats"])
        return jnp.sum(out * dy), updates["batch_stats"]

    plain_grads, plain_stats = jax.grad(plain_loss, has_aux=True)(params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_array_equal(plain_stats["nu"], state["nu"])
    np.testing.assert_allclose(plain_stats["psi2"], new_stats["psi2"], rtol=1e-6)
    assert plain_stats["steps"] == 1


def test_apply_nu_updates_follows_module_paths():
    rng, (x, _, _, _), _ = random_setup(15)
    dy = jnp.asarray(rng.normal(size=x.shape[:-1] + (4,)), jnp.float32)
    model = Net()
    variables = model.init(jax.random.key(1), x, False)
    assert set(variables["perturbations"]) == {"first", "PowerNorm_0"}
    _, nu_grads, new_stats = jax.jit(lambda v: train_step(model, v, x, dy, True))(
        variables
    )
    for name in ("first", "PowerNorm_0"):
        old = variables["batch_stats"][name]
        np.testing.assert_allclose(
            new_stats[name]["nu"], old["nu"] + nu_grads[name]["nu"], rtol=1e-6
        )
        assert np.all(nu_grads[name]["nu"] != 0)
        assert new_stats[name]["steps"] == 1
