"""Atomic checkpoints of a whole :class:`ccjax.TrainState`, with orbax.

A checkpoint holds two items: ``state`` (both parameter sets, both optimizer states,
the baseline state, the step and the run key; the data position is a pure function of
seed and step) and ``meta`` (JSON: the architecture and data shape it was written for).
orbax writes each step into a temporary directory and renames it only once complete,
so a process killed during a save leaves either the previous checkpoints or a
temporary directory that is ignored (and removed at the next start), never a checkpoint
that restores wrongly. Saves are synchronous: when :meth:`Checkpointer.save` returns,
the checkpoint is on disk.

Integrity: orbax checksums only its shard indices, not the array data, so after each
save the primary process writes ``<step>/ccjax_checksums.json``, the SHA-256 of every
file of the step. Every read (:meth:`Checkpointer.read_meta`, :meth:`~Checkpointer.restore`,
:meth:`~Checkpointer.restore_raw`) verifies them first; a step whose files differ, are
missing or lack the checksum file (a save killed before it was written) is damaged and
never restored. :meth:`Checkpointer.latest_intact_step` finds the newest intact step
and :meth:`Checkpointer.set_aside` moves damaged ones to ``checkpoints.damaged/``.

Readers (``Checkpointer(directory, read_only=True)``: :func:`ccjax.load_run`,
``--init_from``, ``--distill_from``, ``experiments.predict``, ``experiments.lm --sample``)
never write: no directory is created, no temporary directory of a save in progress is
removed, nothing is deleted or set aside, so a run still training in the same workdir is
never harmed; a step still being written (no checksum file yet) is never read
(:meth:`Checkpointer.latest_intact_step`). A failed save (full disk, the directory removed
under the run) raises one :class:`CheckpointError` line naming the step's path and the
cause, instead of orbax's thread traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging as py_logging
import os
import re
import shutil
import sys
import time
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from ccjax import atomic

CHECKSUM_FILE = "ccjax_checksums.json"
DAMAGED_SUFFIX = ".damaged"
_READ_CHUNK = 1 << 20
_ORBAX_DIR = os.path.dirname(os.path.abspath(ocp.__file__))


class CheckpointError(ValueError):
  """A checkpoint in the workdir cannot be used (corrupt, or another architecture)."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint's files do not match the checksums written when it was saved."""


