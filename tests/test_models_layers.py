"""normjax.models.layers: Conv and max_pool_2x2 against float64 references and
against flax.linen (forward and gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax.models import layers
from normjax.models.layers import Conv, max_pool_2x2

# (input NHWC, features, kernel, strides, padding, bias)
CASES = [
    ((3, 9, 7, 5), 6, (3, 3), (1, 1), "SAME", True),
    ((3, 9, 7, 5), 6, (3, 3), (2, 2), "SAME", False),
    ((4, 8, 8, 4), 5, (1, 1), (2, 2), "SAME", True),
    ((2, 8, 9, 4), 5, (3, 2), (2, 1), "VALID", True),
    ((2, 10, 11, 3), 4, (3, 3), (2, 2), ((1, 1), (1, 1)), False),
    ((2, 7, 7, 3), 8, (2, 2), (1, 1), "VALID", False),
    ((3, 6, 5, 64), 7, (3, 3), (1, 1), "SAME", True),  # im2col path (C >= 64)
]


def reference_conv(x, kernel, strides, pads):
    """Plain float64 convolution: y[n,h,w] = sum_ij xpad[n, s*h+i, s*w+j] @ k[i,j]."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), *pads, (0, 0)))
    kernel = np.asarray(kernel, np.float64)
    kh, kw = kernel.shape[:2]
    ho = (x.shape[1] - kh) // strides[0] + 1
    wo = (x.shape[2] - kw) // strides[1] + 1
    y = np.zeros((x.shape[0], ho, wo, kernel.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            window = x[
                :,
                i : i + strides[0] * (ho - 1) + 1 : strides[0],
                j : j + strides[1] * (wo - 1) + 1 : strides[1],
            ]
            y += window @ kernel[i, j]
    return y


def reference_grads(x, kernel, strides, pads, dy):
    """float64 (dx, dkernel) of sum(y * dy): every tap (i, j) reads the window
    xpad[:, i::s, j::s] of the padded input."""
    x_pad = np.pad(np.asarray(x, np.float64), ((0, 0), *pads, (0, 0)))
    kernel, dy = np.asarray(kernel, np.float64), np.asarray(dy, np.float64)
    ho, wo = dy.shape[1:3]
    dx_pad, dkernel = np.zeros_like(x_pad), np.zeros_like(kernel)
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            window = (
                slice(None),
                slice(i, i + strides[0] * (ho - 1) + 1, strides[0]),
                slice(j, j + strides[1] * (wo - 1) + 1, strides[1]),
            )
            dkernel[i, j] = np.einsum("nhwc,nhwo->co", x_pad[window], dy)
            dx_pad[window] += dy @ kernel[i, j].T
    (top, _), (left, _) = pads
    h, w = np.shape(x)[1:3]
    return dx_pad[:, top : top + h, left : left + w], dkernel


def _loss_and_grads(module, variables, x, dy):
    def loss(params, x):
        return jnp.sum(module.apply({"params": params}, x) * dy)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables["params"], x)


def _close(got, want, scale):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=scale)


