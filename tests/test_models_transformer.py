"""normjax.models.Transformer: causal for every norm, padding kept out, trains."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normjax
from normjax.models import Transformer

VOCAB, LENGTH = 11, 12


def small(norm="layer", **kwargs):
    return Transformer(
        vocab_size=VOCAB,
        num_layers=2,
        num_heads=2,
        d_model=16,
        max_len=LENGTH,
        norm=norm,
        **kwargs,
    )


def tokens(seed=0, shape=(4, LENGTH)):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


def trained_variables(model, x):
    """After one train-mode step, so running statistics are not the initial ones."""
    variables = model.init(jax.random.key(1), x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return {**variables, **updates}


def train_logits(model, variables, x, mask=None):
    logits, _ = model.apply(
        variables, x, train=True, mask=mask, mutable=["batch_stats"]
    )
    return np.asarray(logits)


@pytest.mark.slow  # a whole model per norm; test_registry checks each norm alone
@pytest.mark.parametrize("name", normjax.names())
def test_logits_up_to_t_never_see_later_tokens_in_training(name):
    if "cumulative" not in normjax.registry.causal_modes(name):
        with pytest.raises(ValueError, match="does not support causal"):
            small(name).init(jax.random.key(0), tokens())
        return
    model = small(name)
    x = tokens()
    variables = trained_variables(model, x)
    before = train_logits(model, variables, x)
    assert before.shape == (4, LENGTH, VOCAB) and np.all(np.isfinite(before))
    for t in (0, 4, LENGTH - 2):
        changed = x.at[:, t + 1 :].set(tokens(7, x.shape)[:, t + 1 :])
        assert not np.array_equal(changed, x)
        after = train_logits(model, variables, changed)
        np.testing.assert_allclose(
            before[:, : t + 1], after[:, : t + 1], rtol=2e-5, atol=2e-5
        )


@pytest.mark.parametrize("name", ["batch", "bln", "power", "prior", "layer"])
def test_logits_up_to_t_never_see_later_tokens_in_evaluation(name):
    if "cumulative" not in normjax.registry.causal_modes(name):
        with pytest.raises(ValueError, match="does not support causal"):
            small(name).init(jax.random.key(0), tokens())
        return
    model = small(name)
    x = tokens()
    variables = trained_variables(model, x)
    before = np.asarray(model.apply(variables, x))
    changed = x.at[:, 5:].set(tokens(7, x.shape)[:, 5:])
    after = np.asarray(model.apply(variables, changed))
    np.testing.assert_allclose(before[:, :5], after[:, :5], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", ["per_position", "running"])
def test_other_causal_modes_of_batch_norm_are_causal(causal):
    model = small("batch", causal=causal)
    x = tokens()
    variables = trained_variables(model, x)
    before = train_logits(model, variables, x)
    changed = x.at[:, 5:].set(tokens(7, x.shape)[:, 5:])
    after = train_logits(model, variables, changed)
    np.testing.assert_allclose(before[:, :5], after[:, :5], rtol=2e-5, atol=2e-5)


def test_batch_norm_over_batch_and_time_leaks_when_causal_mode_is_off():
    model = small("batch", causal=False)
    x = tokens()
    variables = trained_variables(model, x)
    before = train_logits(model, variables, x)
    changed = x.at[:, 5:].set(tokens(7, x.shape)[:, 5:])
    after = train_logits(model, variables, changed)
    assert np.max(np.abs(before[:, :5] - after[:, :5])) > 1e-3


@pytest.mark.slow  # a whole model per norm; test_registry checks each norm alone
@pytest.mark.parametrize("name", normjax.names())
def test_pad_tokens_stay_out_of_attention_and_statistics(name):
    if "cumulative" not in normjax.registry.causal_modes(name):
        with pytest.raises(ValueError, match="does not support causal"):
            small(name).init(jax.random.key(0), tokens())
        return
    model = small(name)
    x = tokens()
    lengths = jnp.array([LENGTH, 7, 3, 10])
    valid = jnp.arange(LENGTH)[None, :] < lengths[:, None]
    variables = trained_variables(model, x)
    before = train_logits(model, variables, x, mask=valid)
    garbage = jnp.where(valid, x, tokens(9, x.shape))
    after = train_logits(model, variables, garbage, mask=valid)
    v = np.asarray(valid)
    assert np.all(np.isfinite(after))
    np.testing.assert_allclose(before[v], after[v], rtol=2e-5, atol=2e-5)
    # and a padded row gives what the unpadded sequence gives in evaluation
    alone = np.asarray(model.apply(variables, x[1:2, :7]))
    padded = np.asarray(model.apply(variables, garbage, mask=valid))[1:2, :7]
    np.testing.assert_allclose(alone, padded, rtol=2e-5, atol=2e-5)


def test_a_row_that_is_all_padding_stays_finite():
    model = small("batch")
    x = tokens()
    valid = jnp.ones(x.shape, bool).at[2].set(False)
    variables = trained_variables(model, x)
    logits = train_logits(model, variables, x, mask=valid)
    assert np.all(np.isfinite(logits))


def test_batch_norm_updates_running_statistics_in_training():
    model = small("batch")
    x = tokens()
    variables = model.init(jax.random.key(1), x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    changed = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)),
        variables["batch_stats"],
        updates["batch_stats"],
    )
    assert all(jax.tree.leaves(changed))
    names = set(variables["batch_stats"])
    assert names == {"block0", "block1", "norm_f"}


@pytest.mark.parametrize("name", ["layer", "batch"])
def test_loss_falls_on_a_fixed_batch(name):
    model = small(name)
    x = tokens(3, (8, LENGTH + 1))
    inputs, targets = x[:, :-1], x[:, 1:]
    variables = model.init(jax.random.key(0), inputs)
    tx = optax.adam(3e-3)
    params, stats = variables["params"], variables.get("batch_stats", {})
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": stats},
                inputs,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            return loss.mean(), updates.get("batch_stats", {})

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    losses = []
    for _ in range(60):
        params, stats, opt_state, loss = step(params, stats, opt_state)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(np.log(VOCAB), rel=0.1)
    assert losses[-1] < 0.5 * losses[0]


def test_dropout_is_used_in_training_only():
    model = small("layer", dropout_rate=0.5)
    x = tokens()
    variables = model.init(jax.random.key(0), x)
    a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


def test_untied_head_has_its_own_parameters():
    model = small("rms", tie_embeddings=False)
    variables = model.init(jax.random.key(0), tokens())
    assert variables["params"]["lm_head"]["kernel"].shape == (16, VOCAB)
    assert "lm_head" not in small("rms").init(jax.random.key(0), tokens())["params"]


def test_shorter_sequences_are_fine_longer_ones_are_an_error():
    model = small()
    variables = model.init(jax.random.key(0), tokens())
    assert model.apply(variables, tokens(shape=(2, 5))).shape == (2, 5, VOCAB)
    with pytest.raises(ValueError, match="exceeds max_len=12"):
        model.apply(variables, tokens(shape=(2, LENGTH + 1)))


def test_heads_must_divide_the_width():
    model = Transformer(VOCAB, 1, num_heads=3, d_model=16, max_len=LENGTH)
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        model.init(jax.random.key(0), tokens())


def test_mask_shape_is_checked():
    model = small()
    variables = model.init(jax.random.key(0), tokens())
    with pytest.raises(ValueError, match="mask shape"):
        model.apply(variables, tokens(), mask=jnp.ones((4, 3), bool))
