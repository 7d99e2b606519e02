"""Flax Linen modules over the pure policy and gating functions.

Axis letters: ``batch`` examples, ``in`` input features, ``units`` output units of a
gated layer, ``blocks = units / block_size``. :class:`GatedDense` and :func:`gate` also
take ``[..., in]`` (e.g. ``[batch, seq, in]``): the policy then gives every position
its own mask, ``probs``/``mask`` are ``[..., blocks]`` and ``log_prob`` is ``[...]``.

Every gated layer returns ``(y, aux)`` where ``aux`` is a :class:`GateAux` holding the
layer's block probabilities, the mask that was applied and its log-probability; an
ungated (dense) layer returns ``aux = None``. Parameters of the policy live under a
sub-module named ``policy`` (:data:`POLICY_MODULE_NAME`) so that the train step can give
them their own optimizer; :func:`is_policy_path` is the one rule that says which
parameters belong to a policy.

Modules know their own parameter names: code outside this file reads a trained
model's weights through :meth:`GatedMLP.hidden_weights` / :meth:`GatedMLP.output_weights`
and the policy accessors below, never by string keys.

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
from ccjax import gate_settings as gate_settings_lib
from ccjax import gating
from ccjax import modes
from ccjax import policy as policy_lib
from ccjax import validation

POLICY_MODULE_NAME = "policy"
_POLICY_DENSE_NAME = "logits"   # the Dense inside BlockPolicy
_POLICY_HIDDEN_NAME = "hidden"  # BlockPolicy's optional hidden layer
_POLICY_FACTOR_NAME = "factor"  # BlockPolicy's optional rank factor A of Z = A B

GateSettings = gate_settings_lib.GateSettings
validate_gate_settings = gate_settings_lib.validate_gate_settings
validate_policy_hidden = gate_settings_lib.validate_policy_hidden
validate_policy_rank = gate_settings_lib.validate_policy_rank


class GateAux(NamedTuple):
  """What a gated layer reports about its gate.

  Attributes:
    probs: ``[batch, blocks]`` block probabilities (differentiable w.r.t. the policy).
    mask: ``[batch, blocks]`` the applied mask (0/1 in the forward pass).
    log_prob: ``[batch]`` ``log pi(mask | input)``: in ``mode='sample'`` under the
      estimator's own training distribution (what its REINFORCE term differentiates, e.g.
      the count-conditioned policy of ``reinforce_top_k``), otherwise under the factorised
      Bernoulli policy (summed over blocks); see :func:`gate_log_prob`.
    block_norms: ``[batch, blocks]`` squared L2 norm of each block's activations before
      the mask, under ``stop_gradient`` (what the policy-imitation loss reads), or
      ``None`` for layers that do not report them (only :class:`GatedDense` does).
  """
  probs: jax.Array
  mask: jax.Array
  log_prob: jax.Array
  block_norms: jax.Array | None = None


# Training-free masks chosen from the layer's own activations (TEAL-style): per
# example/position, the ``capacity`` blocks with the largest activation norm run. Works
# on gated and dense layers alike (the policy, if any, is not consulted).
ACTIVATION_TOP_K = modes.get("activation_top_k").name
LAYER_MODES = modes.LAYER_MODES


def validate_layer_mode(mode: str, allowed: Sequence[str] = policy_lib.POLICY_MODES) -> str:
  """``mode`` if it is one of ``allowed``, else a one-line ValueError listing them."""
  return modes.check(mode, tuple(allowed))


def activation_top_k_mask(activations: jax.Array, num_blocks: int,
                          capacity: int | None) -> jax.Array:
  """The ``capacity`` blocks of largest L2 norm, per leading index (TEAL-style).

  Args:
    activations: ``[..., units]`` layer outputs (after the nonlinearity).
    num_blocks: blocks the units split into.
    capacity: blocks kept per example/position, in ``[1, num_blocks]``.

  Returns:
    ``[..., blocks]`` 0/1 mask with exactly ``capacity`` ones per row.
  """
  if capacity is None or not 1 <= capacity <= num_blocks:
    raise ValueError(f"mode {ACTIVATION_TOP_K!r} needs a capacity in [1, {num_blocks}], "
                     f"got {capacity!r}")
  return policy_lib.top_k_mask(activation_block_norms(activations, num_blocks), capacity)


def activation_block_norms(activations: jax.Array, num_blocks: int) -> jax.Array:
  """``[..., units]`` -> ``[..., blocks]`` float32 squared L2 norm of each block (no
  gradient)."""
  blocked = activations.reshape(*activations.shape[:-1], num_blocks, -1).astype(jnp.float32)
  return jnp.sum(jnp.square(jax.lax.stop_gradient(blocked)), axis=-1)


def _logit(prob: float) -> float:
  return math.log(prob) - math.log1p(-prob)


def make_block_mask(probs: jax.Array, mode: str, estimator: str, *,
                    rng: jax.Array | None = None, capacity: int | None = None,
                    gumbel_temperature: float = 0.5) -> jax.Array:
  """Chooses the mask for a layer given its probabilities.

  Args:
    probs: ``[batch, blocks]`` block probabilities.
    mode: ``sample`` (training: drawn by ``estimator``), or a deterministic mode
      ``threshold`` | ``top_k`` | ``capped`` | ``all``.
    estimator: a name in :data:`ccjax.estimators.REGISTRY`, e.g. ``reinforce`` (hard
      sample, no gradient through the mask), ``straight_through`` or ``gumbel`` (gradient
      flows to ``probs``), ``router`` (no sample: the ``capacity`` most probable blocks,
      straight-through gradient).
    rng: PRNG key, needed for ``sample`` by estimators that draw at random.
    capacity: blocks per example allowed in ``top_k`` and ``capped``; in ``sample`` for
      estimators that train on exactly ``capacity`` blocks (``router``, ...).
    gumbel_temperature: temperature of the ``gumbel`` relaxation.

  Returns:
    ``[batch, blocks]`` mask.
  """
  if mode != "sample":
    return policy_lib.deterministic_mask(jax.lax.stop_gradient(probs), mode, capacity)
  chosen = estimators.get(estimator)
  if chosen.needs_capacity and capacity is None:
    raise ValueError(f"estimator {estimator!r} trains with a top-k mask and needs a capacity "
                     "(blocks per example) in mode='sample'")
  if chosen.needs_rng and rng is None:
    raise ValueError("mode='sample' needs an rng (pass rngs={'gate': key})")
  return chosen.training_mask(probs, rng, capacity, gumbel_temperature)


def gate_log_prob(probs: jax.Array, block_mask: jax.Array, mode: str, estimator: str,
                  capacity: int | None) -> jax.Array:
  """``log pi(mask)``: under the estimator's own training distribution in ``mode='sample'``
  (the log-probability its score-function term differentiates), else under the factorised
  Bernoulli policy.

  Args:
    probs: ``[batch, blocks]`` block probabilities.
    block_mask: ``[batch, blocks]`` the applied 0/1 mask.
    mode: the gate mode.
    estimator: a registered estimator name.
    capacity: blocks per example (estimators that need one).

  Returns:
    ``[batch]`` log-probabilities, differentiable w.r.t. ``probs``.
  """
  chosen = estimators.get(estimator)
  if mode == "sample" and chosen.log_prob is not None:
    return chosen.log_prob(probs, block_mask, capacity)
  return policy_lib.mask_log_prob(probs, block_mask)


def gate(module: nn.Module, policy_input: jax.Array, num_blocks: int, mode: str,
         capacity: int | None, block_mask: jax.Array | None) -> GateAux:
  """The gate shared by every gated module: policy, mask and its log-probability.

  Must be called inside ``module``'s compact ``__call__``; the policy becomes its
  sub-module :data:`POLICY_MODULE_NAME`.

  Args:
    module: the gated module (reads its ``policy_eps``, ``policy_init_prob``,
      ``estimator``, ``gumbel_temperature`` and, if it has one, ``policy_hidden``).
    policy_input: ``[batch, in]`` what the policy reads (under ``stop_gradient``).
    num_blocks: gated blocks.
    mode: see :func:`make_block_mask`.
    capacity: blocks per example for ``top_k``.
    block_mask: optional ``[batch, blocks]`` mask used instead of the policy's own (the
      masked-dense reference of sparse inference); ``log_prob`` is still computed.

  Returns:
    the layer's :class:`GateAux`.
  """
  probs = BlockPolicy(num_blocks, eps=module.policy_eps, init_prob=module.policy_init_prob,
                      hidden_units=getattr(module, "policy_hidden", 0),
                      rank=getattr(module, "policy_rank", 0),
                      name=POLICY_MODULE_NAME)(jax.lax.stop_gradient(policy_input))
  draws = (block_mask is None and mode == "sample"
           and estimators.get(module.estimator).needs_rng)
  return gate_aux(probs, mode, module.estimator, rng=module.make_rng("gate") if draws else None,
                  capacity=capacity, block_mask=block_mask,
                  gumbel_temperature=module.gumbel_temperature)


def gate_aux(probs: jax.Array, mode: str, estimator: str, *, rng: jax.Array | None = None,
             capacity: int | None = None, block_mask: jax.Array | None = None,
             gumbel_temperature: float = 0.5) -> GateAux:
  """A gate's mask and log-probability from its probabilities (pure; Linen and NNX).

  Args:
    probs: ``[..., blocks]`` block probabilities.
    mode: see :func:`make_block_mask`.
    estimator: a registered estimator name.
    rng: PRNG key for ``mode='sample'`` with an estimator that draws at random.
    capacity: blocks per example for ``top_k`` / ``capped`` / top-k estimators.
    block_mask: optional ``[..., blocks]`` mask used instead of the policy's own (the
      masked-dense reference of sparse inference); ``log_prob`` is still computed.
    gumbel_temperature: temperature of the ``gumbel`` estimator.

  Returns:
    the layer's :class:`GateAux`.
  """
  if block_mask is None:
    block_mask = make_block_mask(probs, mode, estimator, rng=rng, capacity=capacity,
                                 gumbel_temperature=gumbel_temperature)
  else:
    block_mask = jax.lax.stop_gradient(jnp.asarray(block_mask, probs.dtype))
    if block_mask.shape != probs.shape:
      raise ValueError(f"block_mask must have shape {probs.shape}, got {block_mask.shape}")
  return GateAux(probs=probs, mask=block_mask,
                 log_prob=gate_log_prob(probs, block_mask, mode, estimator, capacity))


def policy_init_logit(init_prob: float, eps: float) -> float:
  """The policy bias ``d`` that makes the initial block probability ``init_prob`` (the
  ``eps`` squash of :func:`ccjax.policy_probs` undone)."""
  squashed = (init_prob - eps) / (1.0 - 2.0 * eps)
  return _logit(min(max(squashed, 1e-4), 1.0 - 1e-4))


class BlockPolicy(nn.Module):
  """``probs = eps + (1 - 2 eps) sigmoid(h @ Z + d)``, one probability per block.

  With ``hidden_units > 0`` the policy is a one-hidden-layer MLP, ``h`` replaced by
  ``relu(h @ V + c)`` (``hidden_units`` units): a cheap non-linear policy where the
  linear one reads raw inputs. With ``rank > 0`` the policy stays linear but ``Z = A B``
  is factorised (``h A``: ``rank`` features, no bias), ``in * rank + rank * blocks`` MACs
  instead of ``in * blocks``. Its parameters stay under the same ``policy`` sub-module
  (so :func:`is_policy_path` gives them to the policy optimizer).

  Attributes:
    num_blocks: number of gated blocks.
    eps: probability bound, see :func:`ccjax.policy.policy_probs`.
    init_prob: initial probability of every block (sets the bias ``d``).
    kernel_scale: variance scale of the initial ``Z``.
    hidden_units: width of the hidden layer, >= 0 (0: the linear policy).
    rank: rank of the factorised ``Z``, >= 0 (0: the full matrix); not with ``hidden_units``.
  """
  num_blocks: int
  eps: float = policy_lib.DEFAULT_EPS
  init_prob: float = 0.5
  kernel_scale: float = 0.1
  hidden_units: int = 0
  rank: int = 0

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Maps ``inputs [batch, in]`` to ``probs [batch, blocks]`` (float32)."""
    validate_policy_hidden(self.hidden_units)
    validate_policy_rank(self.rank, self.hidden_units)
    if self.rank:
      inputs = nn.Dense(self.rank, use_bias=False, name=_POLICY_FACTOR_NAME, dtype=jnp.float32,
                        kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "normal"))(
                            inputs.astype(jnp.float32))
    if self.hidden_units:
      inputs = nn.relu(nn.Dense(self.hidden_units, name=_POLICY_HIDDEN_NAME,
                                dtype=jnp.float32)(inputs.astype(jnp.float32)))
    logits = nn.Dense(
        self.num_blocks, name=_POLICY_DENSE_NAME, dtype=jnp.float32,
        kernel_init=nn.initializers.variance_scaling(self.kernel_scale, "fan_in", "normal"),
        bias_init=nn.initializers.constant(policy_init_logit(self.init_prob, self.eps)))(
            inputs.astype(jnp.float32))
    return policy_lib.policy_probs(logits, self.eps)


