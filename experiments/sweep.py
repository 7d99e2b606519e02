r"""Seeds x tau grid of condnets with two dense baselines; writes sweep.csv, sweep.md, pareto.png.

  python -m experiments.sweep --workdir=runs/sweep
  python -m experiments.sweep --workdir=runs/study --recipes=baseline,warm,distill --taus=0.125,0.25

Runs go through the same code path as ``experiments.condnet`` and take the same flags
(:mod:`experiments.flags`), with ``--taus`` and ``--seeds`` lists instead of ``--tau`` and
``--seed``; one subdirectory per run, resumable. Every value is validated before the
first run starts; tables report mean ± std over seeds.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging

from ccjax import data
from ccjax import lock
from ccjax import loop
from ccjax import plots
from ccjax import sweep
from experiments import cli
from experiments import flags as shared

_SEEDS = shared.define_number_list("seeds", (0, 1, 2), "Comma list of seeds.", int)
_TAUS = shared.define_number_list("taus", (0.125, 0.25, 0.5),
                                  "Comma list of target active fractions.")
_RECIPES = flags.DEFINE_list(
    "recipes", [], "Recipe study: comma list of recipes (ccjax.recipes.RECIPES, composed with "
    "'+', e.g. baseline,warm,warm+distill); each runs every tau and seed, in "
    "workdir/<recipe>/. Empty: the flags as given.")
flags.FLAGS.set_default("steps", 4000)

# The sweep's list flags set these config fields.
_FLAG_FOR_FIELD = {"tau": "taus", "seed": "seeds"}


def main(argv):
  cli.reject_extra_args(argv)
  loop.quiet_library_logs()
  workdir = shared.WORKDIR.value
  with cli.one_line_errors(_FLAG_FOR_FIELD):
    base = shared.config_from_flags()
    configs = sweep.validate_grid(base, seeds=_SEEDS.value, taus=_TAUS.value,
                                  recipes=_RECIPES.value)
    dataset = data.load_dataset(base.dataset, data_dir=base.data_dir, seed=0,
                                num_classes=base.num_classes)
    loop.check_workdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    with lock.WorkdirLock(workdir):
      rows = sweep.run_sweep(base, workdir, configs, loop.train_and_evaluate,
                             input_dim=dataset.input_dim, num_classes=dataset.num_classes)
  csv_path, md_path = sweep.write_tables(rows, workdir)
  pareto = plots.plot_pareto(rows, os.path.join(workdir, "pareto.png"))
  logging.info("wrote %s, %s, %s", csv_path, md_path, pareto)
  with open(md_path) as stream:
    print(stream.read())


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
