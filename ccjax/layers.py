"""Flax Linen modules over the pure policy and gating functions.

Axis letters: ``batch`` examples, ``in`` input features, ``units`` output units of a
gated layer, ``blocks = units / block_size``.

Every gated layer returns ``(y, aux)`` where ``aux`` is a :class:`GateAux` holding the
layer's block probabilities, the mask that was applied and its log-probability; an
ungated (dense) layer returns ``aux = None``. Parameters of the policy live under a
sub-module named ``policy`` so that the train step can give them their own optimizer.

Masks need randomness only in ``mode='sample'``; it comes from the Flax RNG stream
``'gate'`` (``model.apply(..., rngs={'gate': key})``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccjax import estimators
from ccjax import gating
from ccjax import policy as policy_lib

POLICY_COLLECTION_NAME = "policy"
LAYER_MODES = ("sample", "threshold", "top_k", "all")


class GateAux(NamedTuple):
  """What a gated layer reports about its gate.

  Attributes:
    probs: ``[batch, blocks]`` block probabilities (differentiable w.r.t. the policy).
    mask: ``[batch, blocks]`` the applied mask (0/1 in the forward pass).
    log_prob: ``[batch]`` ``log pi(mask | input)`` summed over blocks.
  """
  probs: jax.Array
  mask: jax.Array
  log_prob: jax.Array


def validate_layer_mode(mode: str) -> str:
  if mode not in LAYER_MODES:
    raise ValueError(f"mode must be one of {'|'.join(LAYER_MODES)}, got {mode!r}")
  return mode


def validate_gate_settings(estimator: str, policy_eps: float, policy_init_prob) -> None:
  """Checks a gated module's policy settings (one init prob or a sequence of them)."""
  if estimator not in estimators.ESTIMATORS:
    raise ValueError(f"estimator must be one of {'|'.join(estimators.ESTIMATORS)}, "
                     f"got {estimator!r}")
  policy_lib.validate_eps(policy_eps)
  probs = (policy_init_prob,) if isinstance(policy_init_prob, (int, float)) else policy_init_prob
  for prob in probs:
    if not isinstance(prob, (int, float)) or not 0.0 < prob < 1.0:
      raise ValueError(f"policy_init_prob must be in (0, 1), got {prob!r}")


def _logit(prob: float) -> float:
  return math.log(prob) - math.log1p(-prob)


def make_block_mask(probs: jax.Array, mode: str, estimator: str, *,
                    rng: jax.Array | None = None, capacity: int | None = None,
                    gumbel_temperature: float = 0.5) -> jax.Array:
  """Chooses the mask for a layer given its probabilities.

  Args:
    probs: ``[batch, blocks]`` block probabilities.
    mode: ``sample`` (training: drawn with ``estimator``), or a deterministic mode
      ``threshold`` | ``top_k`` | ``all``.
    estimator: ``reinforce`` (hard sample, no gradient through the mask),
      ``straight_through`` or ``gumbel`` (gradient flows to ``probs``).
    rng: PRNG key, needed for ``sample``.
    capacity: blocks per example allowed in ``top_k``.
    gumbel_temperature: temperature of the ``gumbel`` relaxation.

  Returns:
    ``[batch, blocks]`` mask.
  """
  if mode != "sample":
    return policy_lib.deterministic_mask(jax.lax.stop_gradient(probs), mode, capacity)
  if rng is None:
    raise ValueError("mode='sample' needs an rng (pass rngs={'gate': key})")
  if estimator == "reinforce":
    return policy_lib.sample_mask(rng, jax.lax.stop_gradient(probs))
  if estimator == "straight_through":
    return estimators.straight_through_mask(rng, probs)
  if estimator == "gumbel":
    return estimators.gumbel_sigmoid_mask(rng, probs, gumbel_temperature)
  raise ValueError(
      f"estimator must be one of {'|'.join(estimators.ESTIMATORS)}, got {estimator!r}")


