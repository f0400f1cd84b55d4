"""What every model shares: norms built by registry name as named submodules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from normjax import registry
from normjax.functional.causal import Causal


def norm_layer(
    norm: str,
    norm_kwargs: Mapping[str, Any] | None,
    *,
    name: str,
    zero_scale: bool = False,
    causal: Causal = False,
    max_len: int | None = None,
) -> nn.Module:
    """``make_norm(norm, causal=causal, **norm_kwargs)`` as a submodule called
    ``name``; ``zero_scale`` starts its scale at 0 when the norm has one (when its
    registered module declares ``scale_init``); ``max_len`` sizes per-position
    running statistics, for the norms that keep them (a ``max_len`` field)."""
    kwargs = dict(norm_kwargs or {})
    fields = getattr(registry.entry(norm).module, "__dataclass_fields__", {})
    if zero_scale and "scale_init" in fields:
        kwargs["scale_init"] = nn.initializers.zeros
    if max_len is not None and causal and "max_len" in fields:
        kwargs.setdefault("max_len", max_len)
    return registry.make_norm(norm, causal=causal, name=name, **kwargs)


def image_mask(mask: jax.Array | None, images_NxHxWxC: jax.Array) -> jax.Array | None:
    """A per-image mask (N,) as (N, 1, 1, 1) for the norms; None stays None."""
    if mask is None:
        return None
    if mask.shape != images_NxHxWxC.shape[:1]:
        raise ValueError(
            f"mask must have shape (batch,) = {images_NxHxWxC.shape[:1]}, got "
            f"{mask.shape}."
        )
    return mask.astype(bool)[:, None, None, None]
