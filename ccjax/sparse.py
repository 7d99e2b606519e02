"""Jitted sparse inference for a trained :class:`ccjax.GatedMLP` that skips inactive blocks.

Axis letters: ``batch`` examples; ``in`` input features; ``bs`` units per block;
``blocks`` (``nb``) blocks of a layer; ``k`` per-example capacity (slots of a compact
activation); ``C`` per-block capacity (examples per block); ``P = out_blocks *
in_blocks`` weight blocks of a hidden->hidden layer; ``C2`` per-weight-block capacity.

Layout (:func:`to_block_major`, a pytree :class:`BlockMajorMLP`):

* first hidden layer (dense input): ``kernel [nb, bs, in]`` (one contiguous block per
  output block, stored transposed so that the batch-1 product contracts the minor axis,
  which XLA:CPU runs several times faster) and ``grouped_kernel [nb, in, bs]`` (the
  same weights untransposed, for the minibatch grouped matmul), ``policy_kernel
  [in, nb]``;
* hidden layer whose input is gated: ``kernel [P, bs, bs]`` with weight block
  ``p = j * in_blocks + i`` = ``W[i-th input block, j-th output block]``, and
  ``policy_kernel [in_blocks, bs, nb]`` split by input block, so that both the layer
  and its policy read only the active input blocks (two-sided sparsity);
* output layer ``[in_blocks, bs, classes]``; biases ``[nb, bs]``.

Activations travel compactly: ``h [batch, k, bs]`` with block ids ``[batch, k]`` and a
``kept [batch, k]`` flag (inactive slots hold zeros).

Which blocks run (deterministic, static shapes). For every gated layer:

1. *threshold*: block ``j`` is a candidate when ``p_j > 0.5`` (``p`` from the policy on
   the layer's actual, sparse input, as in ``mode='threshold'``);
2. *per-example capacity* ``k``: at most ``k`` candidates per example run, the most
   probable ones (ties: lower block id) -- exactly ``mode='top_k'`` with capacity ``k``;
3. (minibatch only) *per-block capacity* ``C``: at most ``C`` examples run block ``j``,
   those with the highest ``p_j`` (ties: lower example index);
4. (minibatch, gated input only) *per-weight-block capacity* ``C2``: the (example,
   input block ``i``, output block ``j``) triples that need weight block ``(i, j)``
   are served in order of decreasing ``p_j`` (ties: lower example index, then slot);
   an (example, output block) with any unserved triple is dropped whole.

A candidate dropped by 2-4 is *treated as inactive*: its units are exactly zero, as if
its mask were 0, so the output equals :func:`masked_dense_forward` with the effective
masks returned by :func:`trace_masks`. ``overflow_rate`` = dropped candidates /
candidates (over examples, blocks and layers). With the exact capacities
(``k = nb``, ``C = C2 = batch``, the :func:`make_sparse_config` default) nothing can
overflow and the result is the ``threshold``-mode network.

Work: the batch-1 path gathers only the active weight blocks and the policy rows of
the active input blocks. With slot buckets (``SparseConfig.buckets``) the first layer
runs the smallest bucket ``s >= c_out`` of kernel blocks, and a hidden layer with a gated
input runs the smallest *pair bucket* (a product of its input and output layers' slot
buckets, :func:`pair_buckets`) that holds its ``c_in * c_out`` active weight blocks,
enumerated flat (pair ``q`` = input slot ``q % c_in``, output slot ``q // c_in``), so the
gathered weights follow the real two-sided count. Buckets only change the work, never
the result. The minibatch path
groups (example, block) pairs by block (examples per output block for the first layer
and for policies / the output layer; triples per weight block for hidden->hidden
layers) into static ``[groups, capacity, ...]`` arrays and runs one grouped matmul
(:func:`ccjax.sparse_kernels.grouped_matmul`): XLA, or on a GPU the Pallas kernel
(:mod:`ccjax.inference.kernels.pallas_gpu`), which skips the empty slots of each group
and reads no weight tile of a group no example uses, from weights padded once by
:func:`to_block_major`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ccjax import flops
from ccjax import gating
from ccjax import policy as policy_lib
from ccjax import sparse_kernels
from ccjax import timing
from ccjax.inference.kernels import pallas_gpu

take_blocks = sparse_kernels.take_blocks


@flax.struct.dataclass
class BlockLayer:
  """One gated hidden layer in block-major layout.

  Attributes:
    kernel: ``[nb, bs, in]`` (dense input, transposed blocks) or ``[nb * in_blocks, bs, bs]`` (gated input,
      block ``j * in_blocks + i``).
    bias: ``[nb, bs]``.
    policy_kernel: ``[in, nb]`` (dense input) or ``[in_blocks, bs, nb]`` (gated input).
    policy_bias: ``[nb]``.
    input_gated: whether the layer's input is a gated layer's output (static).
    grouped_kernel: dense-input layers only, ``[nb, in, bs]``: the same weights with
      untransposed blocks, for the minibatch path's grouped matmul (XLA:CPU runs the
      untransposed batched product about twice as fast); ``None`` otherwise.
    grouped_tiles: the weights of the minibatch grouped product (``grouped_kernel`` or,
      with a gated input, ``kernel``) padded by
      :func:`ccjax.inference.kernels.pallas_gpu.pad_weight_tiles` for the Pallas kernel;
      ``None`` when the layout was not made for it.
    policy_tiles: gated-input layers made for the Pallas kernel, ``policy_kernel``
      padded likewise; ``None`` otherwise.
  """
  kernel: jax.Array
  bias: jax.Array
  policy_kernel: jax.Array
  policy_bias: jax.Array
  input_gated: bool = flax.struct.field(pytree_node=False)
  grouped_kernel: jax.Array | None = None
  grouped_tiles: jax.Array | None = None
  policy_tiles: jax.Array | None = None

  @property
  def num_blocks(self) -> int:
    return self.bias.shape[0]


@flax.struct.dataclass
class BlockMajorMLP:
  """A :class:`ccjax.GatedMLP` laid out for sparse inference (a pytree).

  Attributes:
    layers: one :class:`BlockLayer` per hidden layer.
    output_kernel: ``[in_blocks, bs, classes]``.
    output_bias: ``[classes]``.
    block_size: units per block (static).
    policy_eps: probability bound of the policies (static).
    output_tiles: ``output_kernel`` padded for the Pallas kernel (``None`` when the
      layout was not made for it).
  """
  layers: tuple[BlockLayer, ...]
  output_kernel: jax.Array
  output_bias: jax.Array
  block_size: int = flax.struct.field(pytree_node=False)
  policy_eps: float = flax.struct.field(pytree_node=False)
  output_tiles: jax.Array | None = None

  @property
  def num_blocks(self) -> tuple[int, ...]:
    return tuple(layer.num_blocks for layer in self.layers)

  @property
  def input_dim(self) -> int:
    return self.layers[0].kernel.shape[2]


class LayerTrace(NamedTuple):
  """Which blocks one layer ran.

  Attributes:
    block_index: ``[batch, k]`` int32 block id of each compact slot.
    kept: ``[batch, k]`` bool, the slot ran (effective mask in compact form).
    num_candidates: scalar int32, number of (example, block) with ``p > 0.5``.
    num_kept: scalar int32, number of (example, block) that ran.
  """
  block_index: jax.Array
  kept: jax.Array
  num_candidates: jax.Array
  num_kept: jax.Array


def _hidden_layer_names(params) -> list[str]:
  names = sorted((name for name in params if name.startswith("hidden_")),
                 key=lambda name: int(name.split("_")[1]))
  if not names or "output" not in params:
    raise ValueError("params must be GatedMLP params with hidden_<i> and output entries")
  return names


def to_block_major(params, block_size: int, policy_eps: float = policy_lib.DEFAULT_EPS, *,
                   pallas_tiles: bool | None = None) -> BlockMajorMLP:
  """Converts trained ``GatedMLP`` params to the block-major inference layout.

  Args:
    params: ``GatedMLP`` params: ``{'hidden_i': {'dense': {kernel [in, units], bias},
      'policy': {'logits': {kernel [in, blocks], bias}}}, 'output': {kernel, bias}}``;
      every hidden layer must be gated.
    block_size: the model's ``block_size``.
    policy_eps: the model's ``policy_eps``.
    pallas_tiles: also store the minibatch weights padded for the Pallas kernel (once,
      here; aligned weights are shared, not copied); ``None``: iff the backend is a GPU.

  Returns:
    a :class:`BlockMajorMLP` pytree.
  """
  policy_lib.validate_eps(policy_eps)
  if pallas_tiles is None:
    pallas_tiles = sparse_kernels.use_pallas()
  pad = pallas_gpu.pad_weight_tiles if pallas_tiles else lambda weights: None
  layers = []
  in_blocks = None
  for name in _hidden_layer_names(params):
    layer = params[name]
    if "policy" not in layer:
      raise ValueError(f"{name} has no policy: sparse inference needs a gated GatedMLP")
    kernel = jnp.asarray(layer["dense"]["kernel"])
    bias = jnp.asarray(layer["dense"]["bias"])
    policy_kernel = jnp.asarray(layer["policy"]["logits"]["kernel"])
    policy_bias = jnp.asarray(layer["policy"]["logits"]["bias"])
    fan_in, units = kernel.shape
    nb = gating.validate_block_size(units, block_size, f"{name} units")
    if in_blocks is None:
      grouped_kernel = kernel.reshape(fan_in, nb, block_size).transpose(1, 0, 2)
      block_kernel = grouped_kernel.transpose(0, 2, 1)
      block_policy = policy_kernel
    else:
      block_kernel = kernel.reshape(in_blocks, block_size, nb, block_size)
      block_kernel = block_kernel.transpose(2, 0, 1, 3).reshape(
          nb * in_blocks, block_size, block_size)
      block_policy = policy_kernel.reshape(in_blocks, block_size, nb)
      grouped_kernel = None
    input_gated = in_blocks is not None
    layers.append(BlockLayer(kernel=block_kernel, bias=bias.reshape(nb, block_size),
                             policy_kernel=block_policy, policy_bias=policy_bias,
                             input_gated=input_gated, grouped_kernel=grouped_kernel,
                             grouped_tiles=pad(block_kernel if input_gated else grouped_kernel),
                             policy_tiles=pad(block_policy) if input_gated else None))
    in_blocks = nb
  out_kernel = jnp.asarray(params["output"]["kernel"])
  out_kernel = out_kernel.reshape(in_blocks, block_size, out_kernel.shape[-1])
  return BlockMajorMLP(
      layers=tuple(layers), output_kernel=out_kernel,
      output_bias=jnp.asarray(params["output"]["bias"]),
      block_size=block_size, policy_eps=float(policy_eps), output_tiles=pad(out_kernel))


@dataclasses.dataclass(frozen=True)
class SparseConfig:
  """Static capacities of the sparse path (hashable: pass it as a static argument).

  Attributes:
    example_capacity: ``k`` per layer, blocks per example, ``1 <= k <= nb``.
    block_capacity: ``C`` per layer, examples per block (minibatch path).
    pair_capacity: ``C2`` per layer, triples per weight block (minibatch path, used by
      layers with a gated input; the first entry is ignored).
    buckets: optional static slot counts per layer for the batch-1 path, ascending and
      ending with ``k``; the first layer (and every layer's next-policy product) then
      runs with the smallest bucket that holds its active count, and a layer with a
      gated input with the smallest product of its input and output buckets that holds
      its active pair count (``lax.switch``), so the work follows the real count.
    implementation: grouped-matmul implementation, ``auto`` | ``xla`` | ``pallas``.
  """
  example_capacity: tuple[int, ...]
  block_capacity: tuple[int, ...]
  pair_capacity: tuple[int, ...]
  buckets: tuple[tuple[int, ...], ...] | None = None
  implementation: str = "auto"

  def validate(self, model: BlockMajorMLP) -> "SparseConfig":
    num_layers = len(model.layers)
    for name in ("example_capacity", "block_capacity", "pair_capacity"):
      values = getattr(self, name)
      if len(values) != num_layers or any(int(v) < 1 for v in values):
        raise ValueError(f"{name} needs {num_layers} positive integers, got {values!r}")
    for value, nb in zip(self.example_capacity, model.num_blocks):
      if not 1 <= value <= nb:
        raise ValueError(f"example_capacity must be in [1, {nb}], got {value!r}")
    if self.buckets is not None:
      if len(self.buckets) != num_layers:
        raise ValueError(f"buckets needs one tuple per layer ({num_layers})")
      for sizes, capacity in zip(self.buckets, self.example_capacity):
        if (not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1
            or sizes[-1] != capacity):
          raise ValueError(f"buckets must ascend from >= 1 to the capacity {capacity}, "
                           f"got {sizes!r}")
    if self.implementation not in sparse_kernels.IMPLEMENTATIONS:
      raise ValueError(f"implementation must be one of "
                       f"{'|'.join(sparse_kernels.IMPLEMENTATIONS)}, got {self.implementation!r}")
    return self


def _poisson_capacity(mean: float, limit: int) -> int:
  return int(min(limit, max(1, math.ceil(mean + 3.0 * math.sqrt(mean) + 1.0))))


def make_sparse_config(model: BlockMajorMLP, batch_size: int,
                       active_fraction: float | Sequence[float] | None = None, *,
                       example_slack: float = 2.0, num_buckets: int = 1,
                       implementation: str = "auto") -> SparseConfig:
  """Capacities for a batch size and an expected active fraction.

  Args:
    model: the block-major model.
    batch_size: examples per call.
    active_fraction: expected fraction of blocks a layer runs per example (one value or
      one per layer); ``None`` gives exact capacities (nothing can overflow).
    example_slack: ``k = ceil(example_slack * fraction * nb)``.
    num_buckets: batch-1 bucket count per layer (sizes ``k / n, 2k / n, ..., k``).
    implementation: see :class:`SparseConfig`.

  Returns:
    a validated :class:`SparseConfig`. ``C`` and ``C2`` are Poisson-style margins
    (mean + 3 sd + 1) over the expected load of a block / weight block.
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  num_blocks = model.num_blocks
  if active_fraction is None:
    example = tuple(num_blocks)
    block = pair = (batch_size,) * len(num_blocks)
  else:
    fractions = ((float(active_fraction),) * len(num_blocks)
                 if isinstance(active_fraction, (int, float)) else tuple(active_fraction))
    if len(fractions) != len(num_blocks) or not all(0.0 < f <= 1.0 for f in fractions):
      raise ValueError(f"active_fraction must be in (0, 1], one value or one per layer, "
                       f"got {active_fraction!r}")
    example = tuple(min(nb, max(1, math.ceil(example_slack * f * nb)))
                    for f, nb in zip(fractions, num_blocks))
    block = tuple(_poisson_capacity(batch_size * f, batch_size) for f in fractions)
    pair = (batch_size,) + tuple(
        _poisson_capacity(batch_size * f_in * f_out, batch_size)
        for f_in, f_out in zip(fractions[:-1], fractions[1:]))
  buckets = None
  if num_buckets > 1:
    buckets = tuple(tuple(sorted({max(1, math.ceil(k * (b + 1) / num_buckets))
                                  for b in range(num_buckets)})) for k in example)
  return SparseConfig(example, block, pair, buckets, implementation).validate(model)


def _probs(logits: jax.Array, eps: float) -> jax.Array:
  return policy_lib.policy_probs(logits.astype(jnp.float32), eps)


# ----------------------------------------------------------------------------- batch 1


def _select_single(probs: jax.Array, capacity: int):
  values, index = jax.lax.top_k(probs, capacity)
  kept = values > 0.5
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


def _sparse_forward_single(model: BlockMajorMLP, x: jax.Array, config: SparseConfig):
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
    probs = _probs(logits + layer.policy_bias, eps)
    out_index, kept, out_count = _select_single(probs, capacity)
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
                             jnp.sum((probs > 0.5).astype(jnp.int32)), out_count))
    index, count, in_sizes = out_index, out_count, out_sizes
  return logits + model.output_bias, tuple(traces)


