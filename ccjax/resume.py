"""Where a run starts: its workdir, its checkpoints' metadata and the one resume rule.

Every task's checkpoint carries the same metadata (:func:`checkpoint_meta`): the task,
the architecture, the flat config (:meth:`ccjax.run_config.RunConfig.as_dict`) and the
data fingerprint. A checkpoint is resumed only by a run of the same task, architecture,
data (unless ``allow_data_change``) and settings, except the config's
``RESUME_FREE_FIELDS`` (:func:`check_resume_compatible`). Metadata of language-model runs
written before this format (``kind: lm``, nested config) is read through
:func:`upgrade_meta`.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

from absl import logging

from ccjax import checkpoint as checkpoint_lib
from ccjax import run_config
from ccjax import step as step_lib

RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"


def check_workdir(workdir: str) -> None:
  """Raises ``ValueError`` if ``workdir`` exists but cannot be read and written."""
  path = os.path.abspath(workdir)
  probe = path
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe):
    raise ValueError(f"--workdir {workdir!r}: {probe} exists and is not a directory")
  if not os.access(probe, os.R_OK | os.W_OK | os.X_OK):
    raise ValueError(f"--workdir {workdir!r}: {probe} is not readable and writable by this user")


def check_checkpoint_dir(checkpoint_dir: str) -> None:
  """Raises ``ValueError`` if ``checkpoints`` exists in the workdir but is not a directory."""
  if os.path.lexists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
    raise ValueError(f"--workdir {os.path.dirname(checkpoint_dir)}: {checkpoint_dir} exists "
                     "and is not a directory; move it away or use a fresh --workdir")


class ResumePoint(NamedTuple):
  """Where a run starts: the checkpoint step (``None``: from scratch), its metadata, and the
  damaged newer steps to set aside."""
  step: int | None
  meta: dict[str, Any]
  damaged: list[tuple[int, str]]


def find_resume_point(checkpointer: checkpoint_lib.Checkpointer, meta: dict[str, Any],
                      config: run_config.RunConfig) -> ResumePoint:
  """The newest intact checkpoint, checked to belong to this run
  (:func:`check_resume_compatible`).

  Args:
    checkpointer: the run's checkpoints.
    meta: this run's :func:`checkpoint_meta`.
    config: this run's config.

  Raises:
    checkpoint_lib.CheckpointError: every checkpoint is damaged (names them).
    ValueError: the checkpoint belongs to another configuration or other data.
  """
  intact = checkpointer.latest_intact_step()
  if intact.step is None and intact.damaged:
    described = "; ".join(f"step {step}: {reason}" for step, reason in intact.damaged)
    raise checkpoint_lib.DamagedCheckpointError(
        f"no intact checkpoint in {checkpointer.directory} ({described}); move "
        f"{checkpointer.directory} away to start over, or use a fresh --workdir")
  if intact.step is None:
    return ResumePoint(None, {}, [])
  saved = read_meta(checkpointer, intact.step)
  check_resume_compatible(saved, meta, config)
  return ResumePoint(intact.step, saved, intact.damaged)


def restore_resume_point(checkpointer: checkpoint_lib.Checkpointer, resume: ResumePoint,
                         state: step_lib.TrainState, primary: bool
                         ) -> tuple[step_lib.TrainState, int]:
  """Sets damaged newer checkpoints aside and restores ``resume.step`` into ``state``.

  Returns:
    ``(state, start_step)``; ``state`` unchanged and ``0`` without a checkpoint.
  """
  if resume.damaged and primary:
    for step, reason in resume.damaged:
      logging.warning("checkpoint step %d in %s is damaged (%s); set aside in %s, resuming "
                      "from step %d", step, checkpointer.directory, reason,
                      checkpointer.directory + checkpoint_lib.DAMAGED_SUFFIX, resume.step)
    checkpointer.set_aside(step for step, _ in resume.damaged)
  if resume.step is None:
    return state, 0
  state = checkpointer.restore(state, resume.step)
  logging.info("Resumed from checkpoint step %d in %s", resume.step, checkpointer.directory)
  return state, resume.step


def checkpoint_meta(task: str, architecture: dict[str, Any], config: run_config.RunConfig,
                    data: dict[str, Any]) -> dict[str, Any]:
  """The metadata saved beside every checkpoint of a run.

  Args:
    task: the task's name (``config.TASK``).
    architecture: what the parameters' shapes depend on (the task's resume key).
    config: the run's config.
    data: the data's fingerprint (``sha256``, and more where the task has it).
  """
  return {"task": task, "architecture": architecture, "config": config.as_dict(),
          "data": data}


def upgrade_meta(meta: dict[str, Any]) -> dict[str, Any]:
  """``meta`` in the format of :func:`checkpoint_meta`.

  Classifier checkpoints written before the task field differ only by its absence;
  language-model checkpoints of the older format (``kind: lm``, a nested config, the
  corpus ``sha256`` at the top) are converted.
  """
  if "task" in meta:
    return meta
  architecture = meta.get("architecture")
  if meta.get("kind") != "lm" and not (isinstance(architecture, dict)
                                       and "d_model" in architecture):
    return dict(meta, task="classify")
  nested = dict(meta.get("config") or {})
  config = {key: value for key, value in nested.items() if key != "train"}
  config.update(nested.get("train") or {})
  if "tau" in config and not isinstance(config["tau"], list):
    config["tau"] = [config["tau"]]
  upgraded = {"task": "lm", "architecture": architecture, "config": config,
              "data": {"sha256": meta.get("sha256")}}
  if "skipped_nonfinite" in meta:
    upgraded["skipped_nonfinite"] = meta["skipped_nonfinite"]
  return upgraded


def read_meta(checkpointer: checkpoint_lib.Checkpointer, step: int) -> dict[str, Any]:
  """The metadata of checkpoint ``step`` in the current format (:func:`upgrade_meta`)."""
  return upgrade_meta(checkpointer.read_meta(step))


def check_resume_compatible(saved: dict[str, Any], meta: dict[str, Any],
                            config: run_config.RunConfig) -> None:
  """Raises ``ValueError`` (one line) when a workdir's checkpoint belongs to another run.

  Args:
    saved: the checkpoint's metadata (:func:`read_meta`).
    meta: this run's :func:`checkpoint_meta`.
    config: this run's config (``allow_data_change`` and ``RESUME_FREE_FIELDS``).
  """
  saved = upgrade_meta(saved)
  if saved["task"] != meta["task"]:
    raise ValueError(f"--workdir holds a checkpoint of task {saved['task']!r}, this run is "
                     f"task {meta['task']!r}; use a fresh --workdir")
  before, now = saved.get("architecture") or {}, meta["architecture"]
  if "input_shape" in now and before.get("input_shape") != now["input_shape"]:
    raise ValueError(
        f"input dimension {math.prod(now['input_shape'])} (shape {now['input_shape']}) is "
        f"inconsistent with the checkpoint in --workdir (input dimension "
        f"{math.prod(before.get('input_shape') or [0])}, shape {before.get('input_shape')}); "
        "use a fresh --workdir")
  for key in [*now, *(key for key in before if key not in now)]:
    if before.get(key) != now.get(key):
      raise ValueError(
          f"--workdir holds a checkpoint of a different architecture ({key}: checkpoint "
          f"{before.get(key)!r}, now {now.get(key)!r}); use a fresh --workdir")
  saved_data, data = saved.get("data"), meta["data"]
  if (saved_data is not None and not config.allow_data_change
      and saved_data.get("sha256") != data["sha256"]):
    shapes = ("" if saved_data.get("shapes") == data.get("shapes") else
              f"; shapes then {saved_data.get('shapes')}, now {data.get('shapes')}")
    raise ValueError(
        f"--dataset {config.dataset} holds different data than the checkpoint in --workdir "
        f"was trained on (sha256 {str(saved_data.get('sha256'))[:12]}, now "
        f"{data['sha256'][:12]}{shapes}); pass --allow_data_change to resume on it anyway, "
        "or use a fresh --workdir")
  before, now = saved.get("config") or {}, meta["config"]
  changed = [key for key in now if key in before and key not in config.RESUME_FREE_FIELDS
             and before[key] != now[key]]
  if changed:
    described = ", ".join(f"{key}={before[key]!r} -> {now[key]!r}" for key in changed)
    raise ValueError(
        f"the checkpoint was trained with other settings ({described}); only "
        f"{', '.join(sorted(config.RESUME_FREE_FIELDS))} may change on resume: use the "
        "original flags or a fresh --workdir")
