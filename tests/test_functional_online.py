"""normjax.functional.online: Online Normalization against a float64 NumPy
reference of the authors' algorithm (Chiley et al. 2019; the sample-by-sample
forward and the control-process backward of Cerebras/online-normalization's
NumPy implementation), written out here, over a sequence of batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax import functional as F

EPS = 1e-5


class RefOnline:
    """Channels last: x (N, H, W, C); statistics per sample and channel."""

    def __init__(self, c, a_fwd, a_bkw, clamp=None, scale=None, bias=None):
        self.m, self.var = np.zeros(c), np.ones(c)
        self.u, self.v = np.zeros(c), np.zeros(c)
        self.a, self.b, self.clamp = a_fwd, a_bkw, clamp
        self.scale = np.ones(c) if scale is None else scale
        self.bias = np.zeros(c) if bias is None else bias

    def forward(self, x):
        mu, var = x.mean((1, 2)), x.var((1, 2))
        centers, scales = [], []
        for i in range(len(x)):
            centers.append(self.m.copy())
            scales.append(np.sqrt(self.var + EPS))
            self.var = (
                self.a * self.var
                + (1 - self.a) * var[i]
                + self.a * (1 - self.a) * (mu[i] - self.m) ** 2
            )
            self.m = self.m + (1 - self.a) * (mu[i] - self.m)
        c = np.asarray(centers)[:, None, None]
        s = np.asarray(scales)[:, None, None]
        self.out, self.s = (x - c) / s, s
        y = self.out * self.scale + self.bias
        self.pre_clamp = y
        return y if self.clamp is None else np.clip(y, -self.clamp, self.clamp)

    def backward(self, g):
        if self.clamp is not None:
            g = np.where(np.abs(self.pre_clamp) >= self.clamp, 0.0, g)
        g = g * self.scale
        grad_in = np.empty_like(g)
        for i in range(len(g)):
            grad = g[i] - (1 - self.b) * self.v * self.out[i]
            self.v = self.v + (grad * self.out[i]).mean((0, 1))
            grad = grad / self.s[i]
            grad_in[i] = grad - (1 - self.b) * self.u
            self.u = self.u + grad_in[i].mean((0, 1))
        return grad_in


@pytest.mark.parametrize("ecm", ["none", "clamp"])
def test_online_norm_matches_the_reference_over_a_sequence_of_batches(ecm):
    rng = np.random.default_rng(70)
    c, a, b = 3, 0.9, 0.8  # fast momenta: the statistics move visibly
    scale, bias = rng.uniform(0.5, 2, c), rng.normal(size=c)
    ref = RefOnline(
        c, a, b, clamp=1.5 if ecm == "clamp" else None, scale=scale, bias=bias
    )
    state = {
        k: jnp.asarray(getattr(ref, n), jnp.float32)
        for k, n in (("mean", "m"), ("var", "var"), ("u", "u"), ("v", "v"))
    }
    params = {
        "scale": jnp.asarray(scale, jnp.float32),
        "bias": jnp.asarray(bias, jnp.float32),
    }
    for step in range(3):
        x = rng.normal(step, 1.0 + step, size=(4, 3, 3, c))
        g = rng.normal(size=x.shape)
        want_y = ref.forward(x)
        want_gx = ref.backward(g)

        def f(x, u, v, state=state):
            out = F.online_norm(
                x,
                params,
                {**state, "u": u, "v": v},
                train=True,
                momentum=a,
                backward_momentum=b,
                ecm=ecm,
                clamp_value=1.5,
            )
            return out.y, out.batch_stats

        xj = jnp.asarray(x, jnp.float32)
        y, vjp_fn = jax.vjp(lambda x, u, v: f(x, u, v)[0], xj, state["u"], state["v"])
        new = f(xj, state["u"], state["v"])[1]
        gx, du, dv = vjp_fn(jnp.asarray(g, jnp.float32))
        np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(gx, want_gx, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(new["mean"], ref.m, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new["var"], ref.var, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state["u"] + du, ref.u, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(state["v"] + dv, ref.v, rtol=1e-4, atol=1e-5)
        state = {
            "mean": new["mean"],
            "var": new["var"],
            "u": state["u"] + du,
            "v": state["v"] + dv,
        }


def test_online_norm_masks_padding_and_skips_empty_samples():
    rng = np.random.default_rng(71)
    x = rng.normal(size=(3, 4, 4, 2))
    mask = rng.random((3, 4, 4, 1)) < 0.6
    mask[1] = False  # a sample with no valid element changes nothing
    mask[0, 0, 0] = mask[2, 0, 0] = True
    state = {
        "mean": jnp.zeros(2),
        "var": jnp.ones(2),
        "u": jnp.zeros(2),
        "v": jnp.zeros(2),
    }
    poisoned = jnp.asarray(np.where(mask, x, np.nan), jnp.float32)
    clean = jnp.asarray(np.where(mask, x, 0.0), jnp.float32)

    def run(x):
        def f(x, u, v):
            return F.online_norm(
                x,
                None,
                {**state, "u": u, "v": v},
                train=True,
                mask=mask,
                momentum=0.5,
                ecm="none",
            ).y

        y, vjp = jax.vjp(f, x, state["u"], state["v"])
        return (
            y,
            vjp(jnp.ones_like(y)),
            F.online_norm(
                x, None, state, train=True, mask=mask, momentum=0.5
            ).batch_stats,
        )

    (y1, g1, s1), (y2, g2, s2) = run(poisoned), run(clean)
    assert np.all(np.isfinite(y1)) and all(np.all(np.isfinite(g)) for g in g1)
    np.testing.assert_array_equal(y1, y2)
    jax.tree.map(np.testing.assert_array_equal, g1, g2)
    jax.tree.map(np.testing.assert_array_equal, s1, s2)
    # the statistics took in samples 0 and 2 only
    skip = F.online_norm(
        clean[::2], None, state, train=True, mask=mask[::2], momentum=0.5
    ).batch_stats
    np.testing.assert_allclose(s1["mean"], skip["mean"], rtol=1e-6)
    np.testing.assert_allclose(s1["var"], skip["var"], rtol=1e-6)
    np.testing.assert_array_equal(y1[1], 0.0)


def test_online_norm_evaluation_and_its_causal_refusal():
    import normjax

    rng = np.random.default_rng(72)
    x = jnp.asarray(rng.normal(size=(4, 3, 3, 2)), jnp.float32)
    state = {
        "mean": jnp.asarray([0.5, -1.0]),
        "var": jnp.asarray([2.0, 0.5]),
        "u": jnp.zeros(2),
        "v": jnp.zeros(2),
    }
    y = F.online_norm(x, None, state, train=False, ecm="none").y
    want = (x - state["mean"]) / jnp.sqrt(state["var"] + EPS)
    np.testing.assert_allclose(y, want, rtol=1e-5)
    clamped = F.online_norm(x * 100, None, state, train=False).y
    assert float(jnp.abs(clamped).max()) == 5.0
    scaled = F.online_norm(x, None, state, train=False, ecm="layer_scaling").y
    np.testing.assert_allclose(jnp.mean(scaled**2, (1, 2, 3)), 1.0, rtol=1e-3)
    with pytest.raises(ValueError, match="samples of the batch in sequence"):
        normjax.make_norm("online", causal=True)
    with pytest.raises(ValueError, match="ecm"):
        F.online_norm(x, None, state, train=True, ecm="bogus")