# ----------------------------------------------------------------------------- minibatch


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


_HALF_BITS = 0x3F000000   # int32 bit pattern of float32 0.5
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
                     group_sizes: Callable[[], jax.Array], implementation: str) -> jax.Array:
  """``rows [G, C, k] @ weights [G, k, n]`` per group, by the resolved implementation.

  ``group_sizes`` is called (``[G]`` slots in use, a prefix) only for the Pallas kernel,
  which skips the empty slots and reads no weights for empty groups.
  """
  if implementation == "xla":
    return sparse_kernels.grouped_matmul(rows, weights, implementation="xla")
  if tiles is None:
    raise ValueError("the Pallas path needs a layout made with "
                     "to_block_major(..., pallas_tiles=True)")
  return sparse_kernels.grouped_matmul(rows, weights, None, group_sizes(), tiles=tiles,
                                       implementation=implementation)


def _sum_by_example(hidden_flat: jax.Array, grouping: Grouping, slots_per_example: int,
                    weights: jax.Array, tiles: jax.Array | None, batch: int,
                    implementation: str) -> jax.Array:
  """``out[b] = sum over kept slots (b, s) of hidden[b, s] @ weights[block(b, s)]``.

  Args:
    hidden_flat: ``[batch * k, bs]`` compact activations (zeros where not kept).
    grouping: the activations grouped by block, ``C`` slots per block.
    slots_per_example: ``k``.
    weights: ``[nb, bs, n]`` per-input-block weight rows.
    tiles: ``weights`` padded for the Pallas kernel, or ``None``.
    batch: examples.
    implementation: resolved grouped-matmul implementation, ``xla`` | ``pallas``.

  Returns:
    ``[batch, n]`` float.
  """
  num_blocks = weights.shape[0]
  rows = take_blocks(_pad_row(hidden_flat), grouping.entry_of_slot)
  rows = rows.reshape(num_blocks, -1, rows.shape[-1])                 # [nb, C, bs]
  part = _grouped_product(
      rows, weights, tiles,
      lambda: _group_sizes(grouping.entry_of_slot, num_blocks, hidden_flat.shape[0]),
      implementation)
  example = grouping.entry_of_slot // slots_per_example              # batch when empty
  out = jnp.zeros((batch + 1, weights.shape[-1]), part.dtype)
  return out.at[example].add(part.reshape(-1, part.shape[-1]), mode="drop")[:batch]


