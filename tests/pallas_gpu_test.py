"""Tests of the pallas-gpu backend: ccjax.inference.kernels.pallas_gpu (the Triton grouped
matmul of the minibatch path) and ccjax.inference.kernels.pallas_gpu_gemv (the fused
batch-1 path: gather GEMV and block selection), alone and inside the sparse MLP.

Numerics run the real kernels on a GPU host and the Pallas interpreter elsewhere, against
numpy, the XLA path and masked dense. The CUDA lowering tests lower the real kernels (not
interpret mode) for ``cuda`` on any host and check the Triton modules they carry: grid,
loop structure, precision, and the shape of every load (at most one tile).
"""

import contextlib
import functools
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib.mlir import ir
from jaxlib.triton import dialect as triton_dialect

import ccjax
from ccjax import lm_decode
from ccjax.inference import batch1
from ccjax.inference import capacity
from ccjax.inference import kernels
from ccjax.inference import layout
from ccjax.inference import mlp
from ccjax.inference.kernels import pallas_gpu
from ccjax.inference.kernels import pallas_gpu_gemv
from ccjax.inference.kernels import xla
from tests import inference_mlp_test as mlp_cases
from tests import tiers

ON_GPU = jax.default_backend() == "gpu"
pytestmark = pytest.mark.usefixtures("full_float32_matmuls")


def _kernel(x, weights, index, sizes):
  """The kernel on unpadded weights: real on a GPU, interpreted elsewhere."""
  return pallas_gpu.grouped_matmul(x, pallas_gpu.pad_weight_tiles(weights), index, sizes,
                                   width=weights.shape[2], interpret=not ON_GPU)


def _zero_rows_past(x, sizes):
  return jnp.where(jnp.arange(x.shape[1])[None, :, None] < sizes[:, None, None], x, 0)


def _xla_reference(x, weights, index, sizes):
  return xla.grouped_matmul_xla(_zero_rows_past(x, sizes), weights, index)


def _case(seed, groups, rows, depth, width, num_weights, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(keys[0], (groups, rows, depth), dtype)
  weights = jax.random.normal(keys[1], (num_weights, depth, width), dtype)
  index = jax.random.randint(keys[2], (groups,), 0, num_weights)
  sizes = jax.random.randint(keys[3], (groups,), 0, rows + 1)
  return x, weights, index, sizes


@pytest.mark.parametrize("groups,rows,depth,width,num_weights", [
    (6, 3, 16, 16, 4),      # block size 16, odd rows
    (5, 13, 32, 32, 9),     # block size 32
    (4, 65, 64, 64, 3),     # block size 64, rows cross a row tile
    (3, 7, 128, 128, 5),    # block size 128: two column tiles, four K steps
    (4, 5, 100, 64, 4),     # first layer shape: k not a tile multiple
    (5, 9, 64, 10, 6),      # output layer shape: n = 10 classes
])
def test_matches_xla_on_ragged_groups(groups, rows, depth, width, num_weights):
  x, weights, index, sizes = _case(groups * rows, groups, rows, depth, width, num_weights)
  sizes = sizes.at[0].set(rows).at[1].set(0)            # one full and one empty group
  got = _kernel(x, weights, index, sizes)
  np.testing.assert_allclose(got, _xla_reference(x, weights, index, sizes),
                             atol=1e-5, rtol=1e-5)


def test_repeated_first_and_last_blocks():
  x, weights, _, _ = _case(1, 6, 11, 64, 64, 7)
  index = jnp.array([0, 6, 6, 0, 6, 3], jnp.int32)
  sizes = jnp.full((6,), 11, jnp.int32)
  got = _kernel(x, weights, index, sizes)
  expected = np.einsum("grk,gkn->grn", np.asarray(x, np.float64),
                       np.asarray(weights, np.float64)[np.asarray(index)])
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got, _xla_reference(x, weights, index, sizes),
                             atol=1e-5, rtol=1e-5)


def test_defaults_are_identity_index_and_full_groups():
  x, weights, _, _ = _case(2, 3, 5, 32, 16, 3)
  got = pallas_gpu.grouped_matmul(x, pallas_gpu.pad_weight_tiles(weights), width=16,
                                  interpret=not ON_GPU)
  np.testing.assert_allclose(got, xla.grouped_matmul_xla(x, weights),
                             atol=1e-5, rtol=1e-5)


def test_reads_only_selected_blocks_and_rows_in_use():
  """NaN in unselected blocks, in rows past a group's size and in the block of an empty
  group: the output has none, so none of them was read or multiplied."""
  x, weights, _, _ = _case(3, 4, 6, 32, 32, 5)
  index = jnp.array([1, 3, 4, 1], jnp.int32)
  sizes = jnp.array([6, 2, 0, 3], jnp.int32)
  poisoned_weights = weights.at[jnp.array([0, 2, 4])].set(jnp.nan)   # 4: empty group's
  poisoned_x = jnp.where(jnp.arange(6)[None, :, None] < sizes[:, None, None], x, jnp.nan)
  got = _kernel(poisoned_x, poisoned_weights, index, sizes)
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(got, _xla_reference(x, weights, index, sizes),
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(got[2], 0.0)


def test_bfloat16_accumulates_in_float32():
  x, weights, index, sizes = _case(4, 5, 9, 128, 64, 4, jnp.bfloat16)
  got = _kernel(x, weights, index, sizes)
  assert got.dtype == jnp.bfloat16
  expected = _xla_reference(x.astype(jnp.float32), weights.astype(jnp.float32), index, sizes)
  np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=0.1, rtol=2e-2)


def test_pad_weight_tiles_pads_once_with_zeros():
  weights = jnp.ones((3, 100, 10), jnp.float32)
  tiles = pallas_gpu.pad_weight_tiles(weights)
  assert tiles.shape == (3, *pallas_gpu.padded_weight_shape(100, 10, jnp.float32)) == (3, 128, 16)
  np.testing.assert_array_equal(tiles[:, :100, :10], weights)
  assert float(jnp.abs(tiles).sum()) == 3 * 100 * 10
  aligned = jnp.ones((2, 64, 64), jnp.float32)
  assert pallas_gpu.pad_weight_tiles(aligned) is aligned


