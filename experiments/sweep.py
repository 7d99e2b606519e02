r"""Seeds x tau grid of condnets with two dense baselines; writes sweep.csv, sweep.md, pareto.png.

  python -m experiments.sweep --workdir=runs/sweep

Runs go through the same code path as ``experiments.condnet`` (one subdirectory per
run, resumable); tables report mean ± std over seeds.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging

from ccjax import experiment
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory of the sweep.")
_DATASET = flags.DEFINE_string("dataset", "digits", "As in experiments.condnet.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma list of seeds.")
_TAUS = flags.DEFINE_string("taus", "0.125,0.25,0.5", "Comma list of target active fractions.")
_HIDDEN = flags.DEFINE_string("hidden", "512,512", "Hidden widths of every model.")
_BLOCK_SIZE = flags.DEFINE_string("block_size", "32", "Units per gated block.")
_STEPS = flags.DEFINE_string("steps", "4000", "Training steps of every run.")
_BATCH_SIZE = flags.DEFINE_string("batch_size", "64", "Batch size of every run.")
_LAMBDA_S = flags.DEFINE_string("lambda_s", "2.0", "Weight of L_b + L_e.")
_LAMBDA_V = flags.DEFINE_string("lambda_v", "0.5", "Weight of L_v.")
_EVAL_POLICY = flags.DEFINE_string("eval_policy", "threshold", "threshold | sample.")
_MEASURE_LATENCY = flags.DEFINE_bool("measure_latency", True, "Time batch-1 inference.")


def main(argv):
  cli.reject_extra_args(argv)
  if not _WORKDIR.value:
    cli.fail("--workdir is required, e.g. --workdir=runs/sweep")
  from ccjax import data  # pylint: disable=g-import-not-at-top
  from ccjax import plots  # pylint: disable=g-import-not-at-top
  from ccjax import sweep  # pylint: disable=g-import-not-at-top
  from ccjax import trainer  # pylint: disable=g-import-not-at-top
  try:
    seeds = cli.number_list("seeds", _SEEDS.value, int)
    taus = cli.number_list("taus", _TAUS.value, float)
    base = experiment.ExperimentConfig(
        dataset=_DATASET.value, data_dir=_DATA_DIR.value,
        hidden=cli.number_list("hidden", _HIDDEN.value, int),
        block_size=cli.number("block_size", _BLOCK_SIZE.value, int),
        steps=cli.number("steps", _STEPS.value, int),
        batch_size=cli.number("batch_size", _BATCH_SIZE.value, int),
        lambda_s=cli.number("lambda_s", _LAMBDA_S.value, float),
        lambda_v=cli.number("lambda_v", _LAMBDA_V.value, float),
        eval_policy=_EVAL_POLICY.value, measure_latency=_MEASURE_LATENCY.value)
    for tau in taus:
      experiment.ExperimentConfig(tau=(tau,))  # Validates every tau up front.
    dataset = data.load_dataset(base.dataset, data_dir=base.data_dir, seed=0)
    trainer.check_workdir(_WORKDIR.value)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    rows = sweep.run_sweep(base, _WORKDIR.value, seeds, taus, trainer.train_and_evaluate,
                           input_dim=dataset.input_dim, num_classes=dataset.num_classes)
  except (ValueError, OSError) as error:
    cli.fail(error)
  except trainer.NonFiniteError as error:
    cli.fail(error, status=1)
  csv_path, md_path = sweep.write_tables(rows, _WORKDIR.value)
  pareto = plots.plot_pareto(rows, os.path.join(_WORKDIR.value, "pareto.png"))
  logging.info("wrote %s, %s, %s", csv_path, md_path, pareto)
  with open(md_path) as stream:
    print(stream.read())


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
