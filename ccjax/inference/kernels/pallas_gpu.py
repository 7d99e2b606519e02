"""Grouped matmul on NVIDIA GPUs: a Pallas kernel lowered through Triton.

Axis letters: ``groups`` independent products, ``rows`` rows per group (a static
capacity), ``k`` contraction, ``n`` output columns, ``weights`` stored weight blocks.

``grouped_matmul(x, tiles, weight_index, group_sizes, width=n)[g, r]`` is
``x[g, r] @ weights[weight_index[g]]`` for ``r < group_sizes[g]`` and zero for the
other rows, where ``tiles`` are the block-major ``weights [weights, k, n]`` padded once,
at layout time, by :func:`pad_weight_tiles`.

The kernel (Triton named explicitly through ``pallas.triton.CompilerParams``; Triton
has no scalar prefetch, so the indices are read as scalars inside the kernel and drive
the weight pointers, and every array stays in HBM):

* grid ``(groups, cdiv(rows, bm), cdiv(n, bn))``: program ``(g, i, j)`` owns the
  ``bm x bn`` output tile ``(i, j)`` of group ``g``;
* it reads ``block = weight_index[g]`` (clamped to ``[0, weights)``) and
  ``size = group_sizes[g]``; a tile whose first row is ``>= size`` runs its K loop zero
  times: it loads no ``x`` and no weight tile, does no MMA and stores zeros -- so the
  weights of empty groups (unused capacity slots, blocks no example runs) are never
  read;
* otherwise a K loop of ``cdiv(k, bk)`` steps loads the ``bm x bk`` tile of ``x``
  (rows masked by ``size``, columns by ``k``; masked entries read as zero) and the
  ``bk x bn`` tile of weight block ``block`` and accumulates ``tl.dot`` in float32;
* float32 inputs use ``Precision.HIGHEST`` (Triton ``input_precision="ieee"``: no TF32,
  so results agree with XLA to 1e-5); bfloat16 / float16 inputs use their MMA with a
  float32 accumulator; the output is cast to ``x.dtype``.

Tiles (:func:`tile_shape`): Triton's ``tl.dot`` needs power-of-two sides >= 16; ``bm``
and ``bn`` are at most 64 and ``bk`` spans 128 bytes of a row (32 float32, 64 bf16),
so one pipeline stage holds ``(bm * bk + bk * bn) * itemsize <= 16 KiB`` of shared
memory, 48 KiB for the 3 stages used, well under the 227 KiB of an H100. ``bk`` and
``bn`` depend only on the weight shape, so :func:`pad_weight_tiles` pads the weights to
multiples of them once; ``x`` is never padded (its tails are masked loads).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from ccjax.inference.kernels import base
from ccjax.inference.kernels import pallas_gpu_gemv

# tl.dot needs every tile side to be a power of two and at least this.
INTERPRET_ENV = "CCJAX_PALLAS_INTERPRET"   # "1": available off a GPU, in the interpreter
MIN_TILE = 16
MAX_ROW_TILE = 64
MAX_COL_TILE = 64
# Bytes of one x / weight row that a K step loads.
K_TILE_BYTES = 128
NUM_WARPS = 4
NUM_STAGES = 3


class TileShape(NamedTuple):
  """Static tile sides of the kernel.

  Attributes:
    rows: ``bm``, rows of ``x`` per program.
    depth: ``bk``, contraction step of the K loop.
    cols: ``bn``, output columns per program.
  """
  rows: int
  depth: int
  cols: int


def interpret_default() -> bool:
  """Whether Pallas kernels run in the interpreter: off a GPU (the default JAX device)."""
  return jax.default_backend() != "gpu"


def _pow2_tile(size: int, limit: int) -> int:
  return min(limit, max(MIN_TILE, 1 << (max(size, 1) - 1).bit_length()))


def tile_shape(rows: int, depth: int, width: int, dtype) -> TileShape:
  """Tile sides for a ``[rows, depth] @ [depth, width]`` product per group.

  Args:
    rows: rows per group (capacity).
    depth: contraction size ``k`` (unpadded).
    width: output columns ``n`` (unpadded).
    dtype: element type of ``x`` and the weights.

  Returns:
    a :class:`TileShape`; ``depth`` and ``cols`` depend only on ``(depth, width,
    dtype)``, which is what lets :func:`pad_weight_tiles` pad the weights ahead.
  """
  depth_limit = max(MIN_TILE, K_TILE_BYTES // jnp.dtype(dtype).itemsize)
  return TileShape(rows=_pow2_tile(rows, MAX_ROW_TILE),
                   depth=_pow2_tile(depth, depth_limit),
                   cols=_pow2_tile(width, MAX_COL_TILE))


def padded_weight_shape(depth: int, width: int, dtype) -> tuple[int, int]:
  """``(k, n)`` of one weight block after :func:`pad_weight_tiles`."""
  tiles = tile_shape(1, depth, width, dtype)
  return (math.ceil(depth / tiles.depth) * tiles.depth,
          math.ceil(width / tiles.cols) * tiles.cols)


def pad_weight_tiles(weights: jax.Array) -> jax.Array:
  """Pads block-major weights with zeros to the kernel's tile multiples (layout time).

  Args:
    weights: ``[weights, k, n]``.

  Returns:
    ``[weights, k_pad, n_pad]`` (:func:`padded_weight_shape`); the same array when no
    padding is needed.
  """
  _, depth, width = weights.shape
  depth_pad, width_pad = padded_weight_shape(depth, width, weights.dtype)
  if (depth_pad, width_pad) == (depth, width):
    return weights
  return jnp.pad(weights, ((0, 0), (0, depth_pad - depth), (0, width_pad - width)))


def _dot_precision(dtype):
  # Triton maps HIGHEST on float32 to input_precision="ieee"; DEFAULT would be TF32.
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _grouped_matmul_kernel(index_ref, sizes_ref, x_ref, w_ref, out_ref, *, tiles: TileShape,
                           depth: int, num_weights: int):
  """Program ``(g, i, j)``: output tile ``(i, j)`` of group ``g``; see the module doc."""
  group, row_tile, col_tile = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  block = jnp.clip(index_ref[group], 0, num_weights - 1)
  size = jnp.minimum(sizes_ref[group], x_ref.shape[1])
  row_start = row_tile * tiles.rows
  col_start = col_tile * tiles.cols
  rows = row_start + jnp.arange(tiles.rows)
  row_mask = rows[:, None] < size
  precision = _dot_precision(x_ref.dtype)

  def k_step(step, acc):
    k_start = step * tiles.depth
    cols = k_start + jnp.arange(tiles.depth)
    x_tile = pallas_triton.load(
        x_ref.at[group, pl.ds(row_start, tiles.rows), pl.ds(k_start, tiles.depth)],
        mask=row_mask & (cols[None, :] < depth), other=0)
    w_tile = w_ref[block, pl.ds(k_start, tiles.depth), pl.ds(col_start, tiles.cols)]
    return acc + jnp.dot(x_tile, w_tile, precision=precision,
                         preferred_element_type=jnp.float32)

  # Tiles past the group's rows loop zero times: no loads, no MMA, zeros stored.
  num_steps = pl.cdiv(depth, tiles.depth) * (row_start < size).astype(jnp.int32)
  acc = jax.lax.fori_loop(0, num_steps, k_step,
                          jnp.zeros((tiles.rows, tiles.cols), jnp.float32))
  out_cols = col_start + jnp.arange(tiles.cols)
  pallas_triton.store(
      out_ref.at[group, pl.ds(row_start, tiles.rows), pl.ds(col_start, tiles.cols)],
      acc.astype(out_ref.dtype),
      mask=(rows[:, None] < out_ref.shape[1]) & (out_cols[None, :] < out_ref.shape[2]))


def _check_args(x: jax.Array, tiles: jax.Array, weight_index: jax.Array,
                group_sizes: jax.Array, width: int) -> None:
  if x.ndim != 3 or tiles.ndim != 3 or weight_index.ndim != 1 or group_sizes.ndim != 1:
    raise ValueError("grouped_matmul needs x [groups, rows, k], tiles [weights, k_pad, n_pad], "
                     f"weight_index [groups] and group_sizes [groups]; got {x.shape}, "
                     f"{tiles.shape}, {weight_index.shape}, {group_sizes.shape}")
  groups, _, depth = x.shape
  if weight_index.shape[0] != groups or group_sizes.shape[0] != groups:
    raise ValueError(f"weight_index {weight_index.shape} and group_sizes {group_sizes.shape} "
                     f"need one entry per group ({groups})")
  if x.dtype != tiles.dtype:
    raise ValueError(f"x is {x.dtype} but the weight tiles are {tiles.dtype}")
  expected = padded_weight_shape(depth, width, x.dtype)
  if tiles.shape[1:] != expected:
    raise ValueError(f"weight tiles {tiles.shape} for k={depth}, n={width} must be padded to "
                     f"[weights, {expected[0]}, {expected[1]}] once by pad_weight_tiles")


@functools.partial(jax.jit, static_argnames=("width", "interpret"))
def grouped_matmul(x: jax.Array, tiles: jax.Array, weight_index: jax.Array | None = None,
                   group_sizes: jax.Array | None = None, *, width: int,
                   interpret: bool = False) -> jax.Array:
  """``out[g, r] = x[g, r] @ weights[weight_index[g]]`` for ``r < group_sizes[g]``, else 0.

  Args:
    x: ``[groups, rows, k]``; callers that pass ``group_sizes`` keep the rows past a
      group's size at zero (they are never read), so every backend agrees.
    tiles: ``[weights, k_pad, n_pad]`` from :func:`pad_weight_tiles` (same dtype as x).
    weight_index: ``[groups]`` int block ids (clamped to ``[0, weights)``); ``None``
      means group ``g`` uses block ``g``.
    group_sizes: ``[groups]`` int rows in use per group (a prefix); ``None`` means all.
    width: ``n``, the unpadded output columns (static).
    interpret: run the kernel in the Pallas interpreter (any backend; for tests).

  Returns:
    ``[groups, rows, width]`` in ``x.dtype``.
  """
  groups, rows, depth = x.shape
  if weight_index is None:
    weight_index = jnp.arange(groups, dtype=jnp.int32)
  if group_sizes is None:
    group_sizes = jnp.full((groups,), rows, jnp.int32)
  _check_args(x, tiles, weight_index, group_sizes, width)
  tiles_shape = tile_shape(rows, depth, width, x.dtype)
  kernel = functools.partial(_grouped_matmul_kernel, tiles=tiles_shape, depth=depth,
                             num_weights=tiles.shape[0])
  return pl.pallas_call(
      kernel,
      grid=(groups, pl.cdiv(rows, tiles_shape.rows), pl.cdiv(width, tiles_shape.cols)),
      out_shape=jax.ShapeDtypeStruct((groups, rows, width), x.dtype),
      compiler_params=pallas_triton.CompilerParams(num_warps=NUM_WARPS,
                                                   num_stages=NUM_STAGES),
      interpret=interpret,
      name="ccjax_grouped_matmul",
  )(weight_index.astype(jnp.int32), group_sizes.astype(jnp.int32), x, tiles)


def _unavailable_reason(platform: str) -> str | None:
  if platform == "gpu" or os.environ.get(INTERPRET_ENV) == "1":
    return None
  return (f"needs a GPU (the default JAX backend is {platform}), or {INTERPRET_ENV}=1 for "
          "the interpreter")


def _grouped_matmul(x: jax.Array, weights: jax.Array, weight_index: jax.Array | None,
                    group_sizes: jax.Array | None, *, tiles: jax.Array | None,
                    transpose_rhs: bool = False) -> jax.Array:
  """The :class:`~ccjax.inference.kernels.base.Backend` grouped matmul: :func:`grouped_matmul`
  on the ``tiles`` made at layout time (the empty rows and groups are skipped)."""
  if transpose_rhs:
    raise ValueError("the Pallas grouped matmul takes untransposed [weights, k, n] blocks")
  if tiles is None:
    raise ValueError("the pallas-gpu backend needs tiles=pad_weight_tiles(weights), made "
                     "once at layout time (to_block_major(..., pallas_tiles=True))")
  return grouped_matmul(x, tiles, weight_index, group_sizes, width=weights.shape[2],
                        interpret=interpret_default())


def _batch1_forward(model, x: jax.Array, config):
  return pallas_gpu_gemv.fused_forward_single(model, x, config, interpret=interpret_default())


# Pallas (Triton) on GPU: the minibatch path's grouped matmul and the fused batch-1 path.
BACKEND = base.Backend(
    name="pallas-gpu", unavailable_reason=_unavailable_reason, platform="gpu",
    families=(base.MLP, base.TRANSFORMER), layout_tiles=True,
    grouped_matmul=_grouped_matmul, batch1_forward=_batch1_forward)
