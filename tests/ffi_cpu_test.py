"""Tests of the ffi-cpu backend: the FFI handler runs the same blocks as the XLA path and
its logits equal masked-dense inference with the masks it used."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccjax import sparse
from ccjax.inference.kernels import ffi_cpu

INPUT_DIM, CLASSES = 37, 7
FFI = jax.jit(ffi_cpu.gated_mlp_forward, static_argnums=2)
XLA = jax.jit(sparse.sparse_forward, static_argnums=2)
MASKED_DENSE = jax.jit(sparse.masked_dense_forward)

needs_extension = pytest.mark.skipif(
    not ffi_cpu.available(), reason=f"ffi-cpu unavailable: {ffi_cpu.unavailable_reason()}")


def test_extension_is_built_in_ci():
  """CI builds the extension: without it every other test here would only skip."""
  if os.environ.get("CI", "").lower() != "true":
    pytest.skip("only enforced when CI=true")
  assert ffi_cpu.available(), ffi_cpu.unavailable_reason()


def _params(block_size, widths, tau, seed=0):
  return sparse.random_gated_mlp_params(jax.random.PRNGKey(seed), INPUT_DIM, widths, CLASSES,
                                        block_size, tau, calibration_size=64)


def _fixed_policy_params(block_size, widths, on_blocks, seed=0):
  """Params whose policies ignore the input: layer ``l`` runs exactly ``on_blocks[l]``."""
  params = _params(block_size, widths, 0.5, seed)
  for index, on in enumerate(on_blocks):
    logits = params[f"hidden_{index}"]["policy"]["logits"]
    nb = logits["bias"].shape[0]
    logits["kernel"] = jnp.zeros_like(logits["kernel"])
    logits["bias"] = jnp.where(jnp.isin(jnp.arange(nb), jnp.asarray(on, jnp.int32)), 50.0, -50.0)
  return params


def _inputs(batch, seed=0):
  return jax.random.normal(jax.random.PRNGKey(100 + seed), (batch, INPUT_DIM), jnp.float32)


def _check(params, block_size, x, config):
  """FFI vs XLA (same blocks, same traces) and vs masked-dense (1e-5); returns FFI masks."""
  model = sparse.to_block_major(params, block_size)
  logits, traces = FFI(model, x, config)
  xla_logits, xla_traces = XLA(model, x, config)
  for trace, xla_trace in zip(traces, xla_traces):
    np.testing.assert_array_equal(trace.block_index, xla_trace.block_index)
    np.testing.assert_array_equal(trace.kept, xla_trace.kept)
    assert int(trace.num_candidates) == int(xla_trace.num_candidates)
    assert int(trace.num_kept) == int(xla_trace.num_kept)
  masks = sparse.trace_masks(traces, model.num_blocks)
  np.testing.assert_allclose(logits, MASKED_DENSE(params, x, masks), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits, xla_logits, atol=1e-5, rtol=1e-5)
  return [np.asarray(mask) for mask in masks], traces


@needs_extension
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_random_ragged_masks_exact_capacities(block_size, batch):
  widths = (4 * block_size, 3 * block_size, 5 * block_size)
  params = _params(block_size, widths, 0.4, seed=block_size + batch)
  model = sparse.to_block_major(params, block_size)
  masks, traces = _check(params, block_size, _inputs(batch, batch),
                         sparse.make_sparse_config(model, batch))
  assert float(sparse.overflow_rate(traces)) == 0.0
  if batch > 1:
    assert len({int(row.sum()) for mask in masks for row in mask}) > 1   # ragged


@needs_extension
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("batch", [1, 9, 40])
def test_overflowing_capacities(block_size, batch):
  widths = (6 * block_size, 6 * block_size, 4 * block_size)
  params = _params(block_size, widths, 0.5, seed=batch)
  model = sparse.to_block_major(params, block_size)
  config = sparse.make_sparse_config(model, batch, 0.25, example_slack=1.0)
  _, traces = _check(params, block_size, _inputs(batch, batch), config)
  assert float(sparse.overflow_rate(traces)) > 0.0


@needs_extension
def test_tightest_capacities_drop_by_every_rule():
  block_size, batch = 16, 11
  params = _params(block_size, (8 * block_size, 8 * block_size), 0.6, seed=3)
  model = sparse.to_block_major(params, block_size)
  config = sparse.SparseConfig(example_capacity=(3, 3), block_capacity=(2, 2),
                               pair_capacity=(1, 1)).validate(model)
  _, traces = _check(params, block_size, _inputs(batch, 3), config)
  loose = sparse.SparseConfig(example_capacity=(3, 3), block_capacity=(2, 2),
                              pair_capacity=(batch, batch)).validate(model)
  _, loose_traces = _check(params, block_size, _inputs(batch, 3), loose)
  # The pair capacity really binds: fewer (example, block) pairs run with C2 = 1.
  assert int(traces[1].num_kept) < int(loose_traces[1].num_kept)


@needs_extension
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("on_blocks,expected", [
    (((), (), ()), "off"),                      # empty active sets everywhere
    (((0, 3), (0, 2), (0, 4)), "first_last"),   # first and last block of every layer
    (((0, 1, 2, 3), (0, 1, 2), (0, 1, 2, 3, 4)), "on"),
    (((1,), (), (2,)), "middle_off"),           # a layer whose input is empty
])
def test_fixed_active_sets(on_blocks, expected, batch):
  block_size = 16
  widths = (4 * block_size, 3 * block_size, 5 * block_size)
  params = _fixed_policy_params(block_size, widths, on_blocks)
  model = sparse.to_block_major(params, block_size)
  masks, _ = _check(params, block_size, _inputs(batch), sparse.make_sparse_config(model, batch))
  for mask, on in zip(masks, on_blocks):
    want = np.zeros(mask.shape[1], bool)
    want[list(on)] = True
    np.testing.assert_array_equal(mask, np.broadcast_to(want, mask.shape), err_msg=expected)


@needs_extension
def test_batch1_matches_bucketed_xla_path():
  block_size = 32
  params = _params(block_size, (8 * block_size, 8 * block_size), 0.25, seed=5)
  model = sparse.to_block_major(params, block_size)
  config = sparse.make_sparse_config(model, 1, num_buckets=4)
  for seed in range(4):
    _check(params, block_size, _inputs(1, seed), config)


@needs_extension
def test_two_threads_equal_one(monkeypatch):
  block_size, batch = 32, 24
  params = _params(block_size, (6 * block_size, 6 * block_size), 0.4, seed=7)
  model = sparse.to_block_major(params, block_size)
  config = sparse.make_sparse_config(model, batch, 0.4)
  x = _inputs(batch, 7)
  outputs = []
  for threads in ("1", "2"):
    monkeypatch.setenv(ffi_cpu.THREADS_ENV, threads)
    outputs.append(jax.jit(ffi_cpu.gated_mlp_forward, static_argnums=2)(model, x, config))
  np.testing.assert_array_equal(outputs[0][0], outputs[1][0])


@needs_extension
def test_bad_inputs_are_rejected_before_the_call():
  block_size = 16
  params = _params(block_size, (2 * block_size, 2 * block_size), 0.5)
  model = sparse.to_block_major(params, block_size)
  config = sparse.make_sparse_config(model, 2)
  with pytest.raises(ValueError, match="x must be"):
    ffi_cpu.gated_mlp_forward(model, jnp.zeros((2, INPUT_DIM + 1)), config)
  half = model.replace(output_bias=model.output_bias.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="output_bias must be float32"):
    ffi_cpu.gated_mlp_forward(half, jnp.zeros((2, INPUT_DIM)), config)
  bad = model.replace(output_kernel=model.output_kernel[:, :-1])
  with pytest.raises(ValueError, match="output_kernel"):
    ffi_cpu.gated_mlp_forward(bad, jnp.zeros((2, INPUT_DIM)), config)
  assert ffi_cpu.supports(model)
  assert not ffi_cpu.supports(jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), model))


def test_threads_env_is_validated(monkeypatch):
  monkeypatch.setenv(ffi_cpu.THREADS_ENV, "zero")
  with pytest.raises(ValueError, match=ffi_cpu.THREADS_ENV):
    ffi_cpu.num_threads()
  monkeypatch.setenv(ffi_cpu.THREADS_ENV, "3")
  assert ffi_cpu.num_threads() == 3
