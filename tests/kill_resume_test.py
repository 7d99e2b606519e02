"""scripts/kill_resume.py: SIGKILL at random moments, resume, final state bit-identical.

The fast tier runs one trial (a kill, a resume, and the negative control resumed from a
copy of that kill with its optimizer state zeroed): a resume that loses any part of the
state, the data position or the metrics fails it, and the control shows the comparison
sees such a loss. The ``slow`` tier runs three trials at other kill points.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import experiment_utils


def _run_script(trials: int, steps: int) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  process = subprocess.run(
      [sys.executable, os.path.join(experiment_utils.REPO_ROOT, "scripts", "kill_resume.py"),
       f"--trials={trials}", f"--steps={steps}", "--verbose"],
      cwd=experiment_utils.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert process.returncode == 0, process.stdout + process.stderr[-2000:]
  lines = process.stdout.strip().splitlines()
  assert lines[-1] == f"kill/resume: {trials}/{trials} identical", process.stdout
  assert "NOT A RESUME" not in process.stdout
  assert "negative control" in process.stdout and "NOT DETECTED" not in process.stdout
  assert sum(line.startswith("trial ") for line in lines) == trials
  return process.stdout


@pytest.mark.slow  # a kill/resume script run, 30 s; resume_test.py covers resume in the fast tier
def test_kill_resume_script_one_trial_and_negative_control():
  _run_script(trials=1, steps=20)


@pytest.mark.slow
def test_kill_resume_script_reports_identical_trials():
  _run_script(trials=3, steps=30)
