"""The one run configuration and model construction shared by every entrypoint.

``ExperimentConfig`` (nesting :class:`ccjax.TrainConfig`) is the validated form of the
flags; every check raises :class:`ccjax.validation.ConfigError` naming the field (= the
flag) and the allowed values, before anything is written to disk.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn

from ccjax import conv
from ccjax import data as data_lib
from ccjax import layers
from ccjax import policy as policy_lib
from ccjax import step as step_lib
from ccjax import validation

ARCHS = ("mlp", "cnn")
MODELS = ("condnet", "dense")
# Test-time policies (members of ccjax.policy.POLICY_MODES): ``threshold`` (p > 0.5),
# ``sample`` (Bernoulli draws), ``top_k`` (exactly round(tau * blocks) most probable blocks
# per example and layer).
EVAL_POLICIES = ("threshold", "sample", "top_k")
TFDS_DATASETS = ("mnist", "cifar10", "svhn_cropped")
DEFAULT_STEPS = 4000
CNN_RESIDUAL_BLOCKS = 1
# Architecture-dependent defaults of ``hidden`` / ``block_size`` (used when they are None).
ARCH_DEFAULTS = {"mlp": {"hidden": (512, 512), "block_size": 32},
                 "cnn": {"hidden": (32, 64), "block_size": 8}}
# Policies start at probability tau; a block that always runs (tau = 1) starts here.
MAX_INIT_PROB = 0.99

# The training recipe of experiments.condnet / experiments.sweep (the study in
# docs/recipes.md chose it on the validation split): the straight-through estimator. The
# library's own ``TrainConfig()`` keeps the paper's REINFORCE; this is the one place where
# the experiments' default differs from it.
DEFAULT_TRAIN = step_lib.TrainConfig(estimator="straight_through")
# ...with the fixed-compute ``top_k`` test policy.
DEFAULT_EVAL_POLICY = "top_k"

# Fields that do not change the trained numbers, so a resumed run may change them.
RESUME_FREE_FIELDS = frozenset({
    "steps", "epochs", "eval_every", "log_every", "checkpoint_every", "measure_latency",
    "plots", "num_devices", "data_dir", "allow_data_change"})


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything that defines one training run: the data, the model, the schedule and
  the train step's hyperparameters (:class:`ccjax.TrainConfig`, nested as ``train``).

  Field names are the flag names of ``experiments/condnet.py``. Build one with
  :meth:`create`, which routes the train-step fields into ``train``.

  ``seed`` is in ``[0, 2**63)``; every seed gives its own keys (see
  :func:`ccjax.loop.seed_key`). ``num_classes`` (default: from the data) is in
  ``[2, 100000]``. ``allow_data_change`` lets a resumed run continue on data that differ
  from the checkpoint's. ``policy_hidden`` (>= 0) gives every block policy a hidden layer
  of that many ReLU units (0: the linear policy); sparse inference runs only the linear
  policy, so it needs ``measure_latency=False``.
  """
  dataset: str = "digits"
  data_dir: str | None = None
  arch: str = "mlp"
  model: str = "condnet"
  hidden: tuple[int, ...] | None = None
  block_size: int | None = None
  train: step_lib.TrainConfig = DEFAULT_TRAIN
  batch_size: int = 64
  steps: int | None = None
  epochs: int | None = None
  eval_every: int = 500
  log_every: int = 100
  checkpoint_every: int = 500
  seed: int = 0
  eval_policy: str = DEFAULT_EVAL_POLICY
  valid_fraction: float = 0.1
  num_classes: int | None = None
  allow_data_change: bool = False
  num_devices: int | None = None
  measure_latency: bool = True
  plots: bool = True
  init_from: str | None = None
  distill_from: str | None = None
  policy_hidden: int = 0

  @classmethod
  def create(cls, **fields) -> "ExperimentConfig":
    """A config from flat field names: train-step fields (``tau``, ``lr``, ...) go into
    ``train``; a scalar ``tau`` is allowed."""
    train_fields = {name: fields.pop(name) for name in list(fields) if name in _TRAIN_FIELDS}
    unknown = set(fields) - _OWN_FIELDS
    if unknown:
      raise TypeError(f"unknown config fields {sorted(unknown)}")
    train = dataclasses.replace(fields.pop("train", DEFAULT_TRAIN), **train_fields)
    return cls(**fields, train=train)

  def replace(self, **fields) -> "ExperimentConfig":
    """A copy with flat fields changed (train-step fields go into ``train``)."""
    train_fields = {name: fields.pop(name) for name in list(fields) if name in _TRAIN_FIELDS}
    unknown = set(fields) - _OWN_FIELDS
    if unknown:
      raise TypeError(f"unknown config fields {sorted(unknown)}")
    return dataclasses.replace(self, train=dataclasses.replace(self.train, **train_fields),
                               **fields)

  def __post_init__(self):
    validation.check_choice("arch", self.arch, ARCHS)
    defaults = ARCH_DEFAULTS[self.arch]
    if self.hidden is None:
      object.__setattr__(self, "hidden", defaults["hidden"])
    if self.block_size is None:
      object.__setattr__(self, "block_size", defaults["block_size"])
    object.__setattr__(self, "hidden", tuple(self.hidden))
    validation.check_choice("model", self.model, MODELS)
    validation.check_choice("eval_policy", self.eval_policy, EVAL_POLICIES)
    if not (self.dataset in ("digits", "mnist1d") or self.dataset in TFDS_DATASETS
            or self.dataset.startswith(data_lib.MNIST1D_PREFIX)
            or (self.dataset.startswith("npz:") and len(self.dataset) > 4)):
      raise validation.ConfigError(
          "dataset", f"must be one of digits|mnist1d|mnist1d:N|{'|'.join(TFDS_DATASETS)}|"
          f"npz:PATH, got {self.dataset!r}")
    if self.dataset.startswith(data_lib.MNIST1D_PREFIX):
      try:
        data_lib.mnist1d_num_samples(self.dataset)
      except data_lib.DataError:
        raise validation.ConfigError(
            "dataset", f"={self.dataset}: {data_lib.MNIST1D_SAMPLES_RULE}") from None
    if not self.hidden:
      raise validation.ConfigError("hidden", "must list at least one width, e.g. 512,512")
    for width in self.hidden:
      validation.check_int("hidden", width)
    validation.check_int("block_size", self.block_size)
    for width in self.hidden:
      if width % self.block_size:
        raise validation.ConfigError(
            "block_size", f"must divide every hidden width, got {self.block_size} "
            f"and width {width}")
    if self.model == "condnet":
      self.taus()
    for name in ("batch_size", "eval_every", "log_every", "checkpoint_every"):
      validation.check_int(name, getattr(self, name))
    if self.steps is not None and self.epochs is not None:
      raise validation.ConfigError("steps", "and --epochs: give one, not both")
    if self.steps is not None:
      validation.check_int("steps", self.steps)
    if self.epochs is not None:
      validation.check_int("epochs", self.epochs)
    validation.check_float("valid_fraction", self.valid_fraction, low=0.0, high=1.0,
                           high_open=True)
    if self.num_devices is not None:
      validation.check_int("num_devices", self.num_devices)
    for name in ("init_from", "distill_from"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, str) or not value.strip()):
        raise validation.ConfigError(name, f"must be the workdir of a finished run, got {value!r}")
    if self.distill_from is not None and self.train.distill_weight == 0:
      raise validation.ConfigError("distill_from", "needs --distill_weight > 0")
    if self.num_classes is not None:
      validation.check_int("num_classes", self.num_classes, minimum=2)
      if self.num_classes > data_lib.MAX_NUM_CLASSES:
        raise validation.ConfigError(
            "num_classes", f"must be in [2, {data_lib.MAX_NUM_CLASSES}], got {self.num_classes}")
    validation.check_int("seed", self.seed, minimum=0)
    if self.seed >= MAX_SEED:
      raise validation.ConfigError("seed", f"must be in [0, 2**63), got {self.seed}")
    layers.validate_policy_hidden(self.policy_hidden)
    if self.policy_hidden and self.model == "condnet" and self.measure_latency:
      raise validation.ConfigError(
          "policy_hidden", f"={self.policy_hidden}: sparse inference runs only the linear "
          "policy, so the batch-1 latency cannot be measured; add --measure_latency=false")
    if self.distill_from is not None and self.train.distill_teacher == "snapshot":
      raise validation.ConfigError(
          "distill_teacher", "=snapshot distils from this run's own warm-start snapshot; "
          "drop it or --distill_from")

  @property
  def num_gated_layers(self) -> int:
    """MLP: one gate per hidden layer. CNN: per stage a channel-gated conv and a skippable
    residual block."""
    return len(self.hidden) * (CNN_RESIDUAL_BLOCKS + 1 if self.arch == "cnn" else 1)

  def taus(self) -> tuple[float, ...]:
    """``train.tau`` with one value per gated layer."""
    return self.train.taus(self.num_gated_layers)

  def top_k_capacities(self) -> tuple[int, ...]:
    """Blocks per example of the ``top_k`` test policy, one per gated layer:
    ``round(tau * blocks)`` (at least 1). CNN skip gates (one block) keep the threshold."""
    taus = self.taus()
    if self.arch == "mlp":
      blocks = [width // self.block_size for width in self.hidden]
    else:
      blocks = [width // self.block_size for width in self.hidden
                for _ in range(CNN_RESIDUAL_BLOCKS + 1)]
    return tuple(policy_lib.top_k_capacity(tau, nb) for tau, nb in zip(taus, blocks))

  def total_steps(self, num_train_examples: int) -> int:
    """``steps``, or ``epochs`` converted with the drop-remainder epoch length."""
    if self.steps is not None:
      return self.steps
    if self.epochs is not None:
      return self.epochs * max(1, num_train_examples // self.batch_size)
    return DEFAULT_STEPS

  def as_dict(self) -> dict[str, Any]:
    """Flat ``{field: value}`` (train-step fields included), JSON-ready."""
    values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
              if field.name != "train"}
    values.update(dataclasses.asdict(self.train))
    values["hidden"] = list(self.hidden)
    values["tau"] = list(self.train.tau) if not isinstance(self.train.tau, (int, float)) \
        else [self.train.tau]
    return values

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "ExperimentConfig":
    """Inverse of :meth:`as_dict` (unknown keys are ignored)."""
    known = {key: value for key, value in values.items()
             if key in _OWN_FIELDS or key in _TRAIN_FIELDS}
    if "hidden" in known:
      known["hidden"] = tuple(known["hidden"])
    if isinstance(known.get("tau"), list):
      known["tau"] = tuple(known["tau"])
    return cls.create(**known)


MAX_SEED = 2 ** 63
_TRAIN_FIELDS = frozenset(field.name for field in dataclasses.fields(step_lib.TrainConfig))
_OWN_FIELDS = frozenset(field.name for field in dataclasses.fields(ExperimentConfig))


def build_model(config: ExperimentConfig, input_shape: Sequence[int], num_classes: int
                ) -> nn.Module:
  """The module the config asks for; ``model='dense'`` is the same net with gates off."""
  gated = config.model == "condnet"
  # With a tau curriculum the policies start at the curriculum's first target.
  init_probs = tuple(min(tau, MAX_INIT_PROB)
                     for tau in config.train.initial_taus(config.num_gated_layers))
  if config.arch == "mlp":
    return layers.GatedMLP(
        hidden=tuple(config.hidden), num_classes=num_classes, block_size=config.block_size,
        gated=gated, estimator=config.train.estimator, policy_init_prob=init_probs,
        policy_hidden=config.policy_hidden)
  if len(input_shape) != 3:
    raise validation.ConfigError(
        "arch", f"=cnn needs image inputs [height, width, channels], got examples of shape "
        f"{tuple(input_shape)}")
  return conv.GatedCNN(
      num_classes=num_classes, stage_features=tuple(config.hidden),
      residual_blocks=CNN_RESIDUAL_BLOCKS, block_size=config.block_size, gated=gated,
      estimator=config.train.estimator, policy_init_prob=init_probs,
      policy_hidden=config.policy_hidden)


def architecture_meta(config: ExperimentConfig, input_shape: Sequence[int],
                      num_classes: int) -> dict[str, Any]:
  """What a checkpoint records about the architecture it belongs to."""
  return {"arch": config.arch, "model": config.model, "hidden": list(config.hidden),
          "block_size": config.block_size, "num_classes": int(num_classes),
          "input_shape": [int(d) for d in input_shape]}


def check_resume_compatible(saved: dict[str, Any], config: ExperimentConfig,
                            input_shape: Sequence[int], num_classes: int, *,
                            data_fingerprint: dict[str, Any] | None = None) -> None:
  """Raises ``ValueError`` when a workdir's checkpoint belongs to another run.

  Args:
    saved: the checkpoint's metadata (``architecture``, ``config`` and ``data`` entries).
    config: the current run's configuration.
    input_shape: the current data's per-example shape.
    num_classes: the current data's class count.
    data_fingerprint: the current data's :func:`ccjax.data.fingerprint`; it must equal the
      checkpoint's unless ``config.allow_data_change``.
  """
  saved_arch = saved.get("architecture", {})
  current = architecture_meta(config, input_shape, num_classes)
  saved_dim = math.prod(saved_arch.get("input_shape", [0]))
  if saved_arch.get("input_shape") != current["input_shape"]:
    raise ValueError(
        f"input dimension {math.prod(current['input_shape'])} (shape {current['input_shape']}) "
        f"is inconsistent with the checkpoint in --workdir (input dimension {saved_dim}, "
        f"shape {saved_arch.get('input_shape')}); use a fresh --workdir")
  for key in ("arch", "model", "hidden", "block_size", "num_classes"):
    if saved_arch.get(key) != current[key]:
      raise ValueError(
          f"--workdir holds a checkpoint of a different architecture ({key}: checkpoint "
          f"{saved_arch.get(key)!r}, now {current[key]!r}); use a fresh --workdir")
  saved_config = saved.get("config", {})
  for key, value in config.as_dict().items():
    if key in RESUME_FREE_FIELDS or key not in saved_config:
      continue
    if saved_config[key] != value:
      raise ValueError(
          f"--workdir holds a run with --{key}={saved_config[key]!r} (now {value!r}); resuming "
          "would not reproduce it: use the same flags or a fresh --workdir")
  saved_data = saved.get("data")
  if (data_fingerprint is not None and saved_data is not None and not config.allow_data_change
      and saved_data.get("sha256") != data_fingerprint["sha256"]):
    shapes = ("" if saved_data.get("shapes") == data_fingerprint["shapes"] else
              f"; shapes then {saved_data.get('shapes')}, now {data_fingerprint['shapes']}")
    raise ValueError(
        f"--dataset {config.dataset} holds different data than the checkpoint in --workdir was "
        f"trained on (sha256 {saved_data.get('sha256', '?')[:12]}, now "
        f"{data_fingerprint['sha256'][:12]}{shapes}); pass --allow_data_change to resume on "
        "it anyway, or use a fresh --workdir")