def require_linear_policy(module: nn.Module) -> None:
  """Raises ``ValueError`` (one line) if ``module``'s policies have a hidden layer.

  Sparse inference (:func:`ccjax.make_inference`, its kernels and layouts) runs the
  linear policy only; a model with ``policy_hidden > 0`` is evaluated masked-dense
  (``module.apply``).
  """
  hidden_units = getattr(module, "policy_hidden", 0)
  if hidden_units:
    raise ValueError(f"sparse inference supports only the linear policy, this "
                     f"{type(module).__name__} has policy_hidden={hidden_units}; evaluate it "
                     "with module.apply (masked dense)")


DENSE_MODULE_NAME = "dense"     # the Dense inside GatedDense
OUTPUT_MODULE_NAME = "output"   # GatedMLP's output layer


class LayerWeights(NamedTuple):
  """Kernel and bias of one dense or conv layer.

  Attributes:
    kernel: ``[in, out]`` (dense) or ``[k, k, in, out]`` (conv).
    bias: ``[out]``.
  """
  kernel: jax.Array
  bias: jax.Array


class GatedDenseWeights(NamedTuple):
  """Weights of one :class:`GatedDense` layer.

  Attributes:
    dense: the layer's :class:`LayerWeights` (``kernel [in, units]``).
    policy: the policy's :class:`LayerWeights` (``kernel [in, blocks]``), ``None`` when
      the layer is ungated.
  """
  dense: LayerWeights
  policy: LayerWeights | None


