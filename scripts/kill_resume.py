r"""Kills experiments.condnet with SIGKILL between checkpoints, resumes it, checks bit-identity.

  python scripts/kill_resume.py --trials=10

Each trial starts a tiny digits run in a subprocess and watches its checkpoints: after
the k-th save (k drawn at random, never one of the last three) it waits a random part
of the shortest interval between saves seen (so some kills land inside a save) and
sends SIGKILL. The trial is valid only if the latest intact checkpoint at the kill is after step 0 and before the
final step, i.e. the rerun really resumes. The same command then runs to completion and
its final checkpoint (parameters, optimizer states, baseline, key) is compared bit for
bit with an uninterrupted run's; ``metrics.jsonl`` must hold every logged step once.

A negative control runs too: a copy of the first trial's workdir as the kill left it,
with the optimizer state of its latest checkpoint zeroed, is resumed the same way. The
comparison must call it DIFFERENT, or the script fails (a check that cannot see a lost
optimizer state proves nothing). Prints one summary line, e.g. ``kill/resume: 10/10
identical``; exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # this checkout's ccjax, whatever is installed
from ccjax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

CHECKPOINT_EVERY = 5
LOG_EVERY = 5
RUN_FLAGS = ("--dataset=digits", "--hidden=64,64", "--block_size=16", "--batch_size=32",
             f"--log_every={LOG_EVERY}", "--eval_every=20",
             f"--checkpoint_every={CHECKPOINT_EVERY}", "--measure_latency=false",
             "--plots=false")


def command(workdir: str, steps: int, seed: int) -> list[str]:
  return [sys.executable, "-m", "experiments.condnet", f"--workdir={workdir}",
          f"--steps={steps}", f"--seed={seed}", *RUN_FLAGS]


def _checkpointer(workdir: str, *, read_only: bool) -> checkpoint_lib.Checkpointer:
  return checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=read_only)


def final_state(workdir: str) -> dict:
  checkpointer = _checkpointer(workdir, read_only=True)   # a reader never cleans up or writes
  try:
    return checkpointer.restore_raw()
  finally:
    checkpointer.close()


def latest_intact_step(workdir: str) -> int | None:
  checkpointer = _checkpointer(workdir, read_only=True)
  try:
    return checkpointer.latest_intact_step().step
  finally:
    checkpointer.close()


def saved_steps(workdir: str) -> list[int]:
  """Steps whose save finished (checksum file written), read from the directory listing."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit() and
                os.path.exists(os.path.join(directory, name, checkpoint_lib.CHECKSUM_FILE)))


def states_identical(first: dict, second: dict) -> bool:
  leaves_a, tree_a = jax.tree_util.tree_flatten(first)
  leaves_b, tree_b = jax.tree_util.tree_flatten(second)
  return tree_a == tree_b and all(
      np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves_a, leaves_b))


def metrics_steps_once(workdir: str, steps: int) -> bool:
  with open(os.path.join(workdir, "metrics.jsonl")) as stream:
    records = [json.loads(line) for line in stream]
  train_steps = [r["step"] for r in records if r["kind"] == "train"]
  return train_steps == [1, *range(LOG_EVERY, steps + 1, LOG_EVERY)]  # step 1 is logged too


def kill_after_save(workdir: str, process: subprocess.Popen, saves: int, rng: random.Random,
                    timeout: float = 600) -> str:
  """Waits for the ``saves``-th checkpoint, then a random part of one interval; SIGKILLs.

  Returns:
    what happened, for the notes.
  """
  deadline = time.time() + timeout
  seen, seen_at = 0, time.time()
  interval = None  # the shortest time between two saves seen so far
  while process.poll() is None and time.time() < deadline:
    steps = saved_steps(workdir)  # only the newest two are kept: count by step number
    count = steps[-1] // CHECKPOINT_EVERY if steps else 0
    if count > seen:
      now = time.time()
      if seen:
        latest = (now - seen_at) / (count - seen)
        interval = latest if interval is None else min(interval, latest)
      seen, seen_at = count, now
    if seen >= saves:
      break
    time.sleep(0.005)
  delay = rng.uniform(0.0, 0.9) * (interval or 0.0)
  time.sleep(delay)
  if process.poll() is not None:
    return f"process ended before the kill (after save {seen})"
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  return f"SIGKILL {delay:.2f}s after save {seen}"


