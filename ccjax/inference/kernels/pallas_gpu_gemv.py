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
  h_splits, in_slots, depth = h_ref.shape
  num_weights, _, width = w_ref.shape
  steps = pl.cdiv(depth, tiles.depth)
  chunk = pl.cdiv(in_slots * steps, splits)
  active = slot < out_count_ref[0]
  total = jnp.minimum(in_count_ref[0], in_slots) * steps
  start = split * chunk
  num_iters = jnp.clip(jnp.minimum(chunk, total - start), 0, chunk) * active.astype(jnp.int32)
  block = out_index_ref[slot]
  col_start = col_tile * tiles.cols
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
    if has_in_bias:
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
  pallas_triton.store(out_ref.at[split, slot, pl.ds(col_start, tiles.cols)],
                      jnp.sum(acc, axis=0), mask=col_mask)


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


def _select_kernel(parts_ref, bias_ref, index_ref, kept_ref, counts_ref, probs_ref, *,
                   capacity: int, eps: float, exact_k: bool):
  """One program: policy epilogue and top-``capacity`` selection; see the module doc."""
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
  pallas_triton.store(index_ref.at[pl.ds(0, slots.shape[0])], index, mask=in_capacity)
  pallas_triton.store(kept_ref.at[pl.ds(0, slots.shape[0])], kept.astype(jnp.int32),
                      mask=in_capacity)
  pair = jnp.arange(2)
  pallas_triton.store(counts_ref.at[pl.ds(0, 2)], jnp.where(pair == 0, num_kept, candidates))
  pallas_triton.store(probs_ref.at[pl.ds(0, blocks.shape[0])], probs, mask=valid)


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


def fused_forward_single(model: layout.BlockMajorMLP, x: jax.Array, config, *,
                         interpret: bool = False):
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
