"""Flax NNX gated modules, twins of the Linen ones in :mod:`ccjax.layers`.

Axis letters as in :mod:`ccjax.layers`: ``batch`` examples (or any leading indices),
``in`` input features, ``units`` output units, ``blocks = units / block_size``.

The modules compute with the same pure core as the Linen modules (the policy squash of
:func:`ccjax.policy_probs`, the masks of :func:`ccjax.layers.make_block_mask` and so the
estimator registry, :func:`ccjax.mask_log_prob`, :func:`ccjax.apply_block_mask`) and
have the same parameter tree: ``nnx.state(model, nnx.Param).to_pure_dict()`` of an NNX
:class:`GatedMLP` is a valid ``params`` of the Linen :class:`ccjax.GatedMLP` with the same
fields, and back. So one train step, one checkpoint format and one ``make_inference``
serve both APIs (:mod:`ccjax.nnx.bridge`).

Masks are drawn from an explicit key (``rng=``), never from state hidden in the module,
so ``mode='sample'`` is a pure function of the parameters, the input and the key.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp

from ccjax import gate_settings as gate_settings_lib
from ccjax import gating
from ccjax import layers as linen_layers
from ccjax import policy as policy_lib
from ccjax import validation

GateAux = linen_layers.GateAux


def _settings(settings: gate_settings_lib.GateSettings | None, gate_fields: dict[str, Any],
              num_gated_layers: int) -> gate_settings_lib.GateSettings:
  """The validated :class:`ccjax.GateSettings` of an NNX module's ``settings=`` and
  keyword overrides (NNX policies are linear: ``policy_hidden`` must be 0)."""
  settings = gate_settings_lib.resolve(settings, gate_fields)
  if not isinstance(settings.policy_init_prob, (int, float)):
    settings = settings.replace(policy_init_prob=tuple(settings.policy_init_prob))
  settings.validate(num_gated_layers)
  for name in ("policy_hidden", "policy_rank"):
    if getattr(settings, name):
      raise ValueError(f"{name} must be 0 for the ccjax.nnx modules (full linear policies), "
                       f"got {getattr(settings, name)!r}")
  return settings


class BlockPolicy(nnx.Module):
  """``probs = eps + (1 - 2 eps) sigmoid(h @ Z + d)``, one probability per block.

  The twin of :class:`ccjax.BlockPolicy` (same initialisation, same parameter names).

  Args:
    in_features: features of the policy's input.
    num_blocks: gated blocks.
    eps: probability bound, see :func:`ccjax.policy_probs`.
    init_prob: initial probability of every block (sets the bias ``d``).
    kernel_scale: variance scale of the initial ``Z``.
    rngs: ``nnx.Rngs`` for the initial parameters.
  """

  def __init__(self, in_features: int, num_blocks: int, *, eps: float = policy_lib.DEFAULT_EPS,
               init_prob: float = 0.5, kernel_scale: float = 0.1, rngs: nnx.Rngs):
    self.eps = eps
    self.logits = nnx.Linear(
        in_features, num_blocks, dtype=jnp.float32,
        kernel_init=nn.initializers.variance_scaling(kernel_scale, "fan_in", "normal"),
        bias_init=nn.initializers.constant(linen_layers.policy_init_logit(init_prob, eps)),
        rngs=rngs)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Maps ``inputs [..., in]`` to ``probs [..., blocks]`` (float32)."""
    return policy_lib.policy_probs(self.logits(inputs.astype(jnp.float32)), self.eps)


class GatedDense(nnx.Module):
  """A dense layer whose output units are switched on and off in blocks.

  ``y = mask(policy(stop_gradient(x))) * activation(x @ W + b)``; the twin of
  :class:`ccjax.GatedDense`.

  Args:
    in_features: input features.
    features: output units; a multiple of ``block_size``.
    activation: elementwise nonlinearity applied before masking.
    settings: the :class:`ccjax.GateSettings` (default: its defaults), one
      ``policy_init_prob``, ``policy_hidden=0``.
    **gate_fields: :class:`ccjax.GateSettings` fields overriding ``settings`` (e.g.
      ``block_size=32, estimator='straight_through'``).
    rngs: ``nnx.Rngs`` for the initial parameters.
  """

  def __init__(self, in_features: int, features: int, *,
               activation: Callable[[jax.Array], jax.Array] = nn.relu,
               settings: gate_settings_lib.GateSettings | None = None, rngs: nnx.Rngs,
               **gate_fields: Any):
    settings = _settings(settings, gate_fields, num_gated_layers=1)
    gating.validate_block_size(features, settings.block_size, "features")
    self.features = features
    self.activation = activation
    self.gate_settings = settings
    self.dense = nnx.Linear(in_features, features, dtype=settings.dtype, rngs=rngs)
    if settings.gated:
      self.policy = BlockPolicy(in_features, features // settings.block_size,
                                eps=settings.policy_eps, init_prob=settings.policy_init_prob,
                                rngs=rngs)

  @property
  def gated(self) -> bool:
    return self.gate_settings.gated

  @property
  def estimator(self) -> str:
    return self.gate_settings.estimator

  @property
  def num_blocks(self) -> int:
    return self.features // self.gate_settings.block_size

  def __call__(self, inputs: jax.Array, *, mode: str = "sample", capacity: int | None = None,
               block_mask: jax.Array | None = None, rng: jax.Array | None = None
               ) -> tuple[jax.Array, GateAux | None]:
    """Applies the layer.

    Args:
      inputs: ``[..., in]``.
      mode: ``sample`` | ``threshold`` | ``top_k`` | ``capped`` | ``all``.
      capacity: blocks per example for ``top_k`` / ``capped`` (and a top-k estimator's
        training mask).
      block_mask: optional ``[..., blocks]`` mask used instead of the policy's own.
      rng: PRNG key of ``mode='sample'``.

    Returns:
      ``(y [..., units], aux)``; ``aux`` is ``None`` for an ungated layer.
    """
    linen_layers.validate_layer_mode(mode)
    outputs = self.activation(self.dense(inputs))
    if not self.gated:
      return outputs, None
    probs = self.policy(jax.lax.stop_gradient(inputs))
    aux = linen_layers.gate_aux(probs, mode, self.estimator, rng=rng, capacity=capacity,
                                block_mask=block_mask,
                                gumbel_temperature=self.gate_settings.gumbel_temperature)
    return gating.apply_block_mask(outputs, aux.mask), aux


