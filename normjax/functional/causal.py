"""Causal modes for sequences x_BxLxD: statistics that never see later positions.

Statistics pooled over (batch, time) leak later tokens into earlier positions of
a causal language model. A norm takes one of these values as ``causal``:

  False            statistics pooled as usual (not causal);
  'cumulative'     position t uses (batch or sample, positions <= t); True means
                   'cumulative';
  'per_position'   position t uses the batch at position t only;
  'running'        the forward uses the running statistics of earlier steps; the
                   current batch only updates them.

Running statistics may be updated from the whole batch in every mode: they only
act on later steps. Each norm supports the modes that mean something for it and
refuses the others by name.
"""

from __future__ import annotations

from typing import Literal

CausalMode = Literal["cumulative", "per_position", "running"]
# What a norm's ``causal`` argument takes (True is accepted as 'cumulative').
Causal = Literal[False, True, "cumulative", "per_position", "running"]

CAUSAL_MODES: tuple[CausalMode, ...] = ("cumulative", "per_position", "running")


def parse_causal(
    causal: bool | str | None,
    *,
    supported: tuple[str, ...] = CAUSAL_MODES,
    name: str = "causal",
) -> CausalMode | None:
    """The canonical mode of ``causal`` — None (not causal) or one of
    ``CAUSAL_MODES`` — checked against the modes ``name`` supports."""
    if causal is None or causal is False:
        return None
    mode = "cumulative" if causal is True else causal
    if mode not in CAUSAL_MODES:
        raise ValueError(
            f"causal={causal!r} is not a causal mode; use False, True (= "
            f"'cumulative') or one of {CAUSAL_MODES}."
        )
    if mode not in supported:
        modes = ", ".join(["False", *map(repr, supported)])
        raise ValueError(
            f"{name} does not support causal={causal!r}; its causal modes are: {modes}."
        )
    return mode
