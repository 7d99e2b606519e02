"""Inference for :class:`ccjax.conv.GatedCNN` that really skips.

Axis letters: ``batch`` examples, ``height``/``width`` spatial, ``channels`` channels,
``blocks`` channel blocks of a gated conv, ``bucket`` a static number of gathered
blocks or examples.

Masks are deterministic (``threshold``, ``top_k`` with exactly a per-example block count,
``capped`` (threshold, at most that count) or ``all``), computed by the same policy module
and mask functions as training.

**Skippable residual blocks** (one gate per example). The examples whose gate is on are
gathered into the branch, at most ``example_capacity`` of them (static). If more ask
to run, the overflowing ones (lowest probability first; ties: the higher batch index
first) are *treated as skipped*: their block is the identity, exactly as if their mask
were 0. The effective masks are returned, so masked-dense with those masks gives the
same output, and ``overflow`` / ``requested`` counts are reported per layer. Under
the capacity, the number of gathered rows is the smallest static bucket
``{0, C/4, C/2, 3C/4, C}`` (rounded up) holding every kept example, chosen with
``lax.switch``: with no example running the branch is not computed at all. At batch 1
the block is a ``lax.cond`` on the example's gate (no gather): a skipped block does
nothing.

**Channel-gated convs**. The blocks active for *any* example of the batch (the union)
are gathered from the kernel, again into the smallest of the static buckets
``{0, 1, 2, 4, ..., blocks}``; only those output channels are computed, then masked per
example and scattered into the zero output. This is exact (no overflow). At batch 1
the union is the example's own active blocks, so only they are computed; for
minibatches it saves only when the union is small (independent per-example policies
usually cover every block), so there the savings come from the skipped layers.

Input-side sparsity (a conv reading only the live channels of its input) is not used,
and MACs are counted the same way (:func:`ccjax.flops.gated_cnn_macs`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ccjax import conv
from ccjax import layers
from ccjax import modes
from ccjax import policy as policy_lib
from ccjax import validation
from ccjax.inference.info import InferenceInfo

def channel_buckets(num_blocks: int) -> tuple[int, ...]:
  """Static block counts a channel-gated conv may compute: ``0, 1, 2, 4, ..., num_blocks``."""
  sizes = {0, num_blocks}
  size = 1
  while size < num_blocks:
    sizes.add(size)
    size *= 2
  return tuple(sorted(sizes))


def example_buckets(capacity: int) -> tuple[int, ...]:
  """Static example counts a residual block may compute: ``0, C/4, C/2, 3C/4, C`` rounded up."""
  if not isinstance(capacity, int) or capacity < 1:
    raise ValueError(f"example_capacity must be a positive integer, got {capacity!r}")
  return tuple(sorted({0, capacity, *(math.ceil(capacity * q / 4) for q in (1, 2, 3))}))


def conv2d(inputs: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int = 1,
           dtype: Any = None) -> jax.Array:
  """``SAME`` conv as :class:`flax.linen.Conv` computes it.

  Args:
    inputs: ``[batch, height, width, in]``.
    kernel: ``[k, k, in, out]``.
    bias: ``[out]``.
    stride: spatial stride.
    dtype: computation dtype (``None``: that of ``inputs`` and ``kernel`` promoted).

  Returns:
    ``[batch, ceil(height / stride), ceil(width / stride), out]``.
  """
  if dtype is not None:
    inputs, kernel, bias = (a.astype(dtype) for a in (inputs, kernel, bias))
  outputs = jax.lax.conv_general_dilated(
      inputs, kernel, (stride, stride), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return outputs + bias


def _smallest_bucket(buckets: Sequence[int], count: jax.Array) -> jax.Array:
  return jnp.searchsorted(jnp.asarray(buckets, jnp.int32), count.astype(jnp.int32), side="left")


def _switch(index: jax.Array, branches: list, *operands):
  if len(branches) == 1:
    return branches[0](*operands)
  if len(branches) == 2:
    return jax.lax.cond(index > 0, branches[1], branches[0], *operands)
  return jax.lax.switch(index, branches, *operands)


def channel_gated_conv(inputs: jax.Array, kernel: jax.Array, bias: jax.Array,
                       block_mask: jax.Array, block_size: int, stride: int = 1,
                       dtype: Any = None) -> jax.Array:
  """``relu(conv(x))`` masked in channel blocks, computing only blocks some example uses.

  Args:
    inputs: ``[batch, height, width, in]``.
    kernel: ``[k, k, in, blocks * block_size]``.
    bias: ``[blocks * block_size]``.
    block_mask: ``[batch, blocks]`` 0/1.
    block_size: channels per block.
    stride: spatial stride.
    dtype: computation dtype.

  Returns:
    ``[batch, height', width', blocks * block_size]``, equal to the masked dense output.
  """
  batch, height, width, _ = inputs.shape
  k_h, k_w, in_channels, channels = kernel.shape
  num_blocks = channels // block_size
  out_dtype = jnp.result_type(inputs.dtype, kernel.dtype) if dtype is None else dtype
  out_shape = (batch, -(-height // stride), -(-width // stride), num_blocks, block_size)
  used = jnp.any(block_mask > 0, axis=0)
  # Used blocks first, in index order (stable sort), then unused ones as padding.
  order = jnp.argsort(jnp.logical_not(used).astype(jnp.int32), stable=True)
  inverse_order = jnp.argsort(order)
  blocked_kernel = kernel.reshape(k_h, k_w, in_channels, num_blocks, block_size)
  blocked_bias = bias.reshape(num_blocks, block_size)

  def compute(size):
    def branch(x):
      if size == 0:
        return jnp.zeros(out_shape, out_dtype)
      if size == num_blocks:  # every block is used by some example: no gather needed
        full = nn.relu(conv2d(x, kernel, bias, stride, dtype)).reshape(out_shape)
        return full * block_mask[:, None, None, :, None].astype(full.dtype)
      index = order[:size]
      part_kernel = blocked_kernel[:, :, :, index, :].reshape(k_h, k_w, in_channels,
                                                                size * block_size)
      part_bias = blocked_bias[index].reshape(size * block_size)
      part = nn.relu(conv2d(x, part_kernel, part_bias, stride, dtype))
      part = part.reshape(*out_shape[:3], size, block_size)
      part = part * block_mask[:, index][:, None, None, :, None].astype(part.dtype)
      if size < num_blocks:
        part = jnp.concatenate(
            [part, jnp.zeros((*out_shape[:3], num_blocks - size, block_size), part.dtype)], 3)
      # Block j sits at position inverse_order[j]: a gather puts it back in place.
      return jnp.take(part, inverse_order, axis=3)
    return branch

  buckets = channel_buckets(num_blocks)
  index = _smallest_bucket(buckets, jnp.sum(used))
  outputs = _switch(index, [compute(size) for size in buckets], inputs)
  return outputs.reshape(*out_shape[:3], channels)


def skip_residual(inputs: jax.Array, branch_weights: Sequence[layers.LayerWeights], run: jax.Array,
                  probs: jax.Array, example_capacity: int, dtype: Any = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``x + u * branch(x)`` computing the branch only for kept examples.

  Args:
    inputs: ``[batch, height, width, channels]``.
    branch_weights: the branch convs' weights in order.
    run: ``[batch]`` 0/1, the gate's decision.
    probs: ``[batch]`` the gate's probability (decides who overflows).
    example_capacity: most examples computed (static).
    dtype: computation dtype.

  Returns:
    ``(y [batch, height, width, channels], kept [batch] 0/1, overflow scalar int32)``.
  """
  run = run > 0
  count = jnp.sum(run.astype(jnp.int32))
  score = jnp.where(run, probs, -1.0)
  order = jnp.argsort(-score, stable=True)
  rank = jnp.argsort(order, stable=True)
  kept = run & (rank < example_capacity)
  kept_count = jnp.minimum(count, example_capacity)

  def branch_fn(x):
    convs = [lambda h, w=w: conv2d(h, w.kernel, w.bias, 1, dtype) for w in branch_weights]
    return conv.residual_branch(convs, x)

  if inputs.shape[0] == 1 and example_capacity >= 1:
    # Batch 1: a plain conditional, no gather or scatter; a skipped block does nothing.
    outputs = jax.lax.cond(run[0], lambda x: x + branch_fn(x).astype(x.dtype), lambda x: x,
                           inputs)
    return outputs, run.astype(probs.dtype), jnp.zeros((), jnp.int32)

  def compute(size):
    def branch(x):
      if size == 0:
        return x
      index = order[:size]
      update = branch_fn(x[index]) * kept[index][:, None, None, None].astype(x.dtype)
      return x.at[index].add(update.astype(x.dtype))
    return branch

  buckets = example_buckets(example_capacity)
  index = _smallest_bucket(buckets, kept_count)
  outputs = _switch(index, [compute(size) for size in buckets], inputs)
  return outputs, kept.astype(probs.dtype), count - kept_count


