"""normjax.models.resnet: the CIFAR ResNets with every registered norm.

Structure is checked with ``jax.eval_shape`` (tracing only), so that the loop
over all norms costs no compilation; a few tests run numbers.
"""

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
    BasicBlock,
    FastCNN,
    ResNet,
)


@pytest.mark.parametrize("name", normjax.names())
def test_resnet8_variables_per_norm(name):
    model = with_reference(ResNet(depth=8, width=8, norm=name), name)
    variables = init_shapes(model)
    params = shapes(variables["params"])
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
    check_model_norms(variables, norm_paths, name)

    logits, updates = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        variables,
        IMAGES,
    )
    assert logits.shape == (2, 10)
    assert shapes(updates) == shapes(
        {k: v for k, v in variables.items() if k == "batch_stats"}
    )
    eval_logits = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False), variables, IMAGES
    )
    assert eval_logits.shape == (2, 10)


def test_resnet20_has_0_27m_parameters():
    variables = init_shapes(ResNet(depth=20), jnp.zeros((1, 32, 32, 3)))
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
        init_shapes(ResNet(depth=21))


def test_unknown_norm_gives_the_registry_error():
    for model in (ResNet(depth=8, norm="batchnorm"), FastCNN(norm="batchnorm")):
        with pytest.raises(ValueError, match="unknown norm 'batchnorm'.*batch, "):
            init_shapes(model)


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
            with normjax.nn.reference_batch(1):  # read by 'reference' only
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
    init_shapes(ResNet(depth=8, norm="none", zero_init_residual=True))
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


@pytest.mark.slow  # a whole model, run eagerly
def test_padding_images_get_no_weight_in_batch_statistics():
    check_padding_gets_no_weight(ResNet(depth=8, width=8, norm="batch"))
