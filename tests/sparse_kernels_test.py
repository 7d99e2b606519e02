"""Tests of ccjax.sparse_kernels: the XLA grouped matmul and the dispatch to the Pallas kernel.

Valid on any host: the Pallas kernel runs for real on a GPU and in the Pallas interpreter
elsewhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from ccjax import sparse
from ccjax import sparse_kernels
from ccjax.inference.kernels import pallas_gpu

pytestmark = pytest.mark.usefixtures("full_float32_matmuls")


@pytest.mark.parametrize("groups,rows,depth,width,num_weights", [(5, 3, 8, 6, 7), (4, 16, 16, 16, 4)])
def test_pallas_equals_xla(groups, rows, depth, width, num_weights):
  keys = jax.random.split(jax.random.PRNGKey(groups), 3)
  x = jax.random.normal(keys[0], (groups, rows, depth))
  weights = jax.random.normal(keys[1], (num_weights, depth, width))
  index = jax.random.randint(keys[2], (groups,), 0, num_weights)
  expected = sparse_kernels.grouped_matmul(x, weights, index, implementation="xla")
  got = sparse_kernels.grouped_matmul(x, weights, index, implementation="pallas",
                                      tiles=pallas_gpu.pad_weight_tiles(weights))
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  dense = np.einsum("grk,gkn->grn", np.asarray(x), np.asarray(weights)[np.asarray(index)])
  np.testing.assert_allclose(expected, dense, atol=1e-4, rtol=1e-5)


def test_xla_transposed_blocks():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5))
  weights = jax.random.normal(jax.random.PRNGKey(1), (4, 7, 5))
  index = jnp.array([3, 0, 3])
  got = sparse_kernels.grouped_matmul(x, weights, index, implementation="xla", transpose_rhs=True)
  np.testing.assert_allclose(got, np.einsum("grk,gnk->grn", x, np.asarray(weights)[index]),
                             atol=1e-5, rtol=1e-5)


def test_auto_selection_follows_the_backend():
  on_gpu = jax.default_backend() == "gpu"
  assert sparse_kernels.use_pallas() == on_gpu
  assert sparse_kernels.resolve_implementation("auto") == ("pallas" if on_gpu else "xla")
  x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  weights = jnp.ones((2, 4, 5))
  auto = sparse_kernels.grouped_matmul(x, weights, tiles=pallas_gpu.pad_weight_tiles(weights))
  np.testing.assert_allclose(auto, sparse_kernels.grouped_matmul(x, weights, implementation="xla"))
  with pytest.raises(ValueError, match="implementation"):
    sparse_kernels.grouped_matmul(x, weights, implementation="triton")
  with pytest.raises(ValueError, match="tiles"):
    sparse_kernels.grouped_matmul(x, weights, implementation="pallas")
  with pytest.raises(ValueError, match="untransposed"):
    sparse_kernels.grouped_matmul(x, weights, implementation="pallas", transpose_rhs=True)


def test_take_blocks_matches_indexing():
  blocks = jnp.arange(5 * 2 * 3, dtype=jnp.float32).reshape(5, 2, 3)
  index = jnp.array([[4, 0], [2, 2]])
  np.testing.assert_array_equal(sparse_kernels.take_blocks(blocks, index), blocks[index])


@pytest.mark.parametrize("capacities", [None, ((2, 2), (3, 3), (1, 2))])
def test_sparse_forward_with_pallas_kernel_equals_xla_path(capacities):
  """Exact and overflowing capacities (empty, partial and full groups; padded policy and
  output weights)."""
  model = ccjax.GatedMLP(hidden=(32, 32), num_classes=4, block_size=16)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (6, 10))
  params = model.init({"params": key, "gate": key}, x, mode="sample")["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 30.0 if "policy" in jax.tree_util.keystr(path) else v, params)
  block_model = sparse.to_block_major(params, 16, pallas_tiles=True)
  outputs = {}
  for implementation in ("xla", "pallas"):
    if capacities is None:
      config = sparse.make_sparse_config(block_model, 6, implementation=implementation)
    else:
      config = sparse.SparseConfig(*capacities, implementation=implementation).validate(
          block_model)
    outputs[implementation] = jax.jit(sparse.sparse_forward, static_argnums=2)(
        block_model, x, config)
  np.testing.assert_allclose(outputs["pallas"][0], outputs["xla"][0], atol=1e-5, rtol=1e-5)
  for pallas_trace, xla_trace in zip(outputs["pallas"][1], outputs["xla"][1]):
    np.testing.assert_array_equal(pallas_trace.kept, xla_trace.kept)
  masks = sparse.trace_masks(outputs["pallas"][1], block_model.num_blocks)
  np.testing.assert_allclose(outputs["pallas"][0], sparse.masked_dense_forward(params, x, masks),
                             atol=1e-5, rtol=1e-5)


def test_pallas_path_needs_a_padded_layout():
  model = ccjax.GatedMLP(hidden=(32,), num_classes=4, block_size=16)
  x = jnp.ones((3, 10))
  key = jax.random.PRNGKey(0)
  params = model.init({"params": key, "gate": key}, x, mode="sample")["params"]
  block_model = sparse.to_block_major(params, 16, pallas_tiles=False)
  assert block_model.output_tiles is None and block_model.layers[0].grouped_tiles is None
  config = sparse.make_sparse_config(block_model, 3, implementation="pallas")
  with pytest.raises(ValueError, match="pallas_tiles=True"):
    sparse.sparse_forward(block_model, x, config)
