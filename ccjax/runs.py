"""A finished training run on disk, loaded back: ``load_run(workdir) -> Run``."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import flax.linen as nn

from ccjax import checkpoint as checkpoint_lib
from ccjax import config as config_lib

RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"


class RunError(ValueError):
  """A workdir that does not hold a finished run."""


class Run(NamedTuple):
  """A finished run.

  Attributes:
    module: the trained Linen module (:class:`ccjax.GatedMLP` or :class:`ccjax.GatedCNN`).
    params: its parameters (host numpy arrays).
    config: the run's :class:`ccjax.ExperimentConfig`.
    input_shape: the shape of one example, ``[...features]``.
    num_classes: output logits.
    results: the run's ``results.json``.
  """
  module: nn.Module
  params: Any
  config: config_lib.ExperimentConfig
  input_shape: tuple[int, ...]
  num_classes: int
  results: dict[str, Any]


def load_run(workdir: str) -> Run:
  """Loads the module, parameters and config of a finished run.

  Works whatever device count wrote the checkpoint (the state is read onto this
  process's first device, then to host memory).

  Args:
    workdir: the ``--workdir`` of a run that finished (it wrote ``results.json``).

  Returns:
    a :class:`Run`.

  Raises:
    RunError: the directory is missing, holds no checkpoint, or its run did not finish
      (one line naming the directory).
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
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise RunError(f"--workdir {workdir} holds no complete checkpoint")
    meta = checkpointer.read_meta(step)
    state = checkpointer.restore_raw(step)
  finally:
    checkpointer.close()
  architecture = meta.get("architecture", {})
  config = config_lib.ExperimentConfig.from_dict(meta.get("config", {}))
  input_shape = tuple(int(d) for d in architecture["input_shape"])
  num_classes = int(architecture["num_classes"])
  module = config_lib.build_model(config, input_shape, num_classes)
  return Run(module=module, params=state["params"], config=config, input_shape=input_shape,
             num_classes=num_classes, results=results)