def _pair_grouped_layer(layer: BlockLayer, hidden: jax.Array, index: jax.Array,
                        kept_in: jax.Array, example: jax.Array, batch: int, block_cap: int,
                        pair_cap: int, implementation: str):
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
    implementation: resolved grouped-matmul implementation, ``xla`` | ``pallas``.

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
      lambda: jnp.sum(served.astype(jnp.int32), axis=1).reshape(num_pairs), implementation)
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


def _sparse_forward_batch(model: BlockMajorMLP, x: jax.Array, config: SparseConfig):
  """Minibatch path: ``x [batch, in]`` -> ``logits [batch, classes]``, traces."""
  eps, bs = model.policy_eps, model.block_size
  batch = x.shape[0]
  impl = sparse_kernels.resolve_implementation(config.implementation)
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
                               layer.policy_kernel, layer.policy_tiles, batch, impl)
    probs = _probs(logits + layer.policy_bias, eps)
    values, out_index = jax.lax.top_k(probs, k)                       # [batch, k]
    out_index = out_index.astype(jnp.int32)
    wanted = values > 0.5
    grouping = group_entries(out_index.reshape(-1), values.reshape(-1), wanted.reshape(-1),
                             nb, block_cap, priority_above_half=True)
    kept = (grouping.slot_of_entry < nb * block_cap).reshape(batch, k)
    example = grouping.entry_of_slot // k                             # [nb * C], batch = empty
    if not layer.input_gated:
      rows = take_blocks(_pad_row(x), example).reshape(nb, block_cap, -1)
      out = _grouped_product(rows, layer.grouped_kernel, layer.grouped_tiles,  # [nb, C, bs]
                             lambda: _group_sizes(grouping.entry_of_slot, nb, batch * k),
                             impl)
    else:
      out, dropped = _pair_grouped_layer(layer, hidden, index, kept_in, example, batch,
                                         block_cap, pair_cap, impl)
      dropped = jnp.concatenate([dropped.reshape(-1), jnp.zeros((1,), bool)])
      kept = kept & ~take_blocks(dropped, grouping.slot_of_entry).reshape(batch, k)
    out = _pad_row(out.reshape(nb * block_cap, bs))
    pre = take_blocks(out, grouping.slot_of_entry).reshape(batch, k, bs)
    bias = take_blocks(layer.bias, out_index)                          # [batch, k, bs]
    hidden = jax.nn.relu(pre + bias) * kept[..., None].astype(pre.dtype)
    traces.append(LayerTrace(out_index, kept, jnp.sum((probs > 0.5).astype(jnp.int32)),
                             jnp.sum(kept.astype(jnp.int32))))
    index, kept_in = out_index, kept
  k_in = index.shape[1]
  logits = _sum_by_example(hidden.reshape(batch * k_in, bs), grouping, k_in,
                           model.output_kernel, model.output_tiles, batch, impl)
  return logits + model.output_bias, tuple(traces)


