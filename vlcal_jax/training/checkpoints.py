"""Orbax checkpoints: the RL train state every `checkpoint.every` steps, the warm-started weights
once, each with JSON extras (data-reader position, rng, the params' shapes).

Saves are asynchronous (orbax copies the arrays off the device, then writes in a background
thread while the loop goes on); `wait` blocks before exit, and orbax itself waits for the
previous save before it starts the next. A checkpoint that fails to restore (a partial write,
corruption) is logged and the next older one is tried, so a bad checkpoint never ends a run;
a checkpoint of a different model (other parameter shapes) is refused with an error that
names the first mismatch, because resuming it would silently train something else.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import orbax.checkpoint as ocp

from vlcal_jax import parallel

log = logging.getLogger("vlcal_jax.train")


def param_signature(params) -> dict[str, list]:
    """{param path: [shape..., dtype]} of a params pytree (or of its abstract shapes)."""
    return {parallel.path_str(path): [*map(int, leaf.shape), str(np.dtype(leaf.dtype))]
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


class IncompatibleCheckpoint(ValueError):
    """The checkpoint directory holds a run of another model."""


def check_signature(saved: dict | None, params, directory: str) -> None:
    if saved is None:
        return
    current = param_signature(params)
    if saved == current:
        return
    missing = sorted(set(current) ^ set(saved))
    detail = (f"parameter {missing[0]} is in only one of them" if missing else
              next(f"{k}: checkpoint {saved[k]} vs config {current[k]}" for k in sorted(current)
                   if saved[k] != current[k]))
    raise IncompatibleCheckpoint(
        f"{directory} holds checkpoints of a different model ({detail}). Resume it with the config it "
        f"was written with, or start this config in a new --config.workdir (or delete {directory}).")


class Checkpointer:
    """RL train-state checkpoints under `directory` (a local path or a gs:// URL, given to orbax as is)."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = directory
        self.manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                            enable_async_checkpointing=True))

    def save(self, step: int, state, extra: dict) -> None:
        """Starts an asynchronous save of `state` (returns once the arrays are off the device)."""
        extra = {**extra, "params": param_signature(state.params)}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         extra=ocp.args.JsonSave(extra)))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, state):
        """-> (state, step, extra) from the newest readable checkpoint, or (state, 0, None)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                extra = self.manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one
                log.warning("checkpoint %d could not be read (%s: %s); trying an older one", step, type(e).__name__, e)
                continue
            check_signature((extra or {}).get("params"), state.params, self.directory)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract)))
            except Exception as e:  # noqa: BLE001
                log.warning("checkpoint %d could not be restored (%s: %s); trying an older one",
                            step, type(e).__name__, e)
                continue
            return type(state)(*restored.state), step, extra
        return state, 0, None


class ParamsStore:
    """One finished stage's weights (the warm start, which is also the reference model) at
    `directory`: saved once, restored on every resume instead of being recomputed."""

    def __init__(self, directory: str):
        self.directory = directory
        self.manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=1,
                                                                                            create=True))

    def save(self, params) -> None:
        self.manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                      extra=ocp.args.JsonSave({"params": param_signature(params)})))
        self.manager.wait_until_finished()

    def restore(self, params):
        """The saved weights (placed like `params`), or None when there are none readable."""
        if 0 not in self.manager.all_steps():
            return None
        try:
            extra = self.manager.restore(0, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra
        except Exception as e:  # noqa: BLE001
            log.warning("%s could not be read (%s: %s); redoing the stage", self.directory, type(e).__name__, e)
            return None
        check_signature((extra or {}).get("params"), params, self.directory)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
        try:
            return self.manager.restore(0, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))).params
        except Exception as e:  # noqa: BLE001
            log.warning("%s could not be restored (%s: %s); redoing the stage", self.directory, type(e).__name__, e)
            return None

    def close(self) -> None:
        self.manager.close()
