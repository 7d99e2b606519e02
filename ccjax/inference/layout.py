"""Block-major layout of a trained :class:`ccjax.GatedMLP` for sparse inference.

Axis letters: ``bs`` units per block; ``nb`` blocks of a layer; ``in`` input features;
``P = out_blocks * in_blocks`` weight blocks of a hidden->hidden layer.

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
"""

from __future__ import annotations

from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp

from ccjax import layers as layers_lib
from ccjax.inference.kernels import pallas_gpu


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

  @property
  def float32(self) -> bool:
    """Every weight is float32 (what a float32-only backend runs)."""
    return all_float32(self)


def all_float32(tree) -> bool:
  """Whether every array leaf of ``tree`` (parameters, a layout) is float32."""
  return all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(tree))


class LayerTrace(NamedTuple):
  """Which blocks one layer ran.

  Attributes:
    block_index: ``[batch, k]`` int32 block id of each compact slot.
    kept: ``[batch, k]`` bool, the slot ran (effective mask in compact form).
    num_candidates: scalar int32, number of (example, block) with ``p > 0.5``.
    num_kept: scalar int32, number of (example, block) that ran.
    probs: ``[batch, nb]`` float32 policy probabilities on the layer's actual input.
  """
  block_index: jax.Array
  kept: jax.Array
  num_candidates: jax.Array
  num_kept: jax.Array
  probs: jax.Array


def to_block_major(module: layers_lib.GatedMLP, params, *,
                   pallas_tiles: bool | None = None) -> BlockMajorMLP:
  """Converts a trained :class:`ccjax.GatedMLP`'s params to the block-major layout.

  Args:
    module: the gated MLP (``gated=True``); its ``block_size`` and ``policy_eps`` are used.
    params: its parameters.
    pallas_tiles: also store the minibatch weights padded for the Pallas kernel (once,
      here; aligned weights are shared, not copied); ``None``: iff JAX runs on a GPU.

  Returns:
    a :class:`BlockMajorMLP` pytree.
  """
  if not isinstance(module, layers_lib.GatedMLP) or not module.gated:
    raise ValueError("to_block_major needs a GatedMLP with gated=True")
  if pallas_tiles is None:
    pallas_tiles = jax.default_backend() == "gpu"
  pad = pallas_gpu.pad_weight_tiles if pallas_tiles else lambda weights: None
  block_size = module.block_size
  block_layers = []
  in_blocks = None
  for weights in module.hidden_weights(params):
    kernel = jnp.asarray(weights.dense.kernel)
    policy_kernel = jnp.asarray(weights.policy.kernel)
    fan_in, units = kernel.shape
    nb = units // block_size
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
    block_layers.append(BlockLayer(
        kernel=block_kernel, bias=jnp.asarray(weights.dense.bias).reshape(nb, block_size),
        policy_kernel=block_policy, policy_bias=jnp.asarray(weights.policy.bias),
        input_gated=input_gated, grouped_kernel=grouped_kernel,
        grouped_tiles=pad(block_kernel if input_gated else grouped_kernel),
        policy_tiles=pad(block_policy) if input_gated else None))
    in_blocks = nb
  output = module.output_weights(params)
  out_kernel = jnp.asarray(output.kernel)
  out_kernel = out_kernel.reshape(in_blocks, block_size, out_kernel.shape[-1])
  return BlockMajorMLP(
      layers=tuple(block_layers), output_kernel=out_kernel,
      output_bias=jnp.asarray(output.bias), block_size=block_size,
      policy_eps=float(module.policy_eps), output_tiles=pad(out_kernel))