class IntactStep(NamedTuple):
  """The newest intact checkpoint step (``None``: there is none) and the damaged newer ones.

  Attributes:
    step: the step to resume from.
    damaged: ``(step, reason)`` of each newer step that failed verification.
  """
  step: int | None
  damaged: list[tuple[int, str]]


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as stream:
    for chunk in iter(lambda: stream.read(_READ_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def file_checksums(step_dir: str) -> dict[str, str]:
  """``{relative path: sha256}`` of every file below ``step_dir`` but the checksum file."""
  checksums = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, step_dir)
      if relative != CHECKSUM_FILE:
        checksums[relative] = _sha256(path)
  return dict(sorted(checksums.items()))


def checksum_mismatch(step_dir: str) -> str | None:
  """Why ``step_dir`` fails verification against its checksum file, or ``None`` if intact."""
  try:
    with open(os.path.join(step_dir, CHECKSUM_FILE)) as stream:
      expected = json.load(stream)
  except FileNotFoundError:
    return f"no {CHECKSUM_FILE}: its save did not finish, or an older ccjax wrote it"
  except (OSError, ValueError) as error:
    return f"unreadable {CHECKSUM_FILE} ({type(error).__name__})"
  try:
    actual = file_checksums(step_dir)
  except OSError as error:
    return f"unreadable file ({error.strerror})"
  for path, digest in expected.items():
    if path not in actual:
      return f"file {path} is missing"
    if actual[path] != digest:
      return f"file {path} does not match its checksum"
  extra = sorted(set(actual) - set(expected))
  if extra:
    return f"unexpected file {extra[0]}"
  return None


@contextlib.contextmanager
def _orbax_logs_below(level: int):
  """Drops orbax's log records below ``level`` (and at it) while the block runs.

  orbax logs a failed save's thread traceback at ERROR before the save raises, and warns
  at every read-only open; the raised error (one line, :class:`CheckpointError`) says it all.
  """
  def keep(record) -> bool:
    return record.levelno > level or not record.pathname.startswith(_ORBAX_DIR)

  logger = py_logging.getLogger("absl")
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


def _failure_cause(error: BaseException) -> str:
  """The operating-system cause of a failed save, in words (``No space left on device``)."""
  for link in _error_chain(error):
    if isinstance(link, OSError) and link.strerror:
      return link.strerror + (f": {link.filename}" if link.filename else "")
    code = re.search(r"os_error_code='?(\d+)", str(link))
    if code:
      return os.strerror(int(code.group(1)))
  return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def _is_closed_loop_error(value) -> bool:
  return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def _silence_closed_loop_tracebacks() -> None:
  """Drops the tracebacks of orbax's write callbacks that finish on its already closed
  event loop after a failed save (``RuntimeError: Event loop is closed``, reported by
  tensorstore's threads through ``sys.unraisablehook``); every other error still prints."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_errors", False):
    return

  def hook(unraisable):
    if not _is_closed_loop_error(unraisable.exc_value):
      previous(unraisable)

  hook.drops_closed_loop_errors = True
  sys.unraisablehook = hook


def _error_chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


class Checkpointer:
  """Thin wrapper over ``orbax.checkpoint.CheckpointManager``.

  Args:
    directory: where step directories live (created on the first save).
    max_to_keep: how many recent checkpoints to keep.
    read_only: open for reading only (every reader of another run's checkpoints): no
      directory created, no temporary directory of a save in progress cleaned up, no
      save, delete or set-aside; a run writing into ``directory`` is left alone.
  """

  def __init__(self, directory: str, max_to_keep: int = 2, *, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    if read_only:
      options = ocp.CheckpointManagerOptions(
          read_only=True, max_to_keep=None, create=False, enable_async_checkpointing=False,
          cleanup_tmp_directories=False, save_interval_steps=0)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
          cleanup_tmp_directories=True)
    with _orbax_logs_below(py_logging.WARNING if read_only else py_logging.NOTSET):
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})

  def _check_writable(self, what: str) -> None:
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only: cannot {what}")

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or ``None``."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Writes ``state`` and ``meta`` for ``step`` atomically, waits for it, then (primary
    process) its checksum file.

    Raises:
      CheckpointError: the save failed (one line: the step's path and the cause, e.g.
        ``No space left on device``); the steps saved before are untouched.
    """
    self._check_writable(f"save step {step}")
    _silence_closed_loop_tracebacks()
    try:
      with _orbax_logs_below(py_logging.ERROR):
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()
      if jax.process_index() == 0:
        step_dir = self.step_dir(step)
        atomic.write_json(os.path.join(step_dir, CHECKSUM_FILE), file_checksums(step_dir))
    except Exception as error:  # orbax raises many types (ValueError, OSError, ...).
      raise CheckpointError(
          f"cannot save checkpoint step {step} to {self.step_dir(step)} "
          f"({_failure_cause(error)}); the steps saved before it are intact: fix the cause "
          "(free disk space, restore the directory), then rerun the same command to "
          "resume") from None

  def verify(self, step: int) -> None:
    """Raises :class:`DamagedCheckpointError` unless ``step``'s files match their checksums."""
    reason = checksum_mismatch(self.step_dir(step))
    if reason is not None:
      raise DamagedCheckpointError(f"checkpoint step {step} in {self.directory} is damaged "
                                   f"({reason})")

  def latest_intact_step(self) -> IntactStep:
    """The newest step that passes :meth:`verify`, and the newer damaged ones."""
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      reason = checksum_mismatch(self.step_dir(step))
      if reason is None:
        return IntactStep(step, damaged)
      damaged.append((step, reason))
    return IntactStep(None, damaged)

  def set_aside(self, steps) -> list[str]:
    """Moves the directories of ``steps`` to ``<directory>.damaged/``; returns the new paths.

    Damaged steps are kept for inspection, out of orbax's way, so that training can save
    those steps again.
    """
    self._check_writable("set damaged steps aside")
    moved = []
    for step in steps:
      target = os.path.join(self.directory + DAMAGED_SUFFIX, f"{step}-{int(time.time())}")
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(self.step_dir(step), target)
      moved.append(target)
    self._manager.reload()
    return moved

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of ``step`` (default: latest), verified against its checksums."""
    step = self.latest_step() if step is None else step
    self.verify(step)
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

    Raises:
      DamagedCheckpointError: the step fails its checksums.
      CheckpointError: orbax cannot restore it into ``target``.
    """
    step = self.latest_step() if step is None else step
    self.verify(step)
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
    self.verify(step)
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
            "move that step directory away to fall back to an older one, or use a fresh "
            "--workdir")

  def close(self) -> None:
    self._manager.close()
