"""Tasks: the kinds of run the one driver trains (:func:`train_and_evaluate`).

``TASKS`` maps a task's name (its config's ``TASK``, the checkpoint's ``task``) to the
task; a new task is one module with a :class:`ccjax.tasks.base.Task` and one line here.
"""

from __future__ import annotations

from typing import Any

from ccjax import run_config
from ccjax.tasks import base
from ccjax.tasks import classification
from ccjax.tasks import driver
from ccjax.tasks import language_model

Task = base.Task
TaskRun = base.TaskRun
train_and_evaluate = driver.train_and_evaluate

TASKS: dict[str, base.Task] = {task.name: task for task in (
    classification.TASK,
    language_model.TASK,
)}


def task_for(config: run_config.RunConfig) -> base.Task:
  """The task whose config type ``config`` is.

  Raises:
    TypeError: ``config`` is not the config of a registered task.
  """
  task = TASKS.get(getattr(config, "TASK", None))
  if task is None or not isinstance(config, task.config_type):
    known = ", ".join(f"{name} ({task.config_type.__name__})" for name, task in TASKS.items())
    raise TypeError(f"{type(config).__name__} is not the config of a task; tasks: {known}")
  return task


def train(config: run_config.RunConfig, workdir: str,
          flag_values: dict[str, Any] | None = None) -> dict[str, Any]:
  """:func:`train_and_evaluate` with the task of ``config`` (:func:`task_for`)."""
  return train_and_evaluate(task_for(config), config, workdir, flag_values)
