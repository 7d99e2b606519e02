"""Gated convolutional Linen modules: channel-block gating and per-example layer skipping.

Axis letters: ``batch`` examples, ``height``/``width`` spatial axes, ``in`` input
channels, ``channels`` output channels of a gated conv, ``blocks = channels /
block_size``.

Two kinds of gate, both driven by the core :class:`ccjax.layers.BlockPolicy` reading the
globally average-pooled layer input ``mean_{height, width} x`` under ``stop_gradient``:

* :class:`GatedConv`: output channels split into blocks; the policy decides per example
  which channel blocks run (``probs [batch, blocks]``).
* :class:`GatedResidualBlock`: a pre-activation residual branch
  ``y = x + u * branch(x)`` with one gate per example (``probs [batch, 1]``); a skipped
  block is the identity. ``tau`` in :class:`ccjax.TrainConfig` is then the target
  fraction of residual blocks that run.

Both return ``(y, aux)`` with ``aux`` a :class:`ccjax.layers.GateAux` (``None`` when
ungated), and keep their policy parameters under a sub-module named ``policy``, so
:func:`ccjax.make_train_step` trains them unchanged (REINFORCE + ``L_b``, ``L_e``,
``L_v``). Training computes dense-then-mask; :mod:`ccjax.inference.cnn` really skips.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccjax import flops
from ccjax import gate_settings as gate_settings_lib
from ccjax import gating
from ccjax import layers
from ccjax import modes
from ccjax import validation

CHANNEL_GATE = "channel"
SKIP_GATE = "skip"
_STEM_NAME = "stem"
_CONV_NAME = "conv"          # the conv inside GatedConv
_OUTPUT_NAME = "output"


def _residual_conv_name(index: int) -> str:
  return f"conv_{index}"


def pooled_policy_input(inputs: jax.Array) -> jax.Array:
  """What a conv policy reads: ``[batch, height, width, in]`` -> ``[batch, in]`` spatial mean.

  The result is under ``stop_gradient``: the policy never sends gradient into the network.
  """
  return jnp.mean(jax.lax.stop_gradient(inputs), axis=(1, 2))


class GatedConv(gate_settings_lib.GateFields):
  """A ``SAME``-padded 2-D convolution whose output channels are gated in blocks.

  ``y = mask(policy(pool(stop_gradient(x)))) * activation(conv(x))``, the mask expanded
  over each block's ``block_size`` channels and all spatial positions.

  Attributes:
    features: output channels; a multiple of ``block_size``.
    kernel_size: square kernel side.
    strides: spatial stride (both axes).
    activation: elementwise nonlinearity applied before masking.
    block_size, gated, estimator, policy_init_prob, policy_eps, policy_hidden,
      gumbel_temperature, dtype: the :class:`ccjax.GateSettings` fields (keyword-only;
      ``block_size`` defaults to 8 channels here); ``dtype`` is the convolution's.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  block_size: int = gate_settings_lib.block_size_default(8)

  def __post_init__(self):
    gating.validate_block_size(self.features, self.block_size, "features")
    validation.check_int("kernel_size", self.kernel_size)
    validation.check_int("strides", self.strides)
    self.gate_settings.validate(num_gated_layers=1)
    super().__post_init__()

  @property
  def num_blocks(self) -> int:
    return self.features // self.block_size

  @nn.compact
  def __call__(self, inputs: jax.Array, *, mode: str = "sample", capacity: int | None = None,
               block_mask: jax.Array | None = None) -> tuple[jax.Array, layers.GateAux | None]:
    """Applies the layer.

    Args:
      inputs: ``[batch, height, width, in]``.
      mode: ``sample`` | ``threshold`` | ``top_k`` | ``capped`` | ``all``.
      capacity: blocks per example for ``top_k``.
      block_mask: optional ``[batch, blocks]`` mask used instead of the policy's own
        (e.g. the effective mask of skipping inference); ``log_prob`` is still computed.

    Returns:
      ``(y [batch, height / strides, width / strides, channels], aux)``.
    """
    layers.validate_layer_mode(mode)
    outputs = self.activation(nn.Conv(
        self.features, (self.kernel_size, self.kernel_size), strides=self.strides,
        padding="SAME", dtype=self.dtype, name=_CONV_NAME)(inputs))
    if not self.gated:
      return outputs, None
    aux = layers.gate(self, pooled_policy_input(inputs), self.num_blocks, mode, capacity,
                      block_mask)
    return gating.apply_block_mask(outputs, aux.mask[:, None, None, :]), aux


