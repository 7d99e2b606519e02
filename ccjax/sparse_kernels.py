"""Grouped (block-sparse) matmul: the XLA path and the dispatch to the Pallas GPU kernel.

Axis letters: ``groups`` independent matmuls, ``rows`` rows per group (a static
capacity), ``k`` contraction, ``n`` output columns, ``weights`` stored weight blocks.

``grouped_matmul(x, weights, weight_index)[g] = x[g] @ weights[weight_index[g]]``.
This one primitive covers every product of :mod:`ccjax.sparse`: examples grouped by
output block (``weight_index`` = block ids), (example, input block, output block)
triples grouped by weight block (``weight_index`` = pair ids), and the batch-1 path
(one row per group). The XLA path gathers the blocks (a contiguous copy per block) and
runs one batched ``dot_general``; the Pallas kernel
(:mod:`ccjax.inference.kernels.pallas_gpu`, Triton) reads each selected weight tile
straight from its block-major home, skips groups with no rows in use, and needs the
weights padded once to its tile multiples (``tiles``, made at layout time).

:func:`grouped_matmul` picks the Pallas kernel when ``jax.default_backend() == 'gpu'``
and the XLA path otherwise; off a GPU the kernel runs in the Pallas interpreter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccjax.inference.kernels import pallas_gpu

IMPLEMENTATIONS = ("auto", "xla", "pallas")


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


def use_pallas() -> bool:
  """True when the default backend is a GPU (the Pallas kernel is then used)."""
  return jax.default_backend() == "gpu"


def resolve_implementation(implementation: str) -> str:
  """``xla`` or ``pallas``: ``auto`` is Pallas iff the default backend is a GPU."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {'|'.join(IMPLEMENTATIONS)}, "
                     f"got {implementation!r}")
  if implementation == "auto":
    return "pallas" if use_pallas() else "xla"
  return implementation


def grouped_matmul(x: jax.Array, weights: jax.Array, weight_index: jax.Array | None = None,
                   group_sizes: jax.Array | None = None, *, tiles: jax.Array | None = None,
                   implementation: str = "auto", transpose_rhs: bool = False) -> jax.Array:
  """``out[g] = x[g] @ weights[weight_index[g]]``, Pallas on GPU, XLA elsewhere.

  Args:
    x: ``[groups, rows, k]``; rows at or past ``group_sizes[g]`` must be zero.
    weights: ``[weights, k, n]`` block-major weight blocks.
    weight_index: ``[groups]`` int block ids; ``None`` means ``arange(groups)``.
    group_sizes: ``[groups]`` int rows in use per group (a prefix), ``None`` for all: the
      Pallas kernel skips the rest (a group of size 0 reads no weights); the XLA path
      multiplies the zero rows.
    tiles: ``weights`` padded by :func:`ccjax.inference.kernels.pallas_gpu.pad_weight_tiles`
      (required by the Pallas path; made once, at layout time).
    implementation: ``auto`` (Pallas iff the backend is GPU), ``xla`` or ``pallas``.
    transpose_rhs: ``weights`` is ``[weights, n, k]`` (XLA path only).

  Returns:
    ``[groups, rows, n]`` in ``x.dtype``.
  """
  if resolve_implementation(implementation) == "xla":
    return grouped_matmul_xla(x, weights, weight_index, transpose_rhs)
  if transpose_rhs:
    raise ValueError("the Pallas grouped matmul takes untransposed [weights, k, n] blocks")
  if tiles is None:
    raise ValueError("the Pallas grouped matmul needs tiles=pad_weight_tiles(weights), made "
                     "once at layout time")
  return pallas_gpu.grouped_matmul(x, tiles, weight_index, group_sizes, width=weights.shape[2],
                                   interpret=not use_pallas())
