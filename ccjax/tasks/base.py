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
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

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
    family: the model's inference family (``mlp``, ``cnn``, ``transformer``: the kernel
      backend is chosen per family).

  A run may also define ``after_update(state, step) -> state`` (see
  :class:`ccjax.run_loop.StepHooks`); the classifier regroups units with it.
  """
  module: Any
  description: str
  family: str
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


class Column(NamedTuple):
  """A number a sweep reports per configuration (mean and sample std over seeds).

  Attributes:
    name: the row's key (``<name>_mean``, ``<name>_std``) and the CSV column.
    title: the markdown column's title.
    value: ``results.json payload -> number or None`` (``None``: not measured).
    scale: the markdown shows ``value * scale``.
    digits: decimals in the markdown.
  """
  name: str
  title: str
  value: Callable[[dict[str, Any]], float | None]
  scale: float = 1.0
  digits: int = 2


class SweepSpec(NamedTuple):
  """What the one sweep (:mod:`ccjax.sweep`) needs to know of a task.

  Attributes:
    metric: the ``results.json`` key of the test metric (lower is better).
    valid_metric: the key of the same metric on the validation split.
    metric_title: its name in tables (with the unit of ``metric_scale``).
    metric_scale: tables show ``metric * metric_scale``.
    metric_digits: decimals in tables.
    difference_unit: the unit of a gated − dense difference in tables.
    gated_model: the config's ``model`` of a gated run.
    variants: the task's named gated variants, ``{name: config fields}``.
    default_variants: those a sweep runs unless told otherwise.
    columns: the numbers reported beside the metric.
    hidden: ``config -> per-layer widths`` (what a row's width is).
    at_width: ``(config, width) -> config`` with every gated layer ``width`` wide.
    active_width: ``config -> width`` of the units a gated net of ``config`` runs per
      example (the capacity regime's ``w``); raises ``ConfigError(capacity_widths)`` when
      the config has no single one.
    same_macs_width: ``(gated config, its [seeds] results) -> width`` of the dense
      baseline of the same MACs (a multiple of the block size).
    derived_rows: ``(config, the same-width dense [seeds] results) -> [(label, model,
      [seeds] result-like dicts)]``: rows measured on the dense runs (the LM's TEAL).
  """
  metric: str
  valid_metric: str
  metric_title: str
  metric_scale: float
  metric_digits: int
  difference_unit: str
  gated_model: str
  variants: Mapping[str, Mapping[str, Any]]
  default_variants: tuple[str, ...]
  columns: tuple[Column, ...]
  hidden: Callable[[Any], tuple[int, ...]]
  at_width: Callable[[Any, int], Any]
  active_width: Callable[[Any], int]
  same_macs_width: Callable[[Any, Sequence[dict[str, Any]]], int]
  derived_rows: Callable[[Any, Sequence[dict[str, Any]]], list] = lambda config, runs: []


def train_time(result: dict[str, Any]) -> float | None:
  """A run's training seconds (a :class:`Column` value)."""
  return result.get("train_time_s")


def mean_active_fraction(result: dict[str, Any]) -> float:
  """The active fraction averaged over gated layers; 1 for a dense run."""
  fractions = result["active_fraction"]
  return sum(fractions) / len(fractions) if fractions else 1.0


class Task(Protocol):
  """A kind of run, registered by name in :data:`ccjax.tasks.TASKS`.

  Attributes:
    name: the registry name, also the config's ``TASK`` and the checkpoint's ``task``.
    config_type: its config class (a :class:`ccjax.run_config.RunConfig`).
    sweep: how :mod:`ccjax.sweep` runs and reports it.
  """
  name: str
  config_type: type
  sweep: SweepSpec

  def setup(self, config: run_config.RunConfig) -> TaskRun:
    """Loads the data and builds the model; raises ``ValueError`` (one line) for anything
    the data decide (nothing is written)."""


@dataclasses.dataclass(frozen=True)
class RunTask:
  """A :class:`Task` whose runs are ``run_type(config)`` (every task so far).

  Attributes:
    config_type: the task's config class; its ``TASK`` is the task's name.
    run_type: ``config -> TaskRun``.
    sweep: how :mod:`ccjax.sweep` runs and reports the task.
  """
  config_type: type
  run_type: Callable[[Any], TaskRun]
  sweep: SweepSpec

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