def layer_weights(dense_params) -> LayerWeights:
  """The :class:`LayerWeights` of a ``flax.linen.Dense`` / ``Conv`` parameter dict."""
  return LayerWeights(kernel=dense_params["kernel"], bias=dense_params["bias"])


def policy_weights(gated_layer_params) -> LayerWeights:
  """The policy's :class:`LayerWeights` inside one gated layer's parameters; a factorised
  policy (``policy_rank > 0``) is folded into one ``kernel [in, blocks] = A B``.

  Raises:
    ValueError: the policy has a hidden layer (it is not one linear map).
  """
  policy = gated_layer_params[POLICY_MODULE_NAME]
  if _POLICY_HIDDEN_NAME in policy:
    raise ValueError("this policy has a hidden layer (policy_hidden > 0): it is not one "
                     "linear map, and sparse inference supports only the linear policy")
  weights = layer_weights(policy[_POLICY_DENSE_NAME])
  if _POLICY_FACTOR_NAME in policy:
    return weights._replace(kernel=policy[_POLICY_FACTOR_NAME]["kernel"] @ weights.kernel)
  return weights


def policy_input_kernel_path(gated_layer_params) -> tuple[str, ...] | None:
  """Path, inside one gated layer's parameters, of the policy matrix whose rows are the
  layer's input features (the rank factor ``A``, the hidden layer, or ``Z``); ``None``
  for an ungated layer."""
  policy = gated_layer_params.get(POLICY_MODULE_NAME)
  if policy is None:
    return None
  for name in (_POLICY_FACTOR_NAME, _POLICY_HIDDEN_NAME, _POLICY_DENSE_NAME):
    if name in policy:
      return (POLICY_MODULE_NAME, name, "kernel")
  return None


