"""Whether a workdir's run may be resumed with a configuration.

A rerun in a workdir that already holds a run continues it. If the configuration
differs in anything that changes the model, the optimizer, the data or the seed,
continuing would silently mix two experiments: :func:`check_config` refuses it,
naming the differing keys, unless the configuration says ``resume='force'``.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import ml_collections

# Keys that cannot change what a run computes: how often it logs, evaluates and
# checkpoints, whether it shows a progress bar or writes TensorBoard events, and
# where it finds or caches its data (the dataset is named by the config, not by
# its location). Evaluation settings are compared: a finished run's summary was
# made with the old ones.
RESULT_NEUTRAL = frozenset(
    {
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "progress",
        "tensorboard",
        "data_dir",
        "cache_dir",
        "download",
        "resume",
    }
)
RESUME_MODES = ("auto", "force")
# Keys added to the configurations after runs were made without them: absent
# from a saved configuration, they had this value (the behaviour before).
ADDED_KEYS: dict[str, Any] = {"holdout": 0, "weight_norm": False}


class ConfigMismatchError(ValueError):
    """The workdir holds a run made with another configuration."""


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(
    saved: dict[str, Any], config: dict[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, new value)}`` for every key, nested ones dotted,
    that differs and is not in :data:`RESULT_NEUTRAL`."""
    old, new = _flat(saved), _flat(config)
    missing = object()
    out = {}
    for key in sorted(set(old) | set(new)):
        if key.split(".")[-1] in RESULT_NEUTRAL:
            continue
        before, after = old.get(key, missing), new.get(key, missing)
        leaf = key.split(".")[-1]
        if before is missing and leaf in ADDED_KEYS:
            before = ADDED_KEYS[leaf]
        if before != after:
            out[key] = (
                "(absent)" if before is missing else before,
                "(absent)" if after is missing else after,
            )
    return out


def check_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> bool:
    """Raises :class:`ConfigMismatchError` when ``workdir`` holds a run (a
    ``config.json`` beside checkpoints or a summary) whose configuration differs
    from ``config`` in a key that changes the result; returns whether such a
    difference was let through by ``config.resume == 'force'``."""
    mode = config.get("resume", "auto")
    if mode not in RESUME_MODES:
        raise ValueError(
            f"resume={mode!r}: use 'auto' (continue a run only with the same "
            "configuration) or 'force' (continue it whatever changed)."
        )
    workdir = pathlib.Path(workdir)
    path = workdir / "config.json"
    holds_run = (workdir / "summary.json").exists() or any(
        (workdir / "checkpoints").glob("[0-9]*")
    )
    if not (path.exists() and holds_run):
        return False
    new = json.loads(config.to_json_best_effort())
    changed = differences(json.loads(path.read_text()), new)
    if not changed:
        return False
    if mode == "force":
        return True
    lines = "\n".join(
        f"  {key}: {before!r} in the workdir, {after!r} now"
        for key, (before, after) in changed.items()
    )
    raise ConfigMismatchError(
        f"{workdir} holds a run made with another configuration:\n{lines}\n"
        "Continuing it would mix two experiments. Use a new --workdir for this "
        "configuration, or pass --config.resume=force to continue the run in "
        f"{workdir} with the new configuration anyway."
    )