class BlockPolicy(nn.Module):
  """``probs = eps + (1 - 2 eps) sigmoid(h @ Z + d)``, one probability per block.

  Attributes:
    num_blocks: number of gated blocks.
    eps: probability bound, see :func:`ccjax.policy.policy_probs`.
    init_prob: initial probability of every block (sets the bias ``d``).
    kernel_scale: variance scale of the initial ``Z``.
  """
  num_blocks: int
  eps: float = policy_lib.DEFAULT_EPS
  init_prob: float = 0.5
  kernel_scale: float = 0.1

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Maps ``inputs [batch, in]`` to ``probs [batch, blocks]`` (float32)."""
    # Undo the eps squash so that the initial probability really is init_prob.
    squashed = (self.init_prob - self.eps) / (1.0 - 2.0 * self.eps)
    squashed = min(max(squashed, 1e-4), 1.0 - 1e-4)
    logits = nn.Dense(
        self.num_blocks, name="logits", dtype=jnp.float32,
        kernel_init=nn.initializers.variance_scaling(self.kernel_scale, "fan_in", "normal"),
        bias_init=nn.initializers.constant(_logit(squashed)))(inputs.astype(jnp.float32))
    return policy_lib.policy_probs(logits, self.eps)


class GatedDense(nn.Module):
  """A dense layer whose output units are switched on and off in blocks.

  ``y = mask(policy(stop_gradient(x))) * activation(x @ W + b)``. Training computes the
  dense product and then masks; :mod:`ccjax.sparse` computes only active blocks.

  Attributes:
    features: output units; must be a multiple of ``block_size``.
    block_size: units per gated block.
    activation: elementwise nonlinearity applied before masking.
    gated: ``False`` gives a plain dense layer (the dense baseline) and ``aux=None``.
    estimator: how ``mode='sample'`` draws masks (``reinforce``, ``straight_through``,
      ``gumbel``).
    policy_eps: probability bound of the policy.
    policy_init_prob: initial probability of every block.
    gumbel_temperature: temperature of the ``gumbel`` estimator.
    dtype: computation dtype of the dense product (``None``: inferred from inputs);
      the policy always runs in float32.
  """
  features: int
  block_size: int = 64
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  gated: bool = True
  estimator: str = "reinforce"
  policy_eps: float = policy_lib.DEFAULT_EPS
  policy_init_prob: float = 0.5
  gumbel_temperature: float = 0.5
  dtype: Any = None

  def __post_init__(self):
    gating.validate_block_size(self.features, self.block_size, "features")
    validate_gate_settings(self.estimator, self.policy_eps, self.policy_init_prob)
    super().__post_init__()

  @property
  def num_blocks(self) -> int:
    return self.features // self.block_size

  @nn.compact
  def __call__(self, inputs: jax.Array, *, mode: str = "sample",
               capacity: int | None = None) -> tuple[jax.Array, GateAux | None]:
    """Applies the layer.

    Args:
      inputs: ``[batch, in]``.
      mode: ``sample`` | ``threshold`` | ``top_k`` | ``all`` (see :func:`make_block_mask`).
      capacity: blocks per example for ``top_k``.

    Returns:
      ``(y [batch, units], aux)``; ``aux`` is ``None`` for an ungated layer.
    """
    validate_layer_mode(mode)
    outputs = self.activation(nn.Dense(self.features, name="dense", dtype=self.dtype)(inputs))
    if not self.gated:
      return outputs, None
    probs = BlockPolicy(self.num_blocks, eps=self.policy_eps,
                        init_prob=self.policy_init_prob,
                        name=POLICY_COLLECTION_NAME)(jax.lax.stop_gradient(inputs))
    rng = self.make_rng("gate") if mode == "sample" else None
    block_mask = make_block_mask(probs, mode, self.estimator, rng=rng, capacity=capacity,
                                 gumbel_temperature=self.gumbel_temperature)
    outputs = gating.apply_block_mask(outputs, block_mask)
    log_prob = policy_lib.mask_log_prob(probs, block_mask)
    return outputs, GateAux(probs=probs, mask=block_mask, log_prob=log_prob)


def per_layer_values(value, num_layers: int, name: str) -> tuple:
  """``value`` as a tuple with one entry per gated layer (a scalar is repeated)."""
  if isinstance(value, (int, float)):
    return (value,) * num_layers
  value = tuple(value)
  if len(value) != num_layers:
    raise ValueError(f"{name} needs one value or one per gated layer ({num_layers}), "
                     f"got {len(value)}")
  return value


class GatedMLP(nn.Module):
  """Gated hidden layers followed by a plain linear output layer.

  With ``gated=False`` the same module is the dense baseline (same parameters minus
  the policies).

  Attributes:
    hidden: widths of the hidden layers, each a multiple of ``block_size``.
    num_classes: output logits.
    block_size: units per gated block.
    gated: gate the hidden layers.
    estimator: see :class:`GatedDense`.
    policy_init_prob: one initial block probability, or one per hidden layer.
    policy_eps: probability bound of the policies.
    dtype: computation dtype of the dense products.
  """
  hidden: Sequence[int]
  num_classes: int
  block_size: int = 64
  gated: bool = True
  estimator: str = "reinforce"
  policy_init_prob: float | Sequence[float] = 0.5
  policy_eps: float = policy_lib.DEFAULT_EPS
  dtype: Any = None

  def __post_init__(self):
    if len(self.hidden) == 0:
      raise ValueError("hidden must list at least one width")
    for index, width in enumerate(self.hidden):
      gating.validate_block_size(width, self.block_size, f"hidden[{index}]")
    if not isinstance(self.num_classes, int) or self.num_classes < 2:
      raise ValueError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
    validate_gate_settings(self.estimator, self.policy_eps,
                           per_layer_values(self.policy_init_prob, len(self.hidden),
                                      "policy_init_prob"))
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: jax.Array, *, mode: str = "sample",
               capacity: int | Sequence[int] | None = None
               ) -> tuple[jax.Array, tuple[GateAux | None, ...]]:
    """Applies the network.

    Args:
      inputs: ``[batch, ...]``, flattened to ``[batch, in]``.
      mode: gate mode for every hidden layer (see :class:`GatedDense`).
      capacity: blocks per example for ``top_k``: one value or one per layer.

    Returns:
      ``(logits [batch, num_classes], aux)`` with one :class:`GateAux` (or ``None``
      when ungated) per hidden layer.
    """
    hidden = inputs.reshape(inputs.shape[0], -1)
    init_probs = per_layer_values(self.policy_init_prob, len(self.hidden), "policy_init_prob")
    capacities = (None,) * len(self.hidden) if capacity is None else per_layer_values(
        capacity, len(self.hidden), "capacity")
    aux = []
    for index, width in enumerate(self.hidden):
      hidden, layer_aux = GatedDense(
          width, block_size=self.block_size, gated=self.gated, estimator=self.estimator,
          policy_eps=self.policy_eps, policy_init_prob=init_probs[index], dtype=self.dtype,
          name=f"hidden_{index}")(hidden, mode=mode, capacity=capacities[index])
      aux.append(layer_aux)
    logits = nn.Dense(self.num_classes, name="output", dtype=self.dtype)(hidden)
    return logits, tuple(aux)


def is_policy_path(path: Sequence[Any]) -> bool:
  """True for a parameter path that belongs to a gate policy."""
  return any(getattr(entry, "key", entry) == POLICY_COLLECTION_NAME for entry in path)


def param_labels(params) -> Any:
  """Pytree of ``'policy'`` / ``'network'`` labels matching ``params``."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "policy" if is_policy_path(path) else "network", params)
