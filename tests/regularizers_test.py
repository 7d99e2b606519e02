"""Tests for ccjax.regularizers against hand-computed values."""

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats

import ccjax

# probs[x, j]: two examples (rows), two blocks (columns).
PROBS = jnp.array([[0.2, 0.6],
                   [0.4, 0.8]])
TAU = 0.25


class RegularizersTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_block_balance(self):
    # Block means over examples: 0.3 and 0.7 -> (0.3 - 0.25)^2 + (0.7 - 0.25)^2.
    expected = 0.05 ** 2 + 0.45 ** 2  # 0.205
    value = self.variant(ccjax.block_balance_loss)(PROBS, TAU)
    chex.assert_shape(value, ())
    np.testing.assert_allclose(value, expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_example_balance(self):
    # Example means over blocks: 0.4 and 0.6 -> mean of 0.15^2 and 0.35^2.
    expected = (0.15 ** 2 + 0.35 ** 2) / 2  # 0.0725
    value = self.variant(ccjax.example_balance_loss)(PROBS, TAU)
    np.testing.assert_allclose(value, expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_variance(self):
    # Population variance over examples: block 0 {0.2, 0.4} -> 0.01, block 1 {0.6, 0.8} -> 0.01.
    value = self.variant(ccjax.variance_loss)(PROBS)
    np.testing.assert_allclose(value, -0.02, rtol=1e-5)

  def test_against_numpy_formulas_on_random_probs(self):
    probs = np.asarray(jax.random.uniform(jax.random.key(0), (7, 5)), np.float64)
    tau = 0.3
    np.testing.assert_allclose(
        ccjax.block_balance_loss(jnp.asarray(probs), tau),
        sum((probs[:, j].mean() - tau) ** 2 for j in range(5)), rtol=1e-5)
    np.testing.assert_allclose(
        ccjax.example_balance_loss(jnp.asarray(probs), tau),
        np.mean([(probs[x].mean() - tau) ** 2 for x in range(7)]), rtol=1e-5)
    np.testing.assert_allclose(
        ccjax.variance_loss(jnp.asarray(probs)),
        -sum(np.mean((probs[:, j] - probs[:, j].mean()) ** 2) for j in range(5)), rtol=1e-5)

  def test_zero_at_target(self):
    probs = jnp.full((4, 8), TAU)
    np.testing.assert_allclose(ccjax.block_balance_loss(probs, TAU), 0.0, atol=1e-12)
    np.testing.assert_allclose(ccjax.example_balance_loss(probs, TAU), 0.0, atol=1e-12)
    np.testing.assert_allclose(ccjax.variance_loss(probs), 0.0, atol=1e-12)

  def test_block_balance_gradient(self):
    # d L_b / d probs[x, j] = 2 (mean_x probs[:, j] - tau) / batch.
    grad = jax.grad(ccjax.block_balance_loss)(PROBS, TAU)
    np.testing.assert_allclose(grad, [[0.05, 0.45], [0.05, 0.45]], rtol=1e-5)

  def test_l2_sums_kernels_only(self):
    params = {
        "hidden_0": {
            "dense": {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "bias": jnp.array([10.0])},
            "policy": {"logits": {"kernel": jnp.array([[0.5]]), "bias": jnp.array([-7.0])}},
        },
        "output": {"kernel": jnp.array([[-2.0]], jnp.bfloat16), "bias": jnp.array([3.0])},
    }
    value = ccjax.l2_loss(params)
    chex.assert_type(value, jnp.float32)
    np.testing.assert_allclose(value, 1 + 4 + 9 + 16 + 0.25 + 4, rtol=1e-6)

  def test_l2_of_no_kernels_is_zero(self):
    np.testing.assert_allclose(ccjax.l2_loss({"bias": jnp.ones(3)}), 0.0)


class BatchShapingTest(chex.TestCase):

  @staticmethod
  def _numpy_loss(probs, a, b):
    """The paper's loss in NumPy/SciPy, block by block."""
    count = probs.shape[0]
    empirical = np.arange(1, count + 1) / (count + 1)
    return sum(np.mean((empirical - scipy_stats.beta.cdf(np.sort(probs[:, j]), a, b)) ** 2)
               for j in range(probs.shape[1]))

  @chex.variants(with_jit=True, without_jit=True)
  def test_against_scipy(self):
    probs = np.asarray(jax.random.uniform(jax.random.key(0), (7, 5), minval=0.01, maxval=0.99))
    value = self.variant(ccjax.batch_shaping_loss)(jnp.asarray(probs), 0.3)
    chex.assert_shape(value, ())
    # tau = 0.3 with a + b = 1: Beta(0.3, 0.7).
    np.testing.assert_allclose(value, self._numpy_loss(probs.astype(np.float64), 0.3, 0.7),
                               rtol=1e-5)

  def test_hand_computed_two_examples(self):
    # Beta(1, 1) (tau 0.5, a + b = 2) is uniform: F(x) = x; empirical CDF 1/3, 2/3.
    probs = jnp.array([[0.5], [0.2]])
    expected = ((1 / 3 - 0.2) ** 2 + (2 / 3 - 0.5) ** 2) / 2
    np.testing.assert_allclose(ccjax.batch_shaping_loss(probs, 0.5, concentration=2.0),
                               expected, rtol=1e-5)

  def test_paper_prior_at_tau_0_6(self):
    a, b = ccjax.batch_shaping_prior(0.6)
    np.testing.assert_allclose([a, b], [0.6, 0.4], rtol=1e-6)

  def test_gradient_is_the_papers_through_the_sort(self):
    probs = np.asarray(jax.random.uniform(jax.random.key(1), (9, 3), minval=0.05, maxval=0.95))
    a, b = 0.25, 0.75
    grad = jax.grad(ccjax.batch_shaping_loss)(jnp.asarray(probs), 0.25)
    count = probs.shape[0]
    expected = np.zeros_like(probs, np.float64)
    for j in range(probs.shape[1]):
      order = np.argsort(probs[:, j])
      x = probs[order, j].astype(np.float64)
      empirical = np.arange(1, count + 1) / (count + 1)
      expected[order, j] = (-2 * scipy_stats.beta.pdf(x, a, b)
                            * (empirical - scipy_stats.beta.cdf(x, a, b)) / count)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)

  def test_per_token_gates_count_every_position(self):
    probs = jax.random.uniform(jax.random.key(2), (2, 3, 4), minval=0.01, maxval=0.99)
    np.testing.assert_allclose(ccjax.batch_shaping_loss(probs, 0.25),
                               ccjax.batch_shaping_loss(probs.reshape(6, 4), 0.25), rtol=1e-6)

  def test_gradient_descent_takes_a_uniform_batch_to_the_prior_quantiles(self):
    # Beta(1, 3) (tau 0.25, a + b = 4) has a density <= 3, so plain gradient descent with
    # step 1 is stable (2 * 3^2 / N < 2); the minimiser puts x_(i) at the prior's
    # i / (N + 1) quantile.
    count = 15
    probs = jnp.linspace(0.05, 0.95, count)[::-1].reshape(count, 1)  # unsorted, uniform
    loss = lambda p: ccjax.batch_shaping_loss(p, 0.25, concentration=4.0)
    start = float(loss(probs))
    update = jax.jit(lambda p: jnp.clip(p - jax.grad(loss)(p), 1e-3, 1 - 1e-3))
    for _ in range(3000):
      probs = update(probs)
    self.assertLess(float(loss(probs)), 1e-6 * start)
    quantiles = scipy_stats.beta.ppf(np.arange(1, count + 1) / (count + 1), 1.0, 3.0)
    np.testing.assert_allclose(np.sort(np.asarray(probs[:, 0])), quantiles, atol=1e-4)
    # The order of the examples is kept: the largest stays the largest.
    self.assertEqual(int(jnp.argmax(probs[:, 0])), 0)

  def test_one_step_moves_a_uniform_batch_towards_the_default_prior(self):
    # The default U-shaped prior Beta(tau, 1 - tau): mean tau, mass near 0 and 1.
    probs = jnp.linspace(0.02, 0.98, 64).reshape(64, 1)
    step = 1e-3 * jax.grad(ccjax.batch_shaping_loss)(probs, 0.25)
    moved = probs - step
    self.assertLess(float(ccjax.batch_shaping_loss(moved, 0.25)),
                    float(ccjax.batch_shaping_loss(probs, 0.25)))
    self.assertLess(float(jnp.mean(moved)), float(jnp.mean(probs)))  # towards tau = 0.25


if __name__ == "__main__":
  absltest.main()
