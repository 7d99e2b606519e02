"""Tests of ccjax.budget: the multipliers move the right way."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from ccjax import budget


class BudgetTest(absltest.TestCase):

  def test_dual_ascent_direction(self):
    duals = jnp.zeros((2,))
    moved = budget.dual_update(duals, jnp.array([0.4, 0.1]), jnp.array([0.25, 0.25]), 0.5)
    np.testing.assert_allclose(moved, [0.075, -0.075], rtol=1e-6)

  def test_positive_multiplier_pushes_probabilities_down(self):
    grad = jax.grad(lambda m: budget.lagrangian_term(jnp.array([2.0, -1.0]), m,
                                                     jnp.array([0.25, 0.25])))(
                                                         jnp.array([0.4, 0.1]))
    np.testing.assert_allclose(grad, [2.0, -1.0])  # gradient descent lowers layer 0, raises 1


if __name__ == "__main__":
  absltest.main()