def sparse_forward(model: BlockMajorMLP, x: jax.Array, config: SparseConfig
                   ) -> tuple[jax.Array, tuple[LayerTrace, ...]]:
  """Sparse inference that computes only the blocks that run.

  Jit it with ``config`` static: ``jax.jit(sparse_forward, static_argnums=2)``. A batch
  of one example takes the batch-1 path (gathers of the active weight blocks,
  optionally bucketed), larger batches the grouped minibatch path. See the module
  docstring for which blocks run and what happens on overflow.

  Args:
    model: block-major parameters from :func:`to_block_major`.
    x: ``[batch, ...]`` inputs, flattened to ``[batch, in]``.
    config: static capacities (:func:`make_sparse_config`).

  Returns:
    ``(logits [batch, classes], traces)`` with one :class:`LayerTrace` per hidden layer.
  """
  x = x.reshape(x.shape[0], -1)
  if x.shape[1] != model.input_dim:
    raise ValueError(f"x has {x.shape[1]} features, the model expects {model.input_dim}")
  if x.shape[0] == 1:
    logits, traces = _sparse_forward_single(model, x[0], config)
    return logits[None], traces
  return _sparse_forward_batch(model, x, config)


def make_sparse_forward(config: SparseConfig, *, with_traces: bool = True
                        ) -> Callable[[BlockMajorMLP, jax.Array], Any]:
  """A jitted ``(model, x) -> (logits, traces)`` (or ``logits``) with ``config`` bound.

  Binding the config in a closure instead of passing it as a static argument saves the
  per-call hashing of the static argument (tens of microseconds, which matters at batch
  1). Dropping the traces saves their output buffers.
  """
  if with_traces:
    return jax.jit(lambda model, x: sparse_forward(model, x, config))
  return jax.jit(lambda model, x: sparse_forward(model, x, config)[0])


