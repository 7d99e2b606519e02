"""A finished training run of any task on disk, loaded back: ``load_run(workdir) -> Run``."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import flax.linen as nn

from ccjax import checkpoint as checkpoint_lib
from ccjax import config as config_lib
from ccjax import lm_config
from ccjax import resume
from ccjax import run_config
from ccjax.inference import api

RESULTS_FILE = resume.RESULTS_FILE
CHECKPOINT_DIR = resume.CHECKPOINT_DIR
# Task name (checkpoint metadata's ``task``) -> its config type.
CONFIG_TYPES: dict[str, type[run_config.RunConfig]] = {
    config_type.TASK: config_type
    for config_type in (config_lib.ExperimentConfig, lm_config.LMConfig)}


class RunError(ValueError):
  """A workdir that does not hold a finished run."""


class Run(NamedTuple):
  """A finished run.

  Attributes:
    module: the trained Linen module (:class:`ccjax.GatedMLP`, :class:`ccjax.GatedCNN` or
      :class:`ccjax.GatedTransformer`).
    params: its parameters (host numpy arrays).
    config: the run's config (:class:`ccjax.ExperimentConfig`,
      :class:`ccjax.lm_train.LMConfig`).
    input_shape: the shape of one example, ``[...features]`` (an LM: ``[context]``).
    num_classes: output logits (an LM: 256 bytes).
    results: the run's ``results.json``.
    step: the checkpoint step the parameters come from (``results.json``'s ``steps``).
    task: the run's task (:data:`ccjax.tasks.TASKS`: ``classify`` | ``lm``).
  """
  module: nn.Module
  params: Any
  config: run_config.RunConfig
  input_shape: tuple[int, ...]
  num_classes: int
  results: dict[str, Any]
  step: int | None = None
  task: str = config_lib.ExperimentConfig.TASK


def load_run(workdir: str) -> Run:
  """Loads the module, parameters and config of a finished run.

  Reads only: the checkpoints are opened read-only (nothing is created, cleaned up or
  set aside), so a run training in ``workdir`` is never harmed, and a step still being
  written is never read. The parameters are those of the checkpoint at the step
  ``results.json`` reports (``steps``). Works whatever device count wrote the checkpoint
  (the state is read onto this process's first device, then to host memory).

  Args:
    workdir: the ``--workdir`` of a run of any task that finished (it wrote
      ``results.json``).

  Returns:
    a :class:`Run`.

  Raises:
    RunError: one line naming the directory: it is missing, holds no checkpoint, its
      run did not finish, its newest checkpoint is not the step
      its ``results.json`` describes (a longer run was started on it and not finished),
      or the checkpoint's metadata does not fit its parameters.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise RunError(f"--workdir {workdir} is not a directory")
  results_path = os.path.join(workdir, RESULTS_FILE)
  checkpoint_dir = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(checkpoint_dir):
    raise RunError(f"--workdir {workdir} holds no checkpoints/: not a ccjax run directory")
  if not os.path.isfile(results_path):
    raise RunError(f"--workdir {workdir} holds an unfinished run (no {RESULTS_FILE}); "
                   "finish it by rerunning its training command")
  try:
    with open(results_path) as stream:
      results = json.load(stream)
  except (OSError, json.JSONDecodeError) as error:
    raise RunError(f"--workdir {workdir}: {RESULTS_FILE} is unreadable ({error})") from None
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, read_only=True)
  try:
    step = _finished_step(checkpointer, results, workdir)
    meta = resume.read_meta(checkpointer, step)
    state = checkpointer.restore_raw(step)
  finally:
    checkpointer.close()
  config, input_shape, num_classes, module = _model_from_meta(meta, workdir, step)
  params = state["params"]
  try:
    api.check_params(module, params, argument=f"the parameters of checkpoint step {step}",
                     input_shape=input_shape)
  except ValueError as error:
    raise RunError(f"--workdir {workdir}: the checkpoint's metadata does not fit its "
                   f"parameters ({error})") from None
  return Run(module=module, params=params, config=config, input_shape=input_shape,
             num_classes=num_classes, results=results, step=step, task=meta["task"])


def _finished_step(checkpointer: checkpoint_lib.Checkpointer, results: dict[str, Any],
                   workdir: str) -> int:
  """The intact checkpoint step that ``results`` describes; ``RunError`` otherwise."""
  intact = checkpointer.latest_intact_step()
  if intact.step is None:
    raise RunError(f"--workdir {workdir} holds no complete checkpoint")
  steps = results.get("steps")
  if steps != intact.step and steps in checkpointer.all_steps() and (
      checkpoint_lib.checksum_mismatch(checkpointer.step_dir(steps)) is None):
    return steps
  if steps != intact.step:
    raise RunError(
        f"--workdir {workdir}: its {RESULTS_FILE} describes step {steps!r} but the newest "
        f"intact checkpoint is step {intact.step} (a run of other --steps was started there "
        "and not finished); finish it by rerunning its training command, or evaluate a "
        "copy of the finished run")
  return intact.step


def _model_from_meta(meta: dict[str, Any], workdir: str, step: int):
  """``(config, input_shape, num_classes, module)`` from a checkpoint's metadata."""
  try:
    config_type = CONFIG_TYPES.get(meta["task"])
    if config_type is None:
      raise ValueError(f"task {meta['task']!r}")
    config = config_type.from_dict(meta.get("config") or {})
    module, input_shape, num_classes = config.model_for(meta["architecture"])
    return config, input_shape, num_classes, module
  except (KeyError, TypeError, ValueError) as error:
    missing = f"no {error}" if isinstance(error, KeyError) else " ".join(str(error).split())
    raise RunError(f"--workdir {workdir}: the metadata of checkpoint step {step} does not "
                   f"describe a model this ccjax can build ({missing}); it was written by "
                   "another version or edited: retrain, or use another --workdir") from None
