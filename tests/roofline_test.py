"""Tests of ccjax.inference.roofline: bytes and MACs of dense and sparse calls, bounds."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ccjax import flops
from ccjax.inference import roofline


def test_dense_call_reads_every_weight_once():
  call = roofline.dense_call(784, (4096, 4096, 4096), 10, batch=128)
  dense_macs = 784 * 4096 + 2 * 4096 * 4096 + 4096 * 10
  assert call.macs == 128 * dense_macs
  assert call.weight_bytes == 4 * dense_macs          # 147.2 MB, whatever the batch
  assert round(call.weight_bytes / 1e6, 1) == 147.2


def test_sparse_call_counts_blocks_tiles_policy_rows_and_output_rows():
  """Two layers of 4 blocks of 2 units, input 3, 5 classes, batch 2, by hand."""
  first = np.array([[1, 0, 1, 0], [0, 0, 1, 0]])    # blocks 0 and 2 used
  second = np.array([[0, 1, 0, 0], [0, 1, 0, 1]])   # blocks 1 and 3 used
  call = roofline.sparse_call([first, second], input_dim=3, block_size=2, num_classes=5)
  # policy 3x4 + blocks 2x(3x2) + policy rows 2x(2x4) + tiles {(0,1), (2,1), (2,3)} x 2x2
  # + output rows 2x(2x5)
  assert call.weight_bytes == 4 * (12 + 12 + 16 + 12 + 20)
  np.testing.assert_allclose(call.macs, np.sum(flops.gated_mlp_macs(3, [first, second], 2, 5)))
  all_on = [np.ones((2, 4)), np.ones((2, 4))]
  full = roofline.sparse_call(all_on, 3, 2, 5)
  dense = roofline.dense_call(3, (8, 8), 5, batch=2)
  policies = 4 * (3 * 4 + 8 * 4)                     # policy weights a dense net has not
  assert full.weight_bytes == dense.weight_bytes + policies


def test_bounds_and_report():
  call = roofline.CallCost(macs=2e9, weight_bytes=1e8)
  assert call.bound_ms(10.0) == pytest.approx(10.0)              # 100 MB at 10 GB/s
  assert call.bound_ms(10.0, gmacs=100.0) == pytest.approx(20.0)  # 2 GMAC at 100 GMAC/s
  report = call.report(40.0, 10.0, 100.0)
  assert report["fraction_of_bound"] == pytest.approx(0.5)
  assert report["bound_by"] == "compute"
  assert call.report(40.0, 10.0, 1000.0)["bound_by"] == "bandwidth"
  assert report["achieved_gbs"] == pytest.approx(2.5)
  assert report["weight_mb"] == pytest.approx(100.0)
  with pytest.raises(ValueError, match="positive"):
    call.bound_ms(0.0)
  mean = roofline.mean_call([call, roofline.CallCost(macs=0.0, weight_bytes=3e8)])
  assert (mean.macs, mean.weight_bytes) == (1e9, 2e8)
  with pytest.raises(ValueError, match="at least one"):
    roofline.mean_call([])


def test_measured_rates_are_positive():
  assert roofline.read_bandwidth_gbs(1, megabytes=8, repeats=1) > 0
  assert roofline.device_read_gbs(megabytes=8, repeats=1) > 0
  assert roofline.stream_read_gbs(megabytes=8, repeats=1) > 0
  assert roofline.matmul_gmacs(rows=8, size=64, repeats=1) > 0


@pytest.mark.slow  # the roofline script end to end
def test_cpu_roofline_script_reports_its_accounting():
  """scripts/cpu_roofline.py (the module's accounting against measured rates), small net."""
  repo = pathlib.Path(__file__).resolve().parent.parent
  proc = subprocess.run(
      [sys.executable, str(repo / "scripts" / "cpu_roofline.py"), "--input_dim=16",
       "--hidden=64,64", "--block_size=16", "--tau=0.5", "--batch_sizes=1,3", "--repeats=2", "--bandwidth_mb=8",
       "--matmul_size=256"],
      cwd=repo, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(proc.stdout)
  assert [entry["batch_size"] for entry in report["results"]] == [1, 3]
  for entry in report["results"]:
    dense = roofline.dense_call(16, (64, 64), 10, entry["batch_size"])
    assert entry["dense"]["macs"] == dense.macs
    assert 0 < entry["sparse"]["weight_mb"] <= entry["dense"]["weight_mb"] + 0.1
    assert entry["sparse"]["fraction_of_bound"] > 0