def test_tile_shape_fits_triton_dot():
  for rows, depth, width, dtype in [(1, 16, 16, jnp.float32), (200, 784, 4096, jnp.float32),
                                    (3, 10, 10, jnp.bfloat16), (128, 4096, 10, jnp.bfloat16)]:
    tiles = pallas_gpu.tile_shape(rows, depth, width, dtype)
    for side in tiles:
      assert side >= pallas_gpu.MIN_TILE and side & (side - 1) == 0
    stage_bytes = (tiles.rows * tiles.depth + tiles.depth * tiles.cols) * jnp.dtype(dtype).itemsize
    assert stage_bytes * pallas_gpu.NUM_STAGES <= 64 * 1024


def test_rejects_unpadded_or_mismatched_weights():
  x = jnp.zeros((2, 3, 100), jnp.float32)
  with pytest.raises(ValueError, match="pad_weight_tiles"):
    pallas_gpu.grouped_matmul(x, jnp.zeros((2, 100, 10), jnp.float32), width=10)
  with pytest.raises(ValueError, match="bfloat16"):
    pallas_gpu.grouped_matmul(x, jnp.zeros((2, 128, 16), jnp.bfloat16), width=10)
  with pytest.raises(ValueError, match="one entry per group"):
    pallas_gpu.grouped_matmul(x, jnp.zeros((2, 128, 16), jnp.float32), jnp.zeros((3,), jnp.int32),
                              width=10)


# ------------------------------------------------------------------ batch-1 gather GEMV


def _gemv(*args, **kwargs):
  return pallas_gpu_gemv.gather_gemv(*args, interpret=not ON_GPU, **kwargs)


def _gemv_reference(h_parts, in_index, in_count, out_index, out_count, weights, in_bias,
                    in_stride, in_relu):
  """The documented product in float64 numpy."""
  h = np.asarray(h_parts, np.float64).sum(axis=0)
  in_index, out_index = np.asarray(in_index), np.asarray(out_index)
  if in_bias is not None:
    h = h + np.asarray(in_bias, np.float64)[in_index]
  if in_relu:
    h = np.maximum(h, 0.0)
  weights = np.asarray(weights, np.float64)
  out = np.zeros((out_index.shape[0], weights.shape[2]))
  for o in range(int(out_count[0])):
    for s in range(int(in_count[0])):
      block = np.clip(out_index[o] * in_stride + in_index[s], 0, weights.shape[0] - 1)
      out[o] += h[s] @ weights[block]
  return out


def _gemv_case(seed, h_splits, in_slots, depth, width, out_slots, in_blocks, out_blocks,
               dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(h_splits, in_slots, depth)), dtype)
  weights = jnp.asarray(rng.normal(size=(out_blocks * in_blocks, depth, width)), dtype)
  bias = jnp.asarray(rng.normal(size=(in_blocks, depth)), dtype)
  in_index = jnp.asarray(rng.permutation(in_blocks)[:in_slots], jnp.int32)
  out_index = jnp.asarray(rng.permutation(out_blocks)[:out_slots], jnp.int32)
  return h, weights, bias, in_index, out_index


GEMV_SHAPES = [
    (1, 1, 100, 16, 4, 1, 3),       # dense first layer: depth not a tile multiple
    (3, 5, 16, 16, 6, 5, 6),        # block size 16, all slots active
    (4, 6, 32, 10, 5, 2, 5),        # ragged input count, 10 columns (output layer shape)
    (2, 4, 64, 128, 3, 3, 1),       # block size 64, two column tiles, one output slot
    (5, 3, 24, 40, 4, 0, 4),        # no active input block: every output is zero
    (2, 3, 24, 40, 4, 3, 0),        # no active output block: nothing is read
]
GEMV_SPLITS = [None, 1, 3]


# Fast tier: every shape once, the split counts in turn (each twice); the rest slow.
@pytest.mark.parametrize("splits,h_splits,in_slots,depth,width,out_slots,in_count,out_count",
                         tiers.split([(splits, *shape) for splits in GEMV_SPLITS
                                      for shape in GEMV_SHAPES],
                                     fast=[(GEMV_SPLITS[i % 3], *shape)
                                           for i, shape in enumerate(GEMV_SHAPES)]))
def test_gather_gemv_matches_numpy(h_splits, in_slots, depth, width, out_slots, in_count,
                                   out_count, splits):
  in_blocks, out_blocks = 7, 8
  h, weights, bias, in_index, out_index = _gemv_case(
      depth + width, h_splits, in_slots, depth, width, out_slots, in_blocks, out_blocks)
  counts = (jnp.array([in_count], jnp.int32), jnp.array([out_count, 99], jnp.int32))
  for in_bias, in_relu, stride in ((bias, True, in_blocks), (None, False, 0)):
    parts = _gemv(h, in_index, counts[0], out_index, counts[1], weights, in_bias,
                  in_stride=stride, in_relu=in_relu, splits=splits)
    assert parts.dtype == jnp.float32 and parts.shape[1:] == (out_slots, width)
    if splits is not None:
      assert parts.shape[0] == splits
    expected = _gemv_reference(h, in_index, counts[0], out_index, counts[1], weights, in_bias,
                               stride, in_relu)
    np.testing.assert_allclose(np.asarray(parts).sum(axis=0), expected, atol=1e-5, rtol=1e-5)


def test_gather_gemv_first_and_last_blocks():
  h, weights, bias, _, _ = _gemv_case(5, 2, 3, 16, 16, 2, 4, 5)
  in_index = jnp.array([3, 0, 3], jnp.int32)                 # last and first input block
  out_index = jnp.array([4, 0], jnp.int32)                   # last and first output block
  count = jnp.array([3], jnp.int32), jnp.array([2], jnp.int32)
  parts = _gemv(h, in_index, count[0], out_index, count[1], weights, bias, in_stride=4,
                in_relu=True)
  np.testing.assert_allclose(
      np.asarray(parts).sum(axis=0),
      _gemv_reference(h, in_index, count[0], out_index, count[1], weights, bias, 4, True),
      atol=1e-5, rtol=1e-5)