def trace_masks(traces: Sequence[LayerTrace], num_blocks: Sequence[int]) -> tuple[jax.Array, ...]:
  """The effective ``[batch, blocks]`` 0/1 masks the sparse path used, one per layer."""
  masks = []
  for trace, nb in zip(traces, num_blocks):
    batch = trace.block_index.shape[0]
    mask = jnp.zeros((batch, nb), jnp.float32)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], trace.block_index.shape)
    masks.append(mask.at[rows, trace.block_index].max(trace.kept.astype(jnp.float32)))
  return tuple(masks)


def overflow_rate(traces: Sequence[LayerTrace]) -> jax.Array:
  """Dropped / candidate (example, block) pairs over all layers (0 when no candidate)."""
  candidates = sum(trace.num_candidates for trace in traces)
  kept = sum(trace.num_kept for trace in traces)
  return jnp.where(candidates > 0, (candidates - kept) / jnp.maximum(candidates, 1), 0.0)


# ----------------------------------------------------------------------------- references


def dense_forward(params, x: jax.Array) -> jax.Array:
  """The plain dense MLP ``relu(x @ W + b)`` ... ``@ W_out`` (no policies, no masks).

  Args:
    params: ``GatedMLP`` params (policies ignored).
    x: ``[batch, ...]``.

  Returns:
    ``[batch, classes]`` logits.
  """
  hidden = x.reshape(x.shape[0], -1)
  for name in _hidden_layer_names(params):
    dense = params[name]["dense"]
    hidden = jax.nn.relu(hidden @ dense["kernel"] + dense["bias"])
  return hidden @ params["output"]["kernel"] + params["output"]["bias"]


