"""Tests of ccjax.inference.kernels.pallas_gpu: the Triton grouped matmul.

Numerics run the real kernel on a GPU host and the Pallas interpreter elsewhere, against
the XLA path. The CUDA lowering test lowers the real kernel (not interpret mode) for
``cuda`` on any host and checks the Triton module it carries.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib.mlir import ir
from jaxlib.triton import dialect as triton_dialect

from ccjax.inference.kernels import xla
from ccjax.inference.kernels import pallas_gpu

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


# ----------------------------------------------------------------------------- CUDA lowering


def _walk(operation, parents=()):
  """Yields ``(op, enclosing op names)`` for every op nested in ``operation``."""
  for region in operation.regions:
    for block in region.blocks:
      for op in block.operations:
        yield op.operation, parents
        yield from _walk(op.operation, parents + (op.operation.name,))


def _lower_for_cuda(x, tiles, index, sizes, width):
  lowered = jax.jit(pallas_gpu.grouped_matmul, static_argnames=("width",)).trace(
      x, tiles, index, sizes, width=width).lower(lowering_platforms=("cuda",))
  return lowered.compiler_ir("stablehlo")


@pytest.mark.parametrize("dtype,depth,width", [(jnp.float32, 784, 64), (jnp.float32, 64, 10),
                                               (jnp.bfloat16, 128, 128)])
def test_lowers_for_cuda_through_triton(dtype, depth, width):
  """The real kernel lowers for CUDA on this host; its Triton module verifies and has a
  K loop, tile-sized loads only and the promised dot precision."""
  groups, rows = 16, 40
  x = jax.ShapeDtypeStruct((groups, rows, depth), dtype)
  tiles = jax.ShapeDtypeStruct((8, *pallas_gpu.padded_weight_shape(depth, width, dtype)), dtype)
  index = sizes = jax.ShapeDtypeStruct((groups,), jnp.int32)
  module = _lower_for_cuda(x, tiles, index, sizes, width)
  calls = [op for op, _ in _walk(module.operation) if op.name == "stablehlo.custom_call"]
  assert len(calls) == 1
  target = ir.StringAttr(calls[0].attributes["call_target_name"]).value
  assert "triton" in target, target                       # Triton, not Mosaic GPU
  config = calls[0].attributes["mhlo.backend_config"]
  if "ir" not in config:
    # A jaxlib with a CUDA Triton compiler compiles at lowering (that succeeded).
    assert ON_GPU, f"no Triton IR in the backend config of {target}"
    return
  tile = pallas_gpu.tile_shape(rows, depth, width, dtype)
  assert [ir.IntegerAttr(config[axis]).value for axis in ("grid_x", "grid_y", "grid_z")] == [
      groups, -(-rows // tile.rows), -(-width // tile.cols)]
  with jax_mlir.make_ir_context() as context:
    triton_dialect.register_dialect(context)
    triton_module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
    assert triton_module.operation.verify()
    ops = list(_walk(triton_module.operation))
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
    tensor_loads = [(op, parents) for op, parents in ops if op.name == "tt.load"
                    and isinstance(op.results[0].type, ir.RankedTensorType)]
    in_loop = [op for op, parents in tensor_loads if "scf.for" in parents]
    assert len(in_loop) == 2                                 # one x tile, one weight tile
    for load in in_loop:
      assert np.prod(ir.RankedTensorType(load.results[0].type).shape) <= 64 * 64
    for load, parents in tensor_loads:
      if "scf.for" not in parents:                           # a masked store's old value,
        assert not list(load.results[0].uses)                # unused: dead code for Triton
