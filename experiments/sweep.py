r"""One sweep for any task: seeds x taus x variants against both dense baselines.

  python -m experiments.sweep --workdir=runs/sweep
  python -m experiments.sweep --workdir=runs/study --recipes=baseline,warm,distill --taus=0.125,0.25
  python -m experiments.sweep --workdir=runs/fair --lrs=0.001,0.003
  python -m experiments.sweep --workdir=runs/capacity --dataset=mnist1d --hidden=128,128 \
      --capacity_widths=256,512,1024,2048
  python -m experiments.sweep --config=mnist1d_capacity --workdir=runs/capacity --seeds=0,1,2,3,4
  python -m experiments.sweep --task=lm --workdir=runs/lm_sweep --seeds=0,1,2
  python -m experiments.sweep --task=lm --workdir=runs/lm_capacity --capacity_widths=512,1024,2048

``--task`` chooses what runs: ``classify`` (default: the flags of ``experiments.condnet``)
or ``lm`` (the flags and defaults of ``experiments.lm``; ``--task=lm`` must be on the
command line, as it decides which flags exist). The sweep takes ``--taus``, ``--seeds``
and ``--variants`` lists instead of one run's ``--tau``, ``--seed`` and ``--model`` (the
LM's ``--tau`` stays: its default ``--taus`` and, in the capacity regime, the active
blocks ``k`` that every width keeps). ``--variants`` are the task's gated variants: the
classifier's ``condnet``; the LM's ``gated`` (REINFORCE, ``--estimator``),
``gated_top_k`` (REINFORCE over exact ``k``-subsets, ``top_k`` at test) and ``router``
(MoE-style top-k router). Every gated configuration is paired with dense of the same
width and dense of the same MACs (:mod:`ccjax.sweep`). ``--config`` starts from a named
config (:mod:`experiments.named_configs`).

Every value is validated before the first run starts and before anything is written;
one subdirectory per run, resumable (a finished run is re-evaluated at its end; one
trained with other settings is refused). Tables (sweep.md, sweep.csv, sweep.json; plus
pareto.png for classifiers) report mean ± sample std over seeds and, per gated row, the
per-seed paired differences of its test metric to both dense baselines with a 95 %
interval.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from absl import app
from absl import flags
from absl import logging

from ccjax import lock
from ccjax import loop
from ccjax import plots
from ccjax import sweep
from ccjax import tasks
from experiments import cli
from experiments import shared_flags as shared
from experiments import named_configs

TASK_NAMES = tuple(tasks.TASKS)


def task_of(argv) -> str:
  """The ``--task`` of a command line (``--task=lm`` or ``--task lm``), default
  ``classify``; read before the flags are defined, since the task decides which exist."""
  for index, argument in enumerate(argv[1:], start=1):
    if argument.startswith("--task="):
      return argument.split("=", 1)[1]
    if argument == "--task" and index + 1 < len(argv):
      return argv[index + 1]
  return "classify"


TASK = task_of(sys.argv)
if TASK == "lm":
  from experiments import lm  # pylint: disable=g-import-not-at-top  (the LM's flags)
else:
  flags.FLAGS.set_default("steps", 4000)
_TASK = flags.DEFINE_enum("task", "classify", TASK_NAMES,
                          "What the sweep trains: classify (experiments.condnet's flags) | lm "
                          "(experiments.lm's flags); give it on the command line.")
_SEEDS = shared.define_number_list("seeds", (0, 1, 2), "Comma list of seeds.", int)
DEFAULT_TAUS = (0.125, 0.25, 0.5)
_TAUS = shared.define_number_list("taus", None, "Comma list of target active fractions "
                                  f"(default {','.join(map(str, DEFAULT_TAUS))}; --task=lm: "
                                  "--tau; not with --capacity_widths).")
_VARIANTS = flags.DEFINE_list(
    "variants", [], "The task's gated variants to run: classify: condnet; lm: gated, "
    "gated_top_k, router. Default: all of the task's. Both dense baselines always run.")
_LRS = shared.define_number_list(
    "lrs", None, "Comma list of learning rates: every configuration (gated nets and both dense "
    "baselines) trains at each lr for every seed, in <configuration>/lr<lr>/, and its lr is "
    "chosen on the validation metric (mean over seeds); replaces --lr. Default: --lr only.")
_CAPACITY_WIDTHS = shared.define_number_list(
    "capacity_widths", None, "Capacity regime: comma list of gated widths W; each runs at "
    "tau = w/W, where w is the active width (classify: the single --hidden width; lm: "
    "round(tau * blocks) * --block_size), so every gated net has the active MACs of dense w; "
    "compared with dense w and dense W. Not with --taus; composes with --recipes.", int)
_RECIPES = flags.DEFINE_list(
    "recipes", [], "Recipe study: comma list of recipes (ccjax.recipes.RECIPES, composed with "
    "'+', e.g. baseline,warm,warm+distill); each runs every variant, tau and seed, in "
    "workdir/<recipe>/. Empty: the flags as given.")

# The sweep's list flags set these config fields.
_FLAG_FOR_FIELD = {"tau": "taus", "seed": "seeds"}


def _given(name: str) -> bool:
  """Whether the command line (not a ``--config``) gave flag ``name``."""
  return bool(flags.FLAGS[name].present)


def _default_taus() -> tuple[float, ...]:
  """The taus of a sweep without ``--taus``: the classifier's three, the LM's ``--tau``."""
  if TASK != "lm":
    return DEFAULT_TAUS
  taus = tuple(flags.FLAGS["tau"].value)
  if len(taus) != 1:
    raise ValueError(f"--tau={','.join(map(str, taus))} is one tau per layer; the sweep runs "
                     "one tau for every layer: give --taus")
  return taus


def _grid_flags() -> tuple[tuple[float, ...], tuple[float, ...], tuple[int, ...]]:
  """``(taus, lrs, capacity_widths)`` of the sweep's flags.

  A choice typed on the command line wins over a conflicting one of ``--config``: ``--lr``
  over the config's ``lrs``, ``--taus`` over its ``capacity_widths``; both
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
  if not _given("capacity_widths") and _given("taus"):
    capacity_widths = ()
  taus = _TAUS.value or (() if capacity_widths else _default_taus())
  return taus, lrs, capacity_widths


