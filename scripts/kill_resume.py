r"""Kills experiments.condnet with SIGKILL at random moments, resumes it, checks bit-identity.

  python scripts/kill_resume.py --trials=10

Each trial starts a tiny digits run in a subprocess, kills it after a random delay
(checkpoints are written every few steps, so many kills land during a save), reruns the
same command to completion, and compares the final checkpoint's parameters, optimizer
states, baseline and key, bit for bit, with an uninterrupted run's; it also checks that
``metrics.jsonl`` holds every logged step exactly once. Prints one summary line, e.g.
``kill/resume: 10/10 identical``, and exits non-zero if any trial differs.
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

from ccjax import checkpoint as checkpoint_lib

RUN_FLAGS = ("--dataset=digits", "--hidden=64,64", "--block_size=16", "--batch_size=32",
             "--log_every=5", "--eval_every=20", "--checkpoint_every=5",
             "--measure_latency=false", "--plots=false")


def command(workdir: str, steps: int, seed: int) -> list[str]:
  return [sys.executable, "-m", "experiments.condnet", f"--workdir={workdir}",
          f"--steps={steps}", f"--seed={seed}", *RUN_FLAGS]


def final_state(workdir: str) -> dict:
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return checkpointer.restore_raw()
  finally:
    checkpointer.close()


def states_identical(first: dict, second: dict) -> bool:
  leaves_a, tree_a = jax.tree_util.tree_flatten(first)
  leaves_b, tree_b = jax.tree_util.tree_flatten(second)
  return tree_a == tree_b and all(
      np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves_a, leaves_b))


def metrics_steps_once(workdir: str, steps: int, log_every: int = 5) -> bool:
  with open(os.path.join(workdir, "metrics.jsonl")) as stream:
    records = [json.loads(line) for line in stream]
  train_steps = [r["step"] for r in records if r["kind"] == "train"]
  return train_steps == [1, *range(log_every, steps + 1, log_every)]  # step 1 is logged too


def wait_for_training(workdir: str, process: subprocess.Popen, timeout: float = 600) -> float:
  """Blocks until the run has written its first metrics line; returns that time."""
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while not os.path.exists(metrics_path) and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  return time.time()


def run_trials(trials: int, steps: int, seed: int, root: str, env: dict) -> tuple[int, list[str]]:
  """Returns (identical trials, notes)."""
  reference_dir = os.path.join(root, "reference")
  process = subprocess.Popen(command(reference_dir, steps, seed), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  training_started = wait_for_training(reference_dir, process)
  if process.wait(timeout=600) != 0:
    raise RuntimeError("the uninterrupted reference run failed")
  training_time = time.time() - training_started
  reference = final_state(reference_dir)
  rng = random.Random(seed)
  identical, notes = 0, []
  for trial in range(trials):
    workdir = os.path.join(root, f"trial{trial}")
    process = subprocess.Popen(command(workdir, steps, seed), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_training(workdir, process)
    delay = rng.uniform(0.0, 0.9) * training_time
    time.sleep(delay)
    killed = process.poll() is None
    if killed:
      process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    saved = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    at_kill = saved.latest_step()
    saved.close()
    subprocess.run(command(workdir, steps, seed), check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    same = states_identical(reference, final_state(workdir))
    once = metrics_steps_once(workdir, steps)
    identical += int(same and once)
    notes.append(f"trial {trial}: SIGKILL {delay:.2f}s into training "
                 f"({'killed' if killed else 'had already finished'}; latest checkpoint then: "
                 f"{at_kill}), final state {'identical' if same else 'DIFFERENT'}, metrics "
                 f"{'each step once' if once else 'BROKEN'}")
  return identical, notes


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trials", type=int, default=10)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args()
  if args.trials < 1 or args.steps < 5:
    parser.error("--trials must be >= 1 and --steps >= 5")
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")])
  root = tempfile.mkdtemp(prefix="ccjax-kill-resume-")
  try:
    identical, notes = run_trials(args.trials, args.steps, args.seed, root, env)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  if args.verbose:
    print("\n".join(notes))
  print(f"kill/resume: {identical}/{args.trials} identical")
  return 0 if identical == args.trials else 1


if __name__ == "__main__":
  sys.exit(main())
