r"""Seeds x tau grid of condnets with two dense baselines; writes sweep.csv, sweep.md, pareto.png.

  python -m experiments.sweep --workdir=runs/sweep
  python -m experiments.sweep --workdir=runs/study --recipes=baseline,warm,distill --taus=0.125,0.25
  python -m experiments.sweep --workdir=runs/fair --lrs=0.001,0.003
  python -m experiments.sweep --workdir=runs/capacity --dataset=mnist1d --hidden=128,128 \
      --capacity_widths=256,512,1024,2048
  python -m experiments.sweep --config=mnist1d_capacity --workdir=runs/capacity --seeds=0,1,2,3,4

Runs go through the same code path as ``experiments.condnet`` and take the same flags
(:mod:`experiments.shared_flags`), with ``--taus`` and ``--seeds`` lists instead of ``--tau`` and
``--seed``; one subdirectory per run, resumable. ``--config`` starts from a named config
(:mod:`experiments.named_configs`). Every value is validated before the first run starts
and before anything is written; tables (sweep.md, sweep.csv, sweep.json) report mean ±
sample std over seeds and, per condnet, the per-seed paired differences of its test error
to both dense baselines with a 95 % interval (:mod:`ccjax.sweep`).
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from absl import app
from absl import flags
from absl import logging

from ccjax import data
from ccjax import lock
from ccjax import loop
from ccjax import plots
from ccjax import sweep
from experiments import cli
from experiments import shared_flags as shared
from experiments import named_configs

_SEEDS = shared.define_number_list("seeds", (0, 1, 2), "Comma list of seeds.", int)
DEFAULT_TAUS = (0.125, 0.25, 0.5)
_TAUS = shared.define_number_list("taus", None, "Comma list of target active fractions "
                                  f"(default {','.join(map(str, DEFAULT_TAUS))}; not with "
                                  "--capacity_widths).")
_LRS = shared.define_number_list(
    "lrs", None, "Comma list of learning rates: every configuration (condnets and both dense "
    "baselines) trains at each lr for every seed, in <configuration>/lr<lr>/, and its lr is "
    "chosen on the validation error (mean over seeds); replaces --lr. Default: --lr only.")
_CAPACITY_WIDTHS = shared.define_number_list(
    "capacity_widths", None, "Capacity regime: comma list of condnet widths W; each runs at "
    "tau = w/W, where w is the (single) --hidden width, so every condnet has the active MACs "
    "of dense w; compared with dense w and dense of the widest W. Not with --taus/--recipes.",
    int)
_RECIPES = flags.DEFINE_list(
    "recipes", [], "Recipe study: comma list of recipes (ccjax.recipes.RECIPES, composed with "
    "'+', e.g. baseline,warm,warm+distill); each runs every tau and seed, in "
    "workdir/<recipe>/. Empty: the flags as given.")
flags.FLAGS.set_default("steps", 4000)

# The sweep's list flags set these config fields.
_FLAG_FOR_FIELD = {"tau": "taus", "seed": "seeds"}


def _given(name: str) -> bool:
  """Whether the command line (not a ``--config``) gave flag ``name``."""
  return bool(flags.FLAGS[name].present)


def _grid_flags() -> tuple[tuple[float, ...], tuple[float, ...], tuple[int, ...]]:
  """``(taus, lrs, capacity_widths)`` of the sweep's flags.

  A choice typed on the command line wins over a conflicting one of ``--config``: ``--lr``
  over the config's ``lrs``, ``--taus`` / ``--recipes`` over its ``capacity_widths``; both
  typed is an error (``--lr`` with ``--lrs``) or left to :func:`ccjax.sweep.validate_grid`.

  Raises:
    ValueError: ``--lr`` and ``--lrs`` both on the command line.
  """
  lrs = _LRS.value or ()
  if _given("lr"):
    if _given("lrs"):
      raise ValueError("--lr and --lrs: give one (--lrs trains every configuration at each lr)")
    lrs = ()
  capacity_widths = _CAPACITY_WIDTHS.value or ()
  if not _given("capacity_widths") and (_given("taus") or _given("recipes")):
    capacity_widths = ()
  taus = _TAUS.value or (() if capacity_widths else DEFAULT_TAUS)
  return taus, lrs, capacity_widths


class _Progress:
  """``train_fn`` for :func:`ccjax.sweep.run_sweep` that logs which run starts (the k-th,
  its directory) and, after each, the runs done and their mean time; each run then shows
  its own steps and ETA."""

  def __init__(self, train_fn):
    self.train_fn = train_fn
    self.done = 0
    self.seconds = 0.0

  def __call__(self, config, workdir):
    mean = f", {self.seconds / self.done:.0f}s per run so far" if self.done else ""
    logging.info("sweep: run %d (%d done%s): %s", self.done + 1, self.done, mean, workdir)
    start = time.time()
    results = self.train_fn(config, workdir)
    self.done += 1
    self.seconds += time.time() - start
    return results


def main(argv):
  cli.reject_extra_args(argv)
  loop.quiet_library_logs()
  workdir = shared.WORKDIR.value
  with cli.one_line_errors(_FLAG_FOR_FIELD):
    base = shared.config_from_flags()
    taus, lrs, capacity_widths = _grid_flags()
    configs = sweep.validate_grid(base, seeds=_SEEDS.value, taus=taus, recipes=_RECIPES.value,
                                  lrs=lrs, capacity_widths=capacity_widths)
    dataset = data.load_dataset(base.dataset, data_dir=base.data_dir, seed=0,
                                valid_fraction=base.valid_fraction, num_classes=base.num_classes)
    if len(configs.lrs) > 1 and not dataset.x_valid.shape[0]:
      raise ValueError("--lrs chooses the lr on the validation split, which is empty; give "
                       "--valid_fraction > 0")
    loop.check_workdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    with lock.WorkdirLock(workdir):
      rows = sweep.run_sweep(base, workdir, configs, _Progress(loop.train_and_evaluate),
                             input_dim=dataset.input_dim, num_classes=dataset.num_classes)
  tables = sweep.write_tables(rows, workdir, configs, command=" ".join(
      ["python -m experiments.sweep", *map(shlex.quote, sys.argv[1:])]))
  pareto = plots.plot_pareto(rows, os.path.join(workdir, "pareto.png"))
  logging.info("wrote %s, %s, %s, %s", tables.csv, tables.markdown, tables.json, pareto)
  with open(tables.markdown) as stream:
    print(stream.read())


if __name__ == "__main__":
  app.run(main, flags_parser=named_configs.parse_flags)