def _base_config():
  """The shared configuration of every run, from the task's flags."""
  if TASK != "lm":
    return shared.config_from_flags()
  lm.reject_given((lm.SEED, "is one run's seed; the sweep takes --seeds"),
                  (lm.MODEL, "is one run's model; the sweep takes --variants"),
                  (lm.SAMPLE, "samples from one trained run (experiments.lm)"),
                  (lm.PROMPT, "is the prompt of experiments.lm --sample"))
  return lm.config_from_flags()


def _check_data(base, grid: sweep.Grid) -> None:
  """Loads the data once before any run (a missing or bad dataset is one line, and
  nothing is written); an lr grid chooses on the validation split, which a classifier's
  may lack."""
  run = tasks.task_for(base).setup(base)
  if len(grid.lrs) > 1 and TASK == "classify" and not run.dataset.x_valid.shape[0]:
    raise ValueError("--lrs chooses the lr on the validation split, which is empty; give "
                     "--valid_fraction > 0")


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


def command_line() -> str:
  """The command that reproduces this sweep (this process's arguments, shell-quoted)."""
  return " ".join(["python -m experiments.sweep", *map(shlex.quote, sys.argv[1:])])


def main(argv):
  cli.reject_extra_args(argv)
  loop.quiet_library_logs()
  workdir = shared.WORKDIR.value
  with cli.one_line_errors(_FLAG_FOR_FIELD):
    base = _base_config()
    taus, lrs, capacity_widths = _grid_flags()
    grid = sweep.validate_grid(base, seeds=_SEEDS.value, taus=taus, recipes=_RECIPES.value,
                               lrs=lrs, capacity_widths=capacity_widths,
                               variants=_VARIANTS.value)
    _check_data(base, grid)
    loop.check_workdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    with lock.WorkdirLock(workdir):
      rows = sweep.run_sweep(base, workdir, grid, _Progress(tasks.train))
  spec = sweep.spec_of(base)
  tables = sweep.write_tables(rows, workdir, grid, command=command_line(), spec=spec)
  written = [tables.csv, tables.markdown, tables.json]
  if TASK == "classify":
    written.append(plots.plot_pareto(rows, os.path.join(workdir, "pareto.png")))
  logging.info("wrote %s", ", ".join(map(str, written)))
  with open(tables.markdown) as stream:
    print(stream.read())


if __name__ == "__main__":
  app.run(main, flags_parser=named_configs.parse_flags)