def masked_dense_forward(params, x: jax.Array, masks: Sequence[jax.Array]) -> jax.Array:
  """Dense computation with given block masks: ``h = relu(h W + b) * expand(mask)``.

  Args:
    params: ``GatedMLP`` params.
    x: ``[batch, ...]``.
    masks: one ``[batch, blocks]`` 0/1 mask per hidden layer.

  Returns:
    ``[batch, classes]`` logits.
  """
  hidden = x.reshape(x.shape[0], -1)
  names = _hidden_layer_names(params)
  if len(masks) != len(names):
    raise ValueError(f"masks needs one entry per hidden layer ({len(names)}), got {len(masks)}")
  for name, mask in zip(names, masks):
    dense = params[name]["dense"]
    hidden = gating.apply_block_mask(jax.nn.relu(hidden @ dense["kernel"] + dense["bias"]), mask)
  return hidden @ params["output"]["kernel"] + params["output"]["bias"]


def dense_policy_probs(params, hidden: jax.Array, layer: int, eps: float) -> jax.Array:
  """Policy probabilities ``[batch, blocks]`` of hidden layer ``layer`` on its input."""
  policy = params[f"hidden_{layer}"]["policy"]["logits"]
  return _probs(hidden @ policy["kernel"] + policy["bias"], eps)


# ----------------------------------------------------------------------------- accounting


def sparse_macs(traces: Sequence[LayerTrace], num_blocks: Sequence[int], input_dim: int,
                block_size: int, num_classes: int) -> np.ndarray:
  """Per-example MACs of the blocks that ran, policies included (``flops.gated_mlp_macs``).

  Returns:
    ``[batch]`` float64.
  """
  masks = [np.asarray(mask) for mask in trace_masks(traces, num_blocks)]
  return flops.gated_mlp_macs(input_dim, masks, block_size, num_classes)


