"""Tests for ccjax.regularizers against hand-computed values."""

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

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


if __name__ == "__main__":
  absltest.main()
