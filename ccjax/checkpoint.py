"""Atomic checkpoints of a whole :class:`ccjax.TrainState`, with orbax.

A checkpoint holds two items: ``state`` (both parameter sets, both optimizer states,
the baseline state, the step and the run key; the data position is a pure function of
seed and step) and ``meta`` (JSON: the architecture and data shape it was written for).
orbax writes each step into a temporary directory and renames it only once complete,
so a process killed during a save leaves either the previous checkpoints or a
temporary directory that is ignored (and removed at the next start), never a checkpoint
that restores wrongly. Saves are synchronous: when :meth:`Checkpointer.save` returns,
the checkpoint is on disk.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint in the workdir cannot be used (corrupt, or another architecture)."""


class Checkpointer:
  """Thin wrapper over ``orbax.checkpoint.CheckpointManager``.

  Args:
    directory: where step directories live (created on the first save).
    max_to_keep: how many recent checkpoints to keep.
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or ``None``."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Writes ``state`` and ``meta`` for ``step`` atomically and waits for it."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of ``step`` (default: latest)."""
    step = self.latest_step() if step is None else step
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(restored["meta"])
    except Exception as error:  # orbax raises many types for damaged files.
      raise CheckpointError(self._unreadable(step, error)) from error

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Restores the state of ``step`` (default: latest) into the structure of ``target``.

    Args:
      target: a state (or ``jax.ShapeDtypeStruct`` tree, possibly with shardings) whose
        structure, shapes and dtypes the checkpoint must match.
      step: which checkpoint.

    Returns:
      the restored state, placed like ``target``.
    """
    step = self.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as error:  # orbax raises many types for damaged files.
      raise CheckpointError(self._unreadable(step, error)) from error
    return restored["state"]

  def restore_raw(self, step: int | None = None) -> dict[str, Any]:
    """The state of ``step`` (default: latest) as nested dicts of numpy arrays, no target needed.

    Works for checkpoints written with any device count (e.g. 8 devices, read on 1).
    """
    step = self.latest_step() if step is None else step
    try:
      saved = self._manager.item_metadata(step)["state"]
      # Onto this process's first device, whatever device count wrote it.
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree_util.tree_map(
          lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), saved)
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as error:  # orbax raises many types for damaged files.
      raise CheckpointError(self._unreadable(step, error)) from error
    return jax.device_get(restored["state"])

  def _unreadable(self, step, error) -> str:
    reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return (f"checkpoint step {step} in {self.directory} cannot be restored ({reason}); "
            "delete that step directory to fall back to an older one, or use a fresh --workdir")

  def close(self) -> None:
    self._manager.close()