# ----------------------------------------------------------------------------- timing


def dense_and_sparse_ms(params, model: BlockMajorMLP, x: jax.Array, config: SparseConfig, *,
                        repeats: int = 20, warmup: int = 3) -> dict[str, Any]:
  """Times the dense MLP and the sparse path on the same inputs, both under ``jax.jit``.

  Dense is :func:`dense_forward` (plain ``x @ W``, no policies); sparse is
  :func:`sparse_forward` (policies included). Each is warmed up (compiled) first and
  the median over ``repeats`` calls is reported; dense and sparse runs alternate in
  rounds (same background load) and cycle over the batches in ``x`` (the sparse work
  depends on the example).

  Args:
    params: ``GatedMLP`` params (dense weights).
    model: the same parameters in block-major layout.
    x: ``[batches, batch, in]`` inputs (one batch per call, cycled).
    config: static capacities.
    repeats: timed calls per path.
    warmup: untimed calls per path.

  Returns:
    ``{'dense_ms', 'sparse_ms', 'traces'}`` (traces: one per batch of ``x``).
  """
  dense_params = {name: {"dense": params[name]["dense"]} for name in _hidden_layer_names(params)}
  dense_params["output"] = params["output"]
  dense_fn = jax.jit(dense_forward)
  sparse_fn = make_sparse_forward(config, with_traces=False)
  batches = [x[index] for index in range(x.shape[0])]
  dense_ms, sparse_ms = timing.interleaved_median_ms(
      [(dense_fn, [(dense_params, b) for b in batches]),
       (sparse_fn, [(model, b) for b in batches])], repeats=repeats, warmup=warmup)
  traced_fn = make_sparse_forward(config)
  traces = [traced_fn(model, b)[1] for b in batches]
  return {"dense_ms": dense_ms, "sparse_ms": sparse_ms, "traces": traces}


def measure_latency(params, *, input_dim: int, hidden: Sequence[int], block_size: int,
                    num_classes: int, policy_eps: float = policy_lib.DEFAULT_EPS,
                    repeats: int = 20, x: jax.Array | None = None,
                    num_buckets: int = 4) -> dict[str, float]:
  """Batch-1 latency of a trained ``GatedMLP``: dense ``x @ W`` vs sparse (policy included).

  The sparse path runs the ``threshold`` policy with exact capacities (``k = nb``: no
  block is ever dropped) and ``num_buckets`` bucketed slot counts per layer, so its
  work follows the number of blocks the example really uses.

  Args:
    params: trained ``GatedMLP`` params (gated).
    input_dim: features per example.
    hidden: the hidden widths (checked against ``params``).
    block_size: units per block.
    num_classes: logits (checked against ``params``).
    policy_eps: the model's ``policy_eps``.
    repeats: timed calls (median reported).
    x: ``[1, input_dim]`` example to time (default: a fixed standard-normal draw).
    num_buckets: bucketed slot counts per layer.

  Returns:
    ``{'dense_ms': float, 'sparse_ms': float}``.
  """
  names = _hidden_layer_names(params)
  widths = tuple(int(params[name]["dense"]["kernel"].shape[1]) for name in names)
  if widths != tuple(hidden):
    raise ValueError(f"hidden={tuple(hidden)!r} does not match the params' widths {widths!r}")
  if int(params["output"]["kernel"].shape[1]) != num_classes:
    raise ValueError(f"num_classes={num_classes!r} does not match the params "
                     f"({params['output']['kernel'].shape[1]})")
  model = to_block_major(params, block_size, policy_eps)
  if model.input_dim != input_dim:
    raise ValueError(f"input_dim={input_dim!r} does not match the params ({model.input_dim})")
  if x is None:
    x = jax.random.normal(jax.random.PRNGKey(0), (1, input_dim), jnp.float32)
  x = jnp.asarray(x).reshape(1, 1, input_dim)
  config = make_sparse_config(model, 1, num_buckets=num_buckets)
  timing = dense_and_sparse_ms(params, model, x, config, repeats=repeats)
  return {"dense_ms": timing["dense_ms"], "sparse_ms": timing["sparse_ms"]}


# ----------------------------------------------------------------------------- benchmark