def test_gather_gemv_reads_only_selected_blocks():
  """NaN in every weight block no active (output, input) slot pair selects, in the input
  slots past the active count and in their bias rows: the output has none, so none was
  read; output slots past the active count are zeros."""
  in_blocks, out_blocks = 5, 6
  h, weights, bias, _, _ = _gemv_case(9, 3, 4, 32, 24, 4, in_blocks, out_blocks)
  in_index = jnp.array([2, 4, 0, 1], jnp.int32)
  out_index = jnp.array([5, 1, 3, 0], jnp.int32)
  in_count, out_count = jnp.array([2], jnp.int32), jnp.array([2], jnp.int32)
  used = {int(o) * in_blocks + int(i) for o in out_index[:2] for i in in_index[:2]}
  unused = np.array(sorted(set(range(in_blocks * out_blocks)) - used))
  poisoned_weights = weights.at[unused].set(jnp.nan)
  poisoned_h = h.at[:, 2:].set(jnp.nan)
  poisoned_bias = bias.at[jnp.array([0, 1, 3])].set(jnp.nan)
  for splits in (1, 4):
    parts = _gemv(poisoned_h, in_index, in_count, out_index, out_count, poisoned_weights,
                  poisoned_bias, in_stride=in_blocks, in_relu=True, splits=splits)
    assert np.isfinite(np.asarray(parts)).all()
    np.testing.assert_array_equal(np.asarray(parts)[:, 2:], 0.0)
    np.testing.assert_allclose(
        np.asarray(parts).sum(axis=0),
        _gemv_reference(h, in_index, in_count, out_index, out_count, weights, bias,
                        in_blocks, True), atol=1e-5, rtol=1e-5)


def test_gather_gemv_bfloat16_accumulates_in_float32():
  h, weights, bias, in_index, out_index = _gemv_case(4, 2, 5, 128, 64, 3, 6, 4, jnp.bfloat16)
  counts = jnp.array([4], jnp.int32), jnp.array([3], jnp.int32)
  parts = _gemv(h, in_index, counts[0], out_index, counts[1], weights, bias, in_stride=6,
                in_relu=True)
  expected = _gemv_reference(h.astype(jnp.float32), in_index, counts[0], out_index, counts[1],
                             weights.astype(jnp.float32), bias.astype(jnp.float32), 6, True)
  # The inputs are the same bfloat16 numbers; only float32 summation order differs.
  np.testing.assert_allclose(np.asarray(parts).sum(axis=0), expected, atol=1e-3, rtol=1e-4)


def test_gemv_tiles_and_splits():
  for depth, width, dtype in [(784, 64, jnp.float32), (64, 10, jnp.float32),
                              (4096, 4096, jnp.bfloat16), (3, 3, jnp.float32)]:
    tile = pallas_gpu_gemv.gemv_tiles(depth, width, dtype)
    for side in tile:
      assert side >= pallas_gpu_gemv.MIN_TILE and side & (side - 1) == 0
    assert tile.cols <= pallas_gpu_gemv.MAX_COL_TILE
    assert tile.depth * tile.cols * jnp.dtype(dtype).itemsize <= pallas_gpu_gemv.TILE_BYTES
  # Reference net, batch 1, 16 slots of 64 units: a split per active input block.
  assert pallas_gpu_gemv.gemv_splits(16, 64, 16, 64, jnp.float32) == 16
  # First layer: split over the 784 inputs' K steps.
  assert pallas_gpu_gemv.gemv_splits(16, 64, 1, 784, jnp.float32) == 13
  assert pallas_gpu_gemv.gemv_splits(512, 64, 16, 64, jnp.float32) == 1


def test_gather_gemv_rejects_mismatched_shapes():
  h = jnp.zeros((1, 3, 16), jnp.float32)
  ids, count = jnp.zeros((3,), jnp.int32), jnp.ones((1,), jnp.int32)
  with pytest.raises(ValueError, match="contract over depth"):
    pallas_gpu_gemv.gather_gemv(h, ids, count, ids, count, jnp.zeros((4, 8, 8)), in_stride=1)
  with pytest.raises(ValueError, match="one id per input slot"):
    pallas_gpu_gemv.gather_gemv(h, ids[:2], count, ids, count, jnp.zeros((4, 16, 8)),
                                in_stride=1)
  with pytest.raises(ValueError, match="in_bias"):
    pallas_gpu_gemv.gather_gemv(h, ids, count, ids, count, jnp.zeros((4, 16, 8)),
                                jnp.zeros((4, 8)), in_stride=1)


# ------------------------------------------------------------------- batch-1 selection


SELECT_CASES = [(10, 4, False), (10, 4, True), (48, 12, False), (7, 7, False), (5, 1, False),
                (64, 16, True)]


# Fast tier: every case once, the seeds in turn; the rest slow.
@pytest.mark.parametrize("seed,num_blocks,capacity_,exact_k", tiers.split(
    [(seed, *case) for seed in range(3) for case in SELECT_CASES],
    fast=[(i % 3, *case) for i, case in enumerate(SELECT_CASES)]))
