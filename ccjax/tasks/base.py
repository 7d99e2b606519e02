"""The ``Task`` protocol: what one kind of run (classification, language modelling) gives
the one driver, :func:`ccjax.tasks.train_and_evaluate`.

A :class:`Task` turns a validated config into a :class:`TaskRun` (``setup``: loads the
data, builds the model, checks everything the data decide; nothing is written). The
driver owns the rest and does it the same way for every task: workdir checks and lock,
devices, the checkpoint metadata and the one resume rule (:mod:`ccjax.resume`), the train
state, the loop (:func:`ccjax.run_loop.run_train_steps`), finite checks, timings and
``results.json``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import numpy as np

from ccjax import metrics_log as metrics_log_lib
from ccjax import run_config
from ccjax import step as step_lib
from ccjax import validation


class TaskRun(Protocol):
  """One run of a task, set up from its config and data.

  Attributes:
    module: the Linen module trained.
    description: what runs on which data, for the first progress line.
    architecture: the resume key: what the parameters' shapes depend on.
    data_fingerprint: ``{"sha256": ..., ...}`` of the data (resume checks it).
    total_steps: training steps of the whole run.
  """
  module: Any
  description: str
  architecture: dict[str, Any]
  data_fingerprint: dict[str, Any]
  total_steps: int

  def init_state(self, key) -> step_lib.TrainState:
    """The train state before step 1 (on the host)."""

  def make_train_step(self) -> Callable:
    """The un-jitted ``(state, batch) -> (state, metrics)`` step."""

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The global batch of the 1-based ``step`` (a pure function of seed and step)."""

  def validate(self, eval_fn: Callable, params, step: int) -> tuple[dict[str, Any], str]:
    """``(eval record fields, progress text)`` on the validation split."""

  def describe(self, record: dict[str, Any]) -> str:
    """The metrics part of a train progress line (may add derived fields to ``record``)."""

  def finalize(self, eval_fn: Callable, params, *, workdir: str,
               metrics_log: metrics_log_lib.MetricsLog, total_steps: int,
               primary: bool) -> dict[str, Any]:
    """Final evaluation, costs and plots: the task's part of ``results.json`` (it writes
    the ``final`` metrics record and, on the primary process, the plots)."""


class Task(Protocol):
  """A kind of run, registered by name in :data:`ccjax.tasks.TASKS`.

  Attributes:
    name: the registry name, also the config's ``TASK`` and the checkpoint's ``task``.
    config_type: its config class (a :class:`ccjax.run_config.RunConfig`).
  """
  name: str
  config_type: type

  def setup(self, config: run_config.RunConfig) -> TaskRun:
    """Loads the data and builds the model; raises ``ValueError`` (one line) for anything
    the data decide (nothing is written)."""


@dataclasses.dataclass(frozen=True)
class RunTask:
  """A :class:`Task` whose runs are ``run_type(config)`` (every task so far).

  Attributes:
    config_type: the task's config class; its ``TASK`` is the task's name.
    run_type: ``config -> TaskRun``.
  """
  config_type: type
  run_type: Callable[[Any], TaskRun]

  @property
  def name(self) -> str:
    return self.config_type.TASK

  def setup(self, config: run_config.RunConfig) -> TaskRun:
    return self.run_type(config)


def check_batch_size(config: run_config.RunConfig, available: int, unit: str) -> None:
  """Raises ``ConfigError`` (``batch_size``) unless the batch fits the training split.

  Args:
    config: the run's config.
    available: the training split's size in ``unit`` (examples, windows, ...).
    unit: what one batch row is, plural.
  """
  if not 1 <= config.batch_size <= available:
    raise validation.ConfigError(
        "batch_size", f"must be in [1, {available}] (the training {unit} of --dataset="
        f"{config.dataset}), got {config.batch_size}")
