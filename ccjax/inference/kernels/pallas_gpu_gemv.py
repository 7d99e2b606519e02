"""Batch-1 gated-MLP kernels on NVIDIA GPUs: a gather GEMV and a fused policy selection.

Pallas kernels lowered through Triton (named explicitly by
``pallas.triton.CompilerParams``). Triton has no scalar prefetch, so block ids and
counts are int32 operands read as scalars inside the kernel, where they drive the
weight pointers; every array stays in HBM.

Axis letters: ``splits`` partial sums of a split-K product, ``k_in`` / ``k_out``
compact input / output slots (block ids of the slots in ``in_index`` / ``out_index``),
``depth`` units per input slot, ``width`` output columns, ``weights`` stored weight
blocks ``[weights, depth, width]``, ``nb`` blocks of a layer.

:func:`gather_gemv` -- the block products of one layer at batch 1, reading only the
selected weight tiles::

    h[s]          = act(sum_p h_parts[p, s] + in_bias[in_index[s]])    (act: ReLU or none)
    out[o]        = sum over s < in_count of h[s] @ weights[out_index[o] * in_stride
                                                             + in_index[s]]
    partials[q, o] = the part of out[o] from split q (zeros for o >= out_count)

* grid ``(k_out, cdiv(width, bn), splits)``; program ``(o, j, q)`` owns columns
  ``j * bn ...`` of output slot ``o`` and the ``q``-th contiguous chunk of the flattened
  ``(input slot, K step)`` iteration space (split-K over the active input blocks and,
  for a dense input, over its depth);
* the loop runs ``min(chunk, in_count * steps - q * chunk)`` times (zero for an output
  slot ``o >= out_count`` or a chunk past the active inputs): inactive slots, unused
  capacity and inactive input blocks read no weights and store zeros;
* each step loads one ``[hs, bk]`` tile of the input partials (summed over ``hs``, the
  producer's splits, then bias and ReLU: the previous layer's epilogue is fused into
  its consumers) and one ``[bk, bn]`` weight tile, and adds their elementwise product
  to a ``[bk, bn]`` float32 accumulator that is reduced over ``bk`` once, after the
  loop: a GEMV needs no MMA, and float32 stays exact IEEE arithmetic (no TF32) whatever
  the matmul precision; bfloat16 / float16 inputs are widened to float32.

:func:`select_blocks` -- one program: sums a policy GEMV's partials, adds the policy
bias, maps to probabilities (:func:`ccjax.policy_probs`) and keeps the ``k`` most
probable blocks by ``k`` arg-max passes (ties: the lower block id, as ``lax.top_k``),
with the threshold / exact-``k`` rule of :class:`~ccjax.inference.capacity.SparseConfig`:
the policy, the selection and the trace of a layer in one launch.

A hidden layer at batch 1 is then three launches (policy GEMV, selection, block GEMV)
and the output layer one; see :func:`fused_forward_single`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from ccjax import policy as policy_lib
from ccjax.inference import layout

# Triton block shapes are powers of two; keep every side at least this.
MIN_TILE = 16
MAX_COL_TILE = 64
# Bytes of one weight tile ([bk, bn]) loaded per loop step.
TILE_BYTES = 16 * 1024
NUM_WARPS = 4
NUM_STAGES = 3
# Programs a split-K launch aims for: a few waves of an H100/H200's 132 SMs.
TARGET_PROGRAMS = 264


class GemvTiles(NamedTuple):
  """Static tile sides of :func:`gather_gemv`.

  Attributes:
    depth: ``bk``, contraction step of the loop.
    cols: ``bn``, output columns per program.
  """
  depth: int
  cols: int


def _pow2(size: int) -> int:
  return 1 << (max(size, 1) - 1).bit_length()


def gemv_tiles(depth: int, width: int, dtype) -> GemvTiles:
  """Tile sides for ``[depth] @ [depth, width]`` steps: ``bn <= 64`` columns and a
  ``[bk, bn]`` weight tile of at most :data:`TILE_BYTES`."""
  cols = min(MAX_COL_TILE, max(MIN_TILE, _pow2(width)))
  depth_limit = max(MIN_TILE, TILE_BYTES // (cols * jnp.dtype(dtype).itemsize))
  return GemvTiles(depth=min(depth_limit, max(MIN_TILE, _pow2(depth))), cols=cols)


def gemv_splits(out_slots: int, width: int, in_slots: int, depth: int, dtype) -> int:
  """Split-K factor of a :func:`gather_gemv` launch: enough programs for
  :data:`TARGET_PROGRAMS`, at most one chunk per ``(input slot, K step)``."""
  tiles = gemv_tiles(depth, width, dtype)
  programs = out_slots * math.ceil(width / tiles.cols)
  steps = in_slots * math.ceil(depth / tiles.depth)
  return max(1, min(steps, math.ceil(TARGET_PROGRAMS / programs)))


def _gemv_kernel(in_index_ref, in_count_ref, out_index_ref, out_count_ref, h_ref, *refs,
                 tiles: GemvTiles, in_stride: int, in_relu: bool, has_in_bias: bool,
                 splits: int):
  """Program ``(o, j, q)``; see the module doc."""
  if has_in_bias:
    bias_ref, w_ref, out_ref = refs
  else:
    bias_ref, (w_ref, out_ref) = None, refs
  slot, col_tile, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  _, in_slots, depth = h_ref.shape
  steps = pl.cdiv(depth, tiles.depth)
  chunk = pl.cdiv(in_slots * steps, splits)
  active = slot < out_count_ref[0]
  total = jnp.minimum(in_count_ref[0], in_slots) * steps
  start = split * chunk
  num_iters = jnp.clip(jnp.minimum(chunk, total - start), 0, chunk) * active.astype(jnp.int32)
  col_start = col_tile * tiles.cols
  out, col_mask = _gather_products(h_ref, in_index_ref, bias_ref, w_ref, tiles=tiles,
                                   block=out_index_ref[slot], in_stride=in_stride,
                                   in_relu=in_relu, start=start, num_iters=num_iters,
                                   col_start=col_start)
  pallas_triton.store(out_ref.at[split, slot, pl.ds(col_start, tiles.cols)], out,
                      mask=col_mask)


def _gather_products(h_ref, in_index_ref, bias_ref, w_ref, *, tiles: GemvTiles, block,
                     in_stride: int, in_relu: bool, start, num_iters, col_start):
  """``[bn]`` float32 sum over ``num_iters`` ``(input slot, K step)`` pairs from ``start``
  of the input tile (partials summed, bias and ReLU: the producer's epilogue) times the
  ``[bk, bn]`` tile of weight block ``block * in_stride + in_index[slot]``; and the mask
  of the columns ``col_start ...`` that exist."""
  h_splits, _, depth = h_ref.shape
  num_weights, _, width = w_ref.shape
  steps = pl.cdiv(depth, tiles.depth)
  cols = col_start + jnp.arange(tiles.cols)
  col_mask = cols < width
  h_rows = jnp.arange(_pow2(h_splits))

  def step(iteration, acc):
    flat = start + iteration
    in_slot = flat // steps
    k_start = (flat % steps) * tiles.depth
    ks = k_start + jnp.arange(tiles.depth)
    k_mask = ks < depth
    in_block = in_index_ref[in_slot]
    parts = pallas_triton.load(
        h_ref.at[pl.ds(0, h_rows.shape[0]), in_slot, pl.ds(k_start, tiles.depth)],
        mask=(h_rows[:, None] < h_splits) & k_mask[None, :], other=0)
    h = jnp.sum(parts.astype(jnp.float32), axis=0)                        # [bk]
    if bias_ref is not None:
      h = h + pallas_triton.load(bias_ref.at[in_block, pl.ds(k_start, tiles.depth)],
                                 mask=k_mask, other=0).astype(jnp.float32)
    if in_relu:
      h = jnp.maximum(h, 0.0)
    weight = jnp.clip(block * in_stride + in_block, 0, num_weights - 1)
    w_tile = pallas_triton.load(
        w_ref.at[weight, pl.ds(k_start, tiles.depth), pl.ds(col_start, tiles.cols)],
        mask=k_mask[:, None] & col_mask[None, :], other=0)
    return acc + h[:, None] * w_tile.astype(jnp.float32)

  # A [bk, bn] accumulator reduced once after the loop: no cross-thread reduction per step.
  acc = jax.lax.fori_loop(0, num_iters, step,
                          jnp.zeros((tiles.depth, tiles.cols), jnp.float32))
  return jnp.sum(acc, axis=0), col_mask


def _check_gemv_args(h_parts, in_index, in_count, out_index, out_count, weights, in_bias):
  if (h_parts.ndim != 3 or weights.ndim != 3 or in_index.ndim != 1 or out_index.ndim != 1
      or in_count.ndim != 1 or out_count.ndim != 1):
    raise ValueError("gather_gemv needs h_parts [splits, k_in, depth], in_index [k_in], "
                     "in_count [>=1], out_index [k_out], out_count [>=1], weights "
                     f"[weights, depth, width]; got {h_parts.shape}, {in_index.shape}, "
                     f"{in_count.shape}, {out_index.shape}, {out_count.shape}, {weights.shape}")
  if in_index.shape[0] != h_parts.shape[1]:
    raise ValueError(f"in_index {in_index.shape} needs one id per input slot "
                     f"({h_parts.shape[1]})")
  if weights.shape[1] != h_parts.shape[2]:
    raise ValueError(f"weights {weights.shape} contract over depth {weights.shape[1]}, the "
                     f"input has depth {h_parts.shape[2]}")
  if in_bias is not None and (in_bias.ndim != 2 or in_bias.shape[1] != h_parts.shape[2]):
    raise ValueError(f"in_bias must be [blocks, {h_parts.shape[2]}], got {in_bias.shape}")


@functools.partial(jax.jit, static_argnames=("in_stride", "in_relu", "splits", "interpret"))
def gather_gemv(h_parts: jax.Array, in_index: jax.Array, in_count: jax.Array,
                out_index: jax.Array, out_count: jax.Array, weights: jax.Array,
                in_bias: jax.Array | None = None, *, in_stride: int, in_relu: bool = False,
                splits: int | None = None, interpret: bool = False) -> jax.Array:
  """Split-K partial products of the selected weight blocks (see the module doc).

  Args:
    h_parts: ``[hs, k_in, depth]`` input as ``hs`` partial sums (a producer's
      ``partials``, or ``x[None, None]`` for a dense input).
    in_index: ``[k_in]`` int block id of each input slot.
    in_count: ``[>= 1]`` int; element 0 is the number of active input slots (a prefix).
    out_index: ``[k_out]`` int block id of each output slot.
    out_count: ``[>= 1]`` int; element 0 is the number of active output slots (a prefix).
    weights: ``[weights, depth, width]`` blocks, any shape (tails are masked loads).
      Slot pair ``(o, s)`` multiplies block ``out_index[o] * in_stride + in_index[s]``
      (clamped to ``[0, weights)``).
    in_bias: optional ``[nb_in, depth]`` bias of the input blocks, added after summing
      ``h_parts`` (the producer's epilogue).
    in_stride: static multiplier of the output block id (input blocks per output block
      of a hidden layer; ``0`` when every output slot shares the input's blocks).
    in_relu: apply ReLU to the input after the bias.
    splits: static split-K factor; ``None``: :func:`gemv_splits`.
    interpret: run in the Pallas interpreter (any backend; for tests).

  Returns:
    ``[splits, k_out, width]`` float32 partial sums; their sum over ``splits`` is the
    product, zero for output slots ``>= out_count``.
  """
  _check_gemv_args(h_parts, in_index, in_count, out_index, out_count, weights, in_bias)
  _, in_slots, depth = h_parts.shape
  out_slots = out_index.shape[0]
  width = weights.shape[2]
  if splits is None:
    splits = gemv_splits(out_slots, width, in_slots, depth, weights.dtype)
  tiles = gemv_tiles(depth, width, weights.dtype)
  kernel = functools.partial(_gemv_kernel, tiles=tiles, in_stride=in_stride, in_relu=in_relu,
                             has_in_bias=in_bias is not None, splits=splits)
  operands = [in_index.astype(jnp.int32), in_count.astype(jnp.int32),
              out_index.astype(jnp.int32), out_count.astype(jnp.int32), h_parts]
  operands += [in_bias] if in_bias is not None else []
  return pl.pallas_call(
      kernel,
      grid=(out_slots, pl.cdiv(width, tiles.cols), splits),
      out_shape=jax.ShapeDtypeStruct((splits, out_slots, width), jnp.float32),
      compiler_params=pallas_triton.CompilerParams(num_warps=NUM_WARPS,
                                                   num_stages=NUM_STAGES),
      interpret=interpret,
      name="ccjax_gather_gemv",
  )(*operands, weights)


class Selection(NamedTuple):
  """The blocks one layer runs at batch 1 (output of :func:`select_blocks`).

  Attributes:
    index: ``[k]`` int32 block ids, most probable first.
    kept: ``[k]`` int32 1 where the slot runs (a prefix).
    counts: ``[2]`` int32 ``(slots kept, candidates)``; candidates are the blocks with
      ``p > 0.5`` (``k`` under exact ``k``).
    probs: ``[nb]`` float32 policy probabilities.
  """
  index: jax.Array
  kept: jax.Array
  counts: jax.Array
  probs: jax.Array


def _select(parts_ref, bias_ref, *, capacity: int, eps: float, exact_k: bool):
  """Policy epilogue and top-``capacity`` selection inside a kernel (see the module doc).

  Returns ``(slots, index, kept, num_kept, candidates, probs, valid)``: ``[pow2(k)]``
  slot ids, block ids and kept flags, the two counts, ``[pow2(nb)]`` probabilities and
  the mask of real blocks.
  """
  splits, num_blocks = parts_ref.shape
  split_rows = jnp.arange(_pow2(splits))
  blocks = jnp.arange(_pow2(num_blocks))
  valid = blocks < num_blocks
  parts = pallas_triton.load(parts_ref.at[pl.ds(0, split_rows.shape[0]),
                                          pl.ds(0, blocks.shape[0])],
                             mask=(split_rows[:, None] < splits) & valid[None, :], other=0)
  logits = jnp.sum(parts, axis=0) + pallas_triton.load(
      bias_ref.at[pl.ds(0, blocks.shape[0])], mask=valid, other=0).astype(jnp.float32)
  probs = policy_lib.policy_probs(logits, eps)
  slots = jnp.arange(_pow2(capacity))

  def pick(rank, carry):
    remaining, index, value = carry
    best = jnp.argmax(remaining).astype(jnp.int32)
    top = jnp.max(remaining)
    index = jnp.where(slots == rank, best, index)
    value = jnp.where(slots == rank, top, value)
    return jnp.where(blocks == best, -jnp.inf, remaining), index, value

  _, index, value = jax.lax.fori_loop(
      0, capacity, pick, (jnp.where(valid, probs, -jnp.inf),
                          jnp.zeros(slots.shape, jnp.int32),
                          jnp.zeros(slots.shape, jnp.float32)))
  in_capacity = slots < capacity
  if exact_k:
    kept = in_capacity
    candidates = jnp.asarray(capacity, jnp.int32)
  else:
    kept = in_capacity & (value > policy_lib.THRESHOLD)
    candidates = jnp.sum((valid & (probs > policy_lib.THRESHOLD)).astype(jnp.int32))
  num_kept = jnp.sum(kept.astype(jnp.int32))
  return slots, index, kept, num_kept, candidates, probs, valid


def _store_selection(selection, index_ref, kept_ref, counts_ref, probs_ref, *, capacity: int,
                     enabled=True):
  """Stores what :func:`_select` chose (only where ``enabled``, a scalar bool)."""
  slots, index, kept, num_kept, candidates, probs, valid = selection
  in_capacity = (slots < capacity) & enabled
  pallas_triton.store(index_ref.at[pl.ds(0, slots.shape[0])], index, mask=in_capacity)
  pallas_triton.store(kept_ref.at[pl.ds(0, slots.shape[0])], kept.astype(jnp.int32),
                      mask=in_capacity)
  pair = jnp.arange(2)
  pallas_triton.store(counts_ref.at[pl.ds(0, 2)], jnp.where(pair == 0, num_kept, candidates),
                      mask=(pair < 2) & enabled)
  pallas_triton.store(probs_ref.at[pl.ds(0, probs.shape[0])], probs, mask=valid & enabled)


def _select_kernel(parts_ref, bias_ref, index_ref, kept_ref, counts_ref, probs_ref, *,
                   capacity: int, eps: float, exact_k: bool):
  """One program: policy epilogue and top-``capacity`` selection; see the module doc."""
  selection = _select(parts_ref, bias_ref, capacity=capacity, eps=eps, exact_k=exact_k)
  _store_selection(selection, index_ref, kept_ref, counts_ref, probs_ref, capacity=capacity)


@functools.partial(jax.jit, static_argnames=("capacity", "eps", "exact_k", "interpret"))
def select_blocks(logit_parts: jax.Array, bias: jax.Array, *, capacity: int, eps: float,
                  exact_k: bool = False, interpret: bool = False) -> Selection:
  """A layer's policy and block selection at batch 1, in one launch.

  Args:
    logit_parts: ``[splits, 1, nb]`` float32 partial policy logits (a
      :func:`gather_gemv` result).
    bias: ``[nb]`` policy bias.
    capacity: static ``k``, slots per example (``1 <= k <= nb``).
    eps: the policy's probability bound.
    exact_k: keep all ``k`` most probable blocks (the ``top_k`` policy) instead of
      those with ``p > 0.5``.
    interpret: run in the Pallas interpreter (for tests).

  Returns:
    a :class:`Selection`: the same blocks, order and counts as ``lax.top_k`` and
    :meth:`SparseConfig.wanted` / :meth:`SparseConfig.candidates` on the same
    probabilities.
  """
  if logit_parts.ndim != 3 or logit_parts.shape[1] != 1 or bias.shape != logit_parts.shape[2:]:
    raise ValueError(f"select_blocks needs logit_parts [splits, 1, nb] and bias [nb], got "
                     f"{logit_parts.shape} and {bias.shape}")
  num_blocks = bias.shape[0]
  if not 1 <= capacity <= num_blocks:
    raise ValueError(f"capacity must be in [1, {num_blocks}], got {capacity!r}")
  kernel = functools.partial(_select_kernel, capacity=capacity, eps=float(eps),
                             exact_k=exact_k)
  index, kept, counts, probs = pl.pallas_call(
      kernel,
      grid=(1,),
      out_shape=(jax.ShapeDtypeStruct((capacity,), jnp.int32),
                 jax.ShapeDtypeStruct((capacity,), jnp.int32),
                 jax.ShapeDtypeStruct((2,), jnp.int32),
                 jax.ShapeDtypeStruct((num_blocks,), jnp.float32)),
      compiler_params=pallas_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret,
      name="ccjax_select_blocks",
  )(logit_parts.reshape(logit_parts.shape[0], -1).astype(jnp.float32), bias)
  return Selection(index, kept, counts, probs)


class LayerOutput(NamedTuple):
  """What :func:`gemv_layer` returns.

  Attributes:
    h_parts: ``[1, k, width]`` float32 pre-activations of the kept slots (zeros past
      ``selection.counts[0]``): the next layer's input (bias and ReLU applied by it).
    next_parts: ``[k * col_tiles, next_width]`` float32 partial sums of the next layer's
      policy logits (or of the output logits): their sum over rows is the product of
      ``relu(h + bias)`` with ``next_weights``.
    selection: the layer's :class:`Selection`.
  """
  h_parts: jax.Array
  next_parts: jax.Array
  selection: Selection


def layer_tiles(depth: int, dtype) -> GemvTiles:
  """Tile sides of :func:`gemv_layer`: the narrowest column tile (many programs without
  split-K) and a ``[bk, bn]`` weight tile of at most :data:`TILE_BYTES`."""
  cols = MIN_TILE
  depth_limit = max(MIN_TILE, TILE_BYTES // (cols * jnp.dtype(dtype).itemsize))
  return GemvTiles(depth=min(depth_limit, max(MIN_TILE, _pow2(depth))), cols=cols)


def _layer_kernel(parts_ref, policy_bias_ref, in_index_ref, in_count_ref, h_ref, *refs,
                  tiles: GemvTiles, in_stride: int, in_relu: bool, has_in_bias: bool,
                  capacity: int, eps: float, exact_k: bool):
  """Program ``(o, j)`` of :func:`gemv_layer`: the selection (every program computes it;
  program ``(0, 0)`` stores it), output slot ``o``'s columns ``j * bn ...`` over all active
  input slots, then their share of the next product."""
  if has_in_bias:
    in_bias_ref, w_ref, bias_ref, next_ref, *out_refs = refs
  else:
    in_bias_ref, (w_ref, bias_ref, next_ref, *out_refs) = None, refs
  h_out_ref, next_parts_ref, index_ref, kept_ref, counts_ref, probs_ref = out_refs
  slot, col_tile = pl.program_id(0), pl.program_id(1)
  selection = _select(parts_ref, policy_bias_ref, capacity=capacity, eps=eps, exact_k=exact_k)
  _store_selection(selection, index_ref, kept_ref, counts_ref, probs_ref, capacity=capacity,
                   enabled=(slot == 0) & (col_tile == 0))
  slots, index, _, num_kept, _, _, _ = selection
  block = jnp.sum(jnp.where(slots == slot, index, 0))
  active = slot < num_kept
  _, in_slots, depth = h_ref.shape
  steps = pl.cdiv(depth, tiles.depth)
  num_iters = jnp.minimum(in_count_ref[0], in_slots) * steps * active.astype(jnp.int32)
  col_start = col_tile * tiles.cols
  # start: a traced zero (with a Python 0 Triton's lowering rejects the loop's index math).
  out, col_mask = _gather_products(h_ref, in_index_ref, in_bias_ref, w_ref, tiles=tiles,
                                   block=block, in_stride=in_stride, in_relu=in_relu, start=jnp.zeros((), jnp.int32),
                                   num_iters=num_iters, col_start=col_start)
  pallas_triton.store(h_out_ref.at[slot, pl.ds(col_start, tiles.cols)], out, mask=col_mask)
  # This program's share of the next product: relu(out + bias) @ next[block, columns].
  used = col_mask & active
  hidden = jnp.maximum(out + pallas_triton.load(
      bias_ref.at[block, pl.ds(col_start, tiles.cols)], mask=used, other=0
  ).astype(jnp.float32), 0.0)
  hidden = jnp.where(used, hidden, 0.0)
  next_width = next_ref.shape[2]
  next_cols = jnp.arange(_pow2(next_width))
  next_tile = pallas_triton.load(
      next_ref.at[block, pl.ds(col_start, tiles.cols), pl.ds(0, next_cols.shape[0])],
      mask=used[:, None] & (next_cols < next_width)[None, :], other=0)
  share = jnp.sum(hidden[:, None] * next_tile.astype(jnp.float32), axis=0)
  row = slot * pl.num_programs(1) + col_tile
  pallas_triton.store(next_parts_ref.at[row, pl.ds(0, next_cols.shape[0])], share,
                      mask=next_cols < next_width)


@functools.partial(jax.jit, static_argnames=("in_stride", "in_relu", "capacity", "eps",
                                             "exact_k", "interpret"))
def gemv_layer(logit_parts: jax.Array, policy_bias: jax.Array, h_parts: jax.Array,
               in_index: jax.Array, in_count: jax.Array, weights: jax.Array,
               bias: jax.Array, next_weights: jax.Array, in_bias: jax.Array | None = None, *,
               in_stride: int, in_relu: bool = False, capacity: int, eps: float,
               exact_k: bool = False, interpret: bool = False) -> LayerOutput:
  """One hidden layer at batch 1 in one launch: selection, block product, next product.

  Grid ``(k, cdiv(width, bn))``, no split-K: each program recomputes the layer's
  selection from ``logit_parts`` (as :func:`select_blocks`; ``nb`` probabilities, ``k``
  arg-max passes), owns all of output slot ``o``'s columns ``j * bn ...`` (so it can apply
  the bias and ReLU itself) and multiplies them by rows of ``next_weights`` of that block:
  the next layer's policy logits (or the output logits) leave as ``k * col_tiles`` partial
  rows, summed by their consumer.

  Args:
    logit_parts: ``[rows, nb]`` float32 partial policy logits of this layer.
    policy_bias: ``[nb]``.
    h_parts: ``[hs, k_in, depth]`` input partial sums (see :func:`gather_gemv`).
    in_index: ``[k_in]`` int block ids of the input slots.
    in_count: ``[>= 1]`` int; element 0 is the number of active input slots.
    weights: ``[weights, depth, width]``; slot pair ``(o, s)`` multiplies block
      ``index[o] * in_stride + in_index[s]``.
    bias: ``[nb, width]`` this layer's bias.
    next_weights: ``[nb, width, next_width]`` rows of the next product per block.
    in_bias: optional ``[nb_in, depth]`` bias of the input blocks.
    in_stride, in_relu: as in :func:`gather_gemv`.
    capacity, eps, exact_k: as in :func:`select_blocks`.
    interpret: run in the Pallas interpreter (for tests).

  Returns:
    a :class:`LayerOutput`.
  """
  _check_gemv_args(h_parts, in_index, in_count, jnp.zeros((capacity,), jnp.int32),
                   in_count, weights, in_bias)
  num_blocks = policy_bias.shape[0]
  if logit_parts.ndim != 2 or logit_parts.shape[1] != num_blocks:
    raise ValueError(f"gemv_layer needs logit_parts [rows, {num_blocks}], got "
                     f"{logit_parts.shape}")
  if not 1 <= capacity <= num_blocks:
    raise ValueError(f"capacity must be in [1, {num_blocks}], got {capacity!r}")
  width = weights.shape[2]
  if bias.shape != (num_blocks, width) or next_weights.shape[:2] != (num_blocks, width):
    raise ValueError(f"bias must be [{num_blocks}, {width}] and next_weights "
                     f"[{num_blocks}, {width}, n], got {bias.shape} and {next_weights.shape}")
  tiles = layer_tiles(h_parts.shape[2], weights.dtype)
  col_tiles = pl.cdiv(width, tiles.cols)
  kernel = functools.partial(_layer_kernel, tiles=tiles, in_stride=in_stride, in_relu=in_relu,
                             has_in_bias=in_bias is not None, capacity=capacity,
                             eps=float(eps), exact_k=exact_k)
  operands = [logit_parts.astype(jnp.float32), policy_bias, in_index.astype(jnp.int32),
              in_count.astype(jnp.int32), h_parts]
  operands += [in_bias] if in_bias is not None else []
  h_out, next_parts, index, kept, counts, probs = pl.pallas_call(
      kernel,
      grid=(capacity, col_tiles),
      out_shape=(jax.ShapeDtypeStruct((capacity, width), jnp.float32),
                 jax.ShapeDtypeStruct((capacity * col_tiles, next_weights.shape[2]),
                                      jnp.float32),
                 jax.ShapeDtypeStruct((capacity,), jnp.int32),
                 jax.ShapeDtypeStruct((capacity,), jnp.int32),
                 jax.ShapeDtypeStruct((2,), jnp.int32),
                 jax.ShapeDtypeStruct((num_blocks,), jnp.float32)),
      compiler_params=pallas_triton.CompilerParams(num_warps=NUM_WARPS,
                                                   num_stages=NUM_STAGES),
      interpret=interpret,
      name="ccjax_gemv_layer",
  )(*operands, weights, bias, next_weights)
  return LayerOutput(h_out[None], next_parts, Selection(index, kept, counts, probs))


def fused_forward_single(model: layout.BlockMajorMLP, x: jax.Array, config, *,
                         interpret: bool = False, one_launch_layers: bool = False):
  """Batch-1 path of the ``pallas-gpu`` backend: ``x [in]`` -> ``logits [classes]``, traces.

  Per hidden layer three Pallas launches of this module: the policy as a split-K gather
  GEMV (:func:`gather_gemv`) over the active input blocks (the dense input for the first
  layer), :func:`select_blocks` (the
  policy epilogue, threshold / top-``k`` and the trace), and the block product reading
  only the ``c_out * c_in`` selected weight blocks; the output layer is one more GEMV.
  A layer's output stays as split-K partial sums of its pre-activations; its bias and
  ReLU are applied by the two kernels that read it. Loops follow the real active counts,
  so ``config.buckets`` (an XLA batch-1 device) is not needed and not used. The blocks
  that run and the traces are those of
  :func:`ccjax.inference.batch1.sparse_forward_single`.

  Args:
    model: block-major parameters (any dtype; products accumulate in float32).
    x: ``[in]`` one example.
    config: a :class:`ccjax.inference.capacity.SparseConfig` (``example_capacity`` and
      ``exact_k`` are used).
    interpret: run the kernels in the Pallas interpreter (off a GPU).
    one_launch_layers: one :func:`gemv_layer` launch per hidden layer (selection, block
      product and the next layer's policy product together: ``1 + layers`` launches in
      all) instead of the three launches above. Off by default: on an H200 it took
      31.2 us of device time per forward against 25.6 us for three launches per layer
      (reference net, docs/inference.md): without split-K its 32 programs stream their
      tiles serially, and each recomputes the layer's top-k.

  Returns:
    ``(logits [classes]`` in ``x.dtype``, one :class:`~ccjax.inference.layout.LayerTrace`
    per hidden layer).
  """
  gemv = functools.partial(gather_gemv, interpret=interpret)
  one = jnp.ones((1,), jnp.int32)
  block_zero = jnp.zeros((1,), jnp.int32)      # one slot holding block 0
  h_parts, in_index, in_count, in_bias = x[None, None, :], block_zero, one, None
  logit_parts = gemv(h_parts, block_zero, one, block_zero, one,
                     model.layers[0].policy_kernel[None], in_stride=0)
  if one_launch_layers:
    return _forward_one_launch_layers(model, x, config, logit_parts[:, 0], interpret)
  traces = []
  num_layers = len(model.layers)
  for position, (layer, capacity) in enumerate(zip(model.layers, config.example_capacity)):
    selection = select_blocks(logit_parts, layer.policy_bias, capacity=capacity,
                                              eps=model.policy_eps, exact_k=config.exact_k,
                                              interpret=interpret)
    if layer.input_gated:
      weights, stride = layer.kernel, layer.kernel.shape[0] // layer.num_blocks
    else:
      weights, stride = layer.grouped_kernel, 1
    h_parts = gemv(h_parts, in_index, in_count, selection.index, selection.counts, weights,
                   in_bias, in_stride=stride, in_relu=in_bias is not None)
    next_weights = (model.layers[position + 1].policy_kernel if position + 1 < num_layers
                    else model.output_kernel)                      # [nb, bs, width]
    logit_parts = gemv(h_parts, selection.index, selection.counts, block_zero, one,
                       next_weights, layer.bias, in_stride=0, in_relu=True)
    traces.append(layout.LayerTrace(selection.index[None], selection.kept[None].astype(bool),
                             selection.counts[1], selection.counts[0], selection.probs[None]))
    in_index, in_count, in_bias = selection.index, selection.counts, layer.bias
  logits = jnp.sum(logit_parts, axis=(0, 1)) + model.output_bias
  return logits.astype(x.dtype), tuple(traces)


def _forward_one_launch_layers(model: layout.BlockMajorMLP, x: jax.Array, config,
                               logit_parts: jax.Array, interpret: bool):
  """The rest of :func:`fused_forward_single` with one :func:`gemv_layer` per layer."""
  one = jnp.ones((1,), jnp.int32)
  h_parts, in_index, in_count, in_bias = x[None, None, :], jnp.zeros((1,), jnp.int32), one, None
  traces = []
  num_layers = len(model.layers)
  for position, (layer, capacity) in enumerate(zip(model.layers, config.example_capacity)):
    if layer.input_gated:
      weights, stride = layer.kernel, layer.kernel.shape[0] // layer.num_blocks
    else:
      weights, stride = layer.grouped_kernel, 1
    next_weights = (model.layers[position + 1].policy_kernel if position + 1 < num_layers
                    else model.output_kernel)                      # [nb, bs, width]
    result = gemv_layer(logit_parts, layer.policy_bias, h_parts, in_index, in_count, weights,
                        layer.bias, next_weights, in_bias, in_stride=stride,
                        in_relu=in_bias is not None, capacity=capacity,
                        eps=model.policy_eps, exact_k=config.exact_k, interpret=interpret)
    selection = result.selection
    traces.append(layout.LayerTrace(selection.index[None], selection.kept[None].astype(bool),
                                    selection.counts[1], selection.counts[0],
                                    selection.probs[None]))
    logit_parts, h_parts = result.next_parts, result.h_parts
    in_index, in_count, in_bias = selection.index, selection.counts, layer.bias
  logits = jnp.sum(logit_parts, axis=0) + model.output_bias
  return logits.astype(x.dtype), tuple(traces)
