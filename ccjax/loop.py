"""``train_and_evaluate(config, workdir)``: the one training loop behind every entrypoint.

Writes into ``workdir``: ``metrics.jsonl`` (one JSON object per log step and per eval),
``checkpoints/`` (orbax, atomic), ``plots/*.png`` and, atomically at the end,
``results.json``. Running again on the same workdir resumes from the latest checkpoint
and ends with exactly the result an uninterrupted run gives: data order
(:func:`ccjax.data.train_batch_indices`) and mask keys (``fold_in(rng, step)``) are pure
functions of seed and step, and the checkpoint holds the whole train state.
"""

from __future__ import annotations

import contextlib
import json
import logging as py_logging
import os
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ccjax import atomic
from ccjax import checkpoint as checkpoint_lib
from ccjax import costs
from ccjax import layers
from ccjax import lock as lock_lib
from ccjax import data as data_lib
from ccjax import config as config_lib
from ccjax import parallel
from ccjax import runs
from ccjax import step as step_lib
from ccjax.inference import kernels

EVAL_BATCH_SIZE = 512
METRICS_FILE = "metrics.jsonl"
# With --skip_nonfinite, a run that skips more than this fraction of its steps fails.
MAX_SKIPPED_FRACTION = 0.1


_OWN_PACKAGE_DIRS = (os.path.dirname(os.path.abspath(__file__)),
                     os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "experiments"))


def _keep_log_record(record) -> bool:
  return record.levelno >= py_logging.WARNING or record.pathname.startswith(_OWN_PACKAGE_DIRS)


def quiet_library_logs() -> None:
  """Shows ccjax's own INFO lines (progress) but only warnings from libraries.

  orbax logs every save step and JAX/TFDS their backend and dataset probing at INFO;
  that drowns the progress lines.
  """
  handler = logging.get_absl_handler()
  if _keep_log_record not in handler.filters:
    handler.addFilter(_keep_log_record)


def kernel_backend() -> str:
  """The inference kernel backend this process's runs use (:func:`ccjax.select_backend`),
  for progress lines; an unusable ``$CCJAX_BACKEND`` is described, not raised (whatever
  needs the backend raises it)."""
  try:
    return kernels.select_backend()
  except ValueError as error:
    return f"none ({error})"


def log_run_start(what: str, workdir: str, start_step: int | None) -> str:
  """The first progress line of a run, once its inputs are validated (so that a bad flag,
  dataset or workdir stays a one-line error): what runs, where, from which step, and the
  kernel backend.

  Args:
    what: the run and its data, e.g. ``condnet mlp on digits (1294 train / 144 valid /
      359 test examples)``.
    workdir: the run's directory.
    start_step: the checkpoint step it resumes from (``None``: a fresh run).

  Returns:
    the backend name (:func:`kernel_backend`).
  """
  backend = kernel_backend()
  start = f"resuming from step {start_step}" if start_step else "starting"
  logging.info("%s in %s: %s; kernel backend %s (details: python -m ccjax.info); building "
               "the train state", what, os.path.abspath(workdir), start, backend)
  return backend


def format_error(value: float | None) -> str:
  """An error rate for a progress line: 4 decimals, ``n/a`` without data."""
  return "n/a" if value is None else f"{value:.4f}"


class NonFiniteError(RuntimeError):
  """Training produced a NaN/Inf loss or gradient."""


def _to_python(value):
  array = np.asarray(value)
  if array.ndim == 0:
    return array.item()
  return array.tolist()


