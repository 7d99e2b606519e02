"""XLA backend: the reference grouped (block-sparse) matmul and block gathers.

Axis letters: ``groups`` independent matmuls, ``rows`` rows per group (a static
capacity), ``k`` contraction, ``n`` output columns, ``weights`` stored weight blocks.

``grouped_matmul(x, weights, weight_index)[g] = x[g] @ weights[weight_index[g]]``.
This one primitive covers every product of the sparse MLP path (:mod:`ccjax.inference.minibatch`): examples grouped by
output block (``weight_index`` = block ids), (example, input block, output block)
triples grouped by weight block (``weight_index`` = pair ids), and the batch-1 path
(one row per group). The kernel reads each weight block straight from its block-major
home; the XLA path gathers the blocks (a contiguous copy per block) and runs one
batched ``dot_general``.

This backend is always available and is what every other backend is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccjax.inference.kernels import base

def grouped_matmul_xla(x: jax.Array, weights: jax.Array, weight_index: jax.Array | None = None,
                       transpose_rhs: bool = False) -> jax.Array:
  """XLA path of :func:`grouped_matmul`.

  Args:
    x: ``[groups, rows, k]``.
    weights: ``[weights, k, n]`` block-major weight blocks (``[weights, n, k]`` when
      ``transpose_rhs``).
    weight_index: ``[groups]`` int block ids, or ``None`` when group ``g`` uses block ``g``
      (no gather at all).
    transpose_rhs: the blocks are stored transposed.

  Returns:
    ``[groups, rows, n]`` in ``x.dtype`` (accumulated in float32 or wider).
  """
  if weight_index is not None:
    weights = take_blocks(weights, weight_index)
  return jnp.einsum("grk,gnk->grn" if transpose_rhs else "grk,gkn->grn", x, weights,
                    preferred_element_type=jnp.promote_types(x.dtype, jnp.float32)
                    ).astype(x.dtype)


def take_blocks(blocks: jax.Array, index: jax.Array) -> jax.Array:
  """Gathers whole blocks ``blocks[index]`` as contiguous copies.

  ``lax.gather`` in ``CLIP`` mode with full-block slices is several times faster on
  XLA:CPU than ``jnp.take`` (default ``fill`` mode adds a per-element bounds mask).

  Args:
    blocks: ``[num, ...]`` block-major array.
    index: ``[...idx]`` int ids in ``[0, num)`` (out-of-range ids are clamped).

  Returns:
    ``[...idx, ...]`` the selected blocks.
  """
  index = index.astype(jnp.int32)
  dims = jax.lax.GatherDimensionNumbers(
      offset_dims=tuple(range(index.ndim, index.ndim + blocks.ndim - 1)),
      collapsed_slice_dims=(0,), start_index_map=(0,))
  return jax.lax.gather(blocks, index[..., None], dims, (1, *blocks.shape[1:]),
                        mode=jax.lax.GatherScatterMode.CLIP)


# The reference backend: every family, every dtype, every machine; the generic paths.
BACKEND = base.Backend(name="xla", unavailable_reason=lambda platform: None)
