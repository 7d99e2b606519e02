"""Tests for ccjax.inference.cnn: skipping CNN inference agrees with masked dense."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from ccjax import conv
from ccjax import layers
from ccjax.inference import cnn
from tests import param_utils

# References at full float32 precision (XLA:GPU would use TF32 by default).
pytestmark = pytest.mark.usefixtures("full_float32_matmuls")

SMALL = dict(stem_features=4, stage_features=(8, 12), strides=(2, 1), residual_blocks=1,
             block_size=4)
BATCH = 8


def _init(model, x, seed=0):
  """Fan-in scaled kernels; policy kernels larger so probabilities vary."""
  return param_utils.numpy_params(model, x, seed, policy_kernel_scale=3.0, bias_scale=0.1)


def _shift_policy_biases(params, shift):
  def shifted(path, leaf):
    names = [getattr(entry, "key", None) for entry in path]
    return leaf + shift if "policy" in names and names[-1] == "bias" else leaf
  return jax.tree_util.tree_map_with_path(shifted, params)


@pytest.fixture(scope="module")
def setup():
  model = conv.GatedCNN(10, **SMALL)
  x = jax.random.uniform(jax.random.PRNGKey(0), (BATCH, 8, 8, 1))
  params = ccjax.calibrate_policies(model, _init(model, x), x, 0.5)
  return model, params, x


@functools.lru_cache(maxsize=None)
def _reference(model, mode="threshold", capacity=None):
  return jax.jit(lambda p, x, masks=None: model.apply(
      {"params": p}, x, mode=mode, capacity=capacity, block_masks=masks))


@functools.lru_cache(maxsize=None)
def _sparse(model, mode="threshold", capacity=None, example_capacity=None):
  return jax.jit(cnn.make_cnn_inference(model, mode=mode, capacity=capacity,
                                                example_capacity=example_capacity))


@pytest.mark.parametrize("case, shift", [("calibrated", 0.0), ("none_run", -30.0),
                                         ("all_run", 30.0)])
def test_minibatch_matches_masked_dense(setup, case, shift):
  model, params, x = setup
  params = _shift_policy_biases(params, shift)
  logits, info = _sparse(model)(params, x)
  ref_logits, ref_aux = _reference(model)(params, x)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
  for mask, probs, ref in zip(info.masks, info.probs, ref_aux):
    np.testing.assert_array_equal(mask, ref.mask)
    np.testing.assert_allclose(probs, ref.probs, atol=1e-6)
  np.testing.assert_array_equal(info.dropped, 0)
  active = np.mean([np.mean(m) for m in info.masks])
  if case == "none_run":
    assert active == 0.0
  elif case == "all_run":
    assert active == 1.0
    np.testing.assert_array_equal(info.requested, [BATCH * 2, BATCH, BATCH * 3, BATCH])
  else:
    assert 0.0 < active < 1.0


def test_batch_one_matches_masked_dense(setup):
  model, params, x = setup
  ref_logits, ref_aux = _reference(model)(params, x)
  sparse = _sparse(model)
  runs = set()
  for index in range(BATCH):
    logits, info = sparse(params, x[index:index + 1])
    np.testing.assert_allclose(logits[0], ref_logits[index], atol=1e-5, rtol=0)
    for mask, ref in zip(info.masks, ref_aux):
      np.testing.assert_array_equal(mask[0], ref.mask[index])
    runs.add(tuple(float(m[0, 0]) for m in info.masks[1::2]))
  assert len(runs) > 1  # both skipped and run residual blocks were exercised


def test_overflow_drops_lowest_probability_examples(setup):
  model, params, x = setup
  params = _shift_policy_biases(params, 30.0)  # every residual block asks to run ...
  for layer in model.gate_layers():  # ... with probabilities that differ by example
    if layer.kind == conv.SKIP_GATE:
      params = jax.tree_util.tree_map_with_path(
          lambda path, leaf, name=layer.name: (
              (jnp.zeros_like(leaf) if path[-1].key == "bias" else jnp.full(leaf.shape, 50.0))
              if path[0].key == name and layers.is_policy_path(path) else leaf), params)
  logits, info = _sparse(model, example_capacity=3)(params, x)
  requested = np.asarray(info.requested)[1::2]   # the residual (skip) layers
  assert np.all(requested > 3)
  np.testing.assert_array_equal(np.asarray(info.dropped)[1::2], requested - 3)
  np.testing.assert_array_equal(np.asarray(info.dropped)[0::2], 0)
  for layer_index in (1, 3):
    kept = np.asarray(info.masks[layer_index])[:, 0]
    probs = np.asarray(info.probs[layer_index])[:, 0]
    assert kept.sum() == 3
    assert probs[kept > 0].min() >= probs[kept == 0].max()
  # Dropped over every requested (example, block) pair, channel blocks included.
  assert ccjax.overflow_rate(info) == pytest.approx(
      (requested - 3).sum() / np.asarray(info.requested).sum())
  # Overflowing examples behave exactly as skipped: masked dense with the effective masks.
  ref_logits, _ = _reference(model)(params, x, info.masks)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
  full_logits, _ = _reference(model)(params, x)
  assert not np.allclose(logits, full_logits, atol=1e-3)


@pytest.mark.parametrize("mode", ["top_k", "capped"])
def test_top_k_capped_and_all_modes(setup, mode):
  model, params, x = setup
  logits, info = _sparse(model, mode, 1)(params, x)
  ref_logits, ref_aux = _reference(model, mode, 1)(params, x)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
  counts = np.sum(np.asarray(info.masks[2]), -1)
  assert np.all(counts == 1) if mode == "top_k" else np.all(counts <= 1)
  all_logits, all_info = _sparse(model, "all")(params, x)
  dense = conv.GatedCNN(10, gated=False, **SMALL)
  dense_logits, _ = jax.jit(dense.apply)({"params": layers.strip_policy_params(params)}, x)
  np.testing.assert_allclose(all_logits, dense_logits, atol=1e-5, rtol=0)
  assert all(np.all(np.asarray(m) == 1) for m in all_info.masks)


def test_channel_gated_conv_computes_masked_dense():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(5, 6, 6, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 20)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(20,)), jnp.float32)
  dense = jax.nn.relu(cnn.conv2d(x, kernel, bias, 2))
  fn = jax.jit(functools.partial(cnn.channel_gated_conv, block_size=4, stride=2))
  masks = [np.zeros((5, 5)), np.ones((5, 5)), np.eye(5), (rng.random((5, 5)) > 0.7) * 1.0,
           np.zeros((5, 5)) + (np.arange(5) == 3)]
  for mask in masks:
    y = fn(x, kernel, bias, jnp.asarray(mask, jnp.float32))
    expected = dense * np.repeat(mask, 4, axis=-1)[:, None, None, :]
    np.testing.assert_allclose(y, expected, atol=1e-5, rtol=0)


def test_skip_residual_matches_loop():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(6, 4, 4, 2)), jnp.float32)
  branch = [layers.LayerWeights(kernel=jnp.asarray(rng.normal(size=(3, 3, 2, 2)), jnp.float32),
                                bias=jnp.zeros((2,))) for _ in range(2)]
  probs = jnp.asarray(rng.random(6), jnp.float32)
  full = x + conv.residual_branch(
      [lambda h, w=w: cnn.conv2d(h, w.kernel, w.bias) for w in branch], x)
  for capacity in (1, 4, 6):
    fn = jax.jit(functools.partial(cnn.skip_residual, branch_weights=branch,
                                   example_capacity=capacity))
    for run in (np.zeros(6), np.ones(6), (rng.random(6) > 0.5) * 1.0):
      y, kept, overflow = fn(x, run=jnp.asarray(run, jnp.float32), probs=probs)
      order = np.argsort(-np.where(run > 0, probs, -1.0), kind="stable")
      expected_kept = np.zeros(6)
      expected_kept[order[:min(capacity, int(run.sum()))]] = 1.0
      np.testing.assert_array_equal(kept, expected_kept)
      assert int(overflow) == int(run.sum()) - int(expected_kept.sum())
      expected = np.where(expected_kept[:, None, None, None] > 0, full, x)
      np.testing.assert_allclose(y, expected, atol=1e-5, rtol=0)


def test_buckets():
  assert cnn.channel_buckets(1) == (0, 1)
  assert cnn.channel_buckets(6) == (0, 1, 2, 4, 6)
  assert cnn.example_buckets(1) == (0, 1)
  assert cnn.example_buckets(10) == (0, 3, 5, 8, 10)


def test_inference_validates_arguments():
  gated = conv.GatedCNN(10, **SMALL)
  with pytest.raises(ValueError, match="gated=True"):
    cnn.make_cnn_inference(conv.GatedCNN(10, gated=False, **SMALL))
  with pytest.raises(ValueError, match="mode"):
    cnn.make_cnn_inference(gated, mode="sample")
  with pytest.raises(ValueError, match="capacity"):
    cnn.make_cnn_inference(gated, mode="top_k")
  with pytest.raises(ValueError, match="example_capacity"):
    cnn.make_cnn_inference(gated, example_capacity=0)
