"""Inference for :class:`ccjax.conv.GatedCNN` that really skips, and its benchmark.

Axis letters: ``batch`` examples, ``height``/``width`` spatial, ``channels`` channels,
``blocks`` channel blocks of a gated conv, ``bucket`` a static number of gathered
blocks or examples.

Masks are deterministic (``threshold``, ``top_k`` with a per-example block capacity, or
``all``), computed by the same policy module and mask functions as training.

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
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ccjax import conv
from ccjax import flops
from ccjax import layers
from ccjax import policy as policy_lib
from ccjax import timing

INFERENCE_MODES = ("threshold", "top_k", "all")


class CNNInferenceInfo(NamedTuple):
  """What skipping inference reports.

  Attributes:
    masks: one effective mask per gated layer (``[batch, blocks]`` or ``[batch, 1]``):
      what was really computed, overflow applied.
    probs: the policies' probabilities, same shapes as ``masks``.
    requested: ``[layers]`` int32, examples whose skip gate asked to run (0 for
      channel-gated layers).
    overflow: ``[layers]`` int32, of those, how many were dropped by the capacity.
  """
  masks: tuple[jax.Array, ...]
  probs: tuple[jax.Array, ...]
  requested: jax.Array
  overflow: jax.Array


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


def skip_residual(inputs: jax.Array, branch_params: Sequence[dict], run: jax.Array,
                  probs: jax.Array, example_capacity: int, dtype: Any = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``x + u * branch(x)`` computing the branch only for kept examples.

  Args:
    inputs: ``[batch, height, width, channels]``.
    branch_params: the branch convs' ``{'kernel', 'bias'}`` in order.
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
    convs = [lambda h, p=p: conv2d(h, p["kernel"], p["bias"], 1, dtype) for p in branch_params]
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
  if mode != "top_k":
    return (None,) * len(gate_layers)
  if capacity is None:
    raise ValueError("mode 'top_k' needs a capacity (blocks per example)")
  values = layers.per_layer_values(capacity, len(gate_layers), "capacity")
  return tuple(1 if layer.kind == conv.SKIP_GATE else value
               for layer, value in zip(gate_layers, values))


def make_cnn_inference(model: conv.GatedCNN, *, mode: str = "threshold",
                       capacity: int | Sequence[int] | None = None,
                       example_capacity: int | None = None):
  """Builds skipping inference ``(params, x) -> (logits, CNNInferenceInfo)`` for a gated CNN.

  Args:
    model: a :class:`ccjax.conv.GatedCNN` with ``gated=True``.
    mode: ``threshold`` | ``top_k`` | ``all``.
    capacity: blocks per example for ``top_k``: one value or one per gated layer.
    example_capacity: most examples a residual block computes per batch (static);
      ``None``: the whole batch (no overflow). See the module docstring for overflow.

  Returns:
    a pure function to wrap in ``jax.jit``; ``x`` is ``[batch, height, width,
    channels]`` (or flattened with ``model.image_shape``).
  """
  if not isinstance(model, conv.GatedCNN) or not model.gated:
    raise ValueError("make_cnn_inference needs a GatedCNN with gated=True")
  if mode not in INFERENCE_MODES:
    raise ValueError(f"mode must be one of {'|'.join(INFERENCE_MODES)}, got {mode!r}")
  if example_capacity is not None:
    example_buckets(example_capacity)
  capacities = _layer_capacities(model, mode, capacity)
  strides = model.stage_strides()
  dtype = model.dtype

  def infer(params, inputs):
    images = model.as_images(inputs)
    batch = images.shape[0]
    limit = batch if example_capacity is None else min(example_capacity, batch)
    stem = params["stem"]
    hidden = nn.relu(conv2d(images, stem["kernel"], stem["bias"], 1, dtype))
    masks, probs_list, requested, overflow = [], [], [], []
    for layer, layer_capacity in zip(model.gate_layers(), capacities):
      layer_params = params[layer.name]
      num_blocks = (model.stage_features[layer.stage] // model.block_size
                    if layer.kind == conv.CHANNEL_GATE else 1)
      probs = layers.BlockPolicy(num_blocks, eps=model.policy_eps).apply(
          {"params": layer_params[layers.POLICY_COLLECTION_NAME]},
          conv.pooled_policy_input(hidden))
      block_mask = policy_lib.deterministic_mask(probs, mode, layer_capacity)
      if layer.kind == conv.CHANNEL_GATE:
        conv_params = layer_params["conv"]
        hidden = channel_gated_conv(hidden, conv_params["kernel"], conv_params["bias"],
                                    block_mask, model.block_size, strides[layer.stage], dtype)
        requested.append(jnp.zeros((), jnp.int32))
        overflow.append(jnp.zeros((), jnp.int32))
      else:
        branch_params = [layer_params[f"conv_{i}"] for i in range(model.num_convs)]
        hidden, kept, dropped = skip_residual(hidden, branch_params, block_mask[:, 0],
                                              probs[:, 0], limit, dtype)
        requested.append(jnp.sum(block_mask > 0).astype(jnp.int32))
        overflow.append(dropped.astype(jnp.int32))
        block_mask = kept[:, None]
      masks.append(block_mask)
      probs_list.append(probs)
    features = jnp.mean(nn.relu(hidden), axis=(1, 2))
    head = params["output"]
    head_dtype = dtype or features.dtype
    logits = (features.astype(head_dtype) @ head["kernel"].astype(head_dtype)
              + head["bias"].astype(head_dtype))
    info = CNNInferenceInfo(masks=tuple(masks), probs=tuple(probs_list),
                            requested=jnp.stack(requested), overflow=jnp.stack(overflow))
    return logits, info

  return infer


def overflow_rate(info: CNNInferenceInfo) -> float:
  """Dropped / requested residual-block executions (0.0 when none were requested)."""
  requested = int(np.sum(np.asarray(info.requested)))
  return float(np.sum(np.asarray(info.overflow))) / requested if requested else 0.0


def calibrate_policies(model: conv.GatedCNN, params, inputs: jax.Array,
                       active_fraction: float) -> Any:
  """Shifts each policy's biases so ``threshold`` runs about ``active_fraction`` of the time.

  For benchmarking untrained models: layer by layer (in forward order, so later layers
  see the calibrated earlier ones), every block's bias is moved so that a fraction
  ``active_fraction`` of ``inputs`` has a positive logit for it.

  Args:
    model: a gated :class:`ccjax.conv.GatedCNN`.
    params: its parameters.
    inputs: ``[batch, ...]`` calibration inputs.
    active_fraction: target fraction in (0, 1).

  Returns:
    parameters with the policies' ``logits/bias`` replaced.
  """
  if not 0.0 < active_fraction < 1.0:
    raise ValueError(f"active_fraction must be in (0, 1), got {active_fraction!r}")
  params = jax.tree_util.tree_map(lambda a: a, params)
  eps = model.policy_eps
  gate_probs = jax.jit(lambda p, x: [a.probs for a in model.apply(
      {"params": p}, x, mode="threshold")[1]])
  for index, layer in enumerate(model.gate_layers()):
    probs = gate_probs(params, inputs)[index]
    squashed = (np.asarray(probs, np.float64) - eps) / (1.0 - 2.0 * eps)
    squashed = np.clip(squashed, 1e-12, 1.0 - 1e-12)
    logits = np.log(squashed) - np.log1p(-squashed)
    shift = np.quantile(logits, 1.0 - active_fraction, axis=0)
    policy = params[layer.name][layers.POLICY_COLLECTION_NAME]["logits"]
    policy["bias"] = policy["bias"] - jnp.asarray(shift + 1e-6, policy["bias"].dtype)
  return params


def bench_cnn(batch_sizes: Sequence[int] = (1, 32, 128), repeats: int = 20, seed: int = 0,
              dtype: Any = "float32", *, image_shape: Sequence[int] = (32, 32, 3),
              num_classes: int = 10, active_fraction: float = 0.5,
              capacity_factor: float = 1.25, model: conv.GatedCNN | None = None,
              params=None, num_inputs: int = 4) -> list[dict]:
  """Times dense vs skipping inference of a gated CNN.

  Dense is the same CNN with every layer run (``gated=False``, no policies) under
  ``jit``; sparse is :func:`make_cnn_inference` in ``threshold`` mode under ``jit`` with
  ``example_capacity = ceil(capacity_factor * active_fraction * batch)`` (at most the
  batch). Without ``params`` the model is initialised from ``seed`` and its policies
  calibrated (:func:`calibrate_policies`) to run ``active_fraction`` of blocks/layers.
  Each timing is the median over ``repeats`` calls (after one warm-up call; dense and
  sparse calls interleaved), cycling over ``num_inputs`` random input batches.

  Args:
    batch_sizes: batch sizes to time.
    repeats: timed calls per measurement.
    seed: seed of parameters and inputs.
    dtype: computation dtype (``float32`` or ``bfloat16``).
    image_shape: ``(height, width, channels)`` of the random inputs.
    num_classes: logits of the default model.
    active_fraction: calibration target of the default model's policies.
    capacity_factor: example capacity relative to ``active_fraction * batch``.
    model: optional gated :class:`ccjax.conv.GatedCNN` (its ``dtype`` is replaced).
    params: optional parameters of ``model``.
    num_inputs: distinct random batches cycled through while timing.

  Returns:
    one dict per batch size with keys ``model, batch_size, dense_ms, sparse_ms, ratio
    (dense / sparse time, as for the MLP), dense_macs, sparse_macs (mean per example, policies
    included), mac_ratio (dense / sparse MACs), overflow_rate`` (dropped / requested
    residual-block runs).
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats!r}")
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype("float32"), jnp.dtype("bfloat16")):
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
  rng = jax.random.PRNGKey(seed)
  init_key, calib_key, data_key = jax.random.split(rng, 3)
  if model is None:
    model = conv.GatedCNN(num_classes, stem_features=16, stage_features=(32, 64),
                          residual_blocks=2, block_size=8)
  model = model.clone(dtype=dtype)
  dense_model = model.clone(gated=False)
  if params is None:
    sample = jnp.zeros((1, *image_shape), jnp.float32)
    params = model.init({"params": init_key, "gate": init_key}, sample, mode="threshold")["params"]
    calibration = jax.random.normal(calib_key, (256, *image_shape), jnp.float32)
    params = calibrate_policies(model.clone(dtype=jnp.float32), params, calibration,
                                active_fraction)
  network_params = conv.strip_policy_params(params)
  dense_fn = jax.jit(lambda x: dense_model.apply({"params": network_params}, x)[0])
  specs = model.layer_specs(image_shape)
  dense_macs = flops.dense_cnn_macs(specs, model.num_classes)
  results = []
  for batch_size in batch_sizes:
    keys = jax.random.split(jax.random.fold_in(data_key, batch_size), num_inputs)
    inputs = [jax.random.normal(k, (batch_size, *image_shape), jnp.float32) for k in keys]
    limit = min(batch_size, max(1, math.ceil(capacity_factor * active_fraction * batch_size)))
    sparse_infer = jax.jit(make_cnn_inference(model, example_capacity=limit))
    sparse_fn = lambda x: sparse_infer(params, x)  # noqa: E731
    dense_ms, sparse_ms = timing.interleaved_median_ms(
        [(dense_fn, [(x,) for x in inputs]), (sparse_fn, [(x,) for x in inputs])],
        repeats=repeats, warmup=1)
    macs, requested, dropped = [], 0, 0
    for x in inputs:
      _, info = sparse_fn(x)
      macs.append(flops.gated_cnn_macs(specs, [np.asarray(m) for m in info.masks],
                                       model.num_classes))
      requested += int(np.sum(np.asarray(info.requested)))
      dropped += int(np.sum(np.asarray(info.overflow)))
    sparse_macs = float(np.mean(np.concatenate(macs)))
    results.append({
        "model": "cnn", "batch_size": int(batch_size), "dense_ms": dense_ms,
        "sparse_ms": sparse_ms, "ratio": dense_ms / sparse_ms, "dense_macs": int(dense_macs),
        "sparse_macs": sparse_macs, "mac_ratio": dense_macs / sparse_macs,
        "overflow_rate": dropped / requested if requested else 0.0,
    })
  return results
