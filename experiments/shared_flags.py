"""Flags shared by the ``experiments`` entrypoints (condnet, sweep, lm, ...), defined once.

(Named ``shared_flags`` so that it does not shadow absl's ``flags``.)

Each flag is named like the :class:`ccjax.ExperimentConfig` / :class:`ccjax.TrainConfig`
field it sets, is typed (absl parses numbers and choices, with one-line errors) and
carries no validation of its own: the config types own every rule, and
:func:`experiments.cli.one_line_errors` turns a field in their messages into the flag's name.
"""

from __future__ import annotations

from absl import flags

from ccjax import budget as budget_lib
from ccjax import config as config_lib
from ccjax import distill as distill_lib
from ccjax import estimators
from ccjax import modes
from ccjax import schedules
from ccjax import step as step_lib
from ccjax import validation
from experiments import cli


class _NumberListParser(flags.ArgumentParser):
  """Comma-separated numbers (``512,512``; ``0.25``), parsed to a tuple."""

  def __init__(self, kind):
    super().__init__()
    self._kind = kind

  def parse(self, argument):
    if isinstance(argument, (list, tuple)):
      return tuple(self._kind(value) for value in argument)
    parts = [part.strip() for part in str(argument).split(",")]
    if not str(argument).strip() or any(not part for part in parts):
      raise ValueError(f"must be a comma-separated list of numbers, got {argument!r}")
    try:
      return tuple(self._kind(part) for part in parts)
    except ValueError:
      wanted = "integers" if self._kind is int else "numbers"
      raise ValueError(f"must be a comma-separated list of {wanted}, got {argument!r}") from None

  def flag_type(self):
    return f"comma-separated {self._kind.__name__} list"


class _ListSerializer(flags.ArgumentSerializer):

  def serialize(self, value):
    return ",".join(str(item) for item in value)


def define_number_list(name: str, default, help_text: str, kind=float) -> flags.FlagHolder:
  """A flag holding one number or a comma-separated list (e.g. one value per layer)."""
  return flags.DEFINE(_NumberListParser(kind), name, default, help_text,
                      serializer=_ListSerializer())


_DEFAULT = config_lib.ExperimentConfig()
_DEFAULT_TRAIN = _DEFAULT.train

DATASET = flags.DEFINE_string(
    "dataset", _DEFAULT.dataset, "digits (scikit-learn, offline) | mnist1d (generated offline by the mnist1d "
    "package: 10,000 examples) | mnist1d:N (N examples, 80 % train / 20 % test, e.g. "
    "mnist1d:50000) | mnist | cifar10 | "
    "svhn_cropped (TFDS, from --data_dir) | npz:PATH (x_train, y_train, x_test, y_test"
    "[, x_valid, y_valid]). Language models (experiments.lm): grammar (generated) | bible "
    "(real English, needs the text extra) | text:PATH (docs/data.md).")
DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
ARCH = flags.DEFINE_enum("arch", _DEFAULT.arch, config_lib.ARCHS, "Network family.")
HIDDEN = define_number_list(
    "hidden", None, "Hidden widths (MLP) or stage channel widths (CNN); default per --arch: "
    + "; ".join(f"{arch} {','.join(map(str, d['hidden']))}"
                for arch, d in config_lib.ARCH_DEFAULTS.items()) + ".", int)
BLOCK_SIZE = flags.DEFINE_integer(
    "block_size", None, "Units (or channels) per gated block; default per --arch: "
    + "; ".join(f"{arch} {d['block_size']}" for arch, d in config_lib.ARCH_DEFAULTS.items())
    + ".")
LAMBDA_S = flags.DEFINE_float("lambda_s", _DEFAULT_TRAIN.lambda_s,
                              "Weight of the sparsity terms L_b + L_e.")
LAMBDA_V = flags.DEFINE_float("lambda_v", _DEFAULT_TRAIN.lambda_v, "Weight of the variance term L_v.")
L2 = flags.DEFINE_float("l2", _DEFAULT_TRAIN.l2, "L2 weight on all kernels.")
LR = flags.DEFINE_float("lr", _DEFAULT_TRAIN.lr, "Network learning rate (Adam).")
POLICY_LR = flags.DEFINE_float("policy_lr", _DEFAULT_TRAIN.policy_lr,
                               "Policy learning rate (Adam).")