@pytest.mark.parametrize("chunk_bytes", [layers._CHUNK_BYTES, 1500])
@pytest.mark.parametrize("shape,features,kernel,strides,padding,bias", CASES)
def test_conv_matches_float64_and_flax(
    monkeypatch, chunk_bytes, shape, features, kernel, strides, padding, bias
):
    # A small chunk budget forces the chunked (and, for odd batches, padded)
    # kernel gradient on these small shapes.
    monkeypatch.setattr(layers, "_CHUNK_BYTES", chunk_bytes)
    # numpy inputs: jax.random would compile a sampler per shape (~1 s each here).
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    ours = Conv(features, kernel, strides, padding, use_bias=bias)
    flax_conv = nn.Conv(features, kernel, strides, padding, use_bias=bias)
    params = {"kernel": rng.normal(size=(*kernel, shape[-1], features)) / 3}
    if bias:
        params["bias"] = rng.normal(size=(features,))
    variables = {"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)}
    shapes = jax.eval_shape(flax_conv.init, jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, shapes)

    y = jax.jit(ours.apply)(variables, x)
    pads = layers.conv_padding(shape[1:3], kernel, strides, padding)
    y_ref = reference_conv(x, variables["params"]["kernel"], strides, pads)
    if bias:
        y_ref = y_ref + np.asarray(variables["params"]["bias"], np.float64)
    assert y.shape == y_ref.shape
    _close(y, y_ref, 1e-5 * np.abs(y_ref).max())

    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    _, (dparams, dx) = _loss_and_grads(ours, variables, x, dy)
    _, (flax_dparams, flax_dx) = _loss_and_grads(flax_conv, variables, x, dy)
    dx_ref, dkernel_ref = reference_grads(
        x, variables["params"]["kernel"], strides, pads, dy
    )
    for got, flax_got, want in [
        (dx, flax_dx, dx_ref),
        (dparams["kernel"], flax_dparams["kernel"], dkernel_ref),
    ]:
        scale = np.abs(want).max()
        _close(got, want, 1e-5 * scale)
        # No less accurate than flax's autodiff (up to rounding noise).
        ours_err = np.abs(np.asarray(got, np.float64) - want).max()
        flax_err = np.abs(np.asarray(flax_got, np.float64) - want).max()
        assert ours_err <= 4 * flax_err + 1e-6 * scale
    if bias:
        _close(dparams["bias"], np.asarray(dy, np.float64).sum((0, 1, 2)), 1e-4)


def test_conv_initializes_like_flax():
    x = jnp.ones((2, 6, 6, 3))
    for use_bias in (True, False):
        ours = Conv(4, 3, strides=2, use_bias=use_bias, bias_init=nn.initializers.ones)
        flax_conv = nn.Conv(
            4, (3, 3), strides=2, use_bias=use_bias, bias_init=nn.initializers.ones
        )
        same = jax.tree.map(
            lambda a, b: bool(jnp.array_equal(a, b)),
            ours.init(jax.random.key(1, impl="rbg"), x),
            flax_conv.init(jax.random.key(1, impl="rbg"), x),
        )
        assert jax.tree.all(same)


def test_conv_without_jit_and_bfloat16():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
    conv = Conv(4, 3)
    variables = conv.init(jax.random.key(1), x)
    grads = jax.grad(lambda p: conv.apply({"params": p}, x).sum())(variables["params"])
    flax_grads = jax.grad(lambda p: nn.Conv(4, (3, 3)).apply({"params": p}, x).sum())(
        variables["params"]
    )
    _close(grads["kernel"], np.asarray(flax_grads["kernel"]), 1e-5)

    y16 = jax.jit(conv.apply)(variables, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.float32  # promoted with float32 params, as in flax
    conv16 = Conv(4, 3, dtype=jnp.bfloat16)
    g16 = jax.jit(jax.grad(lambda p: conv16.apply({"params": p}, x).sum()))(
        variables["params"]
    )
    assert g16["kernel"].dtype == jnp.float32
    scale = float(jnp.abs(flax_grads["kernel"]).max())
    _close(g16["kernel"], np.asarray(flax_grads["kernel"]), 0.02 * scale)


def test_conv_rejects_unsupported_padding():
    x = jnp.zeros((1, 4, 4, 1))
    with pytest.raises(NotImplementedError, match="padding"):
        Conv(1, 3, padding="CIRCULAR").init(jax.random.key(0), x)
    with pytest.raises(NotImplementedError, match="padding"):
        Conv(1, 3, padding=3).init(jax.random.key(0), x)


def _value_and_vjp(fn, x, dy):
    y, vjp = jax.vjp(fn, x)
    return y, vjp(dy)[0]


def reference_max_pool(x):
    """float64 2x2 max pool (odd last row/column dropped) and its gradient for
    distinct values: the cotangent goes to each window's maximum."""
    x = np.asarray(x, np.float64)
    n, h, w, c = x.shape
    windows = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
    y = windows.max(axis=(2, 4))
    is_max = windows == y[:, :, None, :, None]
    return y, is_max


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 7, 9, 2), (1, 5, 5, 4)])
def test_max_pool_matches_float64_reference(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)  # distinct: no ties
    dy = jnp.asarray(
        rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])),
        jnp.float32,
    )
    y, dx = jax.jit(lambda x, dy: _value_and_vjp(max_pool_2x2, x, dy))(x, dy)
    y_ref, is_max = reference_max_pool(x)
    np.testing.assert_array_equal(y, y_ref)
    n, h, w, c = shape
    dx_ref = np.zeros(shape)
    dx_ref[:, : h // 2 * 2, : w // 2 * 2] = (
        is_max * np.asarray(dy, np.float64)[:, :, None, :, None]
    ).reshape(n, h // 2 * 2, w // 2 * 2, c)
    np.testing.assert_array_equal(dx, dx_ref)


@pytest.mark.parametrize("shape", [(4, 8, 8, 3), (2, 9, 7, 5)])
def test_max_pool_equals_flax_with_ties(shape):
    # Integer values in {0, 1, 2}: most windows have ties. Flax's backward
    # (select-and-scatter) and ours both give each window's gradient to its first
    # maximum in row-major order.
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, shape), jnp.float32)

    def flax_pool(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2))

    dy = jnp.asarray(np.random.default_rng(1).normal(size=flax_pool(x).shape))
    y, dx = jax.jit(lambda x, dy: _value_and_vjp(max_pool_2x2, x, dy))(x, dy)
    y_flax, dx_flax = jax.jit(lambda x, dy: _value_and_vjp(flax_pool, x, dy))(x, dy)
    np.testing.assert_array_equal(y, y_flax)
    np.testing.assert_array_equal(dx, dx_flax)
    # A window of equal values: all of the gradient to its first element.
    dx = jax.jit(jax.grad(lambda x: max_pool_2x2(x).sum()))(jnp.zeros((1, 2, 2, 1)))
    np.testing.assert_array_equal(dx.ravel(), [1.0, 0.0, 0.0, 0.0])


