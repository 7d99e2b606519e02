"""Tests of the estimator registry (``ccjax.estimators.REGISTRY``)."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

import ccjax
from ccjax import estimators
from ccjax import policy as policy_lib

CAPACITY = 2


class RegistryTest(parameterized.TestCase):

  def test_names_and_lists_come_from_the_registry(self):
    self.assertEqual(estimators.ESTIMATORS, tuple(estimators.REGISTRY))
    self.assertEqual(ccjax.ESTIMATORS, estimators.ESTIMATORS)
    self.assertEqual(estimators.ESTIMATORS[:4],
                     ("reinforce", "straight_through", "gumbel", "router"))
    for name, estimator in estimators.REGISTRY.items():
      self.assertEqual(estimator.name, name)
      self.assertIs(estimators.get(name), estimator)
    self.assertEqual(set(estimators.TOP_K_ESTIMATORS),
                     {"router", "reinforce_top_k", "noisy_top_k"})
    self.assertEqual({n for n, e in estimators.REGISTRY.items() if e.score_function},
                     {"reinforce", "reinforce_top_k"})

  def test_unknown_name(self):
    with self.assertRaisesRegex(ValueError, "estimator must be one of reinforce|.*got 'nope'"):
      estimators.get("nope")
    with self.assertRaisesRegex(ValueError, "estimator"):
      ccjax.TrainConfig(estimator="nope")
    with self.assertRaisesRegex(ValueError, "estimator"):
      ccjax.GatedDense(8, block_size=2, estimator="nope")

  @parameterized.parameters(*estimators.ESTIMATORS)
  def test_training_mask_through_make_block_mask(self, name):
    estimator = estimators.get(name)
    probs = jnp.asarray(np.random.RandomState(0).uniform(0.05, 0.95, (6, 5)), jnp.float32)
    block_mask = ccjax.make_block_mask(probs, "sample", name, rng=jax.random.key(1),
                                       capacity=CAPACITY)
    self.assertEqual(block_mask.shape, probs.shape)
    self.assertTrue(bool(jnp.all((block_mask == 0) | (block_mask == 1))))
    if estimator.needs_capacity:
      np.testing.assert_array_equal(jnp.sum(block_mask, -1), CAPACITY)
      with self.assertRaisesRegex(ValueError, f"estimator '{name}'.*needs a capacity"):
        ccjax.make_block_mask(probs, "sample", name, rng=jax.random.key(1))
    if estimator.needs_rng:
      with self.assertRaisesRegex(ValueError, "rng"):
        ccjax.make_block_mask(probs, "sample", name, capacity=CAPACITY)
    else:  # deterministic: no key needed, same mask every time
      np.testing.assert_array_equal(
          ccjax.make_block_mask(probs, "sample", name, capacity=CAPACITY), block_mask)

  @parameterized.parameters(*estimators.ESTIMATORS)
  def test_gate_log_prob_is_the_estimators_in_sample_mode(self, name):
    estimator = estimators.get(name)
    layer = ccjax.GatedDense(10, block_size=2, estimator=name)
    x = jax.random.normal(jax.random.key(0), (4, 3))
    params = layer.init({"params": jax.random.key(1), "gate": jax.random.key(2)}, x,
                        mode="all")["params"]
    _, aux = layer.apply({"params": params}, x, mode="sample", capacity=CAPACITY,
                         rngs={"gate": jax.random.key(3)})
    expected = (estimator.log_prob(aux.probs, aux.mask, CAPACITY) if estimator.score_function
                else policy_lib.mask_log_prob(aux.probs, aux.mask))
    np.testing.assert_allclose(aux.log_prob, expected, rtol=1e-6)
    # Deterministic modes report the Bernoulli policy's log-probability.
    _, aux = layer.apply({"params": params}, x, mode="top_k", capacity=CAPACITY)
    np.testing.assert_allclose(aux.log_prob, policy_lib.mask_log_prob(aux.probs, aux.mask),
                               rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