BASELINE = flags.DEFINE_enum("baseline", _DEFAULT_TRAIN.baseline, estimators.BASELINES,
                             "REINFORCE baseline.")
ESTIMATOR = flags.DEFINE_enum("estimator", _DEFAULT_TRAIN.estimator, estimators.ESTIMATORS,
                              "Policy gradient estimator.")
SKIP_NONFINITE = flags.DEFINE_bool("skip_nonfinite", _DEFAULT_TRAIN.skip_nonfinite,
                                   "Skip batches with NaN/Inf loss or gradients instead of "
                                   "stopping.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", _DEFAULT.batch_size, "Global training batch size.")
STEPS = flags.DEFINE_integer("steps", None, f"Training steps (default {config_lib.DEFAULT_STEPS} "
                             "unless --epochs is given).")
EPOCHS = flags.DEFINE_integer("epochs", None, "Training epochs (instead of --steps).")
EVAL_EVERY = flags.DEFINE_integer("eval_every", _DEFAULT.eval_every,
                                  "Validation every this many steps.")
LOG_EVERY = flags.DEFINE_integer("log_every", _DEFAULT.log_every,
                                 "Log train metrics every this many steps.")
CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", _DEFAULT.checkpoint_every,
                                        "Checkpoint every this many steps.")
EVAL_POLICY = flags.DEFINE_enum("eval_policy", _DEFAULT.eval_policy, config_lib.EVAL_POLICIES,
                                "Test-time masks: " + modes.help_text(config_lib.EVAL_POLICIES)
                                + "; k = round(tau * blocks) per example and layer.")
# Training recipes (see ccjax.recipes); each sets the TrainConfig field of its name.
WARM_STEPS = flags.DEFINE_integer(
    "warm_steps", _DEFAULT_TRAIN.warm_steps, "Dense warm start: this many first steps run "
    "every block (the policy learns only its regularizers).")
TAU_SCHEDULE = flags.DEFINE_enum(
    "tau_schedule", _DEFAULT_TRAIN.tau_schedule, schedules.TAU_SCHEDULES,
    "Tau curriculum from 1 to --tau after the warm start.")
TAU_SCHEDULE_STEPS = flags.DEFINE_integer("tau_schedule_steps", _DEFAULT_TRAIN.tau_schedule_steps,
                                          "Length of the tau curriculum in steps.")
DISTILL_WEIGHT = flags.DEFINE_float(
    "distill_weight", _DEFAULT_TRAIN.distill_weight, "Weight of the distillation loss "
    "towards the teacher (the same net with every block on, or --distill_from); 0: off.")
DISTILL_TEMPERATURE = flags.DEFINE_float("distill_temperature",
                                         _DEFAULT_TRAIN.distill_temperature,
                                         "Distillation temperature.")
DISTILL_FROM = flags.DEFINE_string("distill_from", None, "Workdir of a finished run used as "
                                   "the distillation teacher (every block on).")
INIT_FROM = flags.DEFINE_string("init_from", None, "Workdir of a finished run of the same shape "
                                "(dense or gated) whose network weights start this run.")
ENTROPY_WEIGHT = flags.DEFINE_float("entropy_weight", _DEFAULT_TRAIN.entropy_weight,
                                    "Weight of the policy-entropy penalty (polarisation).")
ENTROPY_RAMP_STEPS = flags.DEFINE_integer(
    "entropy_ramp_steps", _DEFAULT_TRAIN.entropy_ramp_steps,
    "The entropy weight grows linearly from 0 over this many steps after the warm start.")
BUDGET = flags.DEFINE_enum("budget", _DEFAULT_TRAIN.budget, budget_lib.BUDGETS,
                           "penalty (fixed lambda_s) | lagrange (plus per-layer multipliers "
                           "updated by dual ascent).")
