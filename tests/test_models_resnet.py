"""normjax.models.resnet: ResNet and FastCNN with every registered norm.

Structure is checked with ``jax.eval_shape`` (tracing only), so that the loop
over all norms costs no compilation; a few tests run numbers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
from normjax.models import (
    BasicBlock,
    FastCNN,
    ResNet,
    init_whitening,
    whitening_kernel,
)

# XLA's RngBitGenerator: initializers compile in ~0.2 s here instead of ~1 s
# with threefry (the tests' time is mostly compilation).
KEY = jax.random.key(0, impl="rbg")
IMAGES = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def _init_shapes(model, x=IMAGES):
    return jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)


def _norm_shapes(name, channels, x_shape):
    """Variables of the norm alone, as the registry builds it."""
    norm = normjax.make_norm(name)
    x = jnp.zeros((*x_shape[:-1], channels))
    return jax.eval_shape(lambda x: norm.init(KEY, x, use_running_average=False), x)


def _subtree(variables, path):
    """{collection: variables at path} for the collections that hold path."""
    out = {}
    for collection, tree in variables.items():
        for key in path:
            tree = tree.get(key, {}) if hasattr(tree, "get") else {}
        if tree:
            out[collection] = tree
    return out


def _check_model_norms(variables, norm_paths, name):
    """Every norm's variables equal those of the registry's norm alone, and the
    model keeps batch_stats exactly when that norm does."""
    norm_alone_has_stats = False
    for path, channels, x_shape in norm_paths:
        alone = _norm_shapes(name, channels, x_shape)
        assert _shapes(_subtree(variables, path)) == _shapes(alone), path
        norm_alone_has_stats |= "batch_stats" in alone
    assert ("batch_stats" in variables) == norm_alone_has_stats


@pytest.mark.parametrize("name", normjax.names())
def test_resnet8_variables_per_norm(name):
    model = ResNet(depth=8, width=8, norm=name)
    variables = _init_shapes(model)
    params = _shapes(variables["params"])
    blocks = ["stage1_block1", "stage2_block1", "stage3_block1"]
    assert set(params) >= {"stem_conv", "head", *blocks}
    assert params["stem_conv"] == {"kernel": (3, 3, 3, 8)}
    assert params["stage2_block1"]["conv1"] == {"kernel": (3, 3, 8, 16)}
    assert params["stage3_block1"]["conv2"] == {"kernel": (3, 3, 32, 32)}
    assert params["head"] == {"kernel": (32, 10), "bias": (10,)}
    norm_paths = [(("stem_norm",), 8, (2, 16, 16, 8))]
    for block, channels, size in zip(blocks, (8, 16, 32), (16, 8, 4), strict=True):
        for norm in ("norm1", "norm2"):
            norm_paths.append(((block, norm), channels, (2, size, size, channels)))
    _check_model_norms(variables, norm_paths, name)

    logits, updates = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        variables,
        IMAGES,
    )
    assert logits.shape == (2, 10)
    assert _shapes(updates) == _shapes(
        {k: v for k, v in variables.items() if k == "batch_stats"}
    )
    eval_logits = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False), variables, IMAGES
    )
    assert eval_logits.shape == (2, 10)


@pytest.mark.parametrize("name", normjax.names())
def test_fastcnn_variables_per_norm(name):
    model = FastCNN(widths=(8, 16, 16), num_classes=5, norm=name)
    variables = _init_shapes(model)
    assert _shapes(variables["constants"]) == {
        "whiten": {"kernel": (2, 2, 3, 24), "bias": (24,)}
    }
    params = _shapes(variables["params"])
    assert params["conv1"] == {"kernel": (3, 3, 24, 8)}
    assert params["conv3"] == {"kernel": (3, 3, 16, 16)}
    assert params["head"] == {"kernel": (16, 5)}
    # 16x16 input: whitening (VALID 2x2) 15, pools 7, 3, 1.
    norm_paths = [
        (("norm1",), 8, (2, 7, 7, 8)),
        (("norm2",), 16, (2, 3, 3, 16)),
        (("norm3",), 16, (2, 1, 1, 16)),
    ]
    _check_model_norms(variables, norm_paths, name)
    logits, _ = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        variables,
        IMAGES,
    )
    assert logits.shape == (2, 5)


def test_resnet20_has_0_27m_parameters():
    variables = _init_shapes(ResNet(depth=20), jnp.zeros((1, 32, 32, 3)))
    count = sum(np.prod(s.shape) for s in jax.tree.leaves(variables["params"]))
    n = 3  # blocks per stage
    convs = 9 * (3 * 16 + (2 * n) * 16 * 16)  # stem, stage 1
    convs += 9 * (16 * 32 + (2 * n - 1) * 32 * 32)  # stage 2 (option A shortcut)
    convs += 9 * (32 * 64 + (2 * n - 1) * 64 * 64)  # stage 3
    norms = 2 * (16 + 2 * n * (16 + 32 + 64))  # scale and bias
    head = 64 * 10 + 10
    assert count == convs + norms + head == 269_722  # He et al.: 0.27M


def test_depth_must_be_6n_plus_2():
    with pytest.raises(ValueError, match="6n\\+2"):
        _init_shapes(ResNet(depth=21))


def test_unknown_norm_gives_the_registry_error():
    for model in (ResNet(depth=8, norm="batchnorm"), FastCNN(norm="batchnorm")):
        with pytest.raises(ValueError, match="unknown norm 'batchnorm'.*batch, "):
            _init_shapes(model)


def test_train_and_eval_modes():
    model = ResNet(depth=8, width=8, norm="batch")
    images = jnp.asarray(
        np.random.default_rng(1).normal(2.0, 3.0, size=(4, 8, 8, 3)), jnp.float32
    )
    variables = jax.jit(lambda x: model.init(KEY, x, train=False))(images)
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
    logits, updates = train(variables, images)
    moved = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)),
        updates["batch_stats"],
        variables["batch_stats"],
    )
    assert all(jax.tree.leaves(moved)), "training updates every running statistic"
    # Evaluation uses the running statistics: each sample alone; training uses
    # the batch: one sample's logits move when another sample changes.
    other = images.at[1:].set(-images[1:])
    np.testing.assert_allclose(
        evaluate(variables, images)[0], evaluate(variables, other)[0], rtol=1e-6
    )
    assert not np.allclose(logits[0], train(variables, other)[0][0])
    assert not np.allclose(logits, evaluate(variables, images))


def _block_identity_error(name):
    """max |block(x) - shortcut(x)| at init, training mode, for x >= 0 (a ReLU
    output), for a stride-1 and a downsampling block."""
    x = jnp.asarray(
        np.abs(np.random.default_rng(2).normal(size=(4, 8, 8, 8))), jnp.float32
    )
    errors = []
    for features, strides in ((8, 1), (16, 2)):
        block = BasicBlock(features, strides, norm=name, zero_init_residual=True)

        @jax.jit
        def run(x, block=block):
            variables = block.init(KEY, x, train=True)
            y, _ = block.apply(variables, x, train=True, mutable=["batch_stats"])
            return y

        shortcut = np.zeros((4, 8 // strides, 8 // strides, features), np.float32)
        shortcut[..., :8] = np.asarray(x)[:, ::strides, ::strides]
        errors.append(float(np.abs(np.asarray(run(x)) - shortcut).max()))
    return max(errors)


SCALED_NORMS = [
    n
    for n in normjax.names()
    if "scale_init"
    in getattr(normjax.registry.entry(n).module, "__dataclass_fields__", {})
]


@pytest.mark.parametrize("name", SCALED_NORMS)
def test_zero_init_residual_blocks_start_as_identity(name):
    assert _block_identity_error(name) == 0.0


def test_zero_init_residual_without_a_scale():
    assert "none" not in SCALED_NORMS
    _init_shapes(ResNet(depth=8, norm="none", zero_init_residual=True))
    assert _block_identity_error("none") > 0.1  # nothing to zero: not identity


def test_zero_init_residual_whole_network():
    model = ResNet(depth=8, width=8, zero_init_residual=True)

    @jax.jit
    def intermediates(x):
        variables = model.init(KEY, x, train=True)
        _, state = model.apply(
            variables,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=True,
        )
        return state["intermediates"]

    found = intermediates(IMAGES)
    x = nn.relu(found["stem_norm"]["__call__"][0])
    for block, features, strides in (
        ("stage1_block1", 8, 1),
        ("stage2_block1", 16, 2),
        ("stage3_block1", 32, 2),
    ):
        shortcut = x[:, ::strides, ::strides]
        shortcut = jnp.pad(
            shortcut, ((0, 0), (0, 0), (0, 0), (0, features - x.shape[-1]))
        )
        y = found[block]["__call__"][0]
        np.testing.assert_array_equal(y, shortcut)
        x = y


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


@pytest.mark.parametrize(
    "model",
    [ResNet(depth=8, width=8, norm="batch"), FastCNN(widths=(8, 16, 16), norm="bln")],
    ids=["resnet8", "fast_cnn"],
)
def test_padding_images_get_no_weight_in_batch_statistics(model):
    x = jax.random.normal(jax.random.key(3), (6, 32, 32, 3))
    variables = model.init(KEY, x, train=False)
    mask = jnp.array([True, True, False, True, False, True])
    garbage = jnp.where(mask[:, None, None, None], x, 50.0)

    def train_logits(images):
        logits, _ = model.apply(
            variables, images, train=True, mask=mask, mutable=["batch_stats"]
        )
        return np.asarray(logits)

    np.testing.assert_allclose(
        train_logits(x)[mask], train_logits(garbage)[mask], rtol=1e-5, atol=1e-5
    )
    # the valid images alone give the same logits
    alone, _ = model.apply(variables, x[mask], train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(train_logits(x)[mask], alone, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="mask must have shape"):
        model.apply(variables, x, train=False, mask=mask[:3])
