"""Minibatch sparse MLP path: (example, block) pairs grouped by block into static
``[groups, capacity, ...]`` arrays and run as grouped matmuls.

See :mod:`ccjax.inference.mlp` for the rules (capacities, overflow priority).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ccjax.inference import kernels
from ccjax.inference.batch1 import block_probs
from ccjax.inference.capacity import SparseConfig
from ccjax.inference.layout import BlockLayer
from ccjax.inference.layout import BlockMajorMLP
from ccjax.inference.layout import LayerTrace

take_blocks = kernels.take_blocks


class Grouping(NamedTuple):
  """Entries grouped by id with a static capacity per group.

  Attributes:
    entry_of_slot: ``[groups * capacity]`` int32 entry in each slot (``num_entries`` when
      empty).
    slot_of_entry: ``[num_entries]`` int32 slot of each entry (``groups * capacity`` when
      the entry is invalid or overflowed).
  """
  entry_of_slot: jax.Array
  slot_of_entry: jax.Array


_HALF_BITS = 0x3F000000   # int32 bit pattern of float32 0.5 (= policy_lib.THRESHOLD)
_PACKED_PRIORITY_BITS = 24


def _sort_by_group_then_priority(keys: jax.Array, priority: jax.Array, entries: jax.Array,
                                 num_groups: int, priority_above_half: bool):
  """Stable sort by ``(group, -priority)``: ``(sorted group keys, order)``.

  With ``priority_above_half`` (every valid priority in ``(0.5, 1]``) and few groups,
  the two keys are packed exactly into one int32 (a float32 in ``(0.5, 1]`` is ``0.5``
  plus at most ``2**23`` ulps), which XLA:CPU sorts about 1.5x faster.
  """
  if priority_above_half and num_groups + 1 < 2 ** (31 - _PACKED_PRIORITY_BITS):
    ulps = jax.lax.bitcast_convert_type(priority.astype(jnp.float32), jnp.int32) - _HALF_BITS
    rank = jnp.clip((1 << 23) - ulps, 0, (1 << _PACKED_PRIORITY_BITS) - 1)
    packed = jnp.where(keys < num_groups, (keys << _PACKED_PRIORITY_BITS) + rank,
                       num_groups << _PACKED_PRIORITY_BITS)
    packed, order = jax.lax.sort((packed, entries), num_keys=1, is_stable=True)
    return packed >> _PACKED_PRIORITY_BITS, order
  sorted_keys, _, order = jax.lax.sort(
      (keys, -priority.astype(jnp.float32), entries), num_keys=2, is_stable=True)
  return sorted_keys, order


def group_entries(group_id: jax.Array, priority: jax.Array, valid: jax.Array,
                  num_groups: int, capacity: int, *,
                  priority_above_half: bool = False) -> Grouping:
  """Places valid entries into ``num_groups`` groups of at most ``capacity`` slots.

  Within a group, entries are served by decreasing ``priority`` (ties: lower entry
  index); entries beyond the capacity get no slot (overflow).

  Args:
    group_id: ``[n]`` int group of each entry, in ``[0, num_groups)``.
    priority: ``[n]`` float.
    valid: ``[n]`` bool, entries that want a slot.
    num_groups: static number of groups.
    capacity: static slots per group.
    priority_above_half: promise that every valid priority lies in ``(0.5, 1]`` (the
      policy probabilities of the blocks that pass the threshold): enables a faster
      single-key sort with the same order.

  Returns:
    a :class:`Grouping`; sorting is ``O(n log n)``, no ``[n, groups]`` one-hot is built.
  """
  num_entries = group_id.shape[0]
  entries = jnp.arange(num_entries, dtype=jnp.int32)
  keys = jnp.where(valid, group_id.astype(jnp.int32), num_groups)
  sorted_keys, order = _sort_by_group_then_priority(keys, priority, entries, num_groups,
                                                    priority_above_half)
  # Rank inside the group: position minus the position where the group starts (a
  # running max of group starts; searchsorted would lower to a slow while loop on CPU).
  starts = jnp.concatenate([jnp.ones((1,), bool), sorted_keys[1:] != sorted_keys[:-1]])
  first = jax.lax.cummax(jnp.where(starts, entries, 0), axis=0)
  rank = entries - first
  empty = num_groups * capacity
  placed = (sorted_keys < num_groups) & (rank < capacity)
  slot = jnp.where(placed, sorted_keys * capacity + rank, empty)
  entry_of_slot = jnp.full((empty + 1,), num_entries, jnp.int32).at[slot].set(
      order, mode="drop")[:empty]
  slot_of_entry = jnp.full((num_entries,), empty, jnp.int32).at[order].set(slot)
  return Grouping(entry_of_slot, slot_of_entry)


def _pad_row(rows: jax.Array) -> jax.Array:
  """Appends one zero row (the target of empty slots / dropped entries)."""
  return jnp.concatenate([rows, jnp.zeros((1, *rows.shape[1:]), rows.dtype)], axis=0)


def _group_sizes(entry_of_slot: jax.Array, num_groups: int, num_entries: int) -> jax.Array:
  """``[num_groups]`` filled slots per group (:func:`group_entries` fills a prefix)."""
  filled = (entry_of_slot < num_entries).reshape(num_groups, -1)
  return jnp.sum(filled.astype(jnp.int32), axis=1)


def _grouped_product(rows: jax.Array, weights: jax.Array, tiles: jax.Array | None,
                     group_sizes: Callable[[], jax.Array], backend: str) -> jax.Array:
  """``rows [G, C, k] @ weights [G, k, n]`` per group on ``backend``.

  ``group_sizes`` is called (``[G]`` slots in use, a prefix) only for a backend with a
  grouped-matmul kernel of its own (Pallas: it skips the empty slots and reads no weights
  for empty groups); ``tiles`` are the weights its layout padded for it.
  """
  if kernels.get(backend).grouped_matmul is None:
    return kernels.grouped_matmul(rows, weights, backend=backend)
  return kernels.grouped_matmul(rows, weights, None, group_sizes(), tiles=tiles,
                                backend=backend)


def _sum_by_example(hidden_flat: jax.Array, grouping: Grouping, slots_per_example: int,
                    weights: jax.Array, tiles: jax.Array | None, batch: int,
                    backend: str) -> jax.Array:
  """``out[b] = sum over kept slots (b, s) of hidden[b, s] @ weights[block(b, s)]``.

  Args:
    hidden_flat: ``[batch * k, bs]`` compact activations (zeros where not kept).
    grouping: the activations grouped by block, ``C`` slots per block.
    slots_per_example: ``k``.
    weights: ``[nb, bs, n]`` per-input-block weight rows.
    tiles: ``weights`` padded for the Pallas kernel, or ``None``.
    batch: examples.
    backend: kernel backend (see :mod:`ccjax.inference.kernels`).

  Returns:
    ``[batch, n]`` float.
  """
  num_blocks = weights.shape[0]
  rows = take_blocks(_pad_row(hidden_flat), grouping.entry_of_slot)
  rows = rows.reshape(num_blocks, -1, rows.shape[-1])                 # [nb, C, bs]
  part = _grouped_product(
      rows, weights, tiles,
      lambda: _group_sizes(grouping.entry_of_slot, num_blocks, hidden_flat.shape[0]), backend)
  example = grouping.entry_of_slot // slots_per_example              # batch when empty
  out = jnp.zeros((batch + 1, weights.shape[-1]), part.dtype)
  return out.at[example].add(part.reshape(-1, part.shape[-1]), mode="drop")[:batch]


def _pair_grouped_layer(layer: BlockLayer, hidden: jax.Array, index: jax.Array,
                        kept_in: jax.Array, example: jax.Array, batch: int, block_cap: int,
                        pair_cap: int, backend: str):
  """Hidden->hidden product with (example, input block, output block) triples grouped by
  weight block.

  Output block ``j``'s examples come in its ``C`` slots in priority order (from the
  per-block grouping), so the rank of a triple inside weight block ``(i, j)`` is a
  running count along the slots of ``j`` -- no sort over triples is needed. Triples of
  rank ``>= C2`` are not served and their (example, output block) is dropped.

  Args:
    layer: block-major layer with a gated input.
    hidden: ``[batch, k_in, bs]`` compact input (zeros where not kept).
    index: ``[batch, k_in]`` input block ids.
    kept_in: ``[batch, k_in]`` input slots that ran.
    example: ``[nb * C]`` example of each output-block slot (``batch`` when empty).
    batch: examples.
    block_cap: ``C``.
    pair_cap: ``C2``.
    backend: kernel backend (see :mod:`ccjax.inference.kernels`).

  Returns:
    ``(pre [nb, C, bs]`` pre-activations without bias, ``dropped [nb, C]`` bool).
  """
  nb, bs = layer.num_blocks, hidden.shape[-1]
  k_in = index.shape[1]
  in_blocks = layer.kernel.shape[0] // nb
  num_pairs = nb * in_blocks
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], index.shape)
  flat_position = jnp.where(kept_in, rows * k_in + jnp.arange(k_in)[None, :], batch * k_in)
  # [batch + 1, in_blocks]: where example b keeps input block i (row ``batch`` = empty).
  position = jnp.full((batch + 1, in_blocks), batch * k_in, jnp.int32).at[rows, index].min(
      flat_position.astype(jnp.int32))
  source = take_blocks(position, example).reshape(nb, block_cap, in_blocks)
  uses = source < batch * k_in                                        # [nb, C, in_blocks]
  # Exclusive running count along the slots (an associative scan: XLA:CPU lowers cumsum
  # to a quadratic reduce-window).
  uses_int = uses.astype(jnp.int32)
  rank = jax.lax.associative_scan(jnp.add, uses_int, axis=1) - uses_int
  served = uses & (rank < pair_cap)
  dropped = jnp.any(uses & ~served, axis=2)                           # [nb, C]
  pair = jnp.arange(nb)[:, None, None] * in_blocks + jnp.arange(in_blocks)[None, None, :]
  pair_slot = jnp.where(served, pair * pair_cap + rank, num_pairs * pair_cap)
  source_of_slot = jnp.full((num_pairs * pair_cap + 1,), batch * k_in, jnp.int32).at[
      pair_slot.reshape(-1)].set(source.reshape(-1), mode="drop")[:-1]
  inputs = take_blocks(_pad_row(hidden.reshape(batch * k_in, bs)), source_of_slot)
  out = _grouped_product(                                             # [P, C2, bs]
      inputs.reshape(num_pairs, pair_cap, bs), layer.kernel, layer.grouped_tiles,
      lambda: jnp.sum(served.astype(jnp.int32), axis=1).reshape(num_pairs), backend)
  # Each served pair slot adds into its (output block, example slot): one scatter-add.
  destination = jnp.broadcast_to(
      (jnp.arange(nb)[:, None] * block_cap + jnp.arange(block_cap)[None, :])[:, :, None],
      pair_slot.shape)
  destination_of_slot = jnp.full((num_pairs * pair_cap + 1,), nb * block_cap, jnp.int32).at[
      pair_slot.reshape(-1)].set(destination.reshape(-1).astype(jnp.int32), mode="drop")[:-1]
  pre = jnp.zeros((nb * block_cap, bs), out.dtype).at[
      destination_of_slot.reshape(num_pairs, pair_cap)].add(out, mode="drop")
  pre = pre.reshape(nb, block_cap, bs)
  return pre, dropped


def sparse_forward_batch(model: BlockMajorMLP, x: jax.Array, config: SparseConfig):
  """Minibatch path: ``x [batch, in]`` -> ``logits [batch, classes]``, traces."""
  eps, bs = model.policy_eps, model.block_size
  batch = x.shape[0]
  backend = config.backend
  traces = []
  hidden = index = kept_in = grouping = None
  for layer, k, block_cap, pair_cap in zip(model.layers, config.example_capacity,
                                           config.block_capacity, config.pair_capacity):
    nb = layer.num_blocks
    block_cap = min(block_cap, batch)
    if not layer.input_gated:
      logits = x @ layer.policy_kernel
    else:
      k_in = index.shape[1]
      logits = _sum_by_example(hidden.reshape(batch * k_in, bs), grouping, k_in,
                               layer.policy_kernel, layer.policy_tiles, batch, backend)
    probs = block_probs(logits + layer.policy_bias, eps)
    values, out_index = jax.lax.top_k(probs, k)                       # [batch, k]
    out_index = out_index.astype(jnp.int32)
    wanted = config.wanted(values)
    grouping = group_entries(out_index.reshape(-1), values.reshape(-1), wanted.reshape(-1),
                             nb, block_cap, priority_above_half=not config.exact_k)
    kept = (grouping.slot_of_entry < nb * block_cap).reshape(batch, k)
    example = grouping.entry_of_slot // k                             # [nb * C], batch = empty
    if not layer.input_gated:
      rows = take_blocks(_pad_row(x), example).reshape(nb, block_cap, -1)
      out = _grouped_product(rows, layer.grouped_kernel, layer.grouped_tiles,  # [nb, C, bs]
                             lambda: _group_sizes(grouping.entry_of_slot, nb, batch * k),
                             backend)
    else:
      out, dropped = _pair_grouped_layer(layer, hidden, index, kept_in, example, batch,
                                         block_cap, pair_cap, backend)
      dropped = jnp.concatenate([dropped.reshape(-1), jnp.zeros((1,), bool)])
      kept = kept & ~take_blocks(dropped, grouping.slot_of_entry).reshape(batch, k)
    out = _pad_row(out.reshape(nb * block_cap, bs))
    pre = take_blocks(out, grouping.slot_of_entry).reshape(batch, k, bs)
    bias = take_blocks(layer.bias, out_index)                          # [batch, k, bs]
    hidden = jax.nn.relu(pre + bias) * kept[..., None].astype(pre.dtype)
    traces.append(LayerTrace(out_index, kept, config.candidates(probs, k),
                             jnp.sum(kept.astype(jnp.int32)), probs))
    index, kept_in = out_index, kept
  k_in = index.shape[1]
  logits = _sum_by_example(hidden.reshape(batch * k_in, bs), grouping, k_in,
                           model.output_kernel, model.output_tiles, batch, backend)
  return logits + model.output_bias, tuple(traces)