DUAL_LR = flags.DEFINE_float("dual_lr", _DEFAULT_TRAIN.dual_lr, "Dual-ascent step size.")
ADVANTAGE = flags.DEFINE_enum("advantage", _DEFAULT_TRAIN.advantage, estimators.ADVANTAGES,
                              "REINFORCE advantage: raw (c - b) | standardized (per batch).")
VALID_FRACTION = flags.DEFINE_float(
    "valid_fraction", _DEFAULT.valid_fraction, "Fraction of train held out for validation "
    "when the dataset has no validation split, in [0, 1).")
NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", None, "Output classes (default: from the data; for npz, max label + 1 when "
    "that is at most 4x the number of distinct labels), in [2, 100000].")
ALLOW_DATA_CHANGE = flags.DEFINE_bool(
    "allow_data_change", _DEFAULT.allow_data_change, "Resume even if the data differ from "
    "the data the checkpoint was trained on (same shapes, different values).")
NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices to use (default: all).")
MEASURE_LATENCY = flags.DEFINE_bool("measure_latency", _DEFAULT.measure_latency,
                                    "Time batch-1 dense and sparse inference at the end.")
PLOTS = flags.DEFINE_bool("plots", _DEFAULT.plots, "Write plots/*.png at the end.")
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; an existing run is resumed.")
flags.mark_flag_as_required("workdir")

SHARED_FLAGS = (DATASET, DATA_DIR, ARCH, HIDDEN, BLOCK_SIZE, LAMBDA_S, LAMBDA_V, L2, LR, POLICY_LR,
                BASELINE, ESTIMATOR, SKIP_NONFINITE, BATCH_SIZE, STEPS, EPOCHS, EVAL_EVERY,
                LOG_EVERY, CHECKPOINT_EVERY, EVAL_POLICY, VALID_FRACTION, NUM_CLASSES,
                ALLOW_DATA_CHANGE, NUM_DEVICES, MEASURE_LATENCY, PLOTS, WARM_STEPS, TAU_SCHEDULE,
                TAU_SCHEDULE_STEPS, DISTILL_WEIGHT, DISTILL_TEMPERATURE, DISTILL_FROM, INIT_FROM,
                ENTROPY_WEIGHT, ENTROPY_RAMP_STEPS, BUDGET, DUAL_LR, ADVANTAGE)


# The flags that set :class:`ccjax.TrainConfig` fields (all but ``tau``).
TRAIN_FLAGS = (LAMBDA_S, LAMBDA_V, L2, LR, POLICY_LR, BASELINE, ESTIMATOR, SKIP_NONFINITE,
               WARM_STEPS, TAU_SCHEDULE, TAU_SCHEDULE_STEPS, DISTILL_WEIGHT,
               DISTILL_TEMPERATURE, ENTROPY_WEIGHT, ENTROPY_RAMP_STEPS, BUDGET, DUAL_LR,
               ADVANTAGE)

# Methods that close the gated-vs-dense gap (issue 19): a non-linear policy, the
# batch-shaping prior, pretrain-then-gate (warm start + distillation from its snapshot).
POLICY_HIDDEN = flags.DEFINE_integer(
    "policy_hidden", _DEFAULT.policy_hidden, "Hidden ReLU units of every block policy (0: "
    "the linear policy). Sparse inference runs only the linear policy: needs "
    "--measure_latency=false.")
BATCH_SHAPING_WEIGHT = flags.DEFINE_float(
    "batch_shaping_weight", _DEFAULT_TRAIN.batch_shaping_weight, "Weight of the batch-shaping "
    "prior (Bejnordi et al. 2020: each gate's batch CDF towards Beta with mean tau); 0: off.")
BATCH_SHAPING_STEPS = flags.DEFINE_integer(
    "batch_shaping_steps", _DEFAULT_TRAIN.batch_shaping_steps, "The batch-shaping weight "
    "decays linearly to 0 over this many steps after the warm start (0: constant).")
