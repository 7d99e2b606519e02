"""Tests for ccjax.policy: probabilities, sampling, log-prob, entropy, deterministic modes."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

import ccjax
from ccjax import policy as policy_lib


class PolicyProbsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_probs_at_zero_logit_is_half(self):
    probs = self.variant(ccjax.policy_probs)(jnp.zeros((2, 3)))
    np.testing.assert_allclose(probs, 0.5, rtol=0, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_probs_formula(self):
    logits = jnp.array([[-2.0, 0.5, 3.0]])
    eps = 0.05
    expected = [[eps + (1 - 2 * eps) / (1 + math.exp(-value)) for value in (-2.0, 0.5, 3.0)]]
    probs = self.variant(lambda z: ccjax.policy_probs(z, eps))(logits)
    np.testing.assert_allclose(probs, expected, rtol=1e-6)

  @parameterized.parameters(0.0, 0.01, 0.2)
  def test_probs_stay_inside_bounds(self, eps):
    logits = jnp.array([-jnp.inf, -1e6, -30.0, -1.0, 0.0, 1.0, 30.0, 1e6, jnp.inf])
    probs = ccjax.policy_probs(logits, eps)
    self.assertTrue(bool(jnp.all(probs >= eps - 1e-7)))
    self.assertTrue(bool(jnp.all(probs <= 1 - eps + 1e-7)))
    np.testing.assert_allclose(probs[0], eps, atol=1e-7)
    np.testing.assert_allclose(probs[-1], 1 - eps, atol=1e-7)

  def test_probs_gradient_nonzero_near_bound(self):
    # The squash (not a hard clip) keeps a gradient near the bounds.
    grad = jax.grad(lambda z: ccjax.policy_probs(z, 0.01))(jnp.float32(8.0))
    self.assertGreater(float(grad), 0.0)

  def test_validate_eps(self):
    self.assertEqual(policy_lib.validate_eps(0.01), 0.01)
    for bad in (-0.1, 0.5, 0.9):
      with self.assertRaisesRegex(ValueError, "eps"):
        policy_lib.validate_eps(bad)


class LogProbEntropyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_log_prob_hand_values(self):
    probs = jnp.array([[0.2, 0.6, 0.9], [0.5, 0.3, 0.7]])
    block_mask = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    expected = [math.log(0.2) + math.log(0.4) + math.log(0.9),
                math.log(0.5) + math.log(0.7) + math.log(0.7)]
    log_prob = self.variant(ccjax.mask_log_prob)(probs, block_mask)
    chex.assert_shape(log_prob, (2,))
    np.testing.assert_allclose(log_prob, expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_entropy_hand_values(self):
    probs = jnp.array([[0.2, 0.6], [0.5, 0.5]])

    def bernoulli_entropy(p):
      return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    expected = [bernoulli_entropy(0.2) + bernoulli_entropy(0.6), 2 * math.log(2.0)]
    entropy = self.variant(ccjax.policy_entropy)(probs)
    np.testing.assert_allclose(entropy, expected, rtol=1e-6)

  def test_log_prob_sums_to_one_over_masks(self):
    probs = jnp.array([[0.2, 0.7, 0.55]])
    masks = jnp.array([[(code >> j) & 1 for j in range(3)] for code in range(8)], jnp.float32)
    log_probs = jax.vmap(lambda m: ccjax.mask_log_prob(probs, m[None]))(masks)
    np.testing.assert_allclose(jnp.sum(jnp.exp(log_probs)), 1.0, rtol=1e-6)

  def test_log_prob_gradient_is_score(self):
    # d/dp [u log p + (1 - u) log(1 - p)] = u / p - (1 - u) / (1 - p).
    probs = jnp.array([[0.2, 0.6]])
    block_mask = jnp.array([[1.0, 0.0]])
    grad = jax.grad(lambda p: jnp.sum(ccjax.mask_log_prob(p, block_mask)))(probs)
    np.testing.assert_allclose(grad, [[1 / 0.2, -1 / 0.4]], rtol=1e-6)

  def test_log_prob_does_not_differentiate_the_mask(self):
    probs = jnp.array([[0.2, 0.6]])
    grad = jax.grad(lambda m: jnp.sum(ccjax.mask_log_prob(probs, m)))(jnp.array([[1.0, 0.0]]))
    np.testing.assert_array_equal(grad, 0.0)

  @parameterized.parameters(-jnp.inf, -1e6, 1e6, jnp.inf)
  def test_log_prob_and_grad_finite_at_saturated_logits(self, logit):
    eps = 0.01
    logits = jnp.full((2, 3), logit, jnp.float32)
    block_mask = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])

    def log_prob_of_logits(z):
      return jnp.sum(ccjax.mask_log_prob(ccjax.policy_probs(z, eps), block_mask))

    value, grad = jax.value_and_grad(log_prob_of_logits)(logits)
    self.assertTrue(bool(jnp.isfinite(value)))
    self.assertTrue(bool(jnp.all(jnp.isfinite(grad))))
    # Each block contributes log(eps) or log(1 - eps): three of each here.
    np.testing.assert_allclose(value, 3 * math.log(eps) + 3 * math.log(1 - eps), rtol=1e-5)

  @parameterized.parameters(0.01, 0.001)
  def test_log_prob_and_entropy_finite_at_probability_bounds(self, eps):
    probs = jnp.array([[eps, 1 - eps], [1 - eps, eps]], jnp.float32)
    for block_mask in (jnp.zeros((2, 2)), jnp.ones((2, 2)), jnp.eye(2)):
      value, grad = jax.value_and_grad(
          lambda p, m=block_mask: jnp.sum(ccjax.mask_log_prob(p, m)))(probs)
      self.assertTrue(bool(jnp.all(jnp.isfinite(value))))
      self.assertTrue(bool(jnp.all(jnp.isfinite(grad))))
    entropy, grad = jax.value_and_grad(lambda p: jnp.sum(ccjax.policy_entropy(p)))(probs)
    self.assertTrue(bool(jnp.isfinite(entropy)))
    self.assertTrue(bool(jnp.all(jnp.isfinite(grad))))
    self.assertGreater(float(entropy), 0.0)


class DeterministicModesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_threshold(self):
    probs = jnp.array([[0.2, 0.51, 0.5, 0.9]])
    np.testing.assert_array_equal(self.variant(ccjax.threshold_mask)(probs), [[0, 1, 0, 1]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_capped_threshold(self):
    probs = jnp.array([[0.2, 0.51, 0.5, 0.9], [0.8, 0.7, 0.95, 0.6]])
    capped = self.variant(ccjax.capped_threshold_mask, static_argnums=1)
    np.testing.assert_array_equal(capped(probs, 1), [[0, 0, 0, 1], [0, 0, 1, 0]])
    np.testing.assert_array_equal(capped(probs, 2), [[0, 1, 0, 1], [1, 0, 1, 0]])
    # The threshold still applies: 0.5 and 0.2 never run.
    np.testing.assert_array_equal(capped(probs, 4), [[0, 1, 0, 1], [1, 1, 1, 1]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_top_k_is_exactly_k_without_threshold(self):
    probs = jnp.array([[0.2, 0.51, 0.5, 0.9], [0.1, 0.2, 0.05, 0.3]])
    top_k = self.variant(ccjax.top_k_mask, static_argnums=1)
    np.testing.assert_array_equal(top_k(probs, 1), [[0, 0, 0, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(top_k(probs, 3), [[0, 1, 1, 1], [1, 1, 0, 1]])

  def test_top_k_ties_prefer_lower_index(self):
    probs = jnp.array([[0.7, 0.7, 0.7]])
    np.testing.assert_array_equal(ccjax.top_k_mask(probs, 2), [[1, 1, 0]])

  def test_top_k_rows_hold_exactly_k(self):
    probs = jax.random.uniform(jax.random.key(0), (64, 8))
    for capacity in range(1, 9):
      np.testing.assert_array_equal(jnp.sum(ccjax.top_k_mask(probs, capacity), -1), capacity)
      capped = ccjax.capped_threshold_mask(probs, capacity)
      self.assertLessEqual(int(jnp.max(jnp.sum(capped, -1))), capacity)
      np.testing.assert_array_equal(capped * ccjax.threshold_mask(probs), capped)

  def test_top_k_capacity_rounds_tau_times_blocks(self):
    self.assertEqual(ccjax.top_k_capacity(0.125, 16), 2)
    self.assertEqual(ccjax.top_k_capacity(0.25, 16), 4)
    self.assertEqual(ccjax.top_k_capacity(0.01, 16), 1)
    self.assertEqual(ccjax.top_k_capacity(1.0, 16), 16)

  @parameterized.parameters(0, 5, -1)
  def test_top_k_bad_capacity(self, capacity):
    for fn in (ccjax.top_k_mask, ccjax.capped_threshold_mask):
      with self.assertRaisesRegex(ValueError, "capacity"):
        fn(jnp.full((1, 4), 0.6), capacity)

  def test_deterministic_mask_modes(self):
    probs = jnp.array([[0.2, 0.6, 0.9]])
    np.testing.assert_array_equal(ccjax.deterministic_mask(probs, "threshold"), [[0, 1, 1]])
    np.testing.assert_array_equal(ccjax.deterministic_mask(probs, "top_k", 1), [[0, 0, 1]])
    np.testing.assert_array_equal(ccjax.deterministic_mask(probs, "all"), [[1, 1, 1]])
    with self.assertRaisesRegex(ValueError, "capacity"):
      ccjax.deterministic_mask(probs, "top_k")
    with self.assertRaisesRegex(ValueError, "mode"):
      ccjax.deterministic_mask(probs, "sample")


class SampleMaskTest(chex.TestCase):

  def test_values_dtype_and_shape(self):
    probs = jnp.full((5, 4), 0.5, jnp.float32)
    block_mask = ccjax.sample_mask(jax.random.key(0), probs)
    chex.assert_shape(block_mask, (5, 4))
    chex.assert_type(block_mask, jnp.float32)
    self.assertTrue(bool(jnp.all((block_mask == 0) | (block_mask == 1))))

  def test_frequency_matches_probs(self):
    num_samples = 20000
    block_probs = jnp.array([0.01, 0.1, 0.5, 0.9, 0.99])
    probs = jnp.broadcast_to(block_probs, (num_samples, 5))
    frequency = jnp.mean(ccjax.sample_mask(jax.random.key(1), probs), axis=0)
    standard_error = jnp.sqrt(block_probs * (1 - block_probs) / num_samples)
    np.testing.assert_array_less(jnp.abs(frequency - block_probs), 4 * standard_error)

  def test_same_key_same_mask_different_key_different_mask(self):
    probs = jnp.full((16, 8), 0.5)
    first = ccjax.sample_mask(jax.random.key(3), probs)
    np.testing.assert_array_equal(first, ccjax.sample_mask(jax.random.key(3), probs))
    self.assertFalse(bool(jnp.all(first == ccjax.sample_mask(jax.random.key(4), probs))))


if __name__ == "__main__":
  absltest.main()