def residual_branch(convs: Sequence[Callable[[jax.Array], jax.Array]],
                    inputs: jax.Array) -> jax.Array:
  """Pre-activation branch ``conv_n(relu(... conv_1(relu(x))))``.

  Args:
    convs: the branch's convolutions, each channel-preserving.
    inputs: ``[batch, height, width, channels]``.

  Returns:
    ``[batch, height, width, channels]``.
  """
  hidden = inputs
  for conv in convs:
    hidden = conv(nn.relu(hidden))
  return hidden


class GatedResidualBlock(gate_settings_lib.GateFields):
  """A residual block that runs per example only when its policy says so.

  ``y = x + u * branch(x)`` with ``u ~ Bernoulli(policy(pool(stop_gradient(x))))``, one
  gate per example (``probs [batch, 1]``); ``u = 0`` is the identity. The branch is
  ``num_convs`` pre-activation ``SAME`` convolutions (see :func:`residual_branch`)
  keeping the channel count.

  Attributes:
    kernel_size: square kernel side.
    num_convs: convolutions in the branch, >= 1.
    gated, estimator, policy_init_prob, policy_eps, policy_hidden, gumbel_temperature,
      dtype: the :class:`ccjax.GateSettings` fields (keyword-only), as in
      :class:`GatedConv`; ``gated=False`` always runs the branch (``aux=None``) and
      ``policy_init_prob`` is the initial probability of running. ``block_size`` is not
      read: the block is one gate.
  """
  kernel_size: int = 3
  num_convs: int = 2

  def __post_init__(self):
    validation.check_int("kernel_size", self.kernel_size)
    validation.check_int("num_convs", self.num_convs)
    self.gate_settings.validate(num_gated_layers=1)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: jax.Array, *, mode: str = "sample", capacity: int | None = None,
               block_mask: jax.Array | None = None) -> tuple[jax.Array, layers.GateAux | None]:
    """Applies the block.

    Args:
      inputs: ``[batch, height, width, channels]``.
      mode: ``sample`` | ``threshold`` | ``top_k`` | ``capped`` | ``all``.
      capacity: ignored except for validation in ``top_k`` (one gate: top-1 equals
        threshold); pass ``1`` or ``None``.
      block_mask: optional ``[batch, 1]`` mask used instead of the policy's own.

    Returns:
      ``(y [batch, height, width, channels], aux)`` with ``aux.probs [batch, 1]``.
    """
    layers.validate_layer_mode(mode)
    channels = inputs.shape[-1]
    convs = [nn.Conv(channels, (self.kernel_size, self.kernel_size), padding="SAME",
                     dtype=self.dtype, name=_residual_conv_name(index))
             for index in range(self.num_convs)]
    branch = residual_branch(convs, inputs)
    if not self.gated:
      return inputs + branch, None
    if modes.get(mode).needs_capacity:
      # One gate: a fixed top-1 would always run the block, so both keep the threshold.
      mode, capacity = "threshold", None
    aux = layers.gate(self, pooled_policy_input(inputs), 1, mode, capacity, block_mask)
    return inputs + branch * aux.mask.reshape(-1, 1, 1, 1).astype(branch.dtype), aux


class GateLayer(NamedTuple):
  """One gated layer of a :class:`GatedCNN`, in forward order.

  Attributes:
    name: sub-module name in the parameter tree.
    kind: ``channel`` (:class:`GatedConv`) or ``skip`` (:class:`GatedResidualBlock`).
    stage: index of the stage the layer belongs to.
  """
  name: str
  kind: str
  stage: int


