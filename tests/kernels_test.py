"""Tests of ccjax.inference.kernels: backend selection, the XLA grouped matmul, and the
Pallas kernel (Pallas interpreter on CPU) against it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from ccjax.inference import capacity
from ccjax.inference import kernels
from ccjax.inference import layout
from ccjax.inference import mlp
from ccjax.inference.kernels import pallas_gpu
from ccjax.inference.kernels import xla


@pytest.mark.parametrize("groups,rows,depth,width,num_weights", [(5, 3, 8, 6, 7), (4, 16, 16, 16, 4)])
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_pallas_interpret_equals_xla(groups, rows, depth, width, num_weights, transpose_rhs):
  keys = jax.random.split(jax.random.PRNGKey(groups), 3)
  x = jax.random.normal(keys[0], (groups, rows, depth))
  shape = (num_weights, width, depth) if transpose_rhs else (num_weights, depth, width)
  weights = jax.random.normal(keys[1], shape)
  index = jax.random.randint(keys[2], (groups,), 0, num_weights)
  expected = kernels.grouped_matmul(x, weights, index, backend="xla",
                                    transpose_rhs=transpose_rhs)
  got = kernels.grouped_matmul(x, weights, index, backend="pallas-gpu",
                               transpose_rhs=transpose_rhs)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  dense = np.einsum("grk,gnk->grn" if transpose_rhs else "grk,gkn->grn", np.asarray(x),
                    np.asarray(weights)[np.asarray(index)])
  np.testing.assert_allclose(expected, dense, atol=1e-4, rtol=1e-5)


def test_identity_index():
  x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  weights = jnp.ones((2, 4, 5))
  np.testing.assert_allclose(kernels.grouped_matmul(x, weights),
                             pallas_gpu.grouped_matmul(x, weights, None))


def test_backend_selection(monkeypatch):
  monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
  available = kernels.available_backends()
  assert available[0] == "xla" and set(available) <= set(kernels.BACKENDS)
  assert kernels.select_backend() == available[-1]
  assert kernels.select_backend("xla") == "xla"
  with pytest.raises(ValueError, match="backend must be one of xla"):
    kernels.select_backend("triton")
  monkeypatch.setenv(kernels.BACKEND_ENV, "xla")
  assert kernels.select_backend() == "xla"
  monkeypatch.setenv(kernels.BACKEND_ENV, "cuda")
  with pytest.raises(ValueError, match="CCJAX_BACKEND must be one of"):
    kernels.select_backend()
  if jax.default_backend() != "gpu":
    monkeypatch.setenv(kernels.BACKEND_ENV, "pallas-gpu")
    with pytest.raises(ValueError, match="CCJAX_BACKEND=pallas-gpu is not available"):
      kernels.select_backend()


def test_take_blocks_matches_indexing():
  blocks = jnp.arange(5 * 2 * 3, dtype=jnp.float32).reshape(5, 2, 3)
  index = jnp.array([[4, 0], [2, 2]])
  np.testing.assert_array_equal(xla.take_blocks(blocks, index), blocks[index])


def test_sparse_forward_with_pallas_kernel_equals_xla_path():
  model = ccjax.GatedMLP(hidden=(32, 32), num_classes=4, block_size=16)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (6, 10))
  params = model.init({"params": key, "gate": key}, x, mode="sample")["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 30.0 if ccjax.is_policy_path(path) else v, params)
  block_model = layout.to_block_major(model, params)
  outputs = {}
  exact = capacity.make_sparse_config(block_model, 6, backend="xla")
  for backend in ("xla", "pallas-gpu"):
    config = capacity.SparseConfig(exact.example_capacity, exact.block_capacity,
                                   exact.pair_capacity, backend=backend).validate(block_model)
    forward = jax.jit(mlp.sparse_forward, static_argnums=2)
    outputs[backend] = forward(block_model, x, config)[0]
  np.testing.assert_allclose(outputs["pallas-gpu"], outputs["xla"], atol=1e-5, rtol=1e-5)
