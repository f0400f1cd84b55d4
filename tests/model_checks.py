"""What the model tests share: shape-only initialization (no compilation) and
checks that a model's norms are the registry's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax

# XLA's RngBitGenerator: initializers compile in ~0.2 s here instead of ~1 s
# with threefry (the tests' time is mostly compilation).
KEY = jax.random.key(0, impl="rbg")
IMAGES = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def init_shapes(model, x=IMAGES):
    return jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)


def norm_shapes(name, channels, x_shape):
    """Variables of the norm alone, as the registry builds it."""
    norm = normjax.make_norm(name)
    x = jnp.zeros((*x_shape[:-1], channels))
    with normjax.nn.reference_batch(1):  # read by 'reference' only
        return jax.eval_shape(lambda x: norm.init(KEY, x, use_running_average=False), x)


def with_reference(model, name):
    """``model`` wrapped in ``nn.WithReference`` (R: the first init image) when
    the norm ``name`` reads a reference batch."""
    if normjax.registry.needs_reference(name):
        return normjax.nn.WithReference(model, reference_size=1)
    return model


def subtree(variables, path):
    """{collection: variables at path} for the collections that hold path."""
    out = {}
    for collection, tree in variables.items():
        for key in path:
            tree = tree.get(key, {}) if hasattr(tree, "get") else {}
        if tree:
            out[collection] = tree
    return out


def check_model_norms(variables, norm_paths, name):
    """Every norm's variables equal those of the registry's norm alone, and the
    model keeps batch_stats exactly when that norm does."""
    norm_alone_has_stats = False
    for path, channels, x_shape in norm_paths:
        alone = norm_shapes(name, channels, x_shape)
        assert shapes(subtree(variables, path)) == shapes(alone), path
        norm_alone_has_stats |= "batch_stats" in alone
    assert ("batch_stats" in variables) == norm_alone_has_stats


def check_padding_gets_no_weight(model):
    """A CIFAR model's masked images change no valid image's training logits, and
    the valid images alone give the same logits."""
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
