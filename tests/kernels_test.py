"""Tests of ccjax.inference.kernels: backend selection, the XLA grouped matmul, and the
dispatch to the Pallas kernel (real on a GPU host, the Pallas interpreter elsewhere)."""

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

pytestmark = pytest.mark.usefixtures("full_float32_matmuls")


@pytest.mark.parametrize("groups,rows,depth,width,num_weights", [(5, 3, 8, 6, 7), (4, 16, 16, 16, 4)])
def test_pallas_equals_xla(groups, rows, depth, width, num_weights):
  keys = jax.random.split(jax.random.PRNGKey(groups), 3)
  x = jax.random.normal(keys[0], (groups, rows, depth))
  weights = jax.random.normal(keys[1], (num_weights, depth, width))
  index = jax.random.randint(keys[2], (groups,), 0, num_weights)
  expected = kernels.grouped_matmul(x, weights, index, backend="xla")
  got = kernels.grouped_matmul(x, weights, index, backend="pallas-gpu",
                               tiles=pallas_gpu.pad_weight_tiles(weights))
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  dense = np.einsum("grk,gkn->grn", np.asarray(x), np.asarray(weights)[np.asarray(index)])
  np.testing.assert_allclose(expected, dense, atol=1e-4, rtol=1e-5)


def test_xla_transposed_blocks():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5))
  weights = jax.random.normal(jax.random.PRNGKey(1), (4, 7, 5))
  index = jnp.array([3, 0, 3])
  got = kernels.grouped_matmul(x, weights, index, backend="xla", transpose_rhs=True)
  np.testing.assert_allclose(got, np.einsum("grk,gnk->grn", x, np.asarray(weights)[index]),
                             atol=1e-5, rtol=1e-5)


def test_pallas_dispatch_checks_its_arguments():
  x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  weights = jnp.ones((2, 4, 5))
  np.testing.assert_allclose(
      kernels.grouped_matmul(x, weights, backend="pallas-gpu",
                             tiles=pallas_gpu.pad_weight_tiles(weights)),
      kernels.grouped_matmul(x, weights))
  with pytest.raises(ValueError, match="tiles"):
    kernels.grouped_matmul(x, weights, backend="pallas-gpu")
  with pytest.raises(ValueError, match="untransposed"):
    kernels.grouped_matmul(x, weights, backend="pallas-gpu", transpose_rhs=True)


def test_backend_selection(monkeypatch):
  monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
  available = kernels.available_backends()
  assert available[0] == "xla" and set(available) <= set(kernels.BACKENDS)
  assert ("pallas-gpu" in available) == (jax.default_backend() == "gpu")
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


def _gated_mlp_params(model, x):
  key = jax.random.PRNGKey(0)
  params = model.init({"params": key, "gate": key}, x, mode="sample")["params"]
  return jax.tree_util.tree_map_with_path(
      lambda path, v: v * 30.0 if ccjax.is_policy_path(path) else v, params)


@pytest.mark.parametrize("capacities", [pytest.param(None, marks=pytest.mark.slow),
                                        ((2, 2), (3, 3), (1, 2))])
def test_sparse_forward_with_pallas_kernel_equals_xla_path(capacities):
  """Exact and overflowing capacities (empty, partial and full groups; padded policy and
  output weights)."""
  model = ccjax.GatedMLP(hidden=(32, 32), num_classes=4, block_size=16)
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 10))
  params = _gated_mlp_params(model, x)
  block_model = layout.to_block_major(model, params, pallas_tiles=True)
  outputs = {}
  for backend in ("xla", "pallas-gpu"):
    if capacities is None:
      exact = capacity.make_sparse_config(block_model, 6, backend="xla")
      capacities_used = (exact.example_capacity, exact.block_capacity, exact.pair_capacity)
    else:
      capacities_used = capacities
    config = capacity.SparseConfig(*capacities_used, backend=backend).validate(block_model)
    outputs[backend] = jax.jit(mlp.sparse_forward, static_argnums=2)(block_model, x, config)
  np.testing.assert_allclose(outputs["pallas-gpu"][0], outputs["xla"][0], atol=1e-5, rtol=1e-5)
  for pallas_trace, xla_trace in zip(outputs["pallas-gpu"][1], outputs["xla"][1]):
    np.testing.assert_array_equal(pallas_trace.kept, xla_trace.kept)
  masks = capacity.trace_masks(outputs["pallas-gpu"][1], block_model.num_blocks)
  masked_dense = model.apply({"params": params}, x, mode="all", block_masks=masks)[0]
  np.testing.assert_allclose(outputs["pallas-gpu"][0], masked_dense, atol=1e-5, rtol=1e-5)


def test_pallas_path_needs_a_padded_layout():
  model = ccjax.GatedMLP(hidden=(32,), num_classes=4, block_size=16)
  x = jnp.ones((3, 10))
  block_model = layout.to_block_major(model, _gated_mlp_params(model, x), pallas_tiles=False)
  assert block_model.output_tiles is None and block_model.layers[0].grouped_tiles is None
  exact = capacity.make_sparse_config(block_model, 3, backend="xla")
  config = capacity.SparseConfig(exact.example_capacity, exact.block_capacity,
                                 exact.pair_capacity, backend="pallas-gpu")
  with pytest.raises(ValueError, match="pallas_tiles=True"):
    mlp.sparse_forward(block_model, x, config)
