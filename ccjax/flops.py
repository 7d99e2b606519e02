"""Multiply-accumulate (MAC) counts per example, dense vs gated, policies included.

Axis letters: ``batch`` examples, ``blocks`` blocks of a layer.

Accounting for a gated MLP run by :mod:`ccjax.sparse` (two-sided sparsity): hidden
layer ``l`` reads only the active units of its input (all ``input_dim`` features for the
first layer), so with ``a_in`` active input units, ``n_l`` blocks of ``block_size`` and
``k_l`` active blocks its cost is ``a_in * n_l`` (policy) + ``a_in * k_l * block_size``
(active output blocks). The output layer costs ``a_last * num_classes``. Biases and
nonlinearities are not counted.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def dense_mlp_macs(input_dim: int, hidden: Sequence[int], num_classes: int) -> int:
  """MACs of one example through the dense MLP ``input_dim -> hidden... -> num_classes``."""
  widths = [input_dim, *hidden, num_classes]
  return int(sum(a * b for a, b in zip(widths[:-1], widths[1:])))


def gated_mlp_macs(input_dim: int, block_masks: Sequence[np.ndarray], block_size: int,
                   num_classes: int) -> np.ndarray:
  """Per-example MACs of a gated MLP that skips inactive blocks on both sides.

  Args:
    input_dim: input features.
    block_masks: one ``[batch, blocks]`` 0/1 array per hidden layer.
    block_size: units per block.
    num_classes: output logits.

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
    total += active_in * num_blocks + active_in * active_out
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
