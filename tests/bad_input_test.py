"""The bad-input catalogue: each mistake gives a one-line error, exit 2, nothing written.

Every case runs ``python -m experiments.condnet`` (or the sweep, or bench_inference) as a
user would, then checks: exit status 2, stderr is one line ``error: ...`` naming the flag
or field, and the workdir holds no file it did not hold before. Every catalogue
(flags, npz files, workdir and checkpoint states, sweep and bench inputs) runs in one
subprocess (a forked child per case, ``experiment_utils.run_module_cases``); the
unwritable-workdir case starts its own.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from ccjax import config as config_lib
from ccjax import validation
from tests import experiment_utils
from tests.condnet_test import write_npz

TINY = experiment_utils.TINY_FLAGS


def assert_clean_failure(workdir: str, args, expected: str) -> str:
  before = experiment_utils.listing(workdir)
  process = experiment_utils.run_module("experiments.condnet", f"--workdir={workdir}", *args)
  return check_clean_failure(process, workdir, before, expected)


def check_clean_failure(process, workdir: str, before: set[str], expected: str) -> str:
  """Exit 2, one ``error:`` line holding ``expected``, ``workdir`` as it was (``before``);
  returns the line."""
  lines = [line for line in process.stderr.splitlines() if line.strip()]
  assert process.returncode == 2, process.stderr[-2000:]
  assert len(lines) == 1, process.stderr[-2000:]
  assert lines[0].startswith("error: ")
  assert expected in lines[0], lines[0]
  assert experiment_utils.listing(workdir) == before
  return lines[0]


FLAG_CASES = [
    ("tau_zero", ["--tau=0"], "--tau must be in (0, 1]"),
    ("tau_per_layer_count", ["--tau=0.2,0.3,0.4"], "--tau needs one value or one per gated layer (2)"),
    ("block_size_not_dividing", ["--block_size=7"], "--block_size must divide every hidden width, got 7"),
    ("hidden_empty", ["--hidden="], "--hidden=: must be a comma-separated list"),
    ("hidden_non_numeric", ["--hidden=wide,deep"], "--hidden=wide,deep: must be a comma-separated list of integers"),
    ("lambda_negative", ["--lambda_s=-1"], "--lambda_s must be >= 0"),
    ("lr_negative", ["--lr=-0.1"], "--lr must be > 0"),
    ("batch_size_too_large", ["--batch_size=100000"], "--batch_size must be in [1, "),
    ("unknown_dataset", ["--dataset=imagenet"], "--dataset must be one of digits|mnist"),
    ("unknown_baseline", ["--baseline=median"], "--baseline=median: value should be one of <none|batch_mean|ema>"),
    ("steps_and_epochs", ["--epochs=2"], "--steps and --epochs: give one, not both"),
    ("valid_fraction", ["--valid_fraction=1.0"], "--valid_fraction must be in [0, 1)"),
    ("unknown_flag", ["--learning_rate=3"], "learning_rate"),
    ("lr_inf", ["--lr=inf"], "--lr must be a finite number, got inf"),
    ("seed_too_large", [f"--seed={2**63}"], "--seed must be in [0, 2**63)"),
    ("num_classes_one", ["--num_classes=1"], "--num_classes must be an integer >= 2, got 1"),
    ("num_classes_below_labels", ["--num_classes=5"], "y_train has label 9 but num_classes=5"),
]


def run_condnet_cases(root, args_by_name):
  """``experiments.condnet`` on each ``{name: args}`` in one batch, each with a fresh
  workdir ``root/name/run``; returns ``{name: (process, workdir)}``."""
  workdirs = {name: str(root / name / "run") for name in args_by_name}
  processes = experiment_utils.run_module_cases(
      "experiments.condnet",
      [[f"--workdir={workdirs[name]}", *args] for name, args in args_by_name.items()])
  return {name: (process, workdirs[name]) for name, process in zip(args_by_name, processes)}


@pytest.fixture(scope="module")
def bad_flag_runs(tmp_path_factory):
  return run_condnet_cases(tmp_path_factory.mktemp("flags"),
                           {name: [*TINY, *args] for name, args, _ in FLAG_CASES})


@pytest.mark.parametrize("name,args,expected", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_flags(bad_flag_runs, name, args, expected):
  del args
  process, workdir = bad_flag_runs[name]
  check_clean_failure(process, workdir, set(), expected)


# More values for validators that FLAG_CASES already drive through the CLI (whose wiring,
# one line, exit 2, nothing written, is the same for every field): checked in-process.
CONFIG_CASES = [
    ("tau_above_one", dict(tau=(1.5,)), "--tau must be in (0, 1]"),
    ("lambda_v_negative", dict(lambda_v=-0.5), "--lambda_v must be >= 0"),
    ("policy_lr_zero", dict(policy_lr=0.0), "--policy_lr must be > 0"),
    ("batch_size_zero", dict(batch_size=0), "--batch_size must be a positive integer"),
    ("hidden_negative", dict(hidden=(-32, 32)), "--hidden must be a positive integer, got -32"),
    ("policy_lr_inf", dict(policy_lr=float("inf")), "--policy_lr must be a finite number, got inf"),
    ("l2_inf", dict(l2=float("inf")), "--l2 must be a finite number, got inf"),
    ("lambda_v_inf", dict(lambda_v=float("-inf")), "--lambda_v must be a finite number, got -inf"),
    ("lambda_s_nan", dict(lambda_s=float("nan")), "--lambda_s must be a finite number, got nan"),
    ("seed_beyond_64_bits", dict(seed=2**64 + 3), "--seed must be in [0, 2**63)"),
    ("num_classes_huge", dict(num_classes=1000000), "--num_classes must be in [2, 100000]"),
]


@pytest.mark.parametrize("name,fields,expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_fields(name, fields, expected):
  del name
  with pytest.raises(validation.ConfigError) as error:
    config_lib.ExperimentConfig.create(**fields)
  assert str(error.value).startswith(expected), str(error.value)


def _npz_case(tmp_path, **overrides):
  path = str(tmp_path / "user.npz")
  write_npz(path, **overrides)
  return f"--dataset=npz:{path}"


NPZ_CASES = [
    ("mismatched_lengths", dict(y_train=np.zeros(5, np.int64)), "y_train"),
    ("labels_negative", dict(y_test=-np.ones(30, np.int64)), "y_test"),
    ("labels_non_integer", dict(y_test=np.full(30, 0.5)), "y_test"),
    ("nan_features", dict(x_test=np.full((30, 6), np.nan, np.float32)), "x_test"),
    ("inf_features", dict(x_train=np.full((96, 6), np.inf, np.float32)), "x_train"),
    ("zero_features", dict(x_train=np.zeros((96, 0), np.float32),
                           x_test=np.zeros((30, 0), np.float32)),
     "x_train has shape (96, 0): examples with no features"),
    ("huge_label", dict(y_train=np.r_[np.arange(95) % 3, 10**6]),
     "y_train has label 1000000 but only 4 distinct labels"),
]


@pytest.fixture(scope="module")
def bad_npz_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("npz")
  args_by_name = {}
  for name, overrides, _ in NPZ_CASES:
    (root / name).mkdir()
    args_by_name[name] = [*TINY, _npz_case(root / name, **overrides)]
  return run_condnet_cases(root, args_by_name)


@pytest.mark.parametrize("name,overrides,expected", NPZ_CASES, ids=[c[0] for c in NPZ_CASES])
def test_bad_npz(bad_npz_runs, name, overrides, expected):
  del overrides
  process, workdir = bad_npz_runs[name]
  check_clean_failure(process, workdir, set(), expected)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A finished tiny run on a 6-feature npz; tests copy it before breaking it."""
  root = tmp_path_factory.mktemp("trained")
  path = str(root / "user.npz")
  write_npz(path)
  workdir = str(root / "run")
  process = experiment_utils.run_module(
      "experiments.condnet", f"--workdir={workdir}", f"--dataset=npz:{path}", *TINY,
      "--plots=false")
  assert process.returncode == 0, process.stderr[-2000:]
  return workdir, path


