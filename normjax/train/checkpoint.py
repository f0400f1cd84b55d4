"""Orbax checkpoints: save every N steps, keep K, resume from the latest."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """A thin wrapper of ``orbax.checkpoint.CheckpointManager``.

    Orbax writes each checkpoint into a temporary directory and renames it when
    complete, so a run killed mid-save leaves the previous checkpoints intact and
    ``latest_step`` never points at a half-written one.
    """

    def __init__(
        self, workdir: str | os.PathLike, *, every: int, keep: int = 2
    ) -> None:
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.every = every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, tree: Any, *, force: bool = False) -> bool:
        """Saves ``tree`` at ``step`` if ``step`` is a multiple of ``every`` (or
        ``force``); the write finishes in the background."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        if self.manager.latest_step() == step:
            return False
        return self.manager.save(step, args=ocp.args.StandardSave(tree), force=True)

    def restore(self, tree: Any, step: int | None = None) -> Any:
        """The checkpoint at ``step`` (default the latest), shaped like ``tree``."""
        step = self.latest_step() if step is None else step
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        return self.manager.restore(step, args=ocp.args.StandardRestore(target))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