def test_max_pool_nan_window_propagates_and_passes_no_gradient():
    x = np.arange(2 * 5 * 4 * 2, dtype=np.float32).reshape(2, 5, 4, 2)
    x[0, 1, 0, 1] = np.nan  # window (0, 0) of channel 1, sample 0
    dy = np.ones((2, 2, 2, 2), np.float32)
    y, dx = jax.jit(lambda x, dy: _value_and_vjp(max_pool_2x2, x, dy))(x, dy)
    y, dx = np.asarray(y), np.asarray(dx)
    assert np.isnan(y[0, 0, 0, 1]) and np.isfinite(np.delete(y.ravel(), 1)).all()
    np.testing.assert_array_equal(dx[0, :2, :2, 1], 0.0)  # the NaN window
    # every other window: all of its gradient to its maximum (the last corner
    # here, values increasing); the odd last row none
    assert dx.sum() == dy.sum() - 1 and (dx[:, 4] == 0).all()
    np.testing.assert_array_equal(dx[1, 1::2, 1::2], 1.0)


@pytest.mark.slow  # a benchmark run
def test_benchmark_runs(capsys):
    from benchmarks import conv as bench

    args = ["--batch", "2", "--cases", "ResNet down2", "--repeats", "1", "--steps", "0"]
    rows = bench.main(args)
    assert len(rows) == 2 + 2 * len(bench.POOL_SHAPES)  # (fwd, fwd+bwd) per case
    for row in rows:
        assert row["flax_ms"] > 0 and row["normjax_ms"] > 0
        assert row["max_abs_diff"] < 1e-3
    assert "ResNet down2" in capsys.readouterr().out


def test_backend_layers_choose_fast_layers_on_cpu_and_flax_ones_on_request():
    assert layers.backend_layers() == (layers.Conv, layers.max_pool_2x2)
    assert layers.backend_layers(layers="fast") == (layers.Conv, layers.max_pool_2x2)
    conv, pool = layers.backend_layers(layers="flax")
    assert conv is nn.Conv
    x = jax.random.normal(jax.random.key(0), (2, 7, 9, 3))
    np.testing.assert_array_equal(pool(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
    np.testing.assert_array_equal(pool(x), layers.max_pool_2x2(x))
    # given layers are kept, whatever the backend
    assert layers.backend_layers(nn.Conv, layers="fast")[0] is nn.Conv
    with pytest.raises(ValueError, match="auto, fast, flax"):
        layers.backend_layers(layers="gpu")


def test_weight_normed_conv_uses_the_kernel_normalized_per_output_channel():
    conv = layers.weight_normed(Conv)(5, (3, 3), use_bias=False)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    params = conv.init(jax.random.key(1), x)["params"]["weight_norm"]
    v = np.asarray(params["layer_instance"]["kernel"], np.float64)
    scale = np.linspace(0.5, 2.0, 5)
    params["layer_instance/kernel/scale"] = jnp.asarray(scale, jnp.float32)
    y = conv.apply({"params": {"weight_norm": params}}, x)
    kernel = v / np.sqrt((v**2).sum((0, 1, 2))) * scale
    plain = Conv(5, (3, 3), use_bias=False).apply(
        {"params": {"kernel": jnp.asarray(kernel, jnp.float32)}}, x
    )
    np.testing.assert_allclose(y, plain, rtol=1e-5, atol=1e-5)