def _copy(trained, tmp_path) -> str:
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir


def _damage_steps(workdir: str, steps=None) -> list[int]:
  """Overwrites the state files of ``steps`` (default: every step); returns the steps."""
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  all_steps = sorted(int(name) for name in os.listdir(checkpoint_dir) if name.isdigit())
  for step in all_steps if steps is None else steps:
    state_files = [f for f in glob.glob(os.path.join(checkpoint_dir, str(step), "state", "**"),
                                        recursive=True) if os.path.isfile(f)]
    assert state_files
    for name in state_files:
      with open(name, "wb") as stream:
        stream.write(b"not a checkpoint")
  return all_steps


@pytest.mark.slow  # two CLI runs; the other resume refusals (architecture, input dimension) stay fast
def test_changed_data_on_resume_is_refused_unless_allowed(tmp_path):
  path = str(tmp_path / "user.npz")
  write_npz(path)
  workdir = str(tmp_path / "run")
  args = [*TINY, "--steps=4", "--plots=false", f"--dataset=npz:{path}"]
  first = experiment_utils.run_module("experiments.condnet", f"--workdir={workdir}", *args)
  assert first.returncode == 0, first.stderr[-2000:]
  write_npz(path, seed=1)  # rewritten in place: same shapes and dtypes, other values
  line = assert_clean_failure(workdir, args, "holds different data than the checkpoint")
  assert "--allow_data_change" in line
  allowed = experiment_utils.run_module("experiments.condnet", f"--workdir={workdir}", *args,
                                        "--allow_data_change")
  assert allowed.returncode == 0, allowed.stderr[-2000:]


