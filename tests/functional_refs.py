"""Float64 NumPy references shared by the tests of normjax.functional."""

import jax.numpy as jnp
import numpy as np

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}


def ref_normalize(x, axes, mask=None, eps=1e-6, center=True):
    """Plain float64 normalization over ``axes``; masked elements do not count
    and normalize to 0 (a masked output is the bias alone)."""
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape) * 1.0
    n = w.sum(axes, keepdims=True)
    mean = (x * w).sum(axes, keepdims=True) / np.maximum(n, 1) if center else 0.0
    var = (w * (x - mean) ** 2).sum(axes, keepdims=True) / np.maximum(n, 1)
    return np.where(w > 0, (x - mean) / np.sqrt(var + eps), 0.0), mean, var


def ref_affine(y, scale, bias, feature_axes):
    shape = [y.shape[a] if a in feature_axes else 1 for a in range(y.ndim)]
    return y * np.reshape(scale, shape) + np.reshape(bias, shape)


def as_array(x, dtype):
    return jnp.asarray(x, jnp.float32).astype(dtype)


def params_for(rng, shape):
    return {
        "scale": jnp.asarray(rng.uniform(0.5, 2, size=shape), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=shape), jnp.float32),
    }


def check(got, want, dtype):
    assert got.dtype == dtype
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


def random_input(rng, shape, dtype):
    x = rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 3), size=shape)
    # The reference sees exactly what the norm sees: the input after rounding.
    return np.asarray(as_array(x, dtype), np.float64)


DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def ref_batch_stats(x, feature_axes):
    axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    return x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
