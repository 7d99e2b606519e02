"""Tests of the one inference contract (ccjax.inference.api): every gated family gives
``fn(x) -> (logits, InferenceInfo)`` whose logits equal the module applied with
``block_masks=info.masks``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from tests import param_utils
from tests import tiers

# References at full float32 precision (XLA:GPU would use TF32 by default).
pytestmark = pytest.mark.usefixtures("full_float32_matmuls")

MLP = ccjax.GatedMLP(hidden=(32, 48), num_classes=5, block_size=8)
CNN = ccjax.GatedCNN(5, stem_features=4, stage_features=(8, 12), strides=(2, 1),
                     residual_blocks=1, block_size=4)
SHAPES = {"mlp": (12,), "cnn": (8, 8, 1)}


# References jitted: one compile per mode and shape instead of one per operation.
_apply = param_utils.jitted_apply


def _module(family):
  return MLP if family == "mlp" else CNN


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def trained(request):
  """A module with random weights whose policies run about half of the blocks."""
  module = _module(request.param)
  shape = SHAPES[request.param]
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (64, *shape))
  params = param_utils.jitted_init(module)({"params": key, "gate": key}, x[:1],
                                          mode="threshold")["params"]
  params = ccjax.calibrate_policies(module, params, x, 0.5)
  return module, params, x


# Fast tier: batch 1 (its own path) and a minibatch of each family; the rest slow.
@pytest.mark.parametrize("trained,batch", tiers.split_product(
    (["mlp", "cnn"], [1, 7, 16]), fast=[("mlp", 1), ("mlp", 7), ("cnn", 1), ("cnn", 16)]),
                         indirect=["trained"])
def test_sparse_equals_module_with_effective_masks(trained, batch):
  module, params, x = trained
  inference = ccjax.make_inference(module, params)
  logits, info = inference(x[:batch])
  reference, aux = _apply(module)({"params": params}, x[:batch], mode="threshold")
  np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5)
  masked_dense, _ = _apply(module)({"params": params}, x[:batch], mode="all",
                                   block_masks=info.masks)
  np.testing.assert_allclose(logits, masked_dense, atol=1e-5, rtol=1e-5)
  for mask, probs, layer_aux in zip(info.masks, info.probs, aux):
    np.testing.assert_array_equal(mask, layer_aux.mask)
    np.testing.assert_allclose(probs, layer_aux.probs, atol=1e-6)
  assert ccjax.overflow_rate(info) == 0.0
  np.testing.assert_array_equal(info.dropped, 0)
  assert int(np.sum(info.requested)) == int(sum(np.sum(a.mask) for a in aux))
  assert inference.backend in ccjax.BACKENDS


def test_tight_capacities_overflow_and_stay_exact(trained):
  module, params, x = trained
  capacities = ccjax.Capacities(active_fraction=0.1, example_slack=1.0)
  logits, info = ccjax.make_inference(module, params, capacities=capacities)(x[:16])
  assert ccjax.overflow_rate(info) > 0.0
  masked_dense, _ = _apply(module)({"params": params}, x[:16], mode="all", block_masks=info.masks)
  np.testing.assert_allclose(logits, masked_dense, atol=1e-5, rtol=1e-5)


def test_capped_mode_caps_blocks_per_example(trained):
  module, params, x = trained
  logits, info = ccjax.make_inference(module, params, mode="capped",
                                      capacities=ccjax.Capacities(top_k=1))(x[:8])
  for mask, probs in zip(info.masks, info.probs):
    assert np.all(np.sum(np.asarray(mask), -1) <= 1)
  reference, _ = _apply(module)({"params": params}, x[:8], mode="capped", capacity=1)
  np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 8])
def test_top_k_mode_runs_exactly_k_blocks(trained, batch):
  module, params, x = trained
  fn = ccjax.make_inference(module, params, mode="top_k", capacities=ccjax.Capacities(top_k=2))
  logits, info = fn(x[:batch])
  for mask in info.masks:
    if mask.shape[-1] > 1:  # a CNN's skip gates (one block) keep the threshold
      np.testing.assert_array_equal(np.sum(np.asarray(mask), -1), 2)
  assert int(np.sum(info.dropped)) == 0
  reference, aux = _apply(module)({"params": params}, x[:batch], mode="top_k", capacity=2)
  for mask, layer_aux in zip(info.masks, aux):
    np.testing.assert_array_equal(mask, layer_aux.mask)
  np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5)


def test_macs_and_latency(trained):
  module, params, x = trained
  shape = x.shape[1:]
  _, info = ccjax.make_inference(module, params)(x[:8])
  macs = ccjax.macs_per_example(module, shape, info.masks)
  dense = ccjax.dense_macs_per_example(module, shape)
  assert macs.shape == (8,) and np.all(macs < dense) and np.all(macs > 0)
  latency = ccjax.measure_latency(module, params, [x[:1]], repeats=2)
  assert set(latency) == {"dense", "sparse"} and min(latency.values()) > 0


def test_calibration_hits_the_fraction(trained):
  module, params, x = trained
  _, aux = _apply(module)({"params": params}, x, mode="threshold")
  fraction = np.mean([np.mean(np.asarray(a.mask)) for a in aux])
  assert 0.35 < fraction < 0.65


def test_dense_inference_is_the_ungated_network(trained):
  module, params, x = trained
  dense = ccjax.make_dense_inference(module, params)(x[:4])
  reference, _ = _apply(module)({"params": params}, x[:4], mode="all")
  np.testing.assert_allclose(dense, reference, atol=1e-5, rtol=1e-5)


def test_bad_arguments():
  key = jax.random.PRNGKey(0)
  params = param_utils.jitted_init(MLP)({"params": key, "gate": key}, jnp.zeros((1, 12)),
                                         mode="all")["params"]
  with pytest.raises(ValueError, match="mode must be one of threshold|top_k"):
    ccjax.make_inference(MLP, params, mode="sample")
  with pytest.raises(ValueError, match="top_k"):
    ccjax.make_inference(MLP, params, mode="top_k")
  with pytest.raises(ValueError, match="gated=True"):
    ccjax.make_inference(MLP.clone(gated=False), params)
  with pytest.raises(ValueError, match="supports GatedMLP, GatedCNN and GatedTransformer"):
    ccjax.make_inference(ccjax.GatedDense(8, block_size=4), params)
  with pytest.raises(ValueError, match="active_fraction"):
    ccjax.Capacities(active_fraction=1.5)
  with pytest.raises(ValueError, match="example_slack"):
    ccjax.Capacities(example_slack=float("inf"))