class GatedMLP(nnx.Module):
  """Gated hidden layers followed by a plain linear output layer; twin of
  :class:`ccjax.GatedMLP` (``gated=False`` is the dense baseline).

  Args:
    in_features: input features (after flattening with ``flatten``).
    hidden: widths of the hidden layers, each a multiple of ``block_size``.
    num_classes: output logits.
    flatten: inputs ``[batch, ...]`` are flattened to ``[batch, in]``; ``False`` keeps
      ``[..., in]`` (one mask per leading index).
    settings: the :class:`ccjax.GateSettings` of every hidden layer (default: its
      defaults); ``policy_init_prob`` one value or one per hidden layer,
      ``policy_hidden=0``.
    **gate_fields: :class:`ccjax.GateSettings` fields overriding ``settings``.
    rngs: ``nnx.Rngs`` for the initial parameters.
  """

  def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, *,
               flatten: bool = True, settings: gate_settings_lib.GateSettings | None = None,
               rngs: nnx.Rngs, **gate_fields: Any):
    settings = _settings(settings, gate_fields, num_gated_layers=len(hidden))
    self.gate_settings = settings
    # Static (hashable) metadata: the fields of the Linen twin, which validates them as
    # the Linen API does.
    self.linen_fields = (("hidden", tuple(hidden)), ("num_classes", num_classes),
                         ("flatten", flatten))
    twin = self.to_linen()
    self.hidden = twin.hidden
    self.flatten = flatten
    width_in = in_features
    for index, (width, name) in enumerate(zip(twin.hidden, twin.gate_names())):
      setattr(self, name, GatedDense(width_in, width, rngs=rngs,
                                     settings=settings.layer(index, len(twin.hidden))))
      width_in = width
    self.output = nnx.Linear(width_in, num_classes, dtype=settings.dtype, rngs=rngs)

  def to_linen(self) -> linen_layers.GatedMLP:
    """The Linen :class:`ccjax.GatedMLP` whose parameters this module's are."""
    return linen_layers.GatedMLP(**dict(self.linen_fields), **self.gate_settings.as_kwargs())

  def __call__(self, inputs: jax.Array, *, mode: str = "sample",
               capacity: int | Sequence[int] | None = None,
               block_masks: Sequence[jax.Array] | None = None, rng: jax.Array | None = None
               ) -> tuple[jax.Array, tuple[GateAux | None, ...]]:
    """Applies the network; arguments as :meth:`ccjax.GatedMLP.__call__`, with the mask
    key ``rng`` (split once per layer, as Linen's ``'gate'`` stream does not, so masks
    differ from a Linen call with the same key; given ``block_masks`` they are equal).

    Returns:
      ``(logits [batch, num_classes], aux)``, one :class:`ccjax.GateAux` (or ``None``)
      per hidden layer.
    """
    hidden = inputs.reshape(inputs.shape[0], -1) if self.flatten else inputs
    num_layers = len(self.hidden)
    capacities = (None,) * num_layers if capacity is None else validation.per_layer_values(
        capacity, num_layers, "capacity")
    if block_masks is not None and len(block_masks) != num_layers:
      raise ValueError(f"block_masks needs one mask per gated layer ({num_layers}), "
                       f"got {len(block_masks)}")
    aux = []
    for index in range(num_layers):
      layer_rng = None if rng is None else jax.random.fold_in(rng, index)
      hidden, layer_aux = getattr(self, f"hidden_{index}")(
          hidden, mode=mode, capacity=capacities[index], rng=layer_rng,
          block_mask=None if block_masks is None else block_masks[index])
      aux.append(layer_aux)
    return self.output(hidden), tuple(aux)
