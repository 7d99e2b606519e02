"""Experiment configuration and model construction shared by the entrypoints.

``ExperimentConfig`` is the validated form of ``experiments/condnet.py``'s flags; every
check raises ``ValueError`` naming the flag and the allowed values, before anything is
written to disk.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn

from ccjax import estimators
from ccjax import layers
from ccjax import train as train_lib

ARCHS = ("mlp", "cnn")
MODELS = ("condnet", "dense")
EVAL_POLICIES = ("threshold", "sample")
TFDS_DATASETS = ("mnist", "cifar10", "svhn_cropped")
DEFAULT_STEPS = 4000
CNN_RESIDUAL_BLOCKS = 1

# Flags that do not change the trained numbers, so a resumed run may change them.
RESUME_FREE_FIELDS = frozenset({
    "steps", "epochs", "eval_every", "log_every", "checkpoint_every", "measure_latency",
    "plots", "num_devices", "data_dir"})


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything that defines one training run.

  Attributes mirror the flags of ``experiments/condnet.py``.
  """
  dataset: str = "digits"
  data_dir: str | None = None
  arch: str = "mlp"
  model: str = "condnet"
  hidden: tuple[int, ...] = (512, 512)
  block_size: int = 32
  tau: tuple[float, ...] = (0.25,)
  lambda_s: float = 2.0
  lambda_v: float = 0.5
  l2: float = 1e-5
  lr: float = 1e-3
  policy_lr: float = 1e-3
  batch_size: int = 64
  steps: int | None = None
  epochs: int | None = None
  eval_every: int = 500
  log_every: int = 100
  checkpoint_every: int = 500
  seed: int = 0
  baseline: str = "ema"
  estimator: str = "reinforce"
  eval_policy: str = "threshold"
  valid_fraction: float = 0.1
  skip_nonfinite: bool = False
  num_devices: int | None = None
  measure_latency: bool = True
  plots: bool = True

  def __post_init__(self):
    _check_choice("arch", self.arch, ARCHS)
    _check_choice("model", self.model, MODELS)
    _check_choice("baseline", self.baseline, estimators.BASELINES)
    _check_choice("estimator", self.estimator, estimators.ESTIMATORS)
    _check_choice("eval_policy", self.eval_policy, EVAL_POLICIES)
    if not (self.dataset == "digits" or self.dataset in TFDS_DATASETS
            or (self.dataset.startswith("npz:") and len(self.dataset) > 4)):
      raise ValueError(f"--dataset must be one of digits|{'|'.join(TFDS_DATASETS)}|npz:PATH, "
                       f"got {self.dataset!r}")
    if not self.hidden:
      raise ValueError("--hidden must list at least one width, e.g. --hidden=512,512")
    for width in self.hidden:
      if not isinstance(width, int) or width <= 0:
        raise ValueError(f"--hidden widths must be positive integers, got {width!r}")
    _check_positive_int("block_size", self.block_size)
    for width in self.hidden:
      if width % self.block_size:
        raise ValueError(f"--block_size={self.block_size} must divide every --hidden width "
                         f"(got width {width})")
    if self.model == "condnet" and len(self.tau) not in (1, self.num_gated_layers):
      raise ValueError(f"--tau needs one value or one per gated layer ({self.num_gated_layers}),"
                       f" got {len(self.tau)}")
    for name in ("batch_size", "eval_every", "log_every", "checkpoint_every"):
      _check_positive_int(name, getattr(self, name))
    if self.steps is not None and self.epochs is not None:
      raise ValueError("give either --steps or --epochs, not both")
    if self.steps is not None:
      _check_positive_int("steps", self.steps)
    if self.epochs is not None:
      _check_positive_int("epochs", self.epochs)
    if not 0.0 <= self.valid_fraction < 1.0:
      raise ValueError(f"--valid_fraction must be in [0, 1), got {self.valid_fraction!r}")
    if self.num_devices is not None:
      _check_positive_int("num_devices", self.num_devices)
    if not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"--seed must be a non-negative integer, got {self.seed!r}")
    self.train_config()  # Validates tau, lambdas, learning rates.

  @property
  def num_gated_layers(self) -> int:
    """MLP: one gate per hidden layer. CNN: per stage a channel-gated conv and a skippable
    residual block."""
    return len(self.hidden) * (CNN_RESIDUAL_BLOCKS + 1 if self.arch == "cnn" else 1)

  def taus(self) -> tuple[float, ...]:
    """``tau`` with one value per gated layer."""
    return self.tau if len(self.tau) > 1 else self.tau * self.num_gated_layers

  def train_config(self) -> train_lib.TrainConfig:
    """The train-step hyperparameters (one tau per gated layer)."""
    try:
      return train_lib.TrainConfig(
          tau=self.tau if len(self.tau) > 1 else self.tau[0], lambda_s=self.lambda_s,
          lambda_v=self.lambda_v, l2=self.l2, lr=self.lr, policy_lr=self.policy_lr,
          baseline=self.baseline, estimator=self.estimator,
          skip_nonfinite=self.skip_nonfinite)
    except ValueError as error:
      raise ValueError(f"--{error}") from error

  def total_steps(self, num_train_examples: int) -> int:
    """``--steps``, or ``--epochs`` converted with the drop-remainder epoch length."""
    if self.steps is not None:
      return self.steps
    if self.epochs is not None:
      return self.epochs * max(1, num_train_examples // self.batch_size)
    return DEFAULT_STEPS

  def as_dict(self) -> dict[str, Any]:
    values = dataclasses.asdict(self)
    values["hidden"] = list(self.hidden)
    values["tau"] = list(self.tau)
    return values


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ValueError(f"--{name} must be one of {'|'.join(allowed)}, got {value!r}")


def _check_positive_int(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"--{name} must be a positive integer, got {value!r}")


def build_model(config: ExperimentConfig, input_shape: Sequence[int], num_classes: int
                ) -> nn.Module:
  """The model the config asks for; ``model='dense'`` is the same net with gates off."""
  gated = config.model == "condnet"
  if config.arch == "mlp":
    return layers.GatedMLP(
        hidden=tuple(config.hidden), num_classes=num_classes, block_size=config.block_size,
        gated=gated, estimator=config.estimator, policy_init_prob=config.taus())
  from ccjax import conv  # pylint: disable=g-import-not-at-top
  if len(input_shape) != 3:
    raise ValueError(f"--arch=cnn needs image inputs [height, width, channels], "
                     f"got examples of shape {tuple(input_shape)}")
  return conv.GatedCNN(
      num_classes=num_classes, stage_features=tuple(config.hidden),
      residual_blocks=CNN_RESIDUAL_BLOCKS, block_size=config.block_size, gated=gated,
      estimator=config.estimator, policy_init_prob=config.taus())


def architecture_meta(config: ExperimentConfig, input_shape: Sequence[int],
                      num_classes: int) -> dict[str, Any]:
  """What a checkpoint records about the architecture it belongs to."""
  return {"arch": config.arch, "model": config.model, "hidden": list(config.hidden),
          "block_size": config.block_size, "num_classes": int(num_classes),
          "input_shape": [int(d) for d in input_shape]}


def check_resume_compatible(saved: dict[str, Any], config: ExperimentConfig,
                            input_shape: Sequence[int], num_classes: int) -> None:
  """Raises ``ValueError`` when a workdir's checkpoint belongs to another run.

  Args:
    saved: the checkpoint's metadata (``architecture`` and ``config`` entries).
    config: the current run's configuration.
    input_shape: the current data's per-example shape.
    num_classes: the current data's class count.
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