SWEEP_CASES = [
    ("duplicate_seeds", ["--seeds=0,0"], "--seeds lists a value twice"),
    ("bad_late_seed", ["--seeds=0,1,-4"], "--seeds must be an integer >= 0, got -4"),
    ("duplicate_taus", ["--taus=0.25,0.25"], "--taus lists a value twice"),
    ("colliding_taus", ["--taus=0.25,0.2500001"], "give the same run directory names"),
    ("bad_late_tau", ["--taus=0.25,0.5,1.5"], "--taus must be in (0, 1], got 1.5"),
    ("huge_label", ["--num_classes=2"], "but num_classes=2"),
]


@pytest.fixture(scope="module")
def bad_sweep_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweeps")
  workdirs = [str(root / name / "sweep") for name, _, _ in SWEEP_CASES]
  processes = experiment_utils.run_module_cases(
      "experiments.sweep", [[f"--workdir={workdir}", *TINY, *args]
                            for workdir, (_, args, _) in zip(workdirs, SWEEP_CASES)])
  return {case[0]: run for case, run in zip(SWEEP_CASES, zip(processes, workdirs))}


@pytest.mark.parametrize("name,args,expected", SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_sweep_validates_everything_before_the_first_run(bad_sweep_runs, name, args,
                                                         expected):
  del args
  process, workdir = bad_sweep_runs[name]
  lines = [line for line in process.stderr.splitlines() if line.strip()]
  assert process.returncode == 2, process.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
  assert not os.path.exists(workdir)


BENCH_CASES = [
    ("example_slack_inf", ["--example_slack=inf"], "--example_slack must be a finite number"),
    ("batch_beyond_memory", ["--batch_sizes=1,1000000000"],
     "needs about 249982.2 GiB, more than the"),
    ("widths_beyond_memory", ["--hidden=131072,131072", "--block_size=64"], "GiB, more than"),
]


@pytest.fixture(scope="module")
def bad_bench_runs():
  processes = experiment_utils.run_module_cases(
      "experiments.bench_inference", [["--models=mlp", *args] for _, args, _ in BENCH_CASES])
  return {case[0]: process for case, process in zip(BENCH_CASES, processes)}


@pytest.mark.parametrize("name,args,expected", BENCH_CASES, ids=[c[0] for c in BENCH_CASES])
def test_bench_inference_refuses_before_allocating(bad_bench_runs, name, args, expected):
  del args
  process = bad_bench_runs[name]
  lines = [line for line in process.stderr.splitlines() if line.strip()]
  assert process.returncode == 2, process.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses file permissions")
def test_workdir_not_writable(tmp_path):
  parent = tmp_path / "locked"
  parent.mkdir()
  parent.chmod(0o500)
  try:
    assert_clean_failure(str(parent / "run"), TINY, "not readable and writable")
  finally:
    parent.chmod(0o700)


# Cases that each need their own files: (name, setup, expected). ``setup(root, trained)``
# makes the case's files under ``root`` (``trained``: ``trained_workdir``) and returns
# ``(workdir, args)``; ``workdir`` None: no --workdir flag.
def _missing_workdir(root, trained):
  del root, trained
  return None, ["--steps=1"]


def _tfds_data_missing(root, trained):
  del trained
  empty = root / "tfds"
  empty.mkdir()
  return str(root / "run"), [*TINY, "--dataset=mnist", f"--data_dir={empty}"]


def _npz_missing_keys(root, trained):
  del trained
  path = str(root / "user.npz")
  np.savez(path, x_train=np.zeros((10, 3), np.float32), y_train=np.zeros(10, np.int64))
  return str(root / "run"), [*TINY, f"--dataset=npz:{path}"]


def _input_dimension_inconsistent(root, trained):
  other = str(root / "wider.npz")
  write_npz(other, num_features=9)
  return _copy(trained[0], root), [*TINY, f"--dataset=npz:{other}"]


def _checkpoint_of_other_architecture(root, trained):
  args = [arg for arg in TINY if not arg.startswith("--hidden")]
  return _copy(trained[0], root), [*args, "--hidden=64,64", f"--dataset=npz:{trained[1]}"]


def _every_checkpoint_damaged(root, trained):
  workdir = _copy(trained[0], root)
  _damage_steps(workdir)
  return workdir, [*TINY, f"--dataset=npz:{trained[1]}"]


def _checkpoints_is_a_regular_file(root, trained):
  del trained
  workdir = root / "run"
  workdir.mkdir()
  (workdir / "checkpoints").write_text("x")
  return str(workdir), TINY


def _workdir_is_a_file(root, trained):
  del trained
  path = root / "file"
  path.write_text("x")
  return str(path), TINY


STATE_CASES = [
    ("missing_workdir", _missing_workdir, "--workdir"),
    ("tfds_data_missing", _tfds_data_missing, "--data_dir"),
    ("npz_missing_keys", _npz_missing_keys, "x_test"),
    ("input_dimension_inconsistent_with_checkpoint", _input_dimension_inconsistent,
     "input dimension 9"),
    ("checkpoint_of_other_architecture", _checkpoint_of_other_architecture,
     "different architecture (hidden"),
    ("every_checkpoint_damaged", _every_checkpoint_damaged, "no intact checkpoint in"),
    ("checkpoints_is_a_regular_file", _checkpoints_is_a_regular_file,
     "checkpoints exists and is not a directory"),
    ("workdir_is_a_file", _workdir_is_a_file, "is not a directory"),
]


@pytest.fixture(scope="module")
def bad_state_runs(tmp_path_factory, trained_workdir):
  """``{name: (process, workdir, listing before)}`` of every STATE_CASES case, one batch."""
  root = tmp_path_factory.mktemp("states")
  cases = {}
  for name, setup, _ in STATE_CASES:
    (root / name).mkdir()
    workdir, args = setup(root / name, trained_workdir)
    cases[name] = (workdir, [] if workdir is None else [f"--workdir={workdir}"], args,
                   experiment_utils.listing(workdir) if workdir else set())
  processes = experiment_utils.run_module_cases(
      "experiments.condnet", [[*flag, *args] for _, flag, args, _ in cases.values()])
  return {name: (process, workdir, before)
          for (name, (workdir, _, _, before)), process in zip(cases.items(), processes)}


@pytest.mark.parametrize("name,expected", [(c[0], c[2]) for c in STATE_CASES],
                         ids=[c[0] for c in STATE_CASES])
def test_bad_workdir_and_checkpoint_states(bad_state_runs, name, expected):
  process, workdir, before = bad_state_runs[name]
  if workdir is None:
    lines = process.stderr.strip().splitlines()
    assert process.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    return
  line = check_clean_failure(process, workdir, before, expected)
  if name == "tfds_data_missing":
    assert "--dataset=digits" in line
  if name == "every_checkpoint_damaged":
    steps = sorted(int(step) for step in os.listdir(os.path.join(workdir, "checkpoints"))
                   if step.isdigit())
    assert steps and all(f"step {step}: file state/" in line for step in steps), line
