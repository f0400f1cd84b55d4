"""normjax.models.fastcnn: FastCNN with every registered norm, its whitening
stem, and its fast CPU layers against Flax's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_checks import (
    IMAGES,
    KEY,
    check_model_norms,
    check_padding_gets_no_weight,
    init_shapes,
    shapes,
    with_reference,
)

import normjax
from normjax.models import (
    FastCNN,
    init_whitening,
    whitening_kernel,
)


@pytest.mark.parametrize("name", normjax.names())
def test_fastcnn_variables_per_norm(name):
    model = with_reference(FastCNN(widths=(8, 16, 16), num_classes=5, norm=name), name)
    variables = init_shapes(model)
    assert shapes(variables["constants"]) == {
        "whiten": {"kernel": (2, 2, 3, 24), "bias": (24,)}
    }
    params = shapes(variables["params"])
    assert params["conv1"] == {"kernel": (3, 3, 24, 8)}
    assert params["conv3"] == {"kernel": (3, 3, 16, 16)}
    assert params["head"] == {"kernel": (16, 5)}
    # 16x16 input: whitening (VALID 2x2) 15, pools 7, 3, 1.
    norm_paths = [
        (("norm1",), 8, (2, 7, 7, 8)),
        (("norm2",), 16, (2, 3, 3, 16)),
        (("norm3",), 16, (2, 1, 1, 16)),
    ]
    check_model_norms(variables, norm_paths, name)
    logits, _ = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        variables,
        IMAGES,
    )
    assert logits.shape == (2, 5)


def correlated_images(seed, n=64, size=12):
    """Images whose neighbouring pixels and channels are strongly correlated."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(n, size + 1, size + 1, 3))
    smooth = noise[:, 1:, 1:] + noise[:, :-1, 1:] + noise[:, 1:, :-1]
    mix = np.array([[1.0, 0.8, 0.6], [0.0, 0.5, 0.3], [0.0, 0.0, 0.2]])
    return jnp.asarray(smooth @ mix + 0.5, jnp.float32)


def numpy_patches(images, p):
    """All p x p patches (stride 1), flattened (row, column, channel)."""
    images = np.asarray(images, np.float64)
    n, h, w, c = images.shape
    taps = [
        images[:, i : h - p + 1 + i, j : w - p + 1 + j]
        for i in range(p)
        for j in range(p)
    ]
    return np.stack(taps, axis=3).reshape(-1, p * p * c)


def _whitened_covariance(images, kernel, bias):
    """Covariance (float64) of the first half of the whitened patches, and the
    whitened patches: patches @ kernel + bias, the stem's output per pixel."""
    patches = numpy_patches(images, kernel.shape[0])
    z = patches @ np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    z = z + np.asarray(bias, np.float64)
    half = z.shape[1] // 2
    np.testing.assert_allclose(z[:, half:], -z[:, :half], atol=1e-5)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    return np.cov(z[:, :half], rowvar=False, bias=True), z


def test_whitening_kernel_whitens_patches():
    images = correlated_images(0)
    patches = numpy_patches(images, 2)
    raw_cov = np.cov(patches, rowvar=False)
    assert np.abs(raw_cov - np.diag(np.diag(raw_cov))).max() > 0.5  # correlated
    kernel, bias = jax.jit(whitening_kernel, static_argnums=(1, 2))(images, 2, 1e-6)
    assert kernel.shape == (2, 2, 3, 24) and bias.shape == (24,)
    cov, _ = _whitened_covariance(images, kernel, bias)
    np.testing.assert_allclose(cov, np.eye(12), atol=2e-3)


def test_fastcnn_whitening_from_init_images_and_init_whitening():
    model = FastCNN(widths=(8, 8, 8), norm="layer")
    images = correlated_images(1)
    variables = jax.jit(lambda x: model.init(KEY, x, train=False))(images)
    whiten = variables["constants"]["whiten"]
    cov, z = _whitened_covariance(images, whiten["kernel"], whiten["bias"])
    np.testing.assert_allclose(cov, np.eye(12), atol=0.02)  # eps = 5e-4
    # The stem's output is the whitened patches (then GELU).
    stem = jax.jit(
        lambda v, x: model.apply(
            v,
            x,
            train=False,
            capture_intermediates=lambda mdl, _: mdl.name == "whiten",
            mutable=["intermediates"],
        )[1]["intermediates"]["whiten"]["__call__"][0]
    )(variables, images)
    np.testing.assert_allclose(stem.reshape(-1, 24), z, atol=1e-4)

    other = correlated_images(2) * 3.0
    refit = jax.jit(init_whitening)(variables, other)
    assert jax.tree.all(
        jax.tree.map(jnp.array_equal, refit["params"], variables["params"])
    )
    cov, _ = _whitened_covariance(other, **refit["constants"]["whiten"])
    np.testing.assert_allclose(cov, np.eye(12), atol=0.02)


def test_fastcnn_fast_layers_match_flax_layers():
    def flax_pool(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2))

    fast = FastCNN(widths=(8, 16, 16))
    reference = FastCNN(widths=(8, 16, 16), conv=nn.Conv, pool=flax_pool)
    images = correlated_images(3, n=8, size=16)
    variables = jax.jit(lambda x: fast.init(KEY, x, train=False))(images)

    def loss_and_grads(model):
        def loss(params):
            logits, _ = model.apply(
                {**variables, "params": params},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(logits * jnp.arange(10.0))

        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    (value, grads), (ref_value, ref_grads) = map(loss_and_grads, (fast, reference))
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, want in zip(
        jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.slow  # a whole model, run eagerly
def test_padding_images_get_no_weight_in_batch_statistics():
    check_padding_gets_no_weight(FastCNN(widths=(8, 16, 16), norm="bln"))
