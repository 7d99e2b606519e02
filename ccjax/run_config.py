"""``RunConfig``: the fields every task's run shares, with one set of defaults.

A task's config (:class:`ccjax.ExperimentConfig` for classifiers,
:class:`ccjax.lm_train.LMConfig` for language models) subclasses it, adds only its own
fields and overrides a shared default only where the task needs another one (each such
override sits in the task's class, with its reason). Validation of the shared fields
lives here, so the same bad value raises the same :class:`ccjax.validation.ConfigError`
in every task. Configs are flat towards the outside: :meth:`RunConfig.create`,
:meth:`RunConfig.replace` and :meth:`RunConfig.as_dict` route the train-step fields
(``tau``, ``lr``, ...) into the nested :class:`ccjax.TrainConfig`; ``as_dict`` is the
form recorded in checkpoint metadata and read back by :meth:`RunConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from ccjax import step as step_lib
from ccjax import validation

# Seeds are in [0, MAX_SEED): every seed gets its own PRNG key (ccjax.run_loop.seed_key).
MAX_SEED = 2 ** 63
_TRAIN_FIELDS = frozenset(field.name for field in dataclasses.fields(step_lib.TrainConfig))
# Settings a resumed run may change in every task: they do not change the trained numbers.
SHARED_RESUME_FREE_FIELDS = frozenset({
    "steps", "eval_every", "log_every", "checkpoint_every", "plots", "num_devices",
    "allow_data_change"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """The fields of one training run that every task has.

  Attributes:
    dataset: the data source (the task's registry names it; no shared default).
    model: the task's model kind (one of the subclass's :attr:`MODELS`).
    block_size: units per gated block (``None``: the task's default).
    train: the train step's hyperparameters (:class:`ccjax.TrainConfig`).
    batch_size: global training batch (examples or windows) per step.
    steps: training steps (``None``: the task's :attr:`DEFAULT_STEPS`).
    eval_every, log_every, checkpoint_every: intervals in steps.
    seed: parameters, data order and masks, in ``[0, 2**63)``.
    eval_policy: the test-time policy (one of :attr:`EVAL_POLICIES`; ``None``: the task's
      default).
    num_devices: devices the batch is split over (``None``: all).
    allow_data_change: resume even if the data differ from the checkpoint's.
    plots: write ``plots/*.png`` at the end.
    regroup_step: after that update, within the dense warm start (``<= warm_steps``),
      every gated MLP's hidden units are regrouped into blocks of co-active units
      (:mod:`ccjax.regroup`; the function is unchanged); 0: never. Tasks say which
      models have such units.
  """
  # The task this config belongs to (ccjax.tasks.TASKS), its model kinds, test-time
  # policies, default length and the fields a resume may change (shared ones included).
  TASK: ClassVar[str] = ""
  MODELS: ClassVar[tuple[str, ...]] = ()
  EVAL_POLICIES: ClassVar[tuple[str, ...]] = ()
  DEFAULT_STEPS: ClassVar[int] = 4000
  RESUME_FREE_FIELDS: ClassVar[frozenset[str]] = SHARED_RESUME_FREE_FIELDS

  dataset: str
  model: str
  block_size: int | None = None
  train: step_lib.TrainConfig = step_lib.TrainConfig()
  batch_size: int = 64
  steps: int | None = None
  eval_every: int = 500
  log_every: int = 100
  checkpoint_every: int = 500
  seed: int = 0
  eval_policy: str | None = None
  num_devices: int | None = None
  allow_data_change: bool = False
  plots: bool = True
  regroup_step: int = 0

  def __post_init__(self):
    """Checks the shared fields (subclasses call it, then check their own)."""
    validation.check_choice("model", self.model, self.MODELS)
    if self.eval_policy is not None:
      validation.check_choice("eval_policy", self.eval_policy, self.EVAL_POLICIES)
    for name in ("batch_size", "eval_every", "log_every", "checkpoint_every"):
      validation.check_int(name, getattr(self, name))
    if self.steps is not None:
      validation.check_int("steps", self.steps)
    if self.num_devices is not None:
      validation.check_int("num_devices", self.num_devices)
    validation.check_int("seed", self.seed, minimum=0)
    if self.seed >= MAX_SEED:
      raise validation.ConfigError("seed", f"must be in [0, 2**63), got {self.seed}")
    validation.check_int("regroup_step", self.regroup_step, minimum=0)
    if self.regroup_step > self.train.warm_steps:
      raise validation.ConfigError(
          "regroup_step", f"={self.regroup_step} must fall in the dense warm start (the "
          f"activations of every block are read): needs --warm_steps >= {self.regroup_step}, "
          f"got warm_steps={self.train.warm_steps}")

  @classmethod
  def own_fields(cls) -> frozenset[str]:
    """The config's field names (``train`` included, not the train-step fields)."""
    return frozenset(field.name for field in dataclasses.fields(cls))

  @classmethod
  def _split(cls, fields: dict[str, Any]) -> dict[str, Any]:
    """Pops the train-step fields out of ``fields`` (returned); ``TypeError`` for a name
    that is neither."""
    train_fields = {name: fields.pop(name) for name in list(fields) if name in _TRAIN_FIELDS}
    unknown = set(fields) - cls.own_fields()
    if unknown:
      raise TypeError(f"unknown config fields {sorted(unknown)}")
    return train_fields

  @classmethod
  def create(cls, **fields):
    """A config from flat field names: train-step fields (``tau``, ``lr``, ...) go into
    ``train`` (over the task's default ``train``); a scalar ``tau`` is allowed."""
    train_fields = cls._split(fields)
    train = fields.pop("train", None) or _default_train(cls)
    return cls(**fields, train=dataclasses.replace(train, **train_fields))

  def replace(self, **fields):
    """A copy with flat fields changed (train-step fields go into ``train``)."""
    train_fields = self._split(fields)
    return dataclasses.replace(self, train=dataclasses.replace(self.train, **train_fields),
                               **fields)

  def as_dict(self) -> dict[str, Any]:
    """Flat ``{field: value}`` (train-step fields included, tuples as lists), JSON-ready."""
    values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
              if field.name != "train"}
    values.update(dataclasses.asdict(self.train))
    values["tau"] = (list(self.train.tau) if not isinstance(self.train.tau, (int, float))
                     else [self.train.tau])
    return json.loads(json.dumps(values))

  @classmethod
  def from_dict(cls, values: dict[str, Any]):
    """Inverse of :meth:`as_dict` (unknown keys are ignored, lists become tuples)."""
    known = {key: tuple(value) if isinstance(value, list) else value
             for key, value in values.items()
             if key in cls.own_fields() or key in _TRAIN_FIELDS}
    return cls.create(**known)

  def eval_mode(self) -> str:
    """The test-time policy the run evaluates with (the task's rule)."""
    raise NotImplementedError

  def eval_capacity(self) -> tuple[int, ...] | None:
    """Blocks per example and gated layer of a fixed-capacity test policy (else ``None``)."""
    raise NotImplementedError

  def model_for(self, architecture: dict[str, Any]) -> tuple[Any, tuple[int, ...], int]:
    """``(module, input_shape, num_classes)`` of a checkpoint with ``architecture`` (its
    metadata's resume key), for :func:`ccjax.load_run`."""
    raise NotImplementedError

  def total_steps(self, num_train_examples: int) -> int:  # pylint: disable=unused-argument
    """Training steps of the whole run: ``steps``, else :attr:`DEFAULT_STEPS`."""
    return self.steps if self.steps is not None else self.DEFAULT_STEPS


def _default_train(cls) -> step_lib.TrainConfig:
  """The ``train`` default of config class ``cls`` (a value or a factory)."""
  field = next(field for field in dataclasses.fields(cls) if field.name == "train")
  if field.default is not dataclasses.MISSING:
    return field.default
  return field.default_factory()
