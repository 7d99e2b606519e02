"""Grouped (block-sparse) matmul: a Pallas GPU kernel and its XLA twin.

Axis letters: ``groups`` independent matmuls, ``rows`` rows per group (a static
capacity), ``k`` contraction, ``n`` output columns, ``weights`` stored weight blocks.

``grouped_matmul(x, weights, weight_index)[g] = x[g] @ weights[weight_index[g]]``.
This one primitive covers every product of :mod:`ccjax.sparse`: examples grouped by
output block (``weight_index`` = block ids), (example, input block, output block)
triples grouped by weight block (``weight_index`` = pair ids), and the batch-1 path
(one row per group). The kernel reads each weight block straight from its block-major
home, so no gathered copy of the weights is ever materialised; the XLA path gathers the
blocks (a contiguous copy per block) and runs one batched ``dot_general``.

:func:`grouped_matmul` picks the Pallas kernel when ``jax.default_backend() == 'gpu'``
and the XLA path otherwise; tests run the kernel on CPU with ``interpret=True``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Triton's tl.dot needs every tile side to be at least this and a power of two.
_MIN_TILE = 16
IMPLEMENTATIONS = ("auto", "xla", "pallas")


def _check_shapes(x: jax.Array, weights: jax.Array, weight_index: jax.Array) -> None:
  if x.ndim != 3 or weights.ndim != 3 or weight_index.ndim != 1:
    raise ValueError("grouped_matmul needs x [groups, rows, k], weights [weights, k, n] and "
                     f"weight_index [groups]; got {x.shape}, {weights.shape}, "
                     f"{weight_index.shape}")
  if x.shape[0] != weight_index.shape[0] or x.shape[2] != weights.shape[1]:
    raise ValueError(f"grouped_matmul shape mismatch: x {x.shape}, weights {weights.shape}, "
                     f"weight_index {weight_index.shape}")


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


def _grouped_matmul_kernel(index_ref, x_ref, w_ref, out_ref):
  group = pl.program_id(0)
  block = index_ref[group]
  weight = w_ref[block]
  out_ref[...] = jnp.dot(x_ref[...], weight,
                         preferred_element_type=jnp.float32).astype(out_ref.dtype)


def _next_pow2(value: int) -> int:
  return max(_MIN_TILE, 1 << (value - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("interpret",))
def grouped_matmul_pallas(x: jax.Array, weights: jax.Array, weight_index: jax.Array, *,
                          interpret: bool = False) -> jax.Array:
  """Pallas path of :func:`grouped_matmul`: one program per group.

  Program ``g`` loads the ``[rows, k]`` tile of group ``g`` and weight block
  ``weights[weight_index[g]]`` directly from the block-major array (the index is read
  inside the kernel), multiplies them with ``tl.dot`` and writes ``[rows, n]``. Tile
  sides are padded to powers of two >= 16 for Triton.

  Args:
    x: ``[groups, rows, k]``.
    weights: ``[weights, k, n]``.
    weight_index: ``[groups]`` int block ids.
    interpret: run the kernel in the Pallas interpreter (any backend; used by tests).

  Returns:
    ``[groups, rows, n]`` in ``x.dtype``.
  """
  _check_shapes(x, weights, weight_index)
  groups, rows, depth = x.shape
  width = weights.shape[2]
  rows_p, depth_p, width_p = _next_pow2(rows), _next_pow2(depth), _next_pow2(width)
  x_p = jnp.pad(x, ((0, 0), (0, rows_p - rows), (0, depth_p - depth)))
  w_p = jnp.pad(weights, ((0, 0), (0, depth_p - depth), (0, width_p - width)))
  out = pl.pallas_call(
      _grouped_matmul_kernel,
      grid=(groups,),
      in_specs=[
          pl.BlockSpec((groups,), lambda g: (0,)),
          pl.BlockSpec((None, rows_p, depth_p), lambda g: (g, 0, 0)),
          pl.BlockSpec(w_p.shape, lambda g: (0, 0, 0)),
      ],
      out_specs=pl.BlockSpec((None, rows_p, width_p), lambda g: (g, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((groups, rows_p, width_p), x.dtype),
      interpret=interpret,
  )(weight_index.astype(jnp.int32), x_p, w_p)
  return out[:, :rows, :width]


def use_pallas() -> bool:
  """True when the default backend is a GPU (the Pallas kernel is then used)."""
  return jax.default_backend() == "gpu"


def grouped_matmul(x: jax.Array, weights: jax.Array, weight_index: jax.Array | None = None,
                   *, implementation: str = "auto", transpose_rhs: bool = False) -> jax.Array:
  """``out[g] = x[g] @ weights[weight_index[g]]``, Pallas on GPU, XLA elsewhere.

  Args:
    x: ``[groups, rows, k]``.
    weights: ``[weights, k, n]`` block-major weight blocks.
    weight_index: ``[groups]`` int block ids; ``None`` means ``arange(groups)``.
    implementation: ``auto`` (Pallas iff the backend is GPU), ``xla`` or ``pallas``.
    transpose_rhs: ``weights`` is ``[weights, n, k]`` (blocks stored transposed).

  Returns:
    ``[groups, rows, n]`` in ``x.dtype``.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {'|'.join(IMPLEMENTATIONS)}, "
                     f"got {implementation!r}")
  if implementation == "auto":
    implementation = "pallas" if use_pallas() else "xla"
  if implementation == "xla":
    return grouped_matmul_xla(x, weights, weight_index, transpose_rhs)
  if transpose_rhs:
    weights = jnp.swapaxes(weights, 1, 2)
  if weight_index is None:
    weight_index = jnp.arange(x.shape[0], dtype=jnp.int32)
  return grouped_matmul_pallas(x, weights, weight_index,
                               interpret=jax.default_backend() != "gpu")