def with_policy_bias(params, layer_name: str, bias: jax.Array):
  """A copy of ``params`` whose gated layer ``layer_name`` has policy bias ``bias``."""
  layer = dict(params[layer_name])
  policy = dict(layer[POLICY_MODULE_NAME])
  policy[_POLICY_DENSE_NAME] = {**policy[_POLICY_DENSE_NAME], "bias": bias}
  layer[POLICY_MODULE_NAME] = policy
  return {**params, layer_name: layer}


class GatedDense(gate_settings_lib.GateFields):
  """A dense layer whose output units are switched on and off in blocks.

  ``y = mask(policy(stop_gradient(x))) * activation(x @ W + b)``. Training computes the
  dense product and then masks; :mod:`ccjax.inference` computes only active blocks.

  Attributes:
    features: output units; must be a multiple of ``block_size``.
    activation: elementwise nonlinearity applied before masking.
    block_size, gated, estimator, policy_init_prob, policy_eps, policy_hidden,
      gumbel_temperature, dtype: the :class:`ccjax.GateSettings` fields (keyword-only;
      ``module.gate_settings`` reads them back); ``policy_init_prob`` is one value here.
  """
  features: int
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  def __post_init__(self):
    gating.validate_block_size(self.features, self.block_size, "features")
    self.gate_settings.validate(num_gated_layers=1)
    super().__post_init__()

  @property
  def num_blocks(self) -> int:
    return self.features // self.block_size

  @nn.compact
  def __call__(self, inputs: jax.Array, *, mode: str = "sample",
               capacity: int | None = None, block_mask: jax.Array | None = None
               ) -> tuple[jax.Array, GateAux | None]:
    """Applies the layer.

    Args:
      inputs: ``[batch, in]`` or ``[..., in]`` (one mask per leading index).
      mode: ``sample`` | ``threshold`` | ``top_k`` | ``all`` (see :func:`make_block_mask`),
        or :data:`ACTIVATION_TOP_K` (training-free, from the activations' block norms).
      capacity: blocks per example (per position) for ``top_k`` / ``activation_top_k``.
      block_mask: optional ``[..., blocks]`` mask used instead of the policy's own.

    Returns:
      ``(y [..., units], aux)``; ``aux`` is ``None`` for an ungated layer.
    """
    validate_layer_mode(mode, LAYER_MODES)
    outputs = self.activation(
        nn.Dense(self.features, name=DENSE_MODULE_NAME, dtype=self.dtype)(inputs))
    if mode == ACTIVATION_TOP_K and block_mask is None:
      block_mask = activation_top_k_mask(outputs, self.num_blocks, capacity)
      if not self.gated:
        return gating.apply_block_mask(outputs, block_mask), None
      mode = "all"  # the policy still runs, for its log-probability of block_mask.
    if not self.gated:
      return outputs, None
    aux = gate(self, inputs, self.num_blocks, mode, capacity, block_mask)
    aux = aux._replace(block_norms=activation_block_norms(outputs, self.num_blocks))
    return gating.apply_block_mask(outputs, aux.mask), aux


