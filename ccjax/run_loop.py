"""``run_train_steps``: the training loop every task shares.

Steps a train state from a start step to the last one with progress lines, validation,
checksummed checkpoints (:class:`ccjax.checkpoint.Checkpointer`), finite checks and
Ctrl-C handling; the task supplies batches, validation and its progress text
(:class:`StepHooks`). Data order and mask keys are pure functions of seed and step, so a
resumed run ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ccjax import checkpoint as checkpoint_lib
from ccjax import metrics_log as metrics_log_lib
from ccjax import parallel
from ccjax import step as step_lib

# With --skip_nonfinite, a run that skips more than this fraction of its steps fails.
MAX_SKIPPED_FRACTION = 0.1


class NonFiniteError(RuntimeError):
  """Training produced a NaN/Inf loss or gradient."""


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


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during training; the message names the last checkpoint, which is intact."""


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
  """Holds Ctrl-C (SIGINT) back until the block ends, then raises it: a checkpoint save
  is never cut between orbax's files and the checksum file (a step without checksums
  would be a damaged checkpoint). Outside the main thread, a plain block."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
  try:
    yield
  finally:   # None: a handler not installed from Python; restore Python's default
    signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
  if received:
    raise KeyboardInterrupt


def _last_good(last_saved: int | None, checkpoint_dir: str) -> str:
  if last_saved is None:
    return "none (no checkpoint was written yet)"
  return f"step {last_saved} in {checkpoint_dir}, left intact"


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
    after_update: optional ``(state, step) -> state``, called after update ``step``
      (before that step's validation and checkpoint): a deterministic host-side change of
      the state at a given step (e.g. regrouping units, :mod:`ccjax.regroup`), so that a
      resumed run makes it at the same step.
  """
  batch: Callable[[int], dict[str, np.ndarray]]
  validate: Callable[[Any, int], None]
  describe: Callable[[dict[str, Any]], str]
  after_update: Callable[[step_lib.TrainState, int], step_lib.TrainState] | None = None


class Intervals(NamedTuple):
  """Steps between log lines, validations and checkpoints, and the non-finite policy."""
  log_every: int
  eval_every: int
  checkpoint_every: int
  skip_nonfinite: bool


def run_train_steps(train_step: Callable, state: step_lib.TrainState, hooks: StepHooks,
                    intervals: Intervals, *, mesh, checkpointer: checkpoint_lib.Checkpointer,
                    metrics_log: metrics_log_lib.MetricsLog, meta: dict[str, Any], start_step: int,
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
    # Training runs masked dense XLA; the kernel backend serves inference (first line).
    logging.info("compiling the train step for steps %d..%d on %d device(s)", start_step + 1,
                 total_steps, mesh.size)
  pending_finite = []  # (step, device bool) not yet checked on the host.
  window_start, window_steps = time.time(), 0
  step = start_step
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = parallel.shard_batch(hooks.batch(step), mesh)
      state, metrics = train_step(state, batch)
      if hooks.after_update is not None:
        state = hooks.after_update(state, step)
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
        record.update({key: metrics_log_lib.to_python(value)
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
        with deferred_interrupt():
          checkpointer.save(step, state, dict(meta, skipped_nonfinite=skipped))
          last_saved = step
  except KeyboardInterrupt:
    raise Interrupted(f"interrupted at step {step}; last checkpoint: "
                      f"{_last_good(last_saved, checkpoint_dir)}; rerun the same command to "
                      "resume") from None
  return state