def zero_optimizer_state(workdir: str, step: int) -> None:
  """The negative control's damage: the checkpoint at ``step`` with zeroed optimizer state,
  re-saved as a valid checkpoint (new checksums)."""
  checkpointer = _checkpointer(workdir, read_only=False)  # re-saves the damaged step
  try:
    state = checkpointer.restore_raw(step)
    meta = checkpointer.read_meta(step)
    state["opt_state"] = jax.tree_util.tree_map(np.zeros_like, state["opt_state"])
    shutil.rmtree(checkpointer.step_dir(step))
    checkpointer.close()
    checkpointer = _checkpointer(workdir, read_only=False)
    checkpointer.save(step, state, meta)
  finally:
    checkpointer.close()


def resume_and_compare(workdir: str, steps: int, seed: int, reference: dict, env: dict,
                       what: str, at_kill: int | None) -> tuple[bool, str]:
  """Reruns the killed run in ``workdir`` to the end and compares it with ``reference``;
  returns (valid and identical, note)."""
  valid = at_kill is not None and 0 < at_kill < steps
  subprocess.run(command(workdir, steps, seed), check=True, env=env,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
  same = states_identical(reference, final_state(workdir))
  once = metrics_steps_once(workdir, steps)
  note = (f"{what} (latest checkpoint then: {at_kill}{'' if valid else ', NOT A RESUME'}), "
          f"final state {'identical' if same else 'DIFFERENT'}, metrics "
          f"{'each step once' if once else 'BROKEN'}")
  return valid and same and once, note


def run_trial(workdir: str, steps: int, seed: int, reference: dict, saves: int,
              rng: random.Random, env: dict, control_dir: str | None = None
              ) -> tuple[bool, str, str | None]:
  """One kill and resume; returns (valid and identical, note, negative control note).

  With ``control_dir``, the workdir as the kill left it is also copied there, its latest
  checkpoint's optimizer state zeroed, and resumed (the negative control).
  """
  process = subprocess.Popen(command(workdir, steps, seed), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  what = kill_after_save(workdir, process, saves, rng)
  at_kill = latest_intact_step(workdir)
  control_note = None
  if control_dir is not None:
    shutil.copytree(workdir, control_dir)
    if at_kill is not None and 0 < at_kill < steps:
      zero_optimizer_state(control_dir, at_kill)
    _, control_note = resume_and_compare(control_dir, steps, seed, reference, env, what,
                                         at_kill)
  ok, note = resume_and_compare(workdir, steps, seed, reference, env, what, at_kill)
  return ok, note, control_note


def run_trials(trials: int, steps: int, seed: int, root: str, env: dict
               ) -> tuple[int, list[str], bool]:
  """Returns (identical trials, notes, whether the negative control was caught)."""
  reference_dir = os.path.join(root, "reference")
  subprocess.run(command(reference_dir, steps, seed), check=True, env=env,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
  reference = final_state(reference_dir)
  num_saves = steps // CHECKPOINT_EVERY
  rng = random.Random(seed)
  identical, notes, control_note = 0, [], None
  for trial in range(trials):
    # Never among the last three saves: the kill lands before the final step.
    saves = rng.randint(1, max(1, num_saves - 3))
    ok, note, control = run_trial(
        os.path.join(root, f"trial{trial}"), steps, seed, reference, saves, rng, env,
        control_dir=os.path.join(root, "control") if trial == 0 else None)
    control_note = control_note or control
    identical += int(ok)
    notes.append(f"trial {trial}: {note}")
  caught = "final state DIFFERENT" in control_note and "NOT A RESUME" not in control_note
  notes.append(f"negative control (trial 0's kill, optimizer state zeroed at the resume): "
               f"{control_note}{'' if caught else ' -- NOT DETECTED'}")
  return identical, notes, caught


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trials", type=int, default=10)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args()
  if args.trials < 1 or args.steps < 4 * CHECKPOINT_EVERY:
    parser.error(f"--trials must be >= 1 and --steps >= {4 * CHECKPOINT_EVERY}")
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, env.get("PYTHONPATH", "")])
  root = tempfile.mkdtemp(prefix="ccjax-kill-resume-")
  try:
    identical, notes, caught = run_trials(args.trials, args.steps, args.seed, root, env)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  if args.verbose:
    print("\n".join(notes))
  if not caught:
    print("kill/resume: self-check FAILED: a resume with a zeroed optimizer state was not "
          "detected")
  print(f"kill/resume: {identical}/{args.trials} identical")
  return 0 if identical == args.trials and caught else 1


if __name__ == "__main__":
  sys.exit(main())
