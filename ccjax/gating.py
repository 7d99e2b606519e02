"""Block-mask helpers: expand, apply, count.

Axis letters: ``batch`` examples, ``blocks`` blocks of a layer, ``units`` =
``blocks * block_size`` hidden units of that layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def validate_block_size(width: int, block_size: int, name: str = "width") -> int:
  """Checks that ``block_size`` splits ``width`` evenly; returns the block count."""
  if not isinstance(width, int) or width <= 0:
    raise ValueError(f"{name} must be a positive integer, got {width!r}")
  if not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
  if width % block_size:
    raise ValueError(
        f"block_size={block_size} must divide {name}={width} (allowed: divisors of {width})")
  return width // block_size


def expand_block_mask(block_mask: jax.Array, block_size: int) -> jax.Array:
  """Repeats each block's mask value over its units.

  Args:
    block_mask: ``[..., blocks]`` mask.
    block_size: units per block.

  Returns:
    ``[..., blocks * block_size]`` mask.
  """
  return jnp.repeat(block_mask, block_size, axis=-1)


def apply_block_mask(activations: jax.Array, block_mask: jax.Array) -> jax.Array:
  """Zeroes the units of inactive blocks.

  Args:
    activations: ``[..., units]`` layer outputs.
    block_mask: ``[..., blocks]`` with ``units % blocks == 0``.

  Returns:
    ``[..., units]`` masked activations, same dtype as ``activations``.
  """
  units, blocks = activations.shape[-1], block_mask.shape[-1]
  if units % blocks:
    raise ValueError(f"{blocks} blocks do not divide {units} units")
  blocked = activations.reshape(*activations.shape[:-1], blocks, units // blocks)
  masked = blocked * block_mask[..., None].astype(activations.dtype)
  return masked.reshape(activations.shape)


def active_fraction(block_mask: jax.Array) -> jax.Array:
  """Mean fraction of blocks that run, over examples and blocks.

  Args:
    block_mask: ``[batch, blocks]`` mask.

  Returns:
    scalar in [0, 1].
  """
  return jnp.mean(block_mask.astype(jnp.float32))
