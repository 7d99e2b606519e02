r"""Trains a conditional-computation network (or its dense baseline) from flags.

  python -m experiments.condnet --workdir=runs/demo
  python -m experiments.condnet --workdir=runs/mnist --dataset=mnist --hidden=1024,1024 \
      --block_size=64 --tau=0.25

All logic lives in :mod:`ccjax.trainer`; this file only parses and validates flags.
Bad flags or data exit with status 2 and a one-line message; nothing is written.
"""

from __future__ import annotations

from absl import app
from absl import flags

from ccjax import experiment
from experiments import cli

_DATASET = flags.DEFINE_string(
    "dataset", "digits", "digits (scikit-learn, offline) | mnist | cifar10 | svhn_cropped "
    "(TFDS, from --data_dir) | npz:PATH (x_train, y_train, x_test, y_test[, x_valid, y_valid]).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; an existing run is resumed.")
_ARCH = flags.DEFINE_string("arch", "mlp", "Network family: mlp | cnn.")
_MODEL = flags.DEFINE_string("model", "condnet", "condnet (gated) | dense (baseline).")
_HIDDEN = flags.DEFINE_string("hidden", "512,512", "Comma list of hidden widths (MLP) or "
                              "channel widths (CNN).")
_BLOCK_SIZE = flags.DEFINE_string("block_size", "32", "Units (or channels) per gated block.")
_TAU = flags.DEFINE_string("tau", "0.25", "Target active fraction: one value or one per layer.")
_LAMBDA_S = flags.DEFINE_string("lambda_s", "2.0", "Weight of the sparsity terms L_b + L_e.")
_LAMBDA_V = flags.DEFINE_string("lambda_v", "0.5", "Weight of the variance term L_v.")
_L2 = flags.DEFINE_string("l2", "1e-5", "L2 weight on all kernels.")
_LR = flags.DEFINE_string("lr", "1e-3", "Network learning rate (Adam).")
_POLICY_LR = flags.DEFINE_string("policy_lr", "1e-3", "Policy learning rate (Adam).")
_BATCH_SIZE = flags.DEFINE_string("batch_size", "64", "Global training batch size.")
_STEPS = flags.DEFINE_string("steps", None, f"Training steps (default {experiment.DEFAULT_STEPS} "
                             "unless --epochs is given).")
_EPOCHS = flags.DEFINE_string("epochs", None, "Training epochs (instead of --steps).")
_EVAL_EVERY = flags.DEFINE_string("eval_every", "500", "Validation every this many steps.")
_LOG_EVERY = flags.DEFINE_string("log_every", "100", "Log train metrics every this many steps.")
_CHECKPOINT_EVERY = flags.DEFINE_string("checkpoint_every", "500",
                                        "Checkpoint every this many steps.")
_SEED = flags.DEFINE_string("seed", "0", "Seed of parameters, data order and masks.")
_BASELINE = flags.DEFINE_string("baseline", "ema", "REINFORCE baseline: none | batch_mean | ema.")
_ESTIMATOR = flags.DEFINE_string("estimator", "reinforce",
                                 "Policy gradient: reinforce | straight_through | gumbel.")
_EVAL_POLICY = flags.DEFINE_string("eval_policy", "threshold",
                                   "Test-time masks: threshold (p > 0.5) | sample.")
_VALID_FRACTION = flags.DEFINE_string(
    "valid_fraction", "0.1", "Fraction of train held out for validation when the dataset "
    "has no validation split, in [0, 1).")
_SKIP_NONFINITE = flags.DEFINE_bool("skip_nonfinite", False,
                                    "Skip batches with NaN/Inf loss or gradients instead of "
                                    "stopping.")
_NUM_DEVICES = flags.DEFINE_string("num_devices", None, "Devices to use (default: all).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-host: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_string("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_string("process_id", None, "Multi-host: this process's index.")
_MEASURE_LATENCY = flags.DEFINE_bool("measure_latency", True,
                                     "Time batch-1 dense and sparse inference at the end.")
_PLOTS = flags.DEFINE_bool("plots", True, "Write plots/*.png at the end.")


def config_from_flags() -> experiment.ExperimentConfig:
  """Parses and validates the flags into an ``ExperimentConfig`` (ValueError if bad)."""
  return experiment.ExperimentConfig(
      dataset=_DATASET.value, data_dir=_DATA_DIR.value, arch=_ARCH.value, model=_MODEL.value,
      hidden=cli.number_list("hidden", _HIDDEN.value, int),
      block_size=cli.number("block_size", _BLOCK_SIZE.value, int),
      tau=cli.number_list("tau", _TAU.value, float),
      lambda_s=cli.number("lambda_s", _LAMBDA_S.value, float),
      lambda_v=cli.number("lambda_v", _LAMBDA_V.value, float),
      l2=cli.number("l2", _L2.value, float), lr=cli.number("lr", _LR.value, float),
      policy_lr=cli.number("policy_lr", _POLICY_LR.value, float),
      batch_size=cli.number("batch_size", _BATCH_SIZE.value, int),
      steps=cli.number("steps", _STEPS.value, int), epochs=cli.number("epochs", _EPOCHS.value, int),
      eval_every=cli.number("eval_every", _EVAL_EVERY.value, int),
      log_every=cli.number("log_every", _LOG_EVERY.value, int),
      checkpoint_every=cli.number("checkpoint_every", _CHECKPOINT_EVERY.value, int),
      seed=cli.number("seed", _SEED.value, int), baseline=_BASELINE.value,
      estimator=_ESTIMATOR.value, eval_policy=_EVAL_POLICY.value,
      valid_fraction=cli.number("valid_fraction", _VALID_FRACTION.value, float),
      skip_nonfinite=_SKIP_NONFINITE.value,
      num_devices=cli.number("num_devices", _NUM_DEVICES.value, int),
      measure_latency=_MEASURE_LATENCY.value, plots=_PLOTS.value)


def main(argv):
  cli.reject_extra_args(argv)
  if not _WORKDIR.value:
    cli.fail("--workdir is required, e.g. --workdir=runs/demo")
  # Imported here so that --help and flag errors stay fast.
  from ccjax import parallel  # pylint: disable=g-import-not-at-top
  from ccjax import trainer  # pylint: disable=g-import-not-at-top
  trainer.quiet_library_logs()
  try:
    parallel.initialize_distributed(
        _COORDINATOR.value, cli.number("num_processes", _NUM_PROCESSES.value, int),
        cli.number("process_id", _PROCESS_ID.value, int))
    config = config_from_flags()
    trainer.train_and_evaluate(config, _WORKDIR.value,
                               flag_values=cli.own_flag_values(globals()))
  except trainer.NonFiniteError as error:
    cli.fail(error, status=1)
  except (ValueError, OSError) as error:
    cli.fail(error)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
