"""Tests for the convolution MAC accounting in ccjax.flops (hand-computed values)."""

import numpy as np
import pytest

from ccjax import conv
from ccjax import flops

# GatedCNN(10, stem 8, one stage of 16 channels (stride 2, blocks of 8), one residual
# block of 2 convs) on 8x8x1 images:
#   stem      8*8 * 3*3 * 1*8          =  4608
#   stage_0   4*4 * 3*3 * 8*16         = 18432  (2 blocks; policy 8*2 = 16)
#   res_0     2 * 4*4 * 3*3 * 16*16    = 73728  (policy 16*1 = 16)
#   head      16*10                    =   160
SPECS = (
    flops.ConvLayerSpec("conv", 8, 8, 1, 8, 3),
    flops.ConvLayerSpec("channel", 8, 8, 8, 16, 3, stride=2, block_size=8),
    flops.ConvLayerSpec("skip", 4, 4, 16, 16, 3, num_convs=2),
)


def test_conv2d_macs():
  assert flops.conv2d_macs(8, 8, 1, 8, 3) == 4608
  assert flops.conv2d_macs(8, 8, 8, 16, 3, stride=2) == 18432
  assert flops.conv2d_macs(7, 5, 2, 3, 1, stride=2) == 4 * 3 * 2 * 3
  assert flops.conv2d_macs(32, 32, 3, 16, 3) == 32 * 32 * 9 * 3 * 16


def test_dense_cnn_macs():
  assert flops.dense_cnn_macs(SPECS, 10) == 4608 + 18432 + 73728 + 160


def test_gated_cnn_macs():
  channel_mask = np.array([[1, 0], [0, 0], [1, 1]])
  skip_mask = np.array([[1], [0], [1]])
  macs = flops.gated_cnn_macs(SPECS, [channel_mask, skip_mask], 10)
  np.testing.assert_allclose(macs, [
      4608 + 16 + 9216 + 16 + 73728 + 160,
      4608 + 16 + 0 + 16 + 0 + 160,
      4608 + 16 + 18432 + 16 + 73728 + 160,
  ])
  # Everything on costs the dense network plus the policies.
  np.testing.assert_allclose(macs[2], flops.dense_cnn_macs(SPECS, 10) + 32)
  np.testing.assert_allclose(flops.gated_cnn_macs(SPECS, [channel_mask, skip_mask[:, 0]], 10),
                             macs)


def test_gated_cnn_layer_specs_match_hand_written():
  model = conv.GatedCNN(10, stem_features=8, stage_features=(16,), residual_blocks=1,
                        block_size=8, num_convs=2)
  assert model.layer_specs((8, 8, 1)) == SPECS
  deeper = conv.GatedCNN(10, stem_features=8, stage_features=(16, 32), strides=(2, 2),
                         residual_blocks=2, block_size=8)
  specs = deeper.layer_specs((32, 32, 3))
  assert [s.kind for s in specs] == ["conv", "channel", "skip", "skip", "channel", "skip",
                                     "skip"]
  assert [(s.height, s.in_channels) for s in specs] == [
      (32, 3), (32, 8), (16, 16), (16, 16), (16, 16), (8, 32), (8, 32)]


def test_gated_cnn_macs_validates():
  with pytest.raises(ValueError, match="one mask per gated layer"):
    flops.gated_cnn_macs(SPECS, [np.ones((2, 2))], 10)
  with pytest.raises(ValueError, match="blocks"):
    flops.gated_cnn_macs(SPECS, [np.ones((2, 3)), np.ones((2, 1))], 10)
  with pytest.raises(ValueError, match="kind"):
    flops.dense_cnn_macs([flops.ConvLayerSpec("pool", 8, 8, 1, 1, 1)], 10)
