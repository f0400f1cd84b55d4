"""normjax.registry: one name per norm, one call signature for all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
from normjax import nn


def test_names():
    required = {"batch", "batch_renorm", "ghost_batch", "frozen_batch", "bln"}
    required |= {"prior", "layer", "rms", "group", "instance", "evonorm_s0", "none"}
    assert required <= set(normjax.names())
    assert len(set(normjax.names())) == len(normjax.names())


@pytest.mark.parametrize("name", normjax.names())
@pytest.mark.parametrize("shape", [(4, 6, 6, 16), (3, 7, 32)])
def test_every_norm_has_the_common_call(name, shape):
    norm = normjax.make_norm(name)
    x = jax.random.normal(jax.random.key(0), shape) * 2 + 3
    mask = jnp.ones(shape[:-1] + (1,), bool).at[0].set(False)
    variables = norm.init(jax.random.key(1), x, use_running_average=False)
    y, state = norm.apply(
        variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
    )
    assert y.shape == x.shape and y.dtype == x.dtype and np.all(np.isfinite(y))
    y_eval = norm.apply(variables, x, use_running_average=True, mask=mask)
    assert y_eval.shape == x.shape
    has_running = bool(state.get("batch_stats"))
    kind = normjax.registry.entry(name).statistics
    assert has_running == (kind not in ("per sample", "none"))
    if name != "none":
        assert {"scale", "bias"} & set(variables["params"])


def test_overrides_reach_the_module():
    norm = normjax.make_norm("group", num_groups=4, epsilon=1e-3)
    assert isinstance(norm, nn.GroupNorm)
    assert (norm.num_groups, norm.epsilon) == (4, 1e-3)
    assert normjax.make_norm("batch", momentum=0.9).momentum == 0.9


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown norm .btach.; valid names are: batch, batch_renorm"):
        normjax.make_norm("btach")


def test_unknown_override_lists_accepted_options():
    with pytest.raises(TypeError, match="LayerNorm accepts: .*epsilon"):
        normjax.make_norm("layer", momentum=0.9)
