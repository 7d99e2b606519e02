r"""Trains a conditional-computation network (or its dense baseline) from flags.

  python -m experiments.condnet --workdir=runs/demo
  python -m experiments.condnet --workdir=runs/mnist --dataset=mnist --hidden=1024,1024 \
      --block_size=64 --tau=0.25

All logic lives in :mod:`ccjax.tasks` (the one driver, task ``classify``); the flags
shared with ``experiments.sweep`` are defined in :mod:`experiments.shared_flags`. Bad
flags or data exit with status 2 and a one-line message; nothing is written.
"""

from __future__ import annotations

from absl import app
from absl import flags

from ccjax import config as config_lib
from ccjax import parallel
from ccjax import progress
from ccjax import tasks
from experiments import cli
from experiments import shared_flags as shared
from experiments import named_configs

_MODEL = flags.DEFINE_enum("model", "condnet", config_lib.MODELS,
                           "condnet (gated) | dense (baseline).")
_TAU = shared.define_number_list(
    "tau", (0.25,), "Target active fraction in (0, 1]: one value or one per gated layer.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of parameters, data order and masks.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-host: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def config_from_flags() -> config_lib.ExperimentConfig:
  """The validated run configuration (``ConfigError`` if a value breaks a rule)."""
  return shared.config_from_flags(model=_MODEL.value, tau=_TAU.value, seed=_SEED.value)


def main(argv):
  cli.reject_extra_args(argv)
  progress.quiet_library_logs()
  with cli.one_line_errors():
    config = config_from_flags()
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    tasks.train_and_evaluate(tasks.TASKS[config.TASK], config, shared.WORKDIR.value,
                             flag_values=shared.experiment_flag_values())


if __name__ == "__main__":
  app.run(main, flags_parser=named_configs.parse_flags)  # --config, then the flags given
