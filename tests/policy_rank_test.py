"""A factorised linear policy Z = A B (``policy_rank``): module, inference, MACs, checks."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from ccjax import config as config_lib
from ccjax import flops
from ccjax import layers
from ccjax import validation
from ccjax.nnx import layers as nnx_layers

pytestmark = pytest.mark.usefixtures("full_float32_matmuls")

RANK = 3
MODULE = ccjax.GatedMLP(hidden=(32, 48), num_classes=5, block_size=8, policy_rank=RANK)


def _params(module=MODULE, calibrate=True):
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (64, 12))
  params = module.init({"params": key, "gate": key}, x[:1], mode="threshold")["params"]
  if calibrate:
    params = ccjax.calibrate_policies(module, params, x, 0.5)
  return params, x


def test_the_policy_is_the_product_of_its_factors():
  params, x = _params(calibrate=False)
  policy = params["hidden_0"]["policy"]
  assert policy["factor"]["kernel"].shape == (12, RANK)
  assert "bias" not in policy["factor"]
  assert policy["logits"]["kernel"].shape == (RANK, 4)
  # policy_weights folds A B into one [in, blocks] matrix with the same probabilities.
  folded = layers.policy_weights(params["hidden_0"])
  assert folded.kernel.shape == (12, 4)
  _, aux = MODULE.apply({"params": params}, x, mode="all")
  expected = ccjax.policy_probs(x @ folded.kernel + folded.bias)
  np.testing.assert_allclose(aux[0].probs, expected, atol=1e-6)


@pytest.mark.parametrize("mode", ["threshold", "top_k"])
def test_sparse_inference_equals_masked_dense(mode):
  params, x = _params()
  capacities = ccjax.Capacities(top_k=2) if mode == "top_k" else None
  logits, info = ccjax.make_inference(MODULE, params, mode=mode, capacities=capacities)(x[:9])
  reference, aux = MODULE.apply({"params": params}, x[:9], mode=mode,
                                capacity=2 if mode == "top_k" else None)
  np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5)
  for mask, layer_aux in zip(info.masks, aux):
    np.testing.assert_array_equal(mask, layer_aux.mask)


def test_macs_count_the_factorised_policy():
  params, x = _params()
  _, info = ccjax.make_inference(MODULE, params)(x[:8])
  macs = ccjax.macs_per_example(MODULE, (12,), info.masks)
  full = ccjax.GatedMLP(hidden=(32, 48), num_classes=5, block_size=8)
  full_macs = ccjax.macs_per_example(full, (12,), info.masks)
  # Layer 0's policy reads the 12 inputs (4 blocks), layer 1's the active units of layer 0
  # (6 blocks): the full policies cost in * blocks, the factorised ones in * r + r * blocks.
  active_in = np.sum(np.asarray(info.masks[0]), -1) * 8
  saving = (12 * 4 - (12 * RANK + RANK * 4)) + (active_in * 6 - (active_in * RANK + RANK * 6))
  np.testing.assert_allclose(full_macs - macs, saving)
  assert flops.policy_macs(12, 4, RANK) == 12 * RANK + RANK * 4


def test_bad_ranks_are_refused_in_one_line():
  with pytest.raises(validation.ConfigError, match="policy_rank.*policy_hidden"):
    config_lib.ExperimentConfig.create(policy_rank=4, policy_hidden=8,
                                       measure_latency=False)
  with pytest.raises(validation.ConfigError, match="policy_rank"):
    config_lib.ExperimentConfig.create(policy_rank=-1)
  with pytest.raises(ValueError, match="policy_rank"):
    ccjax.GatedMLP(hidden=(16,), num_classes=3, block_size=8, policy_rank=2,
                   policy_hidden=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 4)), mode="all")
  with pytest.raises(ValueError, match="policy_rank must be 0"):
    nnx_layers.GatedMLP(4, (16,), 3, block_size=8, policy_rank=2,
                        rngs=nnx.Rngs(0))


def test_the_experiment_config_builds_a_factorised_model():
  config = config_lib.ExperimentConfig.create(policy_rank=16, block_size=8)
  module = config_lib.build_model(config, (40,), 10)
  assert module.policy_rank == 16