BATCH_SHAPING_CONCENTRATION = flags.DEFINE_float(
    "batch_shaping_concentration", _DEFAULT_TRAIN.batch_shaping_concentration,
    "a + b of the batch-shaping Beta prior (1: U-shaped, the paper's Beta(0.6, 0.4) shape).")
DISTILL_TEACHER = flags.DEFINE_enum(
    "distill_teacher", _DEFAULT_TRAIN.distill_teacher, distill_lib.TEACHERS,
    "Self-distillation teacher: all_on (the live net, every block on) | snapshot "
    "(pretrain-then-gate: the net frozen after --warm_steps dense steps).")
SHARED_FLAGS += (POLICY_HIDDEN, BATCH_SHAPING_WEIGHT, BATCH_SHAPING_STEPS,
                 BATCH_SHAPING_CONCENTRATION, DISTILL_TEACHER)
TRAIN_FLAGS += (BATCH_SHAPING_WEIGHT, BATCH_SHAPING_STEPS, BATCH_SHAPING_CONCENTRATION,
                DISTILL_TEACHER)

# Load balancing for routers and the other top-k estimators (issue 19).
LOAD_BALANCE_WEIGHT = flags.DEFINE_float(
    "load_balance_weight", _DEFAULT_TRAIN.load_balance_weight, "Weight of the Switch-style "
    "load-balancing loss n * sum_j f_j P_j (f_j: block j's share of the masks that ran, P_j: "
    "its share of the mean probability), per gated layer; 0: off.")
SHARED_FLAGS += (LOAD_BALANCE_WEIGHT,)
TRAIN_FLAGS += (LOAD_BALANCE_WEIGHT,)

# Dense-to-sparse (issue 19): co-activation regrouping at the end of the dense warm start,
# policy imitation of the activation oracle, a cheap factorised policy.
POLICY_RANK = flags.DEFINE_integer(
    "policy_rank", _DEFAULT.policy_rank, "Rank r of every factorised linear policy Z = A B "
    "(in * r + r * blocks MACs instead of in * blocks); 0: the full matrix.")
REGROUP_STEP = flags.DEFINE_integer(
    "regroup_step", _DEFAULT.regroup_step, "After this update (within --warm_steps), regroup "
    "every hidden layer's units into blocks of co-active units (MLP condnets, gated and "
    "router LMs); 0: never.")
IMITATION_WEIGHT = flags.DEFINE_float(
    "imitation_weight", _DEFAULT_TRAIN.imitation_weight, "Weight of the policy-imitation "
    "loss: each policy towards its layer's round(tau * blocks) blocks of largest activation "
    "norm, from step 1 (the dense warm start included); 0: off.")
SHARED_FLAGS += (POLICY_RANK, REGROUP_STEP, IMITATION_WEIGHT)
TRAIN_FLAGS += (IMITATION_WEIGHT,)


def train_config_from_flags(**fields) -> step_lib.TrainConfig:
  """The :class:`ccjax.TrainConfig` of :data:`TRAIN_FLAGS`, with ``fields`` on top.

  Raises:
    validation.ConfigError: a value breaks a rule of the config.
  """
  values = {holder.name: holder.value for holder in TRAIN_FLAGS}
  values.update(fields)
  return step_lib.TrainConfig(**values)


def config_from_flags(**fields) -> config_lib.ExperimentConfig:
  """The :class:`ccjax.ExperimentConfig` of the shared flags, with ``fields`` on top.

  Raises:
    validation.ConfigError: a value breaks a rule of the config types.
  """
  values = {holder.name: holder.value for holder in SHARED_FLAGS}
  values.update(fields)
  return config_lib.ExperimentConfig.create(**values)


def experiment_flag_values() -> dict:
  """``{name: value}`` of every flag the running entrypoint defines
  (:func:`experiments.cli.own_flags`: the ``experiments`` modules' and the main module's,
  e.g. ``--model`` and ``--seed`` of ``python -m experiments.condnet``)."""
  return {flag.name: list(flag.value) if isinstance(flag.value, tuple) else flag.value
          for flag in sorted(cli.own_flags(), key=lambda flag: flag.name)}