def random_gated_mlp_params(rng: jax.Array, input_dim: int, hidden: Sequence[int],
                            num_classes: int, block_size: int, tau: float, *,
                            policy_eps: float = policy_lib.DEFAULT_EPS,
                            calibration_size: int = 512, dtype=jnp.float32):
  """Random ``GatedMLP``-shaped params whose threshold policy runs about ``tau`` of blocks.

  Network weights are He-normal; policy kernels are ``N(0, 1 / fan_in)`` and each
  layer's policy bias is set, layer by layer on a standard-normal calibration batch
  run through the masked network, to minus the ``1 - tau`` quantile of its logits, so
  that ``p > 0.5`` for about ``tau`` of the (example, block) pairs; the count varies
  per example because the logits do.

  Returns:
    a params dict in the ``GatedMLP`` layout.
  """
  if not 0.0 < tau <= 1.0:
    raise ValueError(f"tau must be in (0, 1], got {tau!r}")
  keys = jax.random.split(rng, 2 * len(hidden) + 2)
  x = jax.random.normal(keys[-1], (calibration_size, input_dim), jnp.float32)
  params = {}
  fan_in = input_dim
  for index, width in enumerate(hidden):
    gating.validate_block_size(width, block_size, f"hidden[{index}]")
    nb = width // block_size
    kernel = jax.random.normal(keys[2 * index], (fan_in, width)) * math.sqrt(2.0 / fan_in)
    policy_kernel = jax.random.normal(keys[2 * index + 1], (fan_in, nb)) / math.sqrt(fan_in)
    logits = x @ policy_kernel
    bias = -jnp.quantile(logits, 1.0 - tau) * jnp.ones((nb,))
    mask = (_probs(logits + bias, policy_eps) > 0.5).astype(jnp.float32)
    x = gating.apply_block_mask(jax.nn.relu(x @ kernel), mask)
    params[f"hidden_{index}"] = {
        "dense": {"kernel": kernel.astype(dtype), "bias": jnp.zeros((width,), dtype)},
        "policy": {"logits": {"kernel": policy_kernel, "bias": bias}}}
    fan_in = width
  params["output"] = {
      "kernel": (jax.random.normal(keys[-2], (fan_in, num_classes)) / math.sqrt(fan_in)
                 ).astype(dtype),
      "bias": jnp.zeros((num_classes,), dtype)}
  return params


def benchmark_mlp(*, input_dim: int, hidden: Sequence[int], block_size: int, num_classes: int,
                  tau: float, batch_sizes: Sequence[int], repeats: int, seed: int = 0,
                  dtype=jnp.float32, example_slack: float = 2.0,
                  num_buckets: int = 1) -> list[dict[str, Any]]:
  """Dense vs sparse timing and MACs of a random gated MLP at several batch sizes.

  Returns:
    one dict per batch size with ``batch_size, dense_ms, sparse_ms, ratio, dense_macs,
    sparse_macs, mac_ratio, overflow_rate`` (MACs per example, averaged over the batch).
  """
  rng = jax.random.PRNGKey(seed)
  params = random_gated_mlp_params(rng, input_dim, hidden, num_classes, block_size, tau,
                                   dtype=dtype)
  model = to_block_major(params, block_size)
  dense_macs = flops.dense_mlp_macs(input_dim, hidden, num_classes)
  results = []
  for batch_size in batch_sizes:
    # Batch 1 cycles over 16 different examples (the sparse work depends on the example).
    num_batches = 16 if batch_size == 1 else 1
    x = jax.random.normal(jax.random.fold_in(rng, batch_size),
                          (num_batches, batch_size, input_dim)).astype(dtype)
    config = make_sparse_config(model, batch_size, tau, example_slack=example_slack,
                                num_buckets=num_buckets if batch_size == 1 else 1)
    timing = dense_and_sparse_ms(params, model, x, config, repeats=repeats)
    macs = float(np.mean([sparse_macs(traces, model.num_blocks, input_dim, block_size,
                                      num_classes) for traces in timing["traces"]]))
    candidates = sum(int(t.num_candidates) for traces in timing["traces"] for t in traces)
    kept = sum(int(t.num_kept) for traces in timing["traces"] for t in traces)
    results.append({
        "batch_size": int(batch_size),
        "dense_ms": timing["dense_ms"],
        "sparse_ms": timing["sparse_ms"],
        "ratio": timing["dense_ms"] / timing["sparse_ms"],
        "dense_macs": float(dense_macs),
        "sparse_macs": macs,
        "mac_ratio": float(dense_macs) / max(macs, 1.0),
        "overflow_rate": (candidates - kept) / max(candidates, 1),
        "capacity": {"example": list(config.example_capacity),
                     "block": list(config.block_capacity),
                     "pair": list(config.pair_capacity[1:])},
    })
  return results
