"""Tests of ccjax.load_run and experiments/predict.py, through the real CLI."""

import json
import os

import numpy as np
import pytest

import ccjax
from tests import experiment_utils

TRAIN_FLAGS = ("--hidden=32,32", "--block_size=8", "--batch_size=32", "--steps=60",
               "--log_every=30", "--eval_every=30", "--checkpoint_every=30", "--tau=0.5",
               "--lambda_s=0.5", "--plots=false")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("predict") / "run")
  process = experiment_utils.run_module("experiments.condnet", f"--workdir={workdir}",
                                        *TRAIN_FLAGS)
  assert process.returncode == 0, process.stderr[-2000:]
  return workdir


def test_load_run_rebuilds_module_params_and_config(finished_run):
  run = ccjax.load_run(finished_run)
  assert isinstance(run.module, ccjax.GatedMLP) and run.module.hidden == (32, 32)
  assert run.config.train.tau == (0.5,) and run.config.steps == 60
  assert run.input_shape == (8, 8, 1) and run.num_classes == 10
  logits, _ = run.module.apply({"params": run.params}, np.zeros((2, 8, 8, 1), np.float32),
                               mode="threshold")
  assert logits.shape == (2, 10)


@pytest.mark.parametrize("batch_size", [1, pytest.param(32, marks=pytest.mark.slow)])
def test_predict_error_equals_results_json(finished_run, batch_size):
  process = experiment_utils.run_module("experiments.predict", f"--workdir={finished_run}",
                                        f"--batch_size={batch_size}", "--repeats=2", "--json")
  assert process.returncode == 0, process.stderr[-2000:]
  report = json.loads(process.stdout.strip().splitlines()[-1])
  with open(os.path.join(finished_run, "results.json")) as stream:
    results = json.load(stream)
  assert report["overflow_rate"] == 0.0
  # Same predictions; the two error formulas may differ in the last ulp.
  assert report["test_error"] == pytest.approx(results["test_error"], abs=1e-12)
  np.testing.assert_allclose(report["active_fraction"], results["active_fraction"])
  assert report["macs_per_example"] == pytest.approx(results["macs_per_example"])
  assert set(report["latency_ms"]) == {"dense", "sparse"}
  assert report["backend"] in ccjax.BACKENDS and report["batch_size"] == batch_size
  with open(os.path.join(finished_run, "predict.json")) as stream:
    assert json.load(stream)["test_error"] == report["test_error"]


def _assert_one_line_exit_2(process, expected):
  lines = [line for line in process.stderr.splitlines() if line.strip()]
  assert process.returncode == 2, process.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_wrong_and_unfinished_workdirs_exit_2(tmp_path, finished_run):
  unfinished = str(tmp_path / "unfinished")
  os.makedirs(unfinished)
  os.symlink(os.path.join(finished_run, "checkpoints"), os.path.join(unfinished, "checkpoints"))
  cases = [([f"--workdir={tmp_path}/nope"], "is not a directory"),
           ([f"--workdir={tmp_path}"], "holds no checkpoints/"),
           ([f"--workdir={unfinished}"], "unfinished run"),
           ([], "--workdir")]
  processes = experiment_utils.run_module_cases("experiments.predict",
                                                [args for args, _ in cases])
  for process, (_, expected) in zip(processes, cases):
    _assert_one_line_exit_2(process, expected)