class MetricsLog:
  """Append-only ``metrics.jsonl`` that stays consistent across resumes."""

  def __init__(self, path: str, enabled: bool = True):
    self.path = path
    self.enabled = enabled

  def truncate_after(self, step: int) -> None:
    """Drops records past ``step``, torn lines and old ``final`` records (see below)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as stream:
      for line in stream:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        # "final" records are rewritten by every run that reaches the end.
        if record.get("step", 0) <= step and record.get("kind") != "final":
          kept.append(atomic.dumps(record, sort_keys=True))
    with atomic.atomic_open(self.path) as stream:
      stream.write("".join(line + "\n" for line in kept))

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as stream:
      stream.write(atomic.dumps(record, sort_keys=True) + "\n")
      stream.flush()

  def read(self) -> list[dict[str, Any]]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as stream:
      return [json.loads(line) for line in stream if line.strip()]


def check_workdir(workdir: str) -> None:
  """Raises ``ValueError`` if ``workdir`` exists but cannot be read and written."""
  path = os.path.abspath(workdir)
  probe = path
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe):
    raise ValueError(f"--workdir {workdir!r}: {probe} exists and is not a directory")
  if not os.access(probe, os.R_OK | os.W_OK | os.X_OK):
    raise ValueError(f"--workdir {workdir!r}: {probe} is not readable and writable by this user")


def evaluate(eval_fn: Callable, params, x: np.ndarray, y: np.ndarray, *, mode: str,
             key: jax.Array, keep_gates: bool = False) -> dict[str, Any]:
  """Runs ``eval_fn`` over ``(x, y)`` in padded batches and aggregates.

  Returns:
    dict with ``error``, ``loss``, ``active_fraction`` (list per gated layer, mean over
    examples) and, with ``keep_gates``, ``probs``/``mask``: lists per layer of
    ``[examples, blocks]`` arrays, and ``prediction [examples]``.
  """
  if x.shape[0] == 0:  # e.g. --valid_fraction=0 on a dataset without a validation split.
    return {"error": None, "loss": None, "active_fraction": []}
  totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  active, probs, masks, predictions = [], [], [], []
  for index, batch in enumerate(data_lib.eval_batches(x, y, EVAL_BATCH_SIZE)):
    weight = batch.pop("weight")
    valid = weight > 0
    if mode == "sample":
      batch["rng"] = jax.random.fold_in(key, index)
    out = jax.device_get(eval_fn(params, batch))
    totals["loss"] += float(np.sum(out["loss"] * weight))
    totals["correct"] += float(np.sum(out["correct"] * weight))
    totals["count"] += float(np.sum(weight))
    predictions.append(out["prediction"][valid])
    if "active_fraction" in out:
      active.append(out["active_fraction"][:, valid])
      if keep_gates:
        probs.append([p[valid] for p in out["probs"]])
        masks.append([m[valid] for m in out["mask"]])
  result = {"error": 1.0 - totals["correct"] / totals["count"],
            "loss": totals["loss"] / totals["count"],
            "active_fraction": (np.concatenate(active, axis=1).mean(axis=1).tolist()
                                if active else [])}
  if keep_gates:
    result["prediction"] = np.concatenate(predictions)
    result["probs"] = [np.concatenate(layer) for layer in zip(*probs)] if probs else []
    result["mask"] = [np.concatenate(layer) for layer in zip(*masks)] if masks else []
  return result


def _pop_flags(pending: list) -> tuple[list[int], list[bool]]:
  """Empties ``pending`` ``(step, device flag)`` pairs and fetches the flags in one go."""
  steps = [step for step, _ in pending]
  flags = [bool(flag) for flag in jax.device_get([flag for _, flag in pending])]
  pending.clear()
  return steps, flags


def seed_key(seed: int) -> jax.Array:
  """The run's base PRNG key for any seed in ``[0, 2**63)``, without aliasing.

  Seeds below ``2**32`` give ``PRNGKey(seed)`` exactly (their results do not change);
  larger seeds fold their high 32 bits into the key of their low bits, so ``2**32 + s``
  and ``s`` get different keys.
  """
  key = jax.random.PRNGKey(seed & 0xFFFFFFFF)
  if seed >> 32:
    key = jax.random.fold_in(key, seed >> 32)
  return key


@jax.jit
def _all_finite(tree) -> jax.Array:
  """Whether every floating-point leaf of ``tree`` is free of NaN and Inf."""
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  return jnp.all(jnp.asarray(leaves)) if leaves else jnp.asarray(True)


def state_is_finite(state: step_lib.TrainState) -> bool:
  """Whether parameters, optimizer states and baseline are all finite (one host sync)."""
  return bool(_all_finite((state.params, state.opt_state, state.baseline)))


def check_checkpoint_dir(checkpoint_dir: str) -> None:
  """Raises ``ValueError`` if ``checkpoints`` exists in the workdir but is not a directory."""
  if os.path.lexists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
    raise ValueError(f"--workdir {os.path.dirname(checkpoint_dir)}: {checkpoint_dir} exists "
                     "and is not a directory; move it away or use a fresh --workdir")


class _Resume(NamedTuple):
  """Where a run starts: the checkpoint step (``None``: from scratch), its metadata, and the
  damaged newer steps to set aside."""
  step: int | None
  meta: dict[str, Any]
  damaged: list[tuple[int, str]]


def find_resume_point(checkpointer: checkpoint_lib.Checkpointer,
                      check_meta: Callable[[dict[str, Any]], None]) -> _Resume:
  """The newest intact checkpoint, checked to belong to this run.

  Args:
    checkpointer: the run's checkpoints.
    check_meta: raises ``ValueError`` if a checkpoint's metadata belongs to another run.

  Raises:
    checkpoint_lib.CheckpointError: every checkpoint is damaged (names them).
    ValueError: the checkpoint belongs to another configuration or other data.
  """
  intact = checkpointer.latest_intact_step()
  if intact.step is None and intact.damaged:
    described = "; ".join(f"step {step}: {reason}" for step, reason in intact.damaged)
    raise checkpoint_lib.DamagedCheckpointError(
        f"no intact checkpoint in {checkpointer.directory} ({described}); move "
        f"{checkpointer.directory} away to start over, or use a fresh --workdir")
  if intact.step is None:
    return _Resume(None, {}, [])
  meta = checkpointer.read_meta(intact.step)
  check_meta(meta)
  return _Resume(intact.step, meta, intact.damaged)


def restore_resume_point(checkpointer: checkpoint_lib.Checkpointer, resume: _Resume,
                         state: step_lib.TrainState, primary: bool
                         ) -> tuple[step_lib.TrainState, int]:
  """Sets damaged newer checkpoints aside and restores ``resume.step`` into ``state``.

  Returns:
    ``(state, start_step)``; ``state`` unchanged and ``0`` without a checkpoint.
  """
  if resume.damaged and primary:
    for step, reason in resume.damaged:
      logging.warning("checkpoint step %d in %s is damaged (%s); set aside in %s, resuming "
                      "from step %d", step, checkpointer.directory, reason,
                      checkpointer.directory + checkpoint_lib.DAMAGED_SUFFIX, resume.step)
    checkpointer.set_aside(step for step, _ in resume.damaged)
  if resume.step is None:
    return state, 0
  state = checkpointer.restore(state, resume.step)
  logging.info("Resumed from checkpoint step %d in %s", resume.step, checkpointer.directory)
  return state, resume.step


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during training; the message names the last checkpoint, which is intact."""


