"""scripts/kill_resume.py: SIGKILL at random moments, resume, final state bit-identical."""

from __future__ import annotations

import os
import subprocess
import sys

from tests import experiment_utils


def test_kill_resume_script_reports_identical_trials():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  process = subprocess.run(
      [sys.executable, os.path.join(experiment_utils.REPO_ROOT, "scripts", "kill_resume.py"),
       "--trials=2", "--steps=30", "--verbose"],
      cwd=experiment_utils.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert process.returncode == 0, process.stdout + process.stderr[-2000:]
  lines = process.stdout.strip().splitlines()
  assert lines[-1] == "kill/resume: 2/2 identical", process.stdout
  assert "NOT A RESUME" not in process.stdout
  assert "negative control" in process.stdout and "NOT DETECTED" not in process.stdout