class GatedMLP(gate_settings_lib.GateFields):
  """Gated hidden layers followed by a plain linear output layer.

  With ``gated=False`` the same module is the dense baseline (same parameters minus
  the policies).

  Attributes:
    hidden: widths of the hidden layers, each a multiple of ``block_size``.
    num_classes: output logits.
    flatten: inputs ``[batch, ...]`` are flattened to ``[batch, in]`` (one mask per
      example); ``False`` keeps ``[..., in]`` and gives one mask per leading index (per
      token: ``[batch, seq, in]`` -> masks ``[batch, seq, blocks]``, logits ``[batch,
      seq, num_classes]``).
    block_size, gated, estimator, policy_init_prob, policy_eps, policy_hidden,
      gumbel_temperature, dtype: the :class:`ccjax.GateSettings` fields (keyword-only),
      given to every hidden layer; ``policy_init_prob`` is one value or one per hidden
      layer.
  """
  hidden: Sequence[int]
  num_classes: int
  flatten: bool = True

  def __post_init__(self):
    if len(self.hidden) == 0:
      raise ValueError("hidden must list at least one width")
    for index, width in enumerate(self.hidden):
      gating.validate_block_size(width, self.block_size, f"hidden[{index}]")
    if not isinstance(self.num_classes, int) or self.num_classes < 2:
      raise ValueError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
    self.gate_settings.validate(num_gated_layers=len(self.hidden))
    super().__post_init__()

  def gate_names(self) -> tuple[str, ...]:
    """Sub-module names of the gated layers, in the order of ``aux``."""
    return tuple(f"hidden_{index}" for index in range(len(self.hidden)))

  def hidden_weights(self, params) -> tuple[GatedDenseWeights, ...]:
    """The hidden layers' weights (``policy=None`` when ungated), in forward order."""
    return tuple(GatedDenseWeights(
        dense=layer_weights(params[name][DENSE_MODULE_NAME]),
        policy=policy_weights(params[name]) if POLICY_MODULE_NAME in params[name] else None)
                 for name in self.gate_names())

  def output_weights(self, params) -> LayerWeights:
    """The output layer's weights (``kernel [hidden[-1], num_classes]``)."""
    return layer_weights(params[OUTPUT_MODULE_NAME])

  @nn.compact
  def __call__(self, inputs: jax.Array, *, mode: str = "sample",
               capacity: int | Sequence[int] | None = None,
               block_masks: Sequence[jax.Array] | None = None
               ) -> tuple[jax.Array, tuple[GateAux | None, ...]]:
    """Applies the network.

    Args:
      inputs: ``[batch, ...]``, flattened to ``[batch, in]`` (``flatten=False``: ``[..., in]``).
      mode: gate mode for every hidden layer (see :class:`GatedDense`).
      capacity: blocks per example for ``top_k``: one value or one per layer.
      block_masks: optional ``[batch, blocks]`` masks, one per hidden layer, used instead
        of the policies' own (masked-dense reference of sparse inference).

    Returns:
      ``(logits [batch, num_classes], aux)`` with one :class:`GateAux` (or ``None``
      when ungated) per hidden layer.
    """
    hidden = inputs.reshape(inputs.shape[0], -1) if self.flatten else inputs
    num_layers = len(self.hidden)
    capacities = (None,) * num_layers if capacity is None else validation.per_layer_values(
        capacity, num_layers, "capacity")
    if block_masks is not None and len(block_masks) != num_layers:
      raise ValueError(f"block_masks needs one mask per gated layer ({num_layers}), "
                       f"got {len(block_masks)}")
    aux = []
    for index, (width, name) in enumerate(zip(self.hidden, self.gate_names())):
      hidden, layer_aux = GatedDense(
          width, name=name, **self.gate_settings.layer(index, num_layers).as_kwargs())(hidden, mode=mode, capacity=capacities[index],
                     block_mask=None if block_masks is None else block_masks[index])
      aux.append(layer_aux)
    logits = nn.Dense(self.num_classes, name=OUTPUT_MODULE_NAME, dtype=self.dtype)(hidden)
    return logits, tuple(aux)


def is_policy_path(path: Sequence[Any]) -> bool:
  """True for a parameter path that belongs to a gate policy (the one rule for it)."""
  return any(getattr(entry, "key", entry) == POLICY_MODULE_NAME for entry in path)


def strip_policy_params(params) -> Any:
  """The network part of a gated model's parameters (every policy sub-tree removed).

  The result is the parameter tree of the same model built with ``gated=False``.
  """
  if isinstance(params, dict) or hasattr(params, "items"):
    return {key: strip_policy_params(value) for key, value in params.items()
            if not is_policy_path((key,))}
  return params


def param_labels(params) -> Any:
  """Pytree of ``'policy'`` / ``'network'`` labels matching ``params``."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "policy" if is_policy_path(path) else "network", params)