def _last_good(last_saved: int | None, checkpoint_dir: str) -> str:
  if last_saved is None:
    return "none (no checkpoint was written yet)"
  return f"step {last_saved} in {checkpoint_dir}, left intact"


def train_and_evaluate(config: config_lib.ExperimentConfig, workdir: str,
                       flag_values: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains (or resumes) one run and writes its outputs into ``workdir``.

  The workdir is locked (:class:`ccjax.lock.WorkdirLock`) for the whole run.

  Args:
    config: validated experiment configuration.
    workdir: output directory; an existing checkpoint there is resumed.
    flag_values: every flag value, recorded in ``results.json``.

  Returns:
    the ``results.json`` payload.

  Raises:
    ValueError: bad data, flags, an incompatible or damaged workdir, or a workdir in use
      by another run (nothing written).
    NonFiniteError: NaN/Inf loss or gradient without ``skip_nonfinite``, more than
      :data:`MAX_SKIPPED_FRACTION` of the steps skipped with it, or a non-finite state.
    Interrupted: Ctrl-C (the last checkpoint is intact).
  """
  quiet_library_logs()
  check_workdir(workdir)
  dataset = data_lib.load_dataset(config.dataset, data_dir=config.data_dir,
                                  valid_fraction=config.valid_fraction, seed=config.seed,
                                  num_classes=config.num_classes)
  num_train = dataset.x_train.shape[0]
  if config.batch_size > num_train:
    raise ValueError(f"--batch_size must be in [1, {num_train}] (the training set size), "
                     f"got {config.batch_size}")
  module = config_lib.build_model(config, dataset.input_shape, dataset.num_classes)
  sources = _load_sources(config, module, dataset)
  mesh = parallel.make_mesh(config.num_devices)
  if config.batch_size % mesh.size:
    raise ValueError(f"--batch_size={config.batch_size} must be a multiple of the number of "
                     f"devices ({mesh.size}); see --num_devices")
  workdir = os.path.abspath(workdir)
  check_checkpoint_dir(os.path.join(workdir, runs.CHECKPOINT_DIR))
  # Everything the flags and data decide is valid: from here on the run owns the workdir.
  os.makedirs(workdir, exist_ok=True)
  primary = parallel.is_primary_process()
  with (lock_lib.WorkdirLock(workdir) if primary else contextlib.nullcontext()):
    return _train_locked(config, workdir, dataset, module, mesh, flag_values, primary,
                         sources)


def _train_locked(config, workdir, dataset, module, mesh, flag_values, primary, sources):
  """:func:`train_and_evaluate` once the workdir is locked."""
  start_time = time.time()
  checkpoint_dir = os.path.join(workdir, runs.CHECKPOINT_DIR)
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir)
  try:
    data_fingerprint = data_lib.fingerprint(dataset)
    resume = find_resume_point(checkpointer, lambda meta: config_lib.check_resume_compatible(
        meta, config, dataset.input_shape, dataset.num_classes,
        data_fingerprint=data_fingerprint))
    log_run_start(f"{config.model} {config.arch} on {config.dataset} ("
                  f"{dataset.x_train.shape[0]} train / {dataset.x_valid.shape[0]} valid / "
                  f"{dataset.x_test.shape[0]} test examples)", workdir, resume.step)
    meta = {"architecture": config_lib.architecture_meta(config, dataset.input_shape,
                                                         dataset.num_classes),
            "config": config.as_dict(), "data": data_fingerprint}
    state = step_lib.init_train_state(module, config.train, seed_key(config.seed),
                                      jnp.asarray(dataset.x_train[:1]))
    if sources.init_run is not None:  # a resumed run restores over it below
      state = init_from_run(state, sources.init_run, config.train)
    state = parallel.place_state(state, mesh)
    state, start_step = restore_resume_point(checkpointer, resume, state, primary)
    metrics_log = MetricsLog(os.path.join(workdir, METRICS_FILE), enabled=primary)
    metrics_log.truncate_after(start_step)
    total_steps = config.total_steps(dataset.x_train.shape[0])
    eval_fn = jax.jit(step_lib.make_eval_step(module, config.eval_policy,
                                              eval_capacity(config, module)))
    train_start = time.time()
    state = _train_steps(config, module, mesh, state, dataset, checkpointer, metrics_log, meta,
                         eval_fn, start_step=start_step, total_steps=total_steps,
                         skipped=int(resume.meta.get("skipped_nonfinite", 0)),
                         teacher=_teacher_fn(sources.teacher_run))
    train_time = time.time() - train_start
  finally:
    checkpointer.close()
  if not state_is_finite(state):  # e.g. a checkpoint written before states were checked
    raise NonFiniteError("non-finite parameters or optimizer state at the end of training; "
                         "no results written")
  results = finalize(config, module, state, dataset, workdir, metrics_log, eval_fn,
                     _eval_key(config), total_steps=max(total_steps, start_step),
                     flag_values=flag_values, primary=primary)
  results["wall_time_s"] = time.time() - start_time
  results["trained_steps"] = max(0, total_steps - start_step)
  results["train_time_s"] = train_time
  if not results["trained_steps"]:  # only re-evaluated: keep the time of the real training
    results["train_time_s"] = _previous_train_time(workdir, train_time)
  if primary:
    atomic.write_json(os.path.join(workdir, runs.RESULTS_FILE), results)
  return results


def _eval_key(config) -> jax.Array:
  return jax.random.fold_in(seed_key(config.seed), 2**31 - 1)


def _check_skipped(skipped: int, step: int, total_steps: int, last_saved, checkpoint_dir):
  """Raises :class:`NonFiniteError` once more than the allowed fraction of steps is skipped."""
  if skipped > MAX_SKIPPED_FRACTION * total_steps:
    raise NonFiniteError(
        f"--skip_nonfinite skipped {skipped} non-finite batches by step {step}, more than "
        f"{MAX_SKIPPED_FRACTION:.0%} of the {total_steps} steps; training stopped without "
        f"results. Last good checkpoint: {_last_good(last_saved, checkpoint_dir)}")


class StepHooks(NamedTuple):
  """What :func:`run_train_steps` needs from its task (classification, language models).

  Attributes:
    batch: ``step -> {name: [global_batch, ...] numpy}``, the batch of the 1-based
      ``step``; a pure function of seed and step (exact resume).
    validate: ``(params, step) -> None``: evaluates on the validation split and writes
      the ``eval`` record.
    describe: ``train record -> str``: the metrics part of the progress line; may add
      derived fields to the record before it is written.
  """
  batch: Callable[[int], dict[str, np.ndarray]]
  validate: Callable[[Any, int], None]
  describe: Callable[[dict[str, Any]], str]


class Intervals(NamedTuple):
  """Steps between log lines, validations and checkpoints, and the non-finite policy."""
  log_every: int
  eval_every: int
  checkpoint_every: int
  skip_nonfinite: bool


def run_train_steps(train_step: Callable, state: step_lib.TrainState, hooks: StepHooks,
                    intervals: Intervals, *, mesh, checkpointer: checkpoint_lib.Checkpointer,
                    metrics_log: MetricsLog, meta: dict[str, Any], start_step: int,
                    total_steps: int, skipped: int) -> step_lib.TrainState:
  """Steps ``start_step + 1 .. total_steps`` with logging, validation and checkpoints.

  The loop every task shares: non-finite steps stop the run (or are skipped, up to
  :data:`MAX_SKIPPED_FRACTION`, with ``skip_nonfinite``), a state is checked finite
  before it is saved, and Ctrl-C raises :class:`Interrupted` naming the last intact
  checkpoint.

  Args:
    train_step: the jitted ``(state, batch) -> (state, metrics)`` for ``mesh``
      (:func:`ccjax.parallel.make_parallel_train_step`).
    state: the state after ``start_step`` updates, placed on ``mesh``.
    hooks: the task's batches, validation and progress line.
    intervals: log / eval / checkpoint intervals and ``skip_nonfinite``.
    mesh: the device mesh the batches are sharded over.
    checkpointer: where checkpoints go (``meta`` is saved beside each).
    metrics_log: the run's ``metrics.jsonl``.
    meta: checkpoint metadata (``skipped_nonfinite`` is added).
    start_step: updates already done.
    total_steps: updates in the whole run.
    skipped: non-finite steps skipped before ``start_step``.

  Returns:
    the final train state.
  """
  checkpoint_dir = checkpointer.directory
  last_saved = start_step if start_step else None
  if start_step >= total_steps:
    logging.info("Checkpoint step %d >= %d steps: nothing left to train", start_step, total_steps)
  else:
    logging.info("compiling the train step for steps %d..%d on %d device(s) (kernel backend "
                 "%s)", start_step + 1, total_steps, mesh.size, kernel_backend())
  pending_finite = []  # (step, device bool) not yet checked on the host.
  window_start, window_steps = time.time(), 0
  step = start_step
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = parallel.shard_batch(hooks.batch(step), mesh)
      state, metrics = train_step(state, batch)
      window_steps += 1
      pending_finite.append((step, metrics["finite"]))
      # Step 1 is logged too: a progress line within seconds, whatever the model.
      log_now = step % intervals.log_every == 0 or step == total_steps or step == 1
      eval_now = step % intervals.eval_every == 0 and step != total_steps
      save_now = step % intervals.checkpoint_every == 0 or step == total_steps
      if log_now or eval_now or save_now:
        # One host sync per boundary, not per step; always before anything is saved.
        for checked_step, finite in zip(*_pop_flags(pending_finite)):
          if finite:
            continue
          if not intervals.skip_nonfinite:
            raise NonFiniteError(
                f"non-finite loss or gradient at step {checked_step}; training stopped. Last "
                f"good checkpoint: {_last_good(last_saved, checkpoint_dir)}. Pass "
                "--skip_nonfinite to skip such batches")
          skipped += 1
          logging.warning("step %d: non-finite loss or gradient, batch skipped", checked_step)
          _check_skipped(skipped, checked_step, total_steps, last_saved, checkpoint_dir)
      if log_now:
        elapsed = max(time.time() - window_start, 1e-9)
        steps_per_s = window_steps / elapsed
        record = {"step": step, "kind": "train", "steps_per_s": steps_per_s,
                  "skipped_nonfinite": skipped}
        record.update({key: _to_python(value)
                       for key, value in parallel.to_host(metrics).items()})
        described = hooks.describe(record)
        metrics_log.write(record)
        if step == 1:  # its time is mostly compilation: no rate or ETA yet
          speed = f"first step (compilation included) {elapsed:.1f}s"
        else:
          eta = (total_steps - step) / max(steps_per_s, 1e-9)
          speed = f"{steps_per_s:.1f} steps/s  ETA {eta:.0f}s"
        logging.info("step %d/%d  %s  active %s  %s", step, total_steps, described,
                     np.round(record.get("active_fraction", []), 3).tolist(), speed)
        window_start, window_steps = time.time(), 0
      if eval_now:
        hooks.validate(state.params, step)
      if save_now:
        if not state_is_finite(state):
          raise NonFiniteError(
              f"non-finite parameters or optimizer state at step {step}; not saved, training "
              f"stopped. Last good checkpoint: {_last_good(last_saved, checkpoint_dir)}")
        checkpointer.save(step, state, dict(meta, skipped_nonfinite=skipped))
        last_saved = step
  except KeyboardInterrupt:
    raise Interrupted(f"interrupted at step {step}; last checkpoint: "
                      f"{_last_good(last_saved, checkpoint_dir)}; rerun the same command to "
                      "resume") from None
  return state


def _train_steps(config, module, mesh, state, dataset, checkpointer, metrics_log, meta,
                 eval_fn, *, start_step: int, total_steps: int, skipped: int,
                 teacher: step_lib.Teacher | None = None):
  """:func:`run_train_steps` for a classification run."""
  num_train = dataset.x_train.shape[0]
  train_step = parallel.make_parallel_train_step(
      step_lib.make_train_step(module, config.train, teacher=teacher), mesh,
      parallel.state_sharding(state, mesh))
  eval_key = _eval_key(config)

  def batch(step):
    indices = data_lib.train_batch_indices(num_train, config.batch_size, config.seed, step - 1)
    return {"x": dataset.x_train[indices], "y": dataset.y_train[indices]}

  def validate(params, step):
    valid = evaluate(eval_fn, params, dataset.x_valid, dataset.y_valid,
                     mode=config.eval_policy, key=eval_key)
    metrics_log.write({"step": step, "kind": "eval", "valid_error": valid["error"],
                       "valid_loss": valid["loss"],
                       "valid_active_fraction": valid["active_fraction"]})
    logging.info("step %d  valid error %s  active %s", step, format_error(valid["error"]),
                 np.round(valid["active_fraction"], 3).tolist())

  def describe(record):
    return f"loss {record['loss']:.4f}  error {record['error']:.4f}"

  intervals = Intervals(config.log_every, config.eval_every, config.checkpoint_every,
                        config.train.skip_nonfinite)
  return run_train_steps(train_step, state, StepHooks(batch, validate, describe), intervals,
                         mesh=mesh, checkpointer=checkpointer, metrics_log=metrics_log,
                         meta=meta, start_step=start_step, total_steps=total_steps,
                         skipped=skipped)


def finalize(config, module, state, dataset, workdir, metrics_log, eval_fn, eval_key, *,
             total_steps, flag_values, primary) -> dict[str, Any]:
  """Final evaluation, MAC counts, latency and plots; returns the results payload."""
  params = parallel.to_host(state.params)
  logging.info("final evaluation on %d test and %d validation examples",
               dataset.x_test.shape[0], dataset.x_valid.shape[0])
  test = evaluate(eval_fn, params, dataset.x_test, dataset.y_test, mode=config.eval_policy,
                  key=eval_key, keep_gates=True)
  valid = evaluate(eval_fn, params, dataset.x_valid, dataset.y_valid, mode=config.eval_policy,
                   key=jax.random.fold_in(eval_key, 1))
  metrics_log.write({"step": total_steps, "kind": "final", "valid_error": valid["error"],
                     "test_error": test["error"], "test_active_fraction": test["active_fraction"]})
  logging.info("final: test error %s  valid error %s  active %s", format_error(test["error"]),
               format_error(valid["error"]), np.round(test["active_fraction"], 3).tolist())
  if config.measure_latency:
    logging.info("measuring batch-1 latency, dense vs sparse (kernel backend %s)",
                 kernel_backend())
  model_costs = costs.model_costs(module, params, dataset, test,
                                  measure_latency=config.measure_latency,
                                  mode=config.eval_policy,
                                  top_k=eval_capacity(config, module))
  results = {
      "model": config.model, "arch": config.arch, "dataset": config.dataset,
      "seed": config.seed, "steps": total_steps, "test_error": test["error"],
      "valid_error": valid["error"], "active_fraction": test["active_fraction"],
      "eval_policy": config.eval_policy,
      "flags": dict(flag_values) if flag_values is not None else config.as_dict(),
  }
  results.update(model_costs)
  if primary and config.plots:
    logging.info("writing plots to %s", os.path.join(workdir, "plots"))
    write_plots(os.path.join(workdir, "plots"), test, dataset, metrics_log.read())
  return results


def _previous_train_time(workdir: str, default: float) -> float:
  """``train_time_s`` of the ``results.json`` already in ``workdir`` (else ``default``)."""
  try:
    with open(os.path.join(workdir, runs.RESULTS_FILE)) as stream:
      return float(json.load(stream).get("train_time_s", default))
  except (OSError, ValueError, TypeError):
    return default


def eval_capacity(config: config_lib.ExperimentConfig, module) -> tuple[int, ...] | None:
  """Blocks per example and gated layer of the ``top_k`` test policy (else ``None``)."""
  if config.eval_policy != "top_k" or not getattr(module, "gated", False):
    return None
  return config.top_k_capacities()


class _Sources(NamedTuple):
  """Finished runs a run starts from (``--init_from``) or distils from (``--distill_from``)."""
  init_run: runs.Run | None
  teacher_run: runs.Run | None


def _load_sources(config: config_lib.ExperimentConfig, module, dataset) -> _Sources:
  """Loads and checks ``--init_from`` / ``--distill_from`` before anything is written."""
  init_run = _load_source_run(config.init_from, "init_from", config, dataset)
  teacher_run = _load_source_run(config.distill_from, "distill_from", config, dataset)
  if init_run is not None:
    abstract = jax.eval_shape(lambda: step_lib.init_train_state(
        module, config.train, jax.random.PRNGKey(0), jnp.asarray(dataset.x_train[:1])))
    check_network_shapes(abstract.params, init_run)
  return _Sources(init_run, teacher_run)


def _load_source_run(workdir: str | None, flag: str, config: config_lib.ExperimentConfig,
                     dataset) -> runs.Run | None:
  """The finished run named by ``--init_from`` / ``--distill_from``, checked against the data.

  Raises:
    ValueError: not a finished run, or trained on data of another shape (one line).
  """
  if workdir is None:
    return None
  try:
    run = runs.load_run(workdir)
  except runs.RunError as error:
    raise ValueError(f"--{flag}: {error}") from None
  if (tuple(run.input_shape) != tuple(dataset.input_shape)
      or run.num_classes != dataset.num_classes):
    raise ValueError(
        f"--{flag}={workdir} was trained on examples of shape {list(run.input_shape)} with "
        f"{run.num_classes} classes; this run has {list(dataset.input_shape)} and "
        f"{dataset.num_classes}")
  return run


def init_from_run(state: step_lib.TrainState, run: runs.Run,
                  train_config: step_lib.TrainConfig) -> step_lib.TrainState:
  """``state`` with its network parameters replaced by a finished run's (policies kept).

  The source may be a dense or a gated run; its network part must have exactly the
  shapes of this model's network part.

  Raises:
    ValueError: the shapes differ (one line naming the first mismatch).
  """
  check_network_shapes(state.params, run)

  def merge(ours_tree, theirs_tree):
    if isinstance(ours_tree, dict) or hasattr(ours_tree, "items"):
      return {key: (merge(value, theirs_tree[key]) if key in theirs_tree else value)
              for key, value in ours_tree.items()}
    return jnp.asarray(theirs_tree, jnp.asarray(ours_tree).dtype)

  params = merge(state.params, run.params)
  return state.replace(params=params,
                       opt_state=step_lib.make_optimizer(train_config).init(params))


def check_network_shapes(params, run: runs.Run) -> None:
  """Raises ``ValueError`` (one line) unless ``run``'s network part has the shapes of
  ``params``' network part (arrays or ``ShapeDtypeStruct``)."""
  ours = layers.strip_policy_params(params)
  theirs = layers.strip_policy_params(run.params)
  our_shapes = {jax.tree_util.keystr(path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_flatten_with_path(ours)[0]}
  their_shapes = {jax.tree_util.keystr(path): tuple(np.shape(leaf))
                  for path, leaf in jax.tree_util.tree_flatten_with_path(theirs)[0]}
  if our_shapes != their_shapes:
    mismatch = sorted(set(our_shapes.items()) ^ set(their_shapes.items()))[0][0]
    raise ValueError(
        f"--init_from: the run's network does not have this model's shape (first difference "
        f"at {mismatch}: run {their_shapes.get(mismatch)}, model {our_shapes.get(mismatch)}); "
        "use a run with the same --arch, --hidden and --block_size")


def _teacher_fn(run: runs.Run | None):
  """``x -> logits`` of a distillation teacher run with every block on (``None``: none)."""
  if run is None:
    return None
  module = run.module.clone(gated=False)
  params = jax.tree_util.tree_map(jnp.asarray, layers.strip_policy_params(run.params))
  return lambda x: jax.lax.stop_gradient(module.apply({"params": params}, x, mode="all")[0])


def write_plots(plot_dir: str, test: dict[str, Any], dataset, records) -> list[str]:
  """Activation-probability, class x block and learning-curve figures."""
  from ccjax import plots  # pylint: disable=g-import-not-at-top
  os.makedirs(plot_dir, exist_ok=True)
  paths = [plots.plot_learning_curves(records, os.path.join(plot_dir, "learning_curves.png"))]
  if test.get("probs"):
    paths.append(plots.plot_block_probabilities(
        test["probs"], os.path.join(plot_dir, "block_probabilities.png"),
        labels=dataset.y_test))
    paths.append(plots.plot_class_block_map(
        test["mask"], dataset.y_test, dataset.num_classes,
        os.path.join(plot_dir, "class_block_map.png")))
  return paths
