"""Multiply-accumulate (MAC) counts per example, dense vs gated, policies included.

Axis letters: ``batch`` examples, ``blocks`` blocks of a layer.

Accounting for a gated MLP run by :mod:`ccjax.inference` (two-sided sparsity): hidden
layer ``l`` reads only the active units of its input (all ``input_dim`` features for the
first layer), so with ``a_in`` active input units, ``n_l`` blocks of ``block_size`` and
``k_l`` active blocks its cost is ``a_in * n_l`` (policy) + ``a_in * k_l * block_size``
(active output blocks). The output layer costs ``a_last * num_classes``. Biases and
nonlinearities are not counted. A policy with a hidden layer of ``h`` units
(``policy_hidden``) costs ``a_in * h + h * n_l`` instead of ``a_in * n_l``
(:func:`policy_macs`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


def dense_mlp_macs(input_dim: int, hidden: Sequence[int], num_classes: int) -> int:
  """MACs of one example through the dense MLP ``input_dim -> hidden... -> num_classes``."""
  widths = [input_dim, *hidden, num_classes]
  return int(sum(a * b for a, b in zip(widths[:-1], widths[1:])))


def matched_dense_width(input_dim: int, num_layers: int, num_classes: int, target_macs: float,
                        multiple: int) -> int:
  """The width (a multiple of ``multiple``) whose dense MLP of ``num_layers`` equal hidden
  layers has the MACs per example closest to ``target_macs`` (:func:`dense_mlp_macs`)."""
  candidates = range(multiple, 64 * 1024 + multiple, multiple)
  return min((abs(dense_mlp_macs(input_dim, [width] * num_layers, num_classes) - target_macs),
              width) for width in candidates)[1]


def policy_macs(inputs, num_blocks: int, policy_hidden: int = 0):
  """MACs of one block policy reading ``inputs`` features (a number or an array of them):
  ``inputs * num_blocks`` (linear), or ``inputs * h + h * num_blocks`` with a hidden
  layer of ``h = policy_hidden`` units (a factorised linear policy of rank ``h``,
  ``policy_rank``, costs the same)."""
  if not policy_hidden:
    return inputs * num_blocks
  return inputs * policy_hidden + policy_hidden * num_blocks


def gated_mlp_macs(input_dim: int, block_masks: Sequence[np.ndarray], block_size: int,
                   num_classes: int, policy_hidden: int = 0) -> np.ndarray:
  """Per-example MACs of a gated MLP that skips inactive blocks on both sides.

  Args:
    input_dim: input features.
    block_masks: one ``[batch, blocks]`` 0/1 array per hidden layer.
    block_size: units per block.
    num_classes: output logits.
    policy_hidden: hidden units of the policies (0: linear), see :func:`policy_macs`.

  Returns:
    ``[batch]`` float64 MACs, policies included.
  """
  if not block_masks:
    raise ValueError("gated_mlp_macs needs at least one block mask")
  batch = np.asarray(block_masks[0]).shape[0]
  active_in = np.full((batch,), float(input_dim))
  total = np.zeros((batch,))
  for block_mask in block_masks:
    block_mask = np.asarray(block_mask, dtype=np.float64)
    num_blocks = block_mask.shape[-1]
    active_out = block_mask.sum(-1) * block_size
    total += policy_macs(active_in, num_blocks, policy_hidden) + active_in * active_out
    active_in = active_out
  return total + active_in * num_classes


def expected_gated_mlp_macs(input_dim: int, hidden: Sequence[int], block_size: int,
                            num_classes: int, active_fraction: Sequence[float]) -> float:
  """MACs per example when layer ``l`` runs a fraction ``active_fraction[l]`` of its blocks.

  Uses the fractions as if independent across layers (exact for fixed counts).
  """
  if len(active_fraction) != len(hidden):
    raise ValueError("active_fraction needs one value per hidden layer")
  active_in = float(input_dim)
  total = 0.0
  for width, fraction in zip(hidden, active_fraction):
    num_blocks = width // block_size
    active_out = fraction * width
    total += active_in * num_blocks + active_in * active_out
    active_in = active_out
  return total + active_in * num_classes


# --- Convolutional networks -------------------------------------------------------------
#
# Accounting for :mod:`ccjax.conv` / :mod:`ccjax.inference.cnn` (one-sided: a layer always
# reads all channels of its input; only a layer's own gated outputs are skipped). A
# ``SAME``-padded conv of an ``H x W x C_in`` input with stride ``s`` costs
# ``ceil(H / s) * ceil(W / s) * k * k * C_in * C_out`` MACs. A channel-gated conv with
# ``k_a`` of ``n`` blocks active costs its policy ``C_in * n`` plus ``k_a / n`` of the
# conv; a skippable residual block costs its policy ``C`` plus, when it runs,
# ``num_convs`` stride-1 ``C -> C`` convs. Global pooling is additions (not counted);
# the head costs ``C_last * num_classes``.


class ConvLayerSpec(NamedTuple):
  """Shape of one conv layer of a CNN, for MAC accounting.

  Attributes:
    kind: ``conv`` (ungated), ``channel`` (channel-block gated) or ``skip``
      (skippable residual block).
    height: input height.
    width: input width.
    in_channels: input channels.
    out_channels: output channels (``== in_channels`` for ``skip``).
    kernel_size: square kernel side.
    stride: spatial stride (``skip`` blocks use 1).
    block_size: channels per gated block (``channel`` layers).
    num_convs: convolutions in a residual branch (``skip`` layers).
  """
  kind: str
  height: int
  width: int
  in_channels: int
  out_channels: int
  kernel_size: int
  stride: int = 1
  block_size: int = 1
  num_convs: int = 1


CONV_LAYER_KINDS = ("conv", "channel", "skip")


def conv2d_macs(height: int, width: int, in_channels: int, out_channels: int,
                kernel_size: int, stride: int = 1) -> int:
  """MACs of one example through a ``SAME``-padded square conv (bias not counted)."""
  out_height, out_width = -(-height // stride), -(-width // stride)
  return int(out_height * out_width * kernel_size * kernel_size * in_channels * out_channels)


def _conv_layer_dense_macs(spec: ConvLayerSpec) -> int:
  if spec.kind not in CONV_LAYER_KINDS:
    raise ValueError(f"ConvLayerSpec.kind must be one of {'|'.join(CONV_LAYER_KINDS)}, "
                     f"got {spec.kind!r}")
  if spec.kind == "skip":
    return spec.num_convs * conv2d_macs(spec.height, spec.width, spec.in_channels,
                                        spec.in_channels, spec.kernel_size)
  return conv2d_macs(spec.height, spec.width, spec.in_channels, spec.out_channels,
                     spec.kernel_size, spec.stride)


def dense_cnn_macs(specs: Sequence[ConvLayerSpec], num_classes: int) -> int:
  """MACs of one example through the dense CNN (every layer runs, no policies).

  Args:
    specs: every conv layer in forward order (e.g. ``GatedCNN.layer_specs``).
    num_classes: output logits of the dense head after global pooling.

  Returns:
    integer MACs per example.
  """
  if not specs:
    raise ValueError("dense_cnn_macs needs at least one ConvLayerSpec")
  total = sum(_conv_layer_dense_macs(spec) for spec in specs)
  return int(total + specs[-1].out_channels * num_classes)


def gated_cnn_macs(specs: Sequence[ConvLayerSpec], block_masks: Sequence[np.ndarray],
                   num_classes: int, policy_hidden: int = 0) -> np.ndarray:
  """Per-example MACs of a gated CNN that skips inactive channel blocks and layers.

  Args:
    specs: every conv layer in forward order; ``conv`` layers always run.
    block_masks: one 0/1 mask per gated (``channel`` or ``skip``) spec, in order:
      ``[batch, out_channels / block_size]`` for ``channel``, ``[batch, 1]`` or
      ``[batch]`` for ``skip``.
    num_classes: output logits.
    policy_hidden: hidden units of the policies (0: linear), see :func:`policy_macs`.

  Returns:
    ``[batch]`` float64 MACs, policies included.
  """
  gated_specs = [spec for spec in specs if spec.kind != "conv"]
  if len(gated_specs) != len(block_masks):
    raise ValueError(f"block_masks needs one mask per gated layer ({len(gated_specs)}), "
                     f"got {len(block_masks)}")
  if not block_masks:
    raise ValueError("gated_cnn_macs needs at least one gated layer")
  batch = np.asarray(block_masks[0]).shape[0]
  total = np.zeros((batch,))
  masks = iter(block_masks)
  for spec in specs:
    dense = float(_conv_layer_dense_macs(spec))
    if spec.kind == "conv":
      total += dense
      continue
    block_mask = np.asarray(next(masks), dtype=np.float64).reshape(batch, -1)
    num_blocks = block_mask.shape[-1]
    if spec.kind == "channel" and spec.out_channels != num_blocks * spec.block_size:
      raise ValueError(f"channel mask has {num_blocks} blocks of {spec.block_size}, layer has "
                       f"{spec.out_channels} channels")
    if spec.kind == "skip" and num_blocks != 1:
      raise ValueError(f"skip mask must be [batch, 1], got {block_mask.shape}")
    total += (policy_macs(spec.in_channels, num_blocks, policy_hidden)
              + dense * block_mask.mean(-1))
  return total + specs[-1].out_channels * num_classes
