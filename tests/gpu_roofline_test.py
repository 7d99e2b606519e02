"""Tests of ccjax.inference.gpu_roofline: byte and MAC accounting of a gated-MLP call."""

import numpy as np
import pytest

from ccjax.inference import gpu_roofline


def test_sparse_weight_elements_count_what_some_example_uses():
  # input 10, blocks of 2; layer 0 has 3 blocks, layer 1 has 2 blocks; 4 classes.
  first = np.array([[1, 0, 0], [1, 0, 1]])                 # blocks 0 and 2 used
  second = np.array([[0, 1], [1, 1]])
  got = gpu_roofline.sparse_mlp_weight_elements([first, second], 10, 2, 4)
  policy0 = 10 * 3
  blocks0 = 2 * 10 * 2
  policy1 = 2 * 2 * 2                                      # rows of used input blocks 0, 2
  # tiles (i, j) some example uses: ex0 (0,1); ex1 (0,0),(0,1),(2,0),(2,1)
  tiles1 = 4 * 2 * 2
  output = 2 * 2 * 4                                       # both last-layer blocks used
  assert got == policy0 + blocks0 + policy1 + tiles1 + output


def test_all_off_reads_only_the_first_policy():
  masks = [np.zeros((3, 4)), np.zeros((3, 4))]
  assert gpu_roofline.sparse_mlp_weight_elements(masks, 7, 2, 5) == 7 * 4


def test_dense_weight_elements():
  assert gpu_roofline.dense_mlp_weight_elements(784, (4096, 4096), 10) == (
      784 * 4096 + 4096 * 4096 + 4096 * 10)


def test_call_roofline_takes_the_larger_bound():
  bandwidth_bound = gpu_roofline.call_roofline(4e9, 1e6, 2.0, bandwidth=4e12, mac_rate=1e13)
  assert bandwidth_bound["bound_by"] == "bandwidth"
  assert bandwidth_bound["bound_ms"] == pytest.approx(1.0)
  assert bandwidth_bound["fraction_of_bound"] == pytest.approx(0.5)
  assert bandwidth_bound["achieved_gbs"] == pytest.approx(2000.0)
  compute_bound = gpu_roofline.call_roofline(1e3, 1e13, 4.0, bandwidth=4e12, mac_rate=1e16)
  assert compute_bound["bound_by"] == "compute"
  assert compute_bound["bound_ms"] == pytest.approx(1.0)


def test_mlp_call_accounting_averages_the_calls():
  masks_a = [np.ones((1, 2)), np.ones((1, 2))]
  masks_b = [np.zeros((1, 2)), np.zeros((1, 2))]
  entry = gpu_roofline.mlp_call_accounting(
      [masks_a, masks_b], input_dim=4, hidden=(4, 4), block_size=2, num_classes=3,
      itemsize=4, sparse_macs=10.0, dense_macs=40.0, sparse_ms=1.0, dense_ms=2.0,
      bandwidth=1e9, mac_rate=1e9)
  full = gpu_roofline.sparse_mlp_weight_elements(masks_a, 4, 2, 3)
  empty = gpu_roofline.sparse_mlp_weight_elements(masks_b, 4, 2, 3)
  assert entry["sparse"]["bytes"] == 4 * ((full + empty) / 2 + 4 + 3)
  assert entry["dense"]["bytes"] == 4 * (4 * 4 + 4 * 4 + 4 * 3 + 4 + 3)
  assert entry["dense"]["macs"] == 40.0 and entry["sparse"]["macs"] == 10.0


def test_device_rates_are_positive():
  assert gpu_roofline.read_bandwidth(megabytes=2, repeats=2) > 0
  assert gpu_roofline.matmul_rate(size=32, repeats=2) > 0
