"""Tests of ccjax.sparse_kernels: the Pallas grouped matmul (interpret mode) vs XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from ccjax import sparse
from ccjax import sparse_kernels


@pytest.mark.parametrize("groups,rows,depth,width,num_weights", [(5, 3, 8, 6, 7), (4, 16, 16, 16, 4)])
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_pallas_interpret_equals_xla(groups, rows, depth, width, num_weights, transpose_rhs):
  keys = jax.random.split(jax.random.PRNGKey(groups), 3)
  x = jax.random.normal(keys[0], (groups, rows, depth))
  shape = (num_weights, width, depth) if transpose_rhs else (num_weights, depth, width)
  weights = jax.random.normal(keys[1], shape)
  index = jax.random.randint(keys[2], (groups,), 0, num_weights)
  expected = sparse_kernels.grouped_matmul(x, weights, index, implementation="xla",
                                           transpose_rhs=transpose_rhs)
  got = sparse_kernels.grouped_matmul(x, weights, index, implementation="pallas",
                                      transpose_rhs=transpose_rhs)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  dense = np.einsum("grk,gnk->grn" if transpose_rhs else "grk,gkn->grn", np.asarray(x),
                    np.asarray(weights)[np.asarray(index)])
  np.testing.assert_allclose(expected, dense, atol=1e-4, rtol=1e-5)


def test_identity_index_and_auto_selection_on_cpu():
  x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  weights = jnp.ones((2, 4, 5))
  auto = sparse_kernels.grouped_matmul(x, weights)
  assert not sparse_kernels.use_pallas()          # CPU: the XLA path is chosen
  np.testing.assert_allclose(auto, sparse_kernels.grouped_matmul(x, weights, None,
                                                                 implementation="pallas"))
  with pytest.raises(ValueError, match="implementation"):
    sparse_kernels.grouped_matmul(x, weights, implementation="triton")


def test_take_blocks_matches_indexing():
  blocks = jnp.arange(5 * 2 * 3, dtype=jnp.float32).reshape(5, 2, 3)
  index = jnp.array([[4, 0], [2, 2]])
  np.testing.assert_array_equal(sparse_kernels.take_blocks(blocks, index), blocks[index])


def test_sparse_forward_with_pallas_kernel_equals_xla_path():
  model = ccjax.GatedMLP(hidden=(32, 32), num_classes=4, block_size=16)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (6, 10))
  params = model.init({"params": key, "gate": key}, x, mode="sample")["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 30.0 if "policy" in jax.tree_util.keystr(path) else v, params)
  block_model = sparse.to_block_major(params, 16)
  outputs = {}
  for implementation in ("xla", "pallas"):
    config = sparse.make_sparse_config(block_model, 6, implementation=implementation)
    forward = jax.jit(sparse.sparse_forward, static_argnums=2)
    outputs[implementation] = forward(block_model, x, config)[0]
  np.testing.assert_allclose(outputs["pallas"], outputs["xla"], atol=1e-5, rtol=1e-5)
