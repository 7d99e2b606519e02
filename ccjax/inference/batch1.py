"""Batch-1 sparse MLP path: only the active weight blocks are read.

See :mod:`ccjax.inference.mlp` for the rules (which blocks run) and the bucketing.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ccjax import policy as policy_lib
from ccjax.inference.capacity import SparseConfig
from ccjax.inference.layout import BlockMajorMLP
from ccjax.inference.layout import LayerTrace


def block_probs(logits: jax.Array, eps: float) -> jax.Array:
  """Policy probabilities in float32 from raw logits (see :func:`ccjax.policy_probs`)."""
  return policy_lib.policy_probs(logits.astype(jnp.float32), eps)


def _select_single(probs: jax.Array, capacity: int, config: SparseConfig):
  values, index = jax.lax.top_k(probs, capacity)
  kept = config.wanted(values)
  return index.astype(jnp.int32), kept, jnp.sum(kept.astype(jnp.int32))


def _bucket_switch(count: jax.Array, sizes: Sequence[int], branch: Callable[[int], Any]) -> Any:
  """Calls ``branch(size)`` with the smallest static ``size`` in ``sizes`` holding ``count``."""
  if len(sizes) == 1:
    return branch(sizes[0])
  position = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count.astype(jnp.int32))
  index = jnp.minimum(position, len(sizes) - 1).astype(jnp.int32)
  return jax.lax.switch(index, [lambda _, size=size: branch(size) for size in sizes], None)


def pair_buckets(in_sizes: Sequence[int], out_sizes: Sequence[int]) -> tuple[int, ...]:
  """Static pair counts of a gated-input layer at batch 1: products of the slot buckets."""
  return tuple(sorted({a * b for a in in_sizes for b in out_sizes}))


def _take_rows(blocks: jax.Array, index: jax.Array) -> jax.Array:
  """``blocks[index]`` with every block flattened to one row (the fastest XLA:CPU gather).

  The barrier keeps XLA from fusing the index arithmetic into the gather, where it is
  recomputed for every copied element.
  """
  index = jax.lax.optimization_barrier(index)
  return jnp.take(blocks.reshape(blocks.shape[0], -1), index, axis=0, mode="clip")


def _weighted_row_sum(rows: jax.Array, weights: jax.Array, width: int) -> jax.Array:
  """``sum_r weights[r] * rows[r]`` over rows reshaped to ``[R, width]``.

  A product and a reduction over the non-minor axis: measured faster on XLA:CPU than a
  batched ``dot_general`` over small gathered blocks.
  """
  return jnp.sum(rows.reshape(-1, width) * weights.reshape(-1, 1), axis=0)


def sparse_forward_single(model: BlockMajorMLP, x: jax.Array, config: SparseConfig):
  """Batch-1 path: ``x [in]`` -> ``logits [classes]``, traces.

  The first layer runs in a ``lax.switch`` branch per output-slot bucket ``s``: it
  gathers the ``s`` active kernel blocks and, from its compact output, the next layer's
  policy rows. A hidden layer with a gated input enumerates its ``c_in * c_out`` active
  weight blocks (input slot ``q % c_in``, output slot ``q // c_in``) and runs in a
  branch per *pair-count* bucket (the products of the two layers' slot buckets), so the
  gathered weights follow the real two-sided count; the next policy (or the output
  layer) then runs in a branch per output-slot bucket (a separate small switch measured
  faster than folding it into the pair branches with all ``k`` slots).
  """
  eps, bs = model.policy_eps, model.block_size
  buckets = config.buckets or tuple((k,) for k in config.example_capacity)
  traces = []
  hidden = index = count = None
  logits = x @ model.layers[0].policy_kernel
  num_layers = len(model.layers)
  for position, (layer, capacity, out_sizes) in enumerate(
      zip(model.layers, config.example_capacity, buckets)):
    probs = block_probs(logits + layer.policy_bias, eps)
    out_index, kept, out_count = _select_single(probs, capacity, config)
    next_rows = (model.layers[position + 1].policy_kernel if position + 1 < num_layers
                 else model.output_kernel)                          # [nb, bs, n]
    next_width = next_rows.shape[-1]

    def next_logits(out, size, out_index=out_index, next_rows=next_rows,
                    next_width=next_width):
      return _weighted_row_sum(_take_rows(next_rows, out_index[:size]), out[:size], next_width)

    if not layer.input_gated:
      def first_branch(size, layer=layer, out_index=out_index, kept=kept, capacity=capacity,
                       next_logits=next_logits):
        cols = out_index[:size]
        # Transposed blocks: the product contracts their minor axis (fastest on XLA:CPU).
        weights = _take_rows(layer.kernel, cols).reshape(size, bs, -1)    # [s, bs, in]
        pre = jnp.einsum("jcd,d->jc", weights, x)                          # [s, bs]
        out = jax.nn.relu(pre + _take_rows(layer.bias, cols)) * kept[:size, None]
        return jnp.pad(out, ((0, capacity - size), (0, 0))), next_logits(out, size)

      hidden, logits = _bucket_switch(out_count, out_sizes, first_branch)
    else:
      in_blocks = layer.kernel.shape[0] // layer.num_blocks

      def pair_branch(num_pairs, layer=layer, hidden=hidden, index=index, count=count,
                      out_index=out_index, out_count=out_count, kept=kept, capacity=capacity,
                      in_blocks=in_blocks):
        pair = jnp.arange(num_pairs, dtype=jnp.int32)
        in_slot = pair % jnp.maximum(count, 1)
        out_slot = jnp.minimum(pair // jnp.maximum(count, 1), capacity - 1)
        valid = pair < count * out_count
        block = out_index[out_slot] * in_blocks + index[in_slot]
        weights = _take_rows(layer.kernel, block).reshape(num_pairs, bs, bs)
        inputs = jnp.where(valid[:, None], hidden[in_slot], 0.0)
        per_pair = jnp.sum(weights * inputs[:, :, None], axis=1)   # [pairs, bs]
        pre = jnp.zeros((capacity, bs), per_pair.dtype).at[out_slot].add(per_pair)
        return jax.nn.relu(pre + _take_rows(layer.bias, out_index)) * kept[:, None]

      hidden = _bucket_switch(count * out_count, pair_buckets(in_sizes, out_sizes),
                              pair_branch)
      logits = _bucket_switch(out_count, out_sizes,
                              lambda size, hidden=hidden, nl=next_logits: nl(hidden, size))
    traces.append(LayerTrace(out_index[None], kept[None],
                             config.candidates(probs[None], capacity), out_count, probs[None]))
    index, count, in_sizes = out_index, out_count, out_sizes
  return logits + model.output_bias, tuple(traces)
