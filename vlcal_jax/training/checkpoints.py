"""Orbax checkpoints of the train state plus JSON extras (data-reader position, rng).

A checkpoint that fails to restore (partial write, corruption) is logged and the next older
one is tried, so a bad checkpoint never ends a run.
"""

from __future__ import annotations

import logging

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("vlcal_jax.train")


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2):
        self.manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def save(self, step: int, state, extra: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         extra=ocp.args.JsonSave(extra)))
        self.manager.wait_until_finished()

    def restore_latest(self, state):
        """-> (state, step, extra) from the newest readable checkpoint, or (state, 0, None)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one
                log.warning("checkpoint %d could not be restored (%s: %s); trying an older one",
                            step, type(e).__name__, e)
                continue
            return type(state)(*restored.state), step, restored.extra
        return state, 0, None
