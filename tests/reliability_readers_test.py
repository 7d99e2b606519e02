"""Readers of a run never harm it, and say what they read (issue 21, items 1, 3, 8-11).

Through the real CLI (``experiments.predict``, ``experiments.condnet``) and
:func:`ccjax.load_run`: an in-progress save survives every reader, a checkpoint newer
than ``results.json`` is refused, a read-only workdir and a huge ``--batch_size`` are
refused before any work, a failed save is one line naming its path and cause, and
metadata that does not fit the parameters is one ``RunError`` line.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys

import pytest

import ccjax
from ccjax import checkpoint as checkpoint_lib
from ccjax import runs
from tests import experiment_utils

TRAIN_FLAGS = ("--hidden=16,16", "--block_size=8", "--batch_size=16", "--steps=8",
               "--log_every=4", "--eval_every=4", "--checkpoint_every=4", "--tau=0.5",
               "--plots=false", "--measure_latency=false")
# What orbax 0.12 names a step directory whose save is in progress.
IN_PROGRESS = "16.orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("readers") / "run")
  process = experiment_utils.run_module("experiments.condnet", f"--workdir={workdir}",
                                        *TRAIN_FLAGS)
  assert process.returncode == 0, process.stderr[-2000:]
  return workdir


def _copy(run: str, tmp_path) -> str:
  target = str(tmp_path / "copy")
  shutil.copytree(run, target)
  return target


def _error_line(process, status=2) -> str:
  """The one ``error:`` line of a failed CLI call (and no traceback)."""
  assert process.returncode == status, process.stderr[-3000:]
  assert "Traceback" not in process.stderr, process.stderr[-3000:]
  errors = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, process.stderr[-3000:]
  return errors[0]


@contextlib.contextmanager
def _immutable(path: str):
  """``chattr +i path`` (not even root may create, delete or rename entries in it)."""
  if shutil.which("chattr") is None or subprocess.run(
      ["chattr", "+i", path], capture_output=True).returncode != 0:
    pytest.skip("chattr +i is not available here")
  try:
    yield
  finally:
    subprocess.run(["chattr", "-i", path], check=True)


@pytest.mark.slow  # uses the trained finished_run fixture (a CLI run); the failed-save check stays fast
def test_readers_leave_a_save_in_progress_alone(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  checkpoints = os.path.join(workdir, "checkpoints")
  in_progress = os.path.join(checkpoints, IN_PROGRESS)
  os.makedirs(os.path.join(in_progress, "state"))
  with open(os.path.join(in_progress, "state", "partial"), "w") as stream:
    stream.write("a writer's unfinished save")
  before = experiment_utils.listing(checkpoints)
  run = ccjax.load_run(workdir)
  assert run.step == 8
  assert experiment_utils.listing(checkpoints) == before
  process = experiment_utils.run_module("experiments.predict", f"--workdir={workdir}",
                                        "--batch_size=64", "--repeats=1", "--json")
  assert process.returncode == 0, process.stderr[-2000:]
  assert json.loads(process.stdout.strip().splitlines()[-1])["checkpoint_step"] == 8
  assert experiment_utils.listing(checkpoints) == before
  # Not one entry of checkpoints/ may be created, removed or renamed by a reader.
  with _immutable(checkpoints):
    assert ccjax.load_run(workdir).step == 8


@pytest.mark.slow  # uses the trained finished_run fixture (a CLI run); the failed-save check stays fast
@pytest.mark.slow  # a resumed CLI run, 12 s
def test_checkpoint_newer_than_results_is_refused(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  with open(os.path.join(workdir, "results.json")) as stream:
    finished_results = stream.read()
  # The same run continued to 12 steps, killed before it wrote its results.json.
  longer = experiment_utils.run_module("experiments.condnet", f"--workdir={workdir}",
                                       *TRAIN_FLAGS, "--steps=16")
  assert longer.returncode == 0, longer.stderr[-2000:]
  with open(os.path.join(workdir, "results.json"), "w") as stream:
    stream.write(finished_results)
  with pytest.raises(runs.RunError, match="describes step 8 but the newest intact checkpoint "
                                          "is step 16"):
    ccjax.load_run(workdir)
  process = experiment_utils.run_module("experiments.predict", f"--workdir={workdir}")
  assert "describes step 8 but the newest intact checkpoint is step 16" in _error_line(process)
  assert not os.path.exists(os.path.join(workdir, "predict.json"))


@pytest.mark.slow  # uses the trained finished_run fixture (a CLI run); the failed-save check stays fast
def test_predict_refuses_an_unwritable_workdir_before_any_work(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  os.makedirs(os.path.join(workdir, "predict.json"))
  process = experiment_utils.run_module("experiments.predict", f"--workdir={workdir}")
  assert "predict.json is a directory" in _error_line(process)
  os.rmdir(os.path.join(workdir, "predict.json"))
  with _immutable(workdir):
    process = experiment_utils.run_module("experiments.predict", f"--workdir={workdir}")
  assert "is not writable by this user" in _error_line(process)
  assert not os.path.exists(os.path.join(workdir, "predict.json"))


@pytest.mark.slow  # uses the trained finished_run fixture (a CLI run); the failed-save check stays fast
def test_predict_caps_batch_size_at_the_test_split(finished_run):
  process = experiment_utils.run_module("experiments.predict", f"--workdir={finished_run}",
                                        "--batch_size=1000000000")
  assert "--batch_size must be in [1, 359]" in _error_line(process)


def _limit_file_size():
  resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))


def test_failed_save_is_one_line_naming_the_path_and_cause(tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=experiment_utils.REPO_ROOT)
  # Files may not grow beyond 20 kB: the first checkpoint's array file cannot be written
  # (EFBIG, "File too large"), like a full disk (ENOSPC).
  process = subprocess.run(
      [sys.executable, "-m", "experiments.condnet", f"--workdir={workdir}", *TRAIN_FLAGS],
      cwd=experiment_utils.REPO_ROOT, env=env, capture_output=True, text=True,
      preexec_fn=_limit_file_size, timeout=300)
  line = _error_line(process)
  assert f"cannot save checkpoint step 4 to {workdir}/checkpoints/4 (File too large)" in line
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def _rewrite_meta(workdir: str, step: int, edit) -> None:
  """Edits the JSON metadata of checkpoint ``step`` and re-signs its checksums."""
  step_dir = os.path.join(workdir, "checkpoints", str(step))
  path = os.path.join(step_dir, "meta", "metadata")
  with open(path) as stream:
    meta = json.load(stream)
  edit(meta)
  with open(path, "w") as stream:
    json.dump(meta, stream)
  with open(os.path.join(step_dir, checkpoint_lib.CHECKSUM_FILE), "w") as stream:
    json.dump(checkpoint_lib.file_checksums(step_dir), stream)


@pytest.mark.parametrize("edit,expected", [
    (lambda meta: meta.pop("architecture"), "no 'architecture'"),
    (lambda meta: meta["config"].update(tau=None), "does not describe a model"),
    (lambda meta: meta["config"].update(hidden=[32, 32]),
     r"does not fit its parameters \(the parameters of checkpoint step 8 do not fit the "
     r"module: hidden_0/dense/bias has shape \[16\], the module expects \[32\]\)"),
    (lambda meta: meta["config"].update(block_size=4),
     r"does not fit its parameters .*policy/logits/bias has shape \[2\], the module "
     r"expects \[4\]"),
])
@pytest.mark.slow  # uses the trained finished_run fixture (a CLI run); the failed-save check stays fast
def test_metadata_that_does_not_fit_is_one_line(finished_run, tmp_path, edit, expected):
  workdir = _copy(finished_run, tmp_path)
  _rewrite_meta(workdir, 8, edit)
  with pytest.raises(runs.RunError, match=expected) as raised:
    ccjax.load_run(workdir)
  assert "\n" not in str(raised.value)