def test_select_blocks_matches_top_k_and_config_rules(num_blocks, capacity_, exact_k, seed):
  rng = np.random.default_rng(seed)
  parts = rng.normal(size=(3, 1, num_blocks)).astype(np.float32)
  if seed == 1:                                     # exact ties: lower block id first
    parts[:, :, ::2] = parts[:, :, :1]
  if seed == 2:                                     # every block below the threshold
    parts = -np.abs(parts) - 1.0
  parts = jnp.asarray(parts)
  bias = jnp.asarray(rng.normal(size=(num_blocks,)) * 0.1, jnp.float32)
  eps = 0.01
  got = pallas_gpu_gemv.select_blocks(parts, bias, capacity=capacity_, eps=eps, exact_k=exact_k,
                                      interpret=not ON_GPU)
  probs = batch1.block_probs(jnp.sum(parts, axis=(0, 1)) + bias, eps)
  values, index = jax.lax.top_k(probs, capacity_)
  config = capacity.SparseConfig((capacity_,), (1,), (1,), exact_k=exact_k)
  np.testing.assert_allclose(got.probs, probs, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(got.index, index)
  np.testing.assert_array_equal(got.kept.astype(bool), config.wanted(values))
  np.testing.assert_array_equal(
      got.counts, [int(np.sum(config.wanted(values))), int(config.candidates(probs[None],
                                                                             capacity_))])


def test_select_blocks_rejects_bad_capacity():
  with pytest.raises(ValueError, match="capacity"):
    pallas_gpu_gemv.select_blocks(jnp.zeros((1, 1, 4)), jnp.zeros((4,)), capacity=5, eps=0.01)
  with pytest.raises(ValueError, match="logit_parts"):
    pallas_gpu_gemv.select_blocks(jnp.zeros((1, 2, 4)), jnp.zeros((4,)), capacity=2, eps=0.01)


# ------------------------------------------------------- batch-1 one-launch hidden layer


def _layer_case(seed, in_slots, depth, width, num_blocks, next_width, in_gated,
                dtype=jnp.float32):
  """A hidden layer's operands: policy partials, input partials, weights, biases."""
  rng = np.random.default_rng(seed)
  h, weights, in_bias, in_index, _ = _gemv_case(
      seed, 3, in_slots, depth, width, 1, in_slots + 2 if in_gated else 1,
      num_blocks, dtype)
  stride = in_slots + 2 if in_gated else 1
  logit_parts = jnp.asarray(rng.normal(size=(5, num_blocks)), jnp.float32)
  policy_bias = jnp.asarray(rng.normal(size=(num_blocks,)) * 0.5, jnp.float32)
  bias = jnp.asarray(rng.normal(size=(num_blocks, width)), dtype)
  next_weights = jnp.asarray(rng.normal(size=(num_blocks, width, next_width)), dtype)
  return (logit_parts, policy_bias, h, in_index, weights, bias, next_weights,
          in_bias if in_gated else None, stride)


# (in_slots, depth, width, num_blocks, next_width, in_gated, capacity, in_count, exact_k)
LAYER_CASES = [
    (1, 100, 16, 6, 6, False, 3, 1, False),    # first layer: dense input, depth not a tile
    (4, 64, 64, 12, 12, True, 4, 3, False),    # hidden layer, ragged input count
    (3, 16, 40, 5, 10, True, 5, 3, True),      # columns not a tile multiple, output next
    (2, 32, 16, 7, 7, True, 2, 0, False),      # no active input: outputs are the bias
]


@pytest.mark.parametrize("case", LAYER_CASES)
def test_gemv_layer_equals_select_then_gemv(case):
  """One launch gives the selection of :func:`select_blocks` and the products of
  :func:`gather_gemv` (the layer's block product, then the next product of its
  ReLU output)."""
  in_slots, depth, width, num_blocks, next_width, in_gated, capacity_, in_count, exact_k = case
  (logit_parts, policy_bias, h, in_index, weights, bias, next_weights, in_bias,
   stride) = _layer_case(sum(case[:5]), in_slots, depth, width, num_blocks, next_width,
                         in_gated)
  count = jnp.array([in_count], jnp.int32)
  got = pallas_gpu_gemv.gemv_layer(
      logit_parts, policy_bias, h, in_index, count, weights, bias, next_weights, in_bias,
      in_stride=stride, in_relu=in_gated, capacity=capacity_, eps=0.01, exact_k=exact_k,
      interpret=not ON_GPU)
  selection = pallas_gpu_gemv.select_blocks(logit_parts[:, None], policy_bias,
                                            capacity=capacity_, eps=0.01, exact_k=exact_k,
                                            interpret=not ON_GPU)
  for name in ("index", "kept", "counts"):
    np.testing.assert_array_equal(getattr(got.selection, name), getattr(selection, name))
  np.testing.assert_allclose(got.selection.probs, selection.probs, rtol=1e-6, atol=1e-7)
  expected_h = _gemv_reference(h, in_index, count, selection.index, selection.counts,
                               weights, in_bias, stride, in_gated)
  np.testing.assert_allclose(got.h_parts[0], expected_h, atol=1e-4, rtol=1e-5)
  kept = int(selection.counts[0])
  expected_next = _gemv_reference(got.h_parts, selection.index, selection.counts,
                                  jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.int32),
                                  next_weights, bias, 0, True)
  np.testing.assert_allclose(np.asarray(got.next_parts).sum(axis=0), expected_next[0],
                             atol=1e-4, rtol=1e-5)
  assert got.next_parts.shape == (capacity_ * -(-width // pallas_gpu_gemv.MIN_TILE),
                                  next_width)
  np.testing.assert_array_equal(np.asarray(got.h_parts[0, kept:]), 0.0)


def test_gemv_layer_reads_only_selected_blocks():
  """NaN in every weight block, bias row and next-weight block the selection does not
  use, and in the input slots past the active count: nothing the layer returns has one."""
  (logit_parts, policy_bias, h, in_index, weights, bias, next_weights, in_bias,
   stride) = _layer_case(3, 4, 32, 32, 8, 8, True)
  logit_parts = logit_parts.at[:, jnp.array([1, 6])].set(20.0)   # blocks 1 and 6 run
  logit_parts = logit_parts.at[:, jnp.array([0, 2, 3, 4, 5, 7])].set(-20.0)
  count = jnp.array([2], jnp.int32)
  used = {o * stride + int(i) for o in (1, 6) for i in in_index[:2]}
  unused = np.array(sorted(set(range(weights.shape[0])) - used))
  others = jnp.array([0, 2, 3, 4, 5, 7])
  unused_inputs = np.array(sorted(set(range(in_bias.shape[0])) - set(map(int, in_index[:2]))))
  got = pallas_gpu_gemv.gemv_layer(
      logit_parts, policy_bias, h.at[:, 2:].set(jnp.nan), in_index, count,
      weights.at[unused].set(jnp.nan), bias.at[others].set(jnp.nan),
      next_weights.at[others].set(jnp.nan), in_bias.at[unused_inputs].set(jnp.nan),
      in_stride=stride, in_relu=True, capacity=3, eps=0.01, interpret=not ON_GPU)
  np.testing.assert_array_equal(got.selection.index[:2], [1, 6])
  assert int(got.selection.counts[0]) == 2
  assert np.isfinite(np.asarray(got.h_parts)).all()
  assert np.isfinite(np.asarray(got.next_parts)).all()


def test_gemv_layer_rejects_mismatched_shapes():
  (logit_parts, policy_bias, h, in_index, weights, bias, next_weights, in_bias,
   stride) = _layer_case(1, 2, 16, 16, 4, 4, True)
  count = jnp.ones((1,), jnp.int32)
  with pytest.raises(ValueError, match="logit_parts"):
    pallas_gpu_gemv.gemv_layer(logit_parts[:, :3], policy_bias, h, in_index, count, weights,
                               bias, next_weights, in_bias, in_stride=stride, capacity=2,
                               eps=0.01)
  with pytest.raises(ValueError, match="capacity"):
    pallas_gpu_gemv.gemv_layer(logit_parts, policy_bias, h, in_index, count, weights, bias,
                               next_weights, in_bias, in_stride=stride, capacity=5, eps=0.01)
  with pytest.raises(ValueError, match="next_weights"):
    pallas_gpu_gemv.gemv_layer(logit_parts, policy_bias, h, in_index, count, weights, bias,
                               next_weights[:, :8], in_bias, in_stride=stride, capacity=2,
                               eps=0.01)


@pytest.mark.parametrize("exact_k", [False, True])
def test_one_launch_layers_equal_three_launch_layers(exact_k):
  """The two batch-1 paths run the same blocks, with the same traces, to 1e-5."""
  params, x = mlp_cases._params(6), mlp_cases._inputs(6, 1)
  model = _pallas_layout(params)
  config = capacity.SparseConfig((2, 3, 2), (1,) * 3, (1,) * 3, backend="pallas-gpu",
                                 exact_k=exact_k)
  one, one_traces = pallas_gpu_gemv.fused_forward_single(
      model, x[0], config, interpret=not ON_GPU, one_launch_layers=True)
  three, three_traces = pallas_gpu_gemv.fused_forward_single(model, x[0], config,
                                                             interpret=not ON_GPU)
  np.testing.assert_allclose(one, three, atol=1e-5, rtol=1e-5)
  for trace, ref in zip(one_traces, three_traces):
    for got_field, ref_field in zip(trace, ref):
      np.testing.assert_allclose(np.asarray(got_field, np.float32),
                                 np.asarray(ref_field, np.float32), atol=1e-6)


# ------------------------------------------------- the pallas-gpu backend in the sparse MLP


@pytest.fixture
def pallas_backend_here(monkeypatch):
  """The pallas-gpu backend available on this host (interpreted off a GPU)."""
  if not ON_GPU:
    monkeypatch.setenv(kernels.PALLAS_INTERPRET_ENV, "1")


def _pallas_layout(params):
  return layout.to_block_major(mlp_cases._model(), params, pallas_tiles=True)


def _assert_pallas_equals_xla_and_masked_dense(params, x, config):
  """The pallas-gpu backend runs the same blocks as the XLA path (same traces) and its
  logits equal masked dense with those masks to 1e-5."""
  model = _pallas_layout(params)
  logits, traces = mlp_cases.FORWARD(model, x, config)
  masks = mlp_cases.TRACE_MASKS(traces, mlp_cases.NUM_BLOCKS)
  np.testing.assert_allclose(logits, mlp_cases.MASKED_DENSE(params, x, masks),
                             atol=1e-5, rtol=1e-5)
  xla_config = capacity.SparseConfig(config.example_capacity, config.block_capacity,
                                     config.pair_capacity, config.buckets, "xla",
                                     config.exact_k)
  ref_logits, ref_traces = mlp_cases.FORWARD(model, x, xla_config)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
  for trace, ref in zip(traces, ref_traces):
    np.testing.assert_array_equal(trace.kept, ref.kept)
    np.testing.assert_array_equal(np.where(ref.kept, trace.block_index, -1),
                                  np.where(ref.kept, ref.block_index, -1))
    assert int(trace.num_kept) == int(ref.num_kept)
    assert int(trace.num_candidates) == int(ref.num_candidates)
    np.testing.assert_allclose(trace.probs, ref.probs, atol=1e-6)
  return masks, traces


@pytest.mark.parametrize("seed,batch", tiers.split_product(
    (range(2), [1, 5]), fast=[(0, 5), (1, 1)]))
def test_pallas_backend_random_masks_equal_masked_dense(seed, batch):
  params, x = mlp_cases._params(seed), mlp_cases._inputs(seed, batch)
  config = capacity.SparseConfig(mlp_cases.NUM_BLOCKS, (batch,) * 3, (batch,) * 3,
                                 backend="pallas-gpu").validate(_pallas_layout(params))
  masks, _ = _assert_pallas_equals_xla_and_masked_dense(params, x, config)
  ref_logits, aux = mlp_cases._model().apply({"params": params}, x, mode="threshold")
  for mask, layer_aux in zip(masks, aux):
    np.testing.assert_array_equal(mask, layer_aux.mask)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("shift,expected", [(-50.0, 0.0), (50.0, 1.0)])
def test_pallas_backend_all_blocks_off_or_on(shift, expected, batch):
  params = mlp_cases._params(3, bias_shift=shift, policy_scale=0.0)
  x = mlp_cases._inputs(3, batch)
  config = capacity.SparseConfig(mlp_cases.NUM_BLOCKS, (batch,) * 3, (batch,) * 3,
                                 backend="pallas-gpu").validate(_pallas_layout(params))
  masks, _ = _assert_pallas_equals_xla_and_masked_dense(params, x, config)
  for mask in masks:
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("seed,exact_k,batch", tiers.split(
    [(0, False, 1), (1, False, 1), (0, False, 9), (1, False, 9), (2, True, 1), (2, True, 9)],
    fast=[(0, False, 1), (1, False, 9), (2, True, 9)]))
def test_pallas_backend_overflow_follows_documented_rules(seed, exact_k, batch):
  """Capacities that overflow (per example at batch 1; per block and per weight block
  in a minibatch) drop the same blocks as the documented rules and the XLA path."""
  params, x = mlp_cases._params(10 + seed, bias_shift=1.0), mlp_cases._inputs(seed, batch)
  config = capacity.SparseConfig(example_capacity=(2, 3, 2), block_capacity=(3, 4, 3),
                                 pair_capacity=(1, 2, 1), backend="pallas-gpu",
                                 exact_k=exact_k).validate(_pallas_layout(params))
  masks, traces = _assert_pallas_equals_xla_and_masked_dense(params, x, config)
  if not exact_k:
    expected, candidates = mlp_cases._reference_masks(
        params, x, config.example_capacity, config.block_capacity, config.pair_capacity)
    for mask, ref in zip(masks, expected):
      np.testing.assert_array_equal(mask, ref)
    kept = sum(int(np.sum(ref)) for ref in expected)
    assert sum(int(trace.num_candidates) for trace in traces) == candidates > kept


def test_pallas_backend_bfloat16_batch1_matches_xla():
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.bfloat16), mlp_cases._params(4))
  model = _pallas_layout(params)
  x = mlp_cases._inputs(4, 1).astype(jnp.bfloat16)
  got, traces = mlp_cases.FORWARD(model, x, capacity.SparseConfig(
      mlp_cases.NUM_BLOCKS, (1,) * 3, (1,) * 3, backend="pallas-gpu"))
  ref, ref_traces = mlp_cases.FORWARD(model, x, capacity.SparseConfig(
      mlp_cases.NUM_BLOCKS, (1,) * 3, (1,) * 3))
  assert got.dtype == jnp.bfloat16
  for trace, ref_trace in zip(traces, ref_traces):
    np.testing.assert_array_equal(trace.kept, ref_trace.kept)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                             atol=0.1, rtol=2e-2)