class GatedCNN(gate_settings_lib.GateFields):
  """A small gated CNN: stem conv, stages of (channel-gated conv, skippable residual blocks).

  ``x -> relu(stem conv) -> for each stage: GatedConv(stage_features[s], stride
  strides[s]) -> residual_blocks x GatedResidualBlock -> relu -> global mean pool ->
  dense``. With ``gated=False`` it is the dense baseline (same parameters minus the
  policies). The contract is that of :class:`ccjax.GatedMLP`:
  ``apply(vars, x, mode=..., capacity=..., rngs={'gate': k}) -> (logits, aux)`` with one
  :class:`ccjax.layers.GateAux` (or ``None`` when ungated) per gated layer, in the order
  of :meth:`gate_layers`.

  Attributes:
    num_classes: output logits, >= 2.
    stem_features: channels of the ungated stem conv.
    stage_features: output channels of each stage's gated conv, multiples of ``block_size``.
    strides: stride of each stage's gated conv: one value or one per stage.
    residual_blocks: skippable residual blocks per stage, >= 0.
    kernel_size: square kernel side of every conv.
    num_convs: convolutions per residual branch, >= 1.
    image_shape: optional ``(height, width, channels)``; inputs of rank 2
      ``[batch, height * width * channels]`` are reshaped to it (e.g. flattened digits).
    block_size, gated, estimator, policy_init_prob, policy_eps, policy_hidden,
      gumbel_temperature, dtype: the :class:`ccjax.GateSettings` fields (keyword-only;
      ``block_size`` defaults to 8 channels here), given to every gated layer;
      ``policy_init_prob`` is one value or one per gated layer, ``dtype`` that of the
      convolutions.
  """
  num_classes: int
  stem_features: int = 16
  stage_features: Sequence[int] = (32, 64)
  strides: int | Sequence[int] = 2
  residual_blocks: int = 1
  kernel_size: int = 3
  num_convs: int = 2
  image_shape: Sequence[int] | None = None
  block_size: int = gate_settings_lib.block_size_default(8)

  def __post_init__(self):
    if not isinstance(self.num_classes, int) or self.num_classes < 2:
      raise ValueError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
    validation.check_int("stem_features", self.stem_features)
    if len(self.stage_features) == 0:
      raise ValueError("stage_features must list at least one width")
    for index, width in enumerate(self.stage_features):
      gating.validate_block_size(width, self.block_size, f"stage_features[{index}]")
    for stride in validation.per_layer_values(self.strides, len(self.stage_features), "strides"):
      validation.check_int("strides", stride)
    if (not isinstance(self.residual_blocks, int) or isinstance(self.residual_blocks, bool)
        or self.residual_blocks < 0):
      raise ValueError(f"residual_blocks must be an integer >= 0, got {self.residual_blocks!r}")
    validation.check_int("kernel_size", self.kernel_size)
    validation.check_int("num_convs", self.num_convs)
    self.gate_settings.validate(num_gated_layers=len(self.gate_layers()))
    if self.image_shape is not None and (
        len(self.image_shape) != 3 or any(not isinstance(d, int) or d <= 0
                                          for d in self.image_shape)):
      raise ValueError(f"image_shape must be (height, width, channels) of positive integers "
                       f"or None, got {self.image_shape!r}")
    super().__post_init__()

  def stage_strides(self) -> tuple[int, ...]:
    """Stride of each stage's gated conv."""
    return tuple(validation.per_layer_values(self.strides, len(self.stage_features), "strides"))

  def gate_names(self) -> tuple[str, ...]:
    """Sub-module names of the gated layers, in the order of ``aux``."""
    return tuple(layer.name for layer in self.gate_layers())

  def stem_weights(self, params) -> layers.LayerWeights:
    """The stem conv's weights (``kernel [k, k, in, stem_features]``)."""
    return layers.layer_weights(params[_STEM_NAME])

  def channel_conv_weights(self, params, layer: GateLayer) -> layers.LayerWeights:
    """The conv of a ``channel`` gated layer (``kernel [k, k, in, out]``)."""
    return layers.layer_weights(params[layer.name][_CONV_NAME])

  def residual_conv_weights(self, params, layer: GateLayer) -> tuple[layers.LayerWeights, ...]:
    """The branch convs of a ``skip`` gated layer, in order."""
    return tuple(layers.layer_weights(params[layer.name][_residual_conv_name(index)])
                 for index in range(self.num_convs))

  def policy_weights(self, params, layer: GateLayer) -> layers.LayerWeights:
    """The policy of a gated layer (``kernel [in channels, blocks]``)."""
    return layers.policy_weights(params[layer.name])

  def output_weights(self, params) -> layers.LayerWeights:
    """The dense head's weights (``kernel [channels, num_classes]``)."""
    return layers.layer_weights(params[_OUTPUT_NAME])

  def gate_layers(self) -> tuple[GateLayer, ...]:
    """The gated layers in forward order (the order of ``aux``)."""
    result = []
    for stage in range(len(self.stage_features)):
      result.append(GateLayer(f"stage_{stage}", CHANNEL_GATE, stage))
      for block in range(self.residual_blocks):
        result.append(GateLayer(f"stage_{stage}_res_{block}", SKIP_GATE, stage))
    return tuple(result)

  def as_images(self, inputs: jax.Array) -> jax.Array:
    """``[batch, height, width, channels]`` view of the input (see ``image_shape``)."""
    if inputs.ndim == 2 and self.image_shape is not None:
      return inputs.reshape(inputs.shape[0], *self.image_shape)
    if inputs.ndim != 4:
      raise ValueError(f"GatedCNN inputs must be [batch, height, width, channels] (or "
                       f"[batch, features] with image_shape set), got shape {inputs.shape}")
    return inputs

  def layer_specs(self, image_shape: Sequence[int]) -> tuple[flops.ConvLayerSpec, ...]:
    """Shapes of every conv layer for MAC accounting (see :func:`ccjax.flops.dense_cnn_macs`).

    Args:
      image_shape: ``(height, width, channels)`` of one input.

    Returns:
      the stem spec followed by one spec per gated layer, in forward order.
    """
    height, width, channels = image_shape
    specs = [flops.ConvLayerSpec("conv", height, width, channels, self.stem_features,
                                 self.kernel_size)]
    channels = self.stem_features
    strides = self.stage_strides()
    for layer in self.gate_layers():
      if layer.kind == CHANNEL_GATE:
        out_channels = self.stage_features[layer.stage]
        stride = strides[layer.stage]
        specs.append(flops.ConvLayerSpec(CHANNEL_GATE, height, width, channels, out_channels,
                                         self.kernel_size, stride, block_size=self.block_size))
        height, width = -(-height // stride), -(-width // stride)
        channels = out_channels
      else:
        specs.append(flops.ConvLayerSpec(SKIP_GATE, height, width, channels, channels,
                                         self.kernel_size, num_convs=self.num_convs))
    return tuple(specs)

  @nn.compact
  def __call__(self, inputs: jax.Array, *, mode: str = "sample",
               capacity: int | Sequence[int | None] | None = None,
               block_masks: Sequence[jax.Array] | None = None
               ) -> tuple[jax.Array, tuple[layers.GateAux | None, ...]]:
    """Applies the network.

    Args:
      inputs: ``[batch, height, width, channels]`` (or flattened, see ``image_shape``).
      mode: gate mode of every gated layer: ``sample`` | ``threshold`` | ``top_k`` |
        ``capped`` | ``all``.
      capacity: blocks per example for ``top_k``: one value or one per gated layer
        (residual blocks have one gate, so their ``top_k`` / ``capped`` is ``threshold``).
      block_masks: optional masks, one per gated layer (``[batch, blocks]`` or
        ``[batch, 1]``), used instead of the policies' own; for checking skipping
        inference against masked dense.

    Returns:
      ``(logits [batch, num_classes], aux)`` with one ``GateAux`` (``None`` when
      ungated) per gated layer.
    """
    layers.validate_layer_mode(mode)
    gate_layers = self.gate_layers()
    capacities = (None,) * len(gate_layers) if capacity is None else validation.per_layer_values(
        capacity, len(gate_layers), "capacity")
    if block_masks is not None and len(block_masks) != len(gate_layers):
      raise ValueError(f"block_masks needs one mask per gated layer ({len(gate_layers)}), "
                       f"got {len(block_masks)}")
    strides = self.stage_strides()
    hidden = nn.relu(nn.Conv(self.stem_features, (self.kernel_size, self.kernel_size),
                             padding="SAME", dtype=self.dtype,
                             name=_STEM_NAME)(self.as_images(inputs)))
    aux = []
    for index, layer in enumerate(gate_layers):
      common = dict(name=layer.name,
                    **self.gate_settings.layer(index, len(gate_layers)).as_kwargs())
      if layer.kind == CHANNEL_GATE:
        module = GatedConv(self.stage_features[layer.stage], kernel_size=self.kernel_size,
                           strides=strides[layer.stage], **common)
      else:
        module = GatedResidualBlock(kernel_size=self.kernel_size, num_convs=self.num_convs,
                                    **common)
      hidden, layer_aux = module(
          hidden, mode=mode, capacity=capacities[index],
          block_mask=None if block_masks is None else block_masks[index])
      aux.append(layer_aux)
    features = jnp.mean(nn.relu(hidden), axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name=_OUTPUT_NAME)(features)
    return logits, tuple(aux)