def _layer_capacities(model: conv.GatedCNN, mode: str, capacity) -> tuple:
  gate_layers = model.gate_layers()
  if not modes.get(mode).needs_capacity:
    return (None,) * len(gate_layers)
  if capacity is None:
    raise ValueError(f"mode {mode!r} needs a capacity (blocks per example)")
  values = validation.per_layer_values(capacity, len(gate_layers), "capacity")
  return tuple(None if layer.kind == conv.SKIP_GATE else value
               for layer, value in zip(gate_layers, values))


def make_cnn_inference(model: conv.GatedCNN, *, mode: str = "threshold",
                       capacity: int | Sequence[int] | None = None,
                       example_capacity: int | None = None):
  """Builds skipping inference ``(params, x) -> (logits, InferenceInfo)`` for a gated CNN.

  Args:
    model: a :class:`ccjax.conv.GatedCNN` with ``gated=True``.
    mode: ``threshold`` | ``top_k`` (exactly ``capacity`` blocks) | ``capped`` (threshold,
      at most ``capacity`` blocks) | ``all``.
    capacity: blocks per example for ``top_k`` / ``capped``: one value or one per gated
      layer (residual skip gates keep the threshold).
    example_capacity: most examples a residual block computes per batch (static);
      ``None``: the whole batch (no overflow). See the module docstring for overflow.

  Returns:
    a pure function to wrap in ``jax.jit``; ``x`` is ``[batch, height, width,
    channels]`` (or flattened with ``model.image_shape``).
  """
  if not isinstance(model, conv.GatedCNN) or not model.gated:
    raise ValueError("make_cnn_inference needs a GatedCNN with gated=True")
  modes.check(mode, modes.DETERMINISTIC_MODES)
  if example_capacity is not None:
    example_buckets(example_capacity)
  capacities = _layer_capacities(model, mode, capacity)
  strides = model.stage_strides()
  dtype = model.dtype

  def infer(params, inputs):
    images = model.as_images(inputs)
    batch = images.shape[0]
    limit = batch if example_capacity is None else min(example_capacity, batch)
    stem = model.stem_weights(params)
    hidden = nn.relu(conv2d(images, stem.kernel, stem.bias, 1, dtype))
    masks, probs_list, requested, dropped = [], [], [], []
    for layer, layer_capacity in zip(model.gate_layers(), capacities):
      policy = model.policy_weights(params, layer)
      probs = policy_lib.policy_probs(
          conv.pooled_policy_input(hidden) @ policy.kernel + policy.bias, model.policy_eps)
      # Skip gates (one block) keep the threshold under top_k / capped, as in GatedSkip.
      layer_mode = (mode if layer_capacity is not None or not modes.get(mode).needs_capacity
                    else "threshold")
      block_mask = policy_lib.deterministic_mask(probs, layer_mode, layer_capacity)
      requested.append(jnp.sum(block_mask > 0).astype(jnp.int32))
      if layer.kind == conv.CHANNEL_GATE:
        weights = model.channel_conv_weights(params, layer)
        hidden = channel_gated_conv(hidden, weights.kernel, weights.bias,
                                    block_mask, model.block_size, strides[layer.stage], dtype)
        dropped.append(jnp.zeros((), jnp.int32))
      else:
        hidden, kept, layer_dropped = skip_residual(
            hidden, model.residual_conv_weights(params, layer), block_mask[:, 0],
            probs[:, 0], limit, dtype)
        dropped.append(layer_dropped.astype(jnp.int32))
        block_mask = kept[:, None]
      masks.append(block_mask)
      probs_list.append(probs)
    features = jnp.mean(nn.relu(hidden), axis=(1, 2))
    head = model.output_weights(params)
    head_dtype = dtype or features.dtype
    logits = (features.astype(head_dtype) @ head.kernel.astype(head_dtype)
              + head.bias.astype(head_dtype))
    info = InferenceInfo(masks=tuple(masks), probs=tuple(probs_list),
                         requested=jnp.stack(requested), dropped=jnp.stack(dropped))
    return logits, info

  return infer
