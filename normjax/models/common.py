"""What every model shares: norms built by registry name as named submodules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from normjax import registry


def norm_layer(
    norm: str,
    norm_kwargs: Mapping[str, Any] | None,
    *,
    name: str,
    zero_scale: bool = False,
    causal: bool | str = False,
) -> nn.Module:
    """``make_norm(norm, causal=causal, **norm_kwargs)`` as a submodule called
    ``name``; ``zero_scale`` starts its scale at 0 when the norm has one (when its
    registered module declares ``scale_init``)."""
    kwargs = dict(norm_kwargs or {})
    fields = getattr(registry.entry(norm).module, "__dataclass_fields__", {})
    if zero_scale and "scale_init" in fields:
        kwargs["scale_init"] = nn.initializers.zeros
    # Built unbound (make_norm's own first argument is ``name``), then named.
    return registry.make_norm(norm, causal=causal, parent=None, **kwargs).copy(
        name=name
    )
