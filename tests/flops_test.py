"""Tests for ccjax.flops against hand-computed multiply-accumulate counts."""

from absl.testing import absltest
import numpy as np

import ccjax


class FlopsTest(absltest.TestCase):

  def test_dense_mlp_macs(self):
    # 64*128 + 128*128 + 128*10.
    self.assertEqual(ccjax.dense_mlp_macs(64, (128, 128), 10), 8192 + 16384 + 1280)
    self.assertEqual(ccjax.dense_mlp_macs(4, (), 3), 12)

  def test_gated_mlp_macs_hand_values(self):
    # input 4 -> hidden (4, 6) in blocks of 2 (2 and 3 blocks) -> 3 classes.
    layer_1 = np.array([[1, 0], [0, 0], [1, 1]])
    layer_2 = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    macs = ccjax.gated_mlp_macs(4, [layer_1, layer_2], block_size=2, num_classes=3)
    # Example 0: layer 1: policy 4*2 + 4 inputs * 2 active units = 16; layer 2 reads the
    #   2 active units: policy 2*3 + 2*4 = 14; output reads 4 active units: 4*3 = 12.
    # Example 1: layer 1 policy only: 8; nothing active after it.
    # Example 2: everything on: 8 + 16, then 4*3 + 4*6, then 6*3 = 78 (= dense 58 + policies 20).
    np.testing.assert_array_equal(macs, [16 + 14 + 12, 8, 24 + 36 + 18])
    self.assertEqual(78, ccjax.dense_mlp_macs(4, (4, 6), 3) + 4 * 2 + 4 * 3)

  def test_expected_gated_mlp_macs(self):
    self.assertEqual(ccjax.expected_gated_mlp_macs(4, (4, 6), 2, 3, [1.0, 1.0]), 78.0)
    # Half of each layer: 4*2 + 4*2, then 2*3 + 2*3, then 3*3.
    self.assertEqual(ccjax.expected_gated_mlp_macs(4, (4, 6), 2, 3, [0.5, 0.5]), 37.0)

  def test_expected_matches_per_example_for_fixed_counts(self):
    masks = [np.array([[1, 0, 1, 0]] * 2), np.array([[0, 1]] * 2)]
    per_example = ccjax.gated_mlp_macs(10, masks, block_size=8, num_classes=5)
    expected = ccjax.expected_gated_mlp_macs(10, (32, 16), 8, 5, [0.5, 0.5])
    np.testing.assert_allclose(per_example, [expected, expected])

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, "block mask"):
      ccjax.gated_mlp_macs(4, [], 2, 3)
    with self.assertRaisesRegex(ValueError, "active_fraction"):
      ccjax.expected_gated_mlp_macs(4, (4, 6), 2, 3, [0.5])


if __name__ == "__main__":
  absltest.main()
