"""Tests of ccjax.regularizers.load_balance_loss and its place in the policy objective."""

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

import ccjax
from ccjax import regularizers


class LoadBalanceLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_hand_computed_value(self):
    # 2 examples, 3 blocks. Blocks run: x0 {0, 1}, x1 {0, 2} -> per-block fractions
    # [1, 0.5, 0.5], shares f = [0.5, 0.25, 0.25]. Mean probs [0.6, 0.3, 0.3] -> shares
    # P = [0.5, 0.25, 0.25]. Loss = 3 * (0.25 + 0.0625 + 0.0625) = 1.125.
    probs = jnp.array([[0.8, 0.4, 0.2], [0.4, 0.2, 0.4]])
    block_mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    value = self.variant(regularizers.load_balance_loss)(probs, block_mask)
    np.testing.assert_allclose(value, 1.125, rtol=1e-6)

  def test_hand_computed_gradient(self):
    # dL/dprobs[x, j] = n / (B * sum_i mbar_i) * (f_j - sum_i f_i P_i), mbar = mean probs.
    probs = jnp.array([[0.8, 0.4, 0.2], [0.4, 0.2, 0.4]])
    block_mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    grad_probs, grad_mask = jax.grad(regularizers.load_balance_loss, argnums=(0, 1))(
        probs, block_mask)
    f = np.array([0.5, 0.25, 0.25])
    expected_row = 3 / (2 * 1.2) * (f - 0.375)  # sum_i f_i P_i = 1.125 / 3
    np.testing.assert_allclose(grad_probs, np.broadcast_to(expected_row, (2, 3)), rtol=1e-5)
    np.testing.assert_array_equal(grad_mask, 0.0)  # no gradient through the routing

  def test_balanced_is_one_and_collapsed_is_num_blocks(self):
    balanced = jnp.eye(4)
    np.testing.assert_allclose(
        regularizers.load_balance_loss(jnp.full((4, 4), 0.3), balanced), 1.0, rtol=1e-6)
    collapsed_mask = jnp.zeros((5, 4)).at[:, 2].set(1.0)
    collapsed_probs = jnp.full((5, 4), 1e-6).at[:, 2].set(0.99)
    np.testing.assert_allclose(
        regularizers.load_balance_loss(collapsed_probs, collapsed_mask), 4.0, rtol=1e-4)

  def test_per_position_rows_and_empty_masks(self):
    probs = jnp.full((2, 3, 4), 0.5)
    block_mask = jnp.zeros((2, 3, 4)).at[..., 1].set(1.0)
    np.testing.assert_allclose(regularizers.load_balance_loss(probs, block_mask), 1.0,
                               rtol=1e-6)
    self.assertEqual(float(regularizers.load_balance_loss(probs, jnp.zeros_like(probs))), 0.0)


class LoadBalanceObjectiveTest(absltest.TestCase):

  def test_weight_validated_and_default_off(self):
    self.assertEqual(ccjax.TrainConfig().load_balance_weight, 0.0)
    with self.assertRaisesRegex(ValueError, "load_balance_weight"):
      ccjax.TrainConfig(load_balance_weight=-1.0)

  def test_policy_objective_adds_the_weighted_term(self):
    probs = jnp.array([[0.8, 0.4, 0.2], [0.4, 0.2, 0.4]])
    block_mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    aux = (ccjax.GateAux(probs=probs, mask=block_mask,
                         log_prob=ccjax.mask_log_prob(probs, block_mask)),)
    loss = jnp.array([0.5, 1.0])
    state = ccjax.init_baseline_state()
    base_config = ccjax.TrainConfig(estimator="router")
    off, off_terms = ccjax.policy_objective(aux, loss, base_config, state)
    self.assertNotIn("l_lb", off_terms)
    config = ccjax.TrainConfig(estimator="router", load_balance_weight=0.3)
    on, terms = ccjax.policy_objective(aux, loss, config, state)
    np.testing.assert_allclose(terms["l_lb"], 1.125, rtol=1e-6)
    np.testing.assert_allclose(on - off, 0.3 * 1.125, rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
