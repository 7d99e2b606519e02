"""``train_and_evaluate(task, config, workdir)``: the one driver of every task's runs.

Writes into ``workdir``: ``metrics.jsonl`` (one JSON object per log step and per eval),
``checkpoints/`` (orbax, atomic, checksummed), ``plots/*.png`` and, atomically at the
end, ``results.json``. Running again on the same workdir resumes from the newest intact
checkpoint and ends with exactly the result an uninterrupted run gives: batches and mask
keys (``fold_in(rng, step)``) are pure functions of seed and step, and the checkpoint holds
the whole train state.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from absl import logging
import jax

from ccjax import atomic
from ccjax import checkpoint as checkpoint_lib
from ccjax import lock as lock_lib
from ccjax import metrics_log as metrics_log_lib
from ccjax import parallel
from ccjax import progress
from ccjax import resume as resume_lib
from ccjax import run_config
from ccjax import run_loop
from ccjax import step as step_lib
from ccjax import validation
from ccjax.tasks import base


def train_and_evaluate(task: base.Task, config: run_config.RunConfig, workdir: str,
                       flag_values: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains (or resumes) one run of ``task`` and writes its outputs into ``workdir``.

  The workdir is locked (:class:`ccjax.lock.WorkdirLock`) for the whole run.

  Args:
    task: the task (:data:`ccjax.tasks.TASKS`).
    config: its validated config (``task.config_type``).
    workdir: output directory; an existing checkpoint there is resumed.
    flag_values: every flag value, recorded in ``results.json`` (default: the config).

  Returns:
    the ``results.json`` payload.

  Raises:
    ValueError: bad data or flags, an incompatible or damaged workdir, or a workdir in use
      by another run (nothing written).
    ccjax.run_loop.NonFiniteError: NaN/Inf loss or gradient without ``skip_nonfinite``,
      more than :data:`ccjax.run_loop.MAX_SKIPPED_FRACTION` of the steps skipped with it,
      or a non-finite state.
    ccjax.run_loop.Interrupted: Ctrl-C (the last checkpoint is intact).
  """
  if not isinstance(config, task.config_type):
    raise TypeError(f"task {task.name!r} takes a {task.config_type.__name__}, got "
                    f"{type(config).__name__}")
  start_time = time.time()
  progress.quiet_library_logs()
  resume_lib.check_workdir(workdir)
  run = task.setup(config)
  mesh = parallel.make_mesh(config.num_devices)
  if config.batch_size % mesh.size:
    raise validation.ConfigError("batch_size", f"={config.batch_size} must be a multiple of "
                                 f"the number of devices ({mesh.size}); see --num_devices")
  workdir = os.path.abspath(workdir)
  resume_lib.check_checkpoint_dir(os.path.join(workdir, resume_lib.CHECKPOINT_DIR))
  # Everything the flags and data decide is valid: from here on the run owns the workdir.
  os.makedirs(workdir, exist_ok=True)
  primary = parallel.is_primary_process()
  with (lock_lib.WorkdirLock(workdir) if primary else contextlib.nullcontext()):
    return _train_locked(task, config, run, workdir, mesh, flag_values, primary, start_time)


def _train_locked(task, config, run, workdir, mesh, flag_values, primary, start_time):
  """:func:`train_and_evaluate` once the workdir is locked."""
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, resume_lib.CHECKPOINT_DIR))
  meta = resume_lib.checkpoint_meta(task.name, run.architecture, config, run.data_fingerprint)
  try:
    resume = resume_lib.find_resume_point(checkpointer, meta, config)
    progress.log_run_start(run.description, workdir, resume.step, run.family)
    state = parallel.place_state(run.init_state(run_loop.seed_key(config.seed)), mesh)
    state, start_step = resume_lib.restore_resume_point(checkpointer, resume, state, primary)
    metrics_log = metrics_log_lib.MetricsLog(
        os.path.join(workdir, metrics_log_lib.METRICS_FILE), enabled=primary)
    metrics_log.truncate_after(start_step)
    # One compiled evaluation for validation during training and the final test.
    eval_fn = jax.jit(step_lib.make_eval_step(run.module, config.eval_mode(),
                                              config.eval_capacity()))
    train_step = parallel.make_parallel_train_step(run.make_train_step(), mesh,
                                                   parallel.state_sharding(state, mesh))

    def validate(params, step):
      fields, line = run.validate(eval_fn, params, step)
      metrics_log.write({"step": step, "kind": "eval", **fields})
      logging.info("step %d  %s", step, line)

    hooks = run_loop.StepHooks(run.batch, validate, run.describe,
                               getattr(run, "after_update", None))
    intervals = run_loop.Intervals(config.log_every, config.eval_every,
                                   config.checkpoint_every, config.train.skip_nonfinite)
    train_start = time.time()
    state = run_loop.run_train_steps(
        train_step, state, hooks, intervals, mesh=mesh, checkpointer=checkpointer,
        metrics_log=metrics_log, meta=meta, start_step=start_step,
        total_steps=run.total_steps, skipped=int(resume.meta.get("skipped_nonfinite", 0)))
    train_time = time.time() - train_start
  finally:
    checkpointer.close()
  if not run_loop.state_is_finite(state):  # e.g. a checkpoint written before states were checked
    raise run_loop.NonFiniteError("non-finite parameters or optimizer state at the end of "
                                  "training; no results written")
  results = {"task": task.name}
  results.update(run.finalize(eval_fn, parallel.to_host(state.params), workdir=workdir,
                              metrics_log=metrics_log,
                              total_steps=max(run.total_steps, start_step), primary=primary))
  results["flags"] = dict(flag_values) if flag_values is not None else config.as_dict()
  results["wall_time_s"] = time.time() - start_time
  results["trained_steps"] = max(0, run.total_steps - start_step)
  results["train_time_s"] = train_time
  if not results["trained_steps"]:  # only re-evaluated: keep the time of the real training
    results["train_time_s"] = _previous_train_time(workdir, train_time)
  if primary:
    atomic.write_json(os.path.join(workdir, resume_lib.RESULTS_FILE), results)
  return results


def _previous_train_time(workdir: str, default: float) -> float:
  """``train_time_s`` of the ``results.json`` already in ``workdir`` (else ``default``)."""
  try:
    with open(os.path.join(workdir, resume_lib.RESULTS_FILE)) as stream:
      return float(json.load(stream).get("train_time_s", default))
  except (OSError, ValueError, TypeError):
    return default
