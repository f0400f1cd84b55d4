"""Reference (virtual) batch norm in Linen: the norm, and the one generic
mechanism that feeds it a reference batch — :class:`WithReference`, a wrapper
around any model (FastCNN, ResNet, your own) that needs no edit to the model.

    model = normjax.nn.WithReference(FastCNN(norm="reference"), reference_size=32)
    variables = model.init(key, train_images[:256], train=False)  # R = first 32
    logits = model.apply(variables, images, train=False)          # (B, classes)

The wrapper keeps R (the first ``reference_size`` inputs ``init`` is called
with) in the ``reference`` collection, not in ``params``: it is state, never
trained. Every call runs ``concatenate([R, x])`` through the model inside
:func:`reference_batch`, which tells every ``ReferenceNorm`` how many leading
rows are R, and returns the outputs of ``x``'s rows only. The model's own
variable tree is unchanged (the wrapper shares the model's scope), so
checkpoints, ``normjax.calibrate`` and ``nn.mix_weights`` read it as before.
Cost: each step computes |R| more samples, forward and backward.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer

from normjax import functional as F
from normjax.functional.reference import CAUSAL_REFUSAL, check_reference_size
from normjax.nn.common import affine_params, feature_shape_of

Array = jax.Array

_REFERENCE_SIZE: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "normjax_reference_size", default=None
)


@contextlib.contextmanager
def reference_batch(reference_size: int) -> Iterator[None]:
    """Within this context every :class:`ReferenceNorm` without its own
    ``reference_size`` takes the first ``reference_size`` rows of its batch as
    the reference batch. It acts when a function is traced (jit inside it).
    :class:`WithReference` sets it; use it directly to call a model on a batch
    you have already prefixed with R."""
    check_reference_size(reference_size, reference_size, "reference_batch")
    token = _REFERENCE_SIZE.set(reference_size)
    try:
        yield
    finally:
        _REFERENCE_SIZE.reset(token)


def current_reference_size() -> int | None:
    """The size set by :func:`reference_batch`, or None outside it."""
    return _REFERENCE_SIZE.get()


class ReferenceNorm(nn.Module):
    """Reference batch norm — see ``functional.reference_norm``. The first
    ``reference_size`` rows of the batch (default: the size set by
    :func:`reference_batch`, as :class:`WithReference` does) are the reference
    batch R; each other row is normalized by the statistics of R and itself.

    Variables: ``params/{scale,bias}``; nothing running, no ``batch_stats``:
    training and evaluation are the same computation, and
    ``use_running_average`` is accepted and ignored. Causal modes are refused
    (``causal_refusal``).
    """

    reference_size: int | None = None
    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    reduction_axes: Axes | None = None
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones
    supported_causal: ClassVar[tuple[str, ...]] = ()
    causal_refusal: ClassVar[str] = CAUSAL_REFUSAL

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Array:
        del use_running_average  # the same computation in training and evaluation
        feature_shape = feature_shape_of(x, self.axis, "ReferenceNorm axis")
        size = self.reference_size
        if size is None:
            size = current_reference_size()
        return F.reference_norm(
            x,
            affine_params(self, feature_shape),
            reference_size=size,
            axis=self.axis,
            reduction_axes=self.reduction_axes,
            epsilon=self.epsilon,
            mask=mask,
            dtype=self.dtype,
        )


class WithReference(nn.Module):
    """``model`` with a fixed reference batch R run ahead of every input, for
    the norms that read one ('reference'); see the module docstring.

    ``init`` must be called with at least ``reference_size`` real training
    inputs: the first ``reference_size`` become R (``reference/inputs``;
    replace it in the variables to choose another). Positional and keyword
    arguments go to ``model``; a ``mask`` keyword with a leading batch axis is
    extended with R's rows (all valid). Every output leaf with a leading axis
    of R's and the input's rows together is cut to the input's rows.
    """

    model: nn.Module
    reference_size: int = 32

    def setup(self) -> None:
        nn.share_scope(self, self.model)

    @nn.compact
    def __call__(self, x: Array, *args: Any, **kwargs: Any) -> Any:
        r = self.reference_size
        check_reference_size(r, r, "WithReference")
        if self.is_initializing() and x.shape[0] < r:
            raise ValueError(
                f"WithReference: init got {x.shape[0]} inputs, fewer than "
                f"reference_size={r}; call init with at least {r} real training "
                "inputs (the first of them become the reference batch)."
            )
        reference = self.variable("reference", "inputs", lambda: x[:r])
        ref = reference.value
        return with_reference(self.model, ref, x, args, kwargs, "WithReference")


def with_reference(
    model: Any,
    reference: Array,
    x: Array,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    name: str,
) -> Any:
    """``model(concatenate([reference, x]), *args, **kwargs)`` inside
    :func:`reference_batch`, a ``mask`` keyword with a leading batch axis
    extended with the reference rows (all valid), and every output leaf with
    the reference's and ``x``'s rows cut to ``x``'s: what :class:`WithReference`
    (and its NNX twin) do on each call."""
    r = reference.shape[0]
    if reference.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"{name}: inputs of shape {x.shape[1:]} per sample do not "
            f"match the reference batch's {reference.shape[1:]}."
        )
    rows = x.shape[0]
    kwargs = dict(kwargs)
    mask = kwargs.get("mask")
    if mask is not None and jnp.ndim(mask) and jnp.shape(mask)[0] == rows:
        mask = jnp.asarray(mask)
        valid = jnp.ones((r, *mask.shape[1:]), mask.dtype)
        kwargs["mask"] = jnp.concatenate([valid, mask])
    with reference_batch(r):
        out = model(jnp.concatenate([reference.astype(x.dtype), x]), *args, **kwargs)

    def cut(leaf: Any) -> Any:
        if jnp.ndim(leaf) and jnp.shape(leaf)[0] == r + rows:
            return leaf[r:]
        return leaf

    return jax.tree.map(cut, out)
