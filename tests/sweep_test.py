"""Tests of experiments/sweep.py and ccjax.sweep."""

from __future__ import annotations

import csv
import os

from ccjax import flops
from ccjax import sweep
from tests import experiment_utils


def test_matched_dense_width_matches_macs():
  target = flops.dense_mlp_macs(64, [96, 96], 10)
  assert sweep.matched_dense_width(64, 2, 10, target, 32) == 96
  assert sweep.matched_dense_width(64, 2, 10, target + 10, 32) == 96


def test_aggregate_reports_mean_and_std_over_seeds():
  runs = [{"test_error": 0.1, "active_fraction": [0.2, 0.4], "macs_per_example": 100.0,
           "latency_ms": {"dense": 2.0, "sparse": 1.0}},
          {"test_error": 0.3, "active_fraction": [0.4, 0.6], "macs_per_example": 300.0,
           "latency_ms": {"dense": 2.0, "sparse": 3.0}}]
  row = sweep.aggregate("x", "condnet", 0.25, (32,), runs)
  assert row["seeds"] == 2
  assert abs(row["test_error_mean"] - 0.2) < 1e-12 and abs(row["test_error_std"] - 0.1) < 1e-12
  assert abs(row["active_fraction_mean"] - 0.4) < 1e-12
  assert row["macs_mean"] == 200.0 and row["latency_ms_mean"] == 2.0


def test_sweep_cli_writes_tables_and_pareto(tmp_path):
  workdir = str(tmp_path / "sweep")
  process = experiment_utils.run_module(
      "experiments.sweep", f"--workdir={workdir}", "--seeds=0,1", "--taus=0.25",
      "--hidden=32,32", "--block_size=8", "--steps=8", "--batch_size=32",
      "--measure_latency=false", timeout=600)
  assert process.returncode == 0, process.stderr[-3000:]
  with open(os.path.join(workdir, "sweep.csv")) as stream:
    rows = list(csv.DictReader(stream))
  labels = [row["label"] for row in rows]
  assert labels[0] == "dense (same width)" and labels[1] == "condnet tau=0.25"
  assert labels[2].startswith("dense (MACs of tau=0.25, width ")
  assert all(row["seeds"] == "2" for row in rows)
  condnet_macs = float(rows[1]["macs_mean"])
  assert condnet_macs < float(rows[0]["macs_mean"])
  # The matched baseline's MACs are the closest a multiple of the block size can get.
  assert abs(float(rows[2]["macs_mean"]) - condnet_macs) <= flops.dense_mlp_macs(64, [8, 8], 10)
  with open(os.path.join(workdir, "sweep.md")) as stream:
    table = stream.read()
  assert "±" in table and "condnet tau=0.25" in table
  assert "condnet tau=0.25" in process.stdout
  with open(os.path.join(workdir, "pareto.png"), "rb") as stream:
    assert stream.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.exists(os.path.join(workdir, "condnet_tau0.25", "seed1", "results.json"))


def test_sweep_bad_flag_is_one_line(tmp_path):
  process = experiment_utils.run_module("experiments.sweep", f"--workdir={tmp_path}/s",
                                        "--taus=0.25,2")
  assert process.returncode == 2
  assert process.stderr.strip().startswith("error: --taus must be in (0, 1]")
  assert not os.path.exists(f"{tmp_path}/s")


def test_sweep_on_npz_and_mocked_tfds(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from ccjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ccjax import loop  # pylint: disable=g-import-not-at-top
  from tests.condnet_test import write_npz  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "data.npz")
  write_npz(path)
  tiny = dict(hidden=(16, 16), block_size=8, batch_size=16, steps=4, log_every=2,
              eval_every=2, checkpoint_every=2, measure_latency=False, plots=False)
  rows = sweep.run_sweep(config_lib.ExperimentConfig.create(dataset=f"npz:{path}", **tiny),
                         str(tmp_path / "npz"), sweep.Grid((0,), (0.5,)), loop.train_and_evaluate,
                         input_dim=6, num_classes=3)
  assert [row["model"] for row in rows] == ["dense", "condnet", "dense"]
  assert all(np.isfinite(row["test_error_mean"]) for row in rows)
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=64):
    rows = sweep.run_sweep(
        config_lib.ExperimentConfig.create(dataset="mnist", data_dir=str(tmp_path / "tfds"), **tiny),
        str(tmp_path / "mnist"), sweep.Grid((0,), (0.5,)), loop.train_and_evaluate, input_dim=784,
        num_classes=10)
  assert rows[1]["macs_mean"] < rows[0]["macs_mean"]
