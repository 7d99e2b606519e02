"""The one run configuration and model construction shared by every entrypoint.

``ExperimentConfig`` (nesting :class:`ccjax.TrainConfig`) is the validated form of the
flags; every check raises :class:`ccjax.validation.ConfigError` naming the field (= the
flag) and the allowed values, before anything is written to disk.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn

from ccjax import conv
from ccjax import data as data_lib
from ccjax import datasets
from ccjax import estimators
from ccjax import layers
from ccjax import policy as policy_lib
from ccjax import run_config
from ccjax import step as step_lib
from ccjax import validation

ARCHS = ("mlp", "cnn")
MODELS = ("condnet", "dense")
# Test-time policies (members of ccjax.policy.POLICY_MODES): ``threshold`` (p > 0.5),
# ``sample`` (Bernoulli draws), ``top_k`` (exactly round(tau * blocks) most probable blocks
# per example and layer).
EVAL_POLICIES = ("threshold", "sample", "top_k")
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig(run_config.RunConfig):
  """Everything that defines one classifier run: the shared fields of
  :class:`ccjax.run_config.RunConfig` (data, schedule, seed, the train step's
  hyperparameters nested as ``train``) and the classifier's own (architecture, splits,
  sources, latency).

  Field names are the flag names of ``experiments/condnet.py``. Build one with
  :meth:`create`, which routes the train-step fields into ``train``.

  ``seed`` is in ``[0, 2**63)``; every seed gives its own keys (see
  :func:`ccjax.run_loop.seed_key`). ``num_classes`` (default: from the data) is in
  ``[2, 100000]``. ``allow_data_change`` lets a resumed run continue on data that differ
  from the checkpoint's. ``policy_hidden`` (>= 0) gives every block policy a hidden layer
  of that many ReLU units (0: the linear policy); sparse inference runs only the linear
  policy, so it needs ``measure_latency=False``. ``policy_rank`` (>= 0) factorises every
  linear policy ``Z = A B`` at that rank (0: the full matrix; :class:`ccjax.BlockPolicy`).
  ``regroup_step`` (:class:`ccjax.run_config.RunConfig`) needs MLP condnets here.
  """
  TASK = "classify"
  MODELS = MODELS
  EVAL_POLICIES = EVAL_POLICIES
  DEFAULT_STEPS = DEFAULT_STEPS
  RESUME_FREE_FIELDS = run_config.SHARED_RESUME_FREE_FIELDS | {
      "epochs", "measure_latency", "data_dir"}

  # The classifier's values of shared fields (the others: RunConfig's defaults).
  dataset: str = "digits"
  model: str = "condnet"
  train: step_lib.TrainConfig = DEFAULT_TRAIN
  eval_policy: str = DEFAULT_EVAL_POLICY
  # Its own fields.
  data_dir: str | None = None
  arch: str = "mlp"
  hidden: tuple[int, ...] | None = None
  epochs: int | None = None
  valid_fraction: float = 0.1
  num_classes: int | None = None
  measure_latency: bool = True
  init_from: str | None = None
  distill_from: str | None = None
  policy_hidden: int = 0
  policy_rank: int = 0

  def __post_init__(self):
    validation.check_choice("arch", self.arch, ARCHS)
    defaults = ARCH_DEFAULTS[self.arch]
    if self.hidden is None:
      object.__setattr__(self, "hidden", defaults["hidden"])
    if self.block_size is None:
      object.__setattr__(self, "block_size", defaults["block_size"])
    object.__setattr__(self, "hidden", tuple(self.hidden))
    validation.check_choice("eval_policy", self.eval_policy, EVAL_POLICIES)
    super().__post_init__()
    try:   # the data-source registry (ccjax.datasets) knows every name and spec
      datasets.parse(self.dataset, datasets.CLASSIFICATION)
    except datasets.DataError as error:
      detail = str(error).removeprefix("dataset ")
      raise validation.ConfigError(
          "dataset", "=" + detail if detail.startswith(f"{self.dataset}:") else detail) from None
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
    if self.steps is not None and self.epochs is not None:
      raise validation.ConfigError("steps", "and --epochs: give one, not both")
    if self.epochs is not None:
      validation.check_int("epochs", self.epochs)
    validation.check_float("valid_fraction", self.valid_fraction, low=0.0, high=1.0,
                           high_open=True)
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
    layers.validate_policy_hidden(self.policy_hidden)
    if self.policy_hidden and self.model == "condnet" and self.measure_latency:
      raise validation.ConfigError(
          "policy_hidden", f"={self.policy_hidden}: sparse inference runs only the linear "
          "policy, so the batch-1 latency cannot be measured; add --measure_latency=false")
    layers.validate_policy_rank(self.policy_rank, self.policy_hidden)
    if self.regroup_step and (self.arch != "mlp" or self.model != "condnet"):
      raise validation.ConfigError(
          "regroup_step", f"={self.regroup_step} regroups a gated MLP's hidden units: needs "
          f"--arch=mlp --model=condnet, got arch={self.arch}, model={self.model}")
    if (self.arch == "cnn" and self.model == "condnet"
        and self.train.estimator in estimators.TOP_K_ESTIMATORS):
      allowed = "|".join(name for name in estimators.ESTIMATORS
                         if name not in estimators.TOP_K_ESTIMATORS)
      raise validation.ConfigError(
          "estimator", f"must be one of {allowed} with --arch=cnn, got "
          f"{self.train.estimator!r}: it trains exactly k blocks per example, and the CNN's "
          "one-block residual gates would always run in training and be thresholded at test "
          "(docs/studies/cnn_digits_tau05.md)")
    if self.train.imitation_weight > 0 and self.model == "condnet" and self.arch != "mlp":
      raise validation.ConfigError(
          "imitation_weight", f"={self.train.imitation_weight} imitates the blocks of largest "
          "activation norm, which only MLP layers report: needs --arch=mlp")
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

  def eval_mode(self) -> str:
    """The test-time policy (``eval_policy``)."""
    return self.eval_policy

  def eval_capacity(self) -> tuple[int, ...] | None:
    """Blocks per example and gated layer of the ``top_k`` test policy of a condnet
    (else ``None``)."""
    if self.eval_policy != "top_k" or self.model != "condnet":
      return None
    return self.top_k_capacities()

  def architecture_for(self, input_shape: Sequence[int], num_classes: int) -> dict[str, Any]:
    """What a checkpoint records about the architecture it belongs to."""
    return {"arch": self.arch, "model": self.model, "hidden": list(self.hidden),
            "block_size": self.block_size, "num_classes": int(num_classes),
            "input_shape": [int(d) for d in input_shape]}

  def model_for(self, architecture: dict[str, Any]) -> tuple[nn.Module, tuple[int, ...], int]:
    """``(module, input_shape, num_classes)`` of a checkpoint whose metadata has
    ``architecture`` (:meth:`architecture_for`).

    Raises:
      KeyError, TypeError, ValueError: ``architecture`` does not describe a model.
    """
    input_shape = tuple(int(d) for d in architecture["input_shape"])
    num_classes = int(architecture["num_classes"])
    if any(d <= 0 for d in input_shape):
      raise ValueError(f"input_shape {list(input_shape)}")
    return build_model(self, input_shape, num_classes), input_shape, num_classes

  def total_steps(self, num_train_examples: int) -> int:
    """``steps``, or ``epochs`` converted with the drop-remainder epoch length."""
    if self.epochs is not None and self.steps is None:
      return self.epochs * max(1, num_train_examples // self.batch_size)
    return super().total_steps(num_train_examples)


def build_model(config: ExperimentConfig, input_shape: Sequence[int], num_classes: int,
                **module_fields) -> nn.Module:
  """The module the config asks for; ``model='dense'`` is the same net with gates off.

  ``module_fields`` set module fields the config does not hold (a benchmark's ``dtype``,
  the CNN's ``residual_blocks`` / ``stem_features``)."""
  gated = config.model == "condnet"
  # With a tau curriculum the policies start at the curriculum's first target.
  init_probs = tuple(min(tau, MAX_INIT_PROB)
                     for tau in config.train.initial_taus(config.num_gated_layers))
  fields = {"num_classes": num_classes, "block_size": config.block_size, "gated": gated,
            "estimator": config.train.estimator, "policy_init_prob": init_probs,
            "policy_hidden": config.policy_hidden, "policy_rank": config.policy_rank}
  if config.arch == "mlp":
    return layers.GatedMLP(hidden=tuple(config.hidden), **{**fields, **module_fields})
  if len(input_shape) != 3:
    raise validation.ConfigError(
        "arch", f"=cnn needs image inputs [height, width, channels], got examples of shape "
        f"{tuple(input_shape)}")
  return conv.GatedCNN(stage_features=tuple(config.hidden), **{
      **fields, "residual_blocks": CNN_RESIDUAL_BLOCKS, **module_fields})
