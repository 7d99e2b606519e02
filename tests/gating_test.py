"""Tests for ccjax.gating: expand, apply, active fraction, block-size validation."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax.numpy as jnp
import numpy as np

import ccjax
from ccjax import gating


class ExpandApplyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_expand(self):
    block_mask = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    expanded = self.variant(ccjax.expand_block_mask, static_argnums=1)(block_mask, 3)
    np.testing.assert_array_equal(expanded, [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_apply_hand_values(self):
    activations = jnp.arange(1.0, 13.0).reshape(2, 6)
    block_mask = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    masked = self.variant(ccjax.apply_block_mask)(activations, block_mask)
    np.testing.assert_array_equal(
        masked, [[1, 2, 0, 0, 5, 6], [0, 0, 9, 10, 0, 0]])

  def test_apply_equals_multiplying_by_expanded_mask(self):
    activations = jnp.linspace(-1.0, 1.0, 3 * 2 * 12).reshape(3, 2, 12)
    block_mask = jnp.array([[[1.0, 0, 1, 1], [0, 0, 0, 1]]] * 3)
    np.testing.assert_array_equal(
        ccjax.apply_block_mask(activations, block_mask),
        activations * ccjax.expand_block_mask(block_mask, 3))

  @parameterized.parameters(jnp.float16, jnp.bfloat16, jnp.float32)
  def test_apply_keeps_dtype(self, dtype):
    activations = jnp.ones((2, 4), dtype)
    masked = ccjax.apply_block_mask(activations, jnp.array([[1.0, 0.0], [0.0, 0.0]]))
    chex.assert_type(masked, dtype)
    np.testing.assert_array_equal(masked.astype(jnp.float32), [[1, 1, 0, 0], [0, 0, 0, 0]])

  def test_apply_rejects_blocks_not_dividing_units(self):
    with self.assertRaisesRegex(ValueError, "blocks"):
      ccjax.apply_block_mask(jnp.ones((2, 5)), jnp.ones((2, 2)))

  def test_active_fraction(self):
    block_mask = jnp.array([[1, 0, 0, 0], [1, 1, 1, 0]], jnp.int32)
    fraction = ccjax.active_fraction(block_mask)
    chex.assert_type(fraction, jnp.float32)
    np.testing.assert_allclose(fraction, 4 / 8)
    np.testing.assert_allclose(ccjax.active_fraction(jnp.zeros((3, 2))), 0.0)


class ValidateBlockSizeTest(parameterized.TestCase):

  def test_returns_block_count(self):
    self.assertEqual(gating.validate_block_size(128, 16), 8)
    self.assertEqual(gating.validate_block_size(7, 7), 1)
    self.assertEqual(gating.validate_block_size(7, 1), 7)

  @parameterized.parameters(0, -16, 2.5, "64", None)
  def test_bad_width(self, width):
    with self.assertRaisesRegex(ValueError, "my_width must be a positive integer"):
      gating.validate_block_size(width, 4, "my_width")

  @parameterized.parameters(0, -4, 1.5)
  def test_bad_block_size(self, block_size):
    with self.assertRaisesRegex(ValueError, "block_size must be a positive integer"):
      gating.validate_block_size(64, block_size)

  def test_block_size_not_dividing(self):
    with self.assertRaisesRegex(ValueError, r"block_size=16 must divide my_width=100"):
      gating.validate_block_size(100, 16, "my_width")


if __name__ == "__main__":
  absltest.main()