def test_pallas_backend_is_named_and_interpreted_only_on_request(pallas_backend_here):
  assert "pallas-gpu" in kernels.available_backends()
  params = mlp_cases._params(5)
  inference = ccjax.make_inference(mlp_cases._model(), params, backend="pallas-gpu")
  assert inference.backend == "pallas-gpu"
  x = mlp_cases._inputs(5, 1)
  logits, info = inference(x)
  np.testing.assert_allclose(logits, mlp_cases.MASKED_DENSE(params, x, info.masks),
                             atol=1e-5, rtol=1e-5)
  if not ON_GPU:
    with mock.patch.dict(os.environ):
      os.environ.pop(kernels.PALLAS_INTERPRET_ENV)
      assert "pallas-gpu" not in kernels.available_backends()
      assert kernels.available_backends()[-1] != "pallas-gpu"
      with pytest.raises(ValueError, match="not available.*CCJAX_PALLAS_INTERPRET=1"):
        kernels.select_backend("pallas-gpu")


# Slow tier off a GPU only: the interpreted Pallas decode scan compiles for ~14 s on CPU;
# the backend's own equivalence tests above stay fast.
@(pytest.mark.slow if not ON_GPU else lambda test: test)
def test_decode_mlps_run_the_fused_path(pallas_backend_here):
  """The gated transformer's MLPs at decode (one row per layer) on pallas-gpu equal the
  XLA backend's, token after token."""
  model = ccjax.GatedTransformer(max_len=8, num_layers=2, d_model=16, num_heads=2,
                                 mlp_width=64, block_size=16)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 8), 0, 256)
  params = model.init({"params": jax.random.PRNGKey(1), "gate": jax.random.PRNGKey(2)},
                      tokens)["params"]
  hidden = jax.random.normal(jax.random.PRNGKey(3), (4, 2, 1, 16))
  fused = lm_decode.make_decode(model, params, sparse=True, backend="pallas-gpu")
  reference = lm_decode.make_decode(model, params, sparse=True, backend="xla")
  assert fused.backend == "pallas-gpu"
  np.testing.assert_allclose(fused.mlp_scan(fused.weights, hidden),
                             reference.mlp_scan(reference.weights, hidden),
                             atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- CUDA lowering


def _walk(operation, parents=()):
  """Yields ``(op, enclosing op names)`` for every op nested in ``operation``."""
  for region in operation.regions:
    for block in region.blocks:
      for op in block.operations:
        yield op.operation, parents
        yield from _walk(op.operation, parents + (op.operation.name,))


@contextlib.contextmanager
def _triton_kernels(fn, *args, **static):
  """Lowers ``fn(*args, **static)`` for CUDA on this host and yields ``[(grid, ops)]``, one
  per Triton custom call (``ops``: ``(op, enclosing op names)`` of its Triton module), or
  ``None`` where this jaxlib compiles Triton at lowering (a GPU host: lowering succeeded)."""
  lowered = jax.jit(functools.partial(fn, **static)).trace(*args).lower(
      lowering_platforms=("cuda",))
  module = lowered.compiler_ir("stablehlo")
  calls = [op for op, _ in _walk(module.operation) if op.name == "stablehlo.custom_call"]
  assert calls
  configs = []
  for call in calls:
    target = ir.StringAttr(call.attributes["call_target_name"]).value
    assert "triton" in target, target                     # Triton, not Mosaic GPU
    configs.append(call.attributes["mhlo.backend_config"])
  if any("ir" not in config for config in configs):
    assert ON_GPU, "no Triton IR in a backend config"
    yield None
    return
  with jax_mlir.make_ir_context() as context:
    triton_dialect.register_dialect(context)
    kernels_ir = []
    for config in configs:
      triton_module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
      assert triton_module.operation.verify()
      grid = [ir.IntegerAttr(config[axis]).value for axis in ("grid_x", "grid_y", "grid_z")]
      kernels_ir.append((grid, list(_walk(triton_module.operation))))
    yield kernels_ir


def _tensor_loads(ops):
  """``(shape, element type, in a loop)`` of every tensor ``tt.load`` whose value is used
  (an unused load is a masked store's old value: dead code for Triton)."""
  loads = []
  for op, parents in ops:
    if op.name == "tt.load" and isinstance(op.results[0].type, ir.RankedTensorType):
      if not list(op.results[0].uses):
        continue
      result = ir.RankedTensorType(op.results[0].type)
      loads.append((list(result.shape), result.element_type, "scf.for" in parents))
  return loads


def _element_type(dtype):
  return {"float32": ir.F32Type.get, "bfloat16": ir.BF16Type.get}[jnp.dtype(dtype).name]()


@pytest.mark.parametrize("dtype,depth,width", [(jnp.float32, 784, 64), (jnp.float32, 64, 10),
                                               (jnp.bfloat16, 128, 128)])
def test_lowers_for_cuda_through_triton(dtype, depth, width):
  """The real kernel lowers for CUDA on this host; its Triton module verifies and has a
  K loop, the promised dot precision, and loads exactly one x tile and one weight tile
  per K step (the load shapes are read from the IR, so a kernel that loads more than a
  tile fails here even where Triton would still lower it)."""
  groups, rows = 16, 40
  x = jax.ShapeDtypeStruct((groups, rows, depth), dtype)
  tiles = jax.ShapeDtypeStruct((8, *pallas_gpu.padded_weight_shape(depth, width, dtype)), dtype)
  index = sizes = jax.ShapeDtypeStruct((groups,), jnp.int32)
  with _triton_kernels(pallas_gpu.grouped_matmul, x, tiles, index, sizes, width=width) as lowered:
    if lowered is None:
      return
    [(grid, ops)] = lowered
    tile = pallas_gpu.tile_shape(rows, depth, width, dtype)
    assert grid == [groups, -(-rows // tile.rows), -(-width // tile.cols)]
    dots = [(op, parents) for op, parents in ops if op.name == "tt.dot"]
    assert len(dots) == 1
    dot, parents = dots[0]
    assert "scf.for" in parents                              # the K loop
    lhs, rhs = (ir.RankedTensorType(operand.type) for operand in dot.operands[:2])
    assert lhs.shape == [tile.rows, tile.depth] and rhs.shape == [tile.depth, tile.cols]
    accumulator = ir.RankedTensorType(dot.results[0].type).element_type
    assert accumulator == ir.F32Type.get()
    precision = ir.IntegerAttr(dot.attributes["inputPrecision"]).value
    if dtype == jnp.float32:
      assert precision == triton_dialect.InputPrecision.IEEE.value     # not TF32
    else:
      assert lhs.element_type == ir.BF16Type.get()
    element = _element_type(dtype)
    loads = _tensor_loads(ops)
    # Exactly one [bm, bk] x tile and one [bk, bn] weight tile, both inside the K loop.
    assert sorted(loads, key=str) == sorted([([tile.rows, tile.depth], element, True),
                                             ([tile.depth, tile.cols], element, True)], key=str)


@pytest.mark.parametrize("dtype,h_splits,depth,width,has_bias", [
    (jnp.float32, 1, 784, 64, False),      # first layer: dense input x, 64-unit blocks
    (jnp.float32, 5, 64, 64, True),        # hidden layer: input partials + bias + ReLU
    (jnp.float32, 3, 64, 10, True),        # output layer / policy: 10 columns
    (jnp.bfloat16, 4, 128, 128, True),     # bfloat16 weights, two column tiles
])
def test_gather_gemv_lowers_for_cuda(dtype, h_splits, depth, width, has_bias):
  """The GEMV lowers through Triton with a split-K grid, no MMA (exact float32), a
  float32 accumulator, and per loop step one weight tile, one input tile (and one bias
  row) -- nothing larger, and no tensor load outside the loop."""
  in_slots, out_slots, num_weights = 8, 16, 40
  h = jax.ShapeDtypeStruct((h_splits, in_slots, depth), jnp.float32 if has_bias else dtype)
  ids = jax.ShapeDtypeStruct((in_slots,), jnp.int32)
  counts = jax.ShapeDtypeStruct((2,), jnp.int32)
  out_ids = jax.ShapeDtypeStruct((out_slots,), jnp.int32)
  weights = jax.ShapeDtypeStruct((num_weights, depth, width), dtype)
  bias = jax.ShapeDtypeStruct((6, depth), dtype) if has_bias else None
  splits = pallas_gpu_gemv.gemv_splits(out_slots, width, in_slots, depth, dtype)
  with _triton_kernels(pallas_gpu_gemv.gather_gemv, h, ids, counts, out_ids, counts, weights,
                       bias, in_stride=5, in_relu=has_bias) as lowered:
    if lowered is None:
      return
    [(grid, ops)] = lowered
    tile = pallas_gpu_gemv.gemv_tiles(depth, width, dtype)
    assert grid == [out_slots, -(-width // tile.cols), splits] and splits > 1
    assert not [op for op, _ in ops if op.name == "tt.dot"]
    loops = [op for op, _ in ops if op.name == "scf.for"]
    assert len(loops) == 1
    assert ir.RankedTensorType(loops[0].results[0].type).element_type == ir.F32Type.get()
    h_rows = 1 << (h_splits - 1).bit_length()
    expected = [([tile.depth, tile.cols], _element_type(dtype), True),
                ([h_rows, tile.depth], _element_type(h.dtype), True)]
    if has_bias:
      expected.append(([tile.depth], _element_type(dtype), True))
    assert sorted(_tensor_loads(ops), key=str) == sorted(expected, key=str)
    assert tile.depth * tile.cols * jnp.dtype(dtype).itemsize <= pallas_gpu_gemv.TILE_BYTES


def test_select_blocks_lowers_for_cuda():
  """One program: the partial logits and the bias are each loaded once, then ``k``
  arg-max passes in a loop that loads nothing."""
  parts = jax.ShapeDtypeStruct((6, 1, 48), jnp.float32)
  bias = jax.ShapeDtypeStruct((48,), jnp.float32)
  with _triton_kernels(pallas_gpu_gemv.select_blocks, parts, bias, capacity=12,
                       eps=0.01) as lowered:
    if lowered is None:
      return
    [(grid, ops)] = lowered
    assert grid == [1, 1, 1]
    assert sorted(_tensor_loads(ops), key=str) == sorted(
        [([8, 64], ir.F32Type.get(), False), ([64], ir.F32Type.get(), False)], key=str)
    assert len([op for op, _ in ops if op.name == "scf.for"]) == 1


@pytest.mark.parametrize("dtype,in_gated,depth,width,next_width", [
    (jnp.float32, False, 784, 64, 64),     # first layer: dense input, next policy 64 blocks
    (jnp.float32, True, 64, 64, 10),       # last hidden layer: the output logits next
    (jnp.bfloat16, True, 128, 128, 32),    # bfloat16 weights
])
def test_gemv_layer_lowers_for_cuda(dtype, in_gated, depth, width, next_width):
  """One program per (output slot, 16-column tile), no split-K, no MMA; in the K loop one
  weight tile and one input tile (and one input-bias row) per step; outside it only the
  policy partials and bias (once), the layer's bias row and one next-weight tile."""
  num_blocks, capacity_, in_slots, rows = 12, 4, 3, 6
  h = jax.ShapeDtypeStruct((2, in_slots, depth), jnp.float32 if in_gated else dtype)
  weights = jax.ShapeDtypeStruct((num_blocks * (5 if in_gated else 1), depth, width), dtype)
  args = [jax.ShapeDtypeStruct((rows, num_blocks), jnp.float32),
          jax.ShapeDtypeStruct((num_blocks,), jnp.float32), h,
          jax.ShapeDtypeStruct((in_slots,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32),
          weights, jax.ShapeDtypeStruct((num_blocks, width), dtype),
          jax.ShapeDtypeStruct((num_blocks, width, next_width), dtype),
          jax.ShapeDtypeStruct((5, depth), dtype) if in_gated else None]
  with _triton_kernels(pallas_gpu_gemv.gemv_layer, *args, in_stride=5 if in_gated else 1,
                       in_relu=in_gated, capacity=capacity_, eps=0.01) as lowered:
    if lowered is None:
      return
    [(grid, ops)] = lowered
    tile = pallas_gpu_gemv.layer_tiles(depth, dtype)
    assert tile.cols == pallas_gpu_gemv.MIN_TILE
    assert grid == [capacity_, -(-width // tile.cols), 1]
    assert not [op for op, _ in ops if op.name == "tt.dot"]
    assert len([op for op, _ in ops if op.name == "scf.for"]) == 2   # top-k passes, K loop
    element, f32 = _element_type(dtype), ir.F32Type.get()
    expected = [([tile.depth, tile.cols], element, True),
                ([2, tile.depth], _element_type(h.dtype), True),
                ([8, 16], f32, False), ([16], f32, False),           # policy partials, bias
                ([tile.cols], element, False),                        # the layer's bias row
                ([tile.cols, 1 << (next_width - 1).bit_length()], element, False)]
    if in_gated:
      expected.append(([tile.depth], element, True))
    assert sorted(_tensor_loads(ops), key=str) == sorted(expected, key=str)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch", [1, 5])
def test_sparse_forward_lowers_for_cuda_with_real_kernels(monkeypatch, batch, dtype):
  """The whole sparse MLP on pallas-gpu lowers for CUDA with the real (not interpreted)
  kernels, and no other custom call: batch 1 is three launches per hidden layer plus the
  output GEMV, a minibatch one grouped matmul per product (two per gated-input layer)."""
  monkeypatch.setattr(pallas_gpu, "interpret_default", lambda: False)
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), mlp_cases._params(0))
  model = _pallas_layout(params)
  config = capacity.make_sparse_config(model, batch, 0.5, backend="xla")
  config = capacity.SparseConfig(config.example_capacity, config.block_capacity,
                                 config.pair_capacity, backend="pallas-gpu")
  x = jax.ShapeDtypeStruct((batch, mlp_cases.INPUT_DIM), dtype)
  module = jax.jit(lambda model, x: mlp.sparse_forward(model, x, config)).trace(
      model, x).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
  assert _triton_launches(module) == (3 * len(mlp_cases.HIDDEN) + 1 if batch == 1
                                      else 2 * len(mlp_cases.HIDDEN))


def _triton_launches(module) -> int:
  """Triton custom calls a lowered module executes: call sites of the private functions
  that hold one (a jitted kernel called twice with the same shapes is lowered once).
  Asserts that every custom call at batch 1 is a Triton one."""
  kernel_functions, direct = set(), 0
  for function in module.body.operations:
    name = ir.StringAttr(function.attributes["sym_name"]).value
    for op, _ in _walk(function.operation):
      if op.name == "stablehlo.custom_call":
        target = ir.StringAttr(op.attributes["call_target_name"]).value
        assert "triton" in target, target
        kernel_functions.add(name)
        direct += name == "main"
  calls = [op for op, _ in _walk(module.operation) if op.name == "func.call"]
  return direct + sum(ir.FlatSymbolRefAttr(op.attributes["callee"]).value in kernel_functions
                      for op in calls)
