"""The jitted train step: task loss, REINFORCE and policy regularizers together.

Axis letters: ``batch`` examples, ``layers`` gated hidden layers, ``blocks`` blocks of a
layer.

One scalar objective is differentiated once:

``task_loss + l2 * L2 + REINFORCE + lambda_s * (L_b + L_e) + lambda_v * L_v``

and the gradients separate by construction: the policy reads ``stop_gradient`` of its
layer input and the REINFORCE cost is under ``stop_gradient``, so the network
parameters receive only the task-loss (+ L2) gradient; the sampled mask carries no
gradient, so the policy parameters receive only the REINFORCE + regularizer (+ L2)
gradient. (With the straight-through family, ``straight_through`` / ``gumbel`` /
``router`` / ``noisy_top_k``, the task loss does reach the policy through the mask, and
no REINFORCE term is added; which estimator does what is in :mod:`ccjax.estimators`.)
Optional terms (batch shaping, load balancing, recipes) add to the same objective. Each
parameter set has its own optax optimizer and learning rate (``optax.multi_transform``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ccjax import budget as budget_lib
from ccjax import distill
from ccjax import estimators
from ccjax import layers
from ccjax import policy as policy_lib
from ccjax import regularizers
from ccjax import schedules
from ccjax import validation

OPTIMIZERS = ("adam", "sgd", "momentum")
# What a token model's REINFORCE cost is: the sequence's loss (unbiased) or each
# position's own loss (biased; see policy_objective).
REINFORCE_COSTS = ("sequence", "position")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyperparameters of the train step, validated at construction.

  Attributes:
    tau: target fraction of active blocks, one value or one per gated layer, in (0, 1].
    lambda_s: weight of ``L_b + L_e``, >= 0.
    lambda_v: weight of ``L_v``, >= 0.
    l2: weight of the squared-kernel penalty (network and policy), >= 0.
    lr: network learning rate, > 0.
    policy_lr: policy learning rate, > 0.
    optimizer: ``adam`` | ``sgd`` | ``momentum`` (momentum 0.9), for both parameter sets.
    baseline: ``none`` | ``batch_mean`` (leave-one-out) | ``ema``.
    baseline_decay: decay of the ``ema`` baseline, in [0, 1).
    estimator: a name in :data:`ccjax.estimators.REGISTRY`: ``reinforce`` |
      ``straight_through`` | ``gumbel`` | ``router`` | ``reinforce_top_k`` |
      ``noisy_top_k``; must match the model's. The top-k estimators (``router``: the
      ``top_k_capacity(tau, blocks)`` most probable blocks, straight-through;
      ``reinforce_top_k``: that many blocks drawn from the Bernoulli policy conditioned on
      the count, REINFORCE; ``noisy_top_k``: top-k of log-odds + Gumbel noise,
      straight-through) train every example on exactly that many blocks (the final
      ``tau`` even under a curriculum); evaluate them with the ``top_k`` policy.
    skip_nonfinite: if True, a step whose loss or gradients are NaN/Inf leaves the
      parameters and optimizer states unchanged (the step counter still advances and
      ``metrics['finite']`` is 0); otherwise the update is applied and the caller
      is expected to stop (see :mod:`ccjax.loop`).
    max_grad_norm: optional global-norm clipping of each parameter set's gradient.
    warm_steps: dense warm start: the first ``warm_steps`` updates run every block
      (``mode='all'``); the policy then learns only its regularizers (no REINFORCE, no
      dual ascent), >= 0.
    tau_schedule: ``constant`` | ``linear`` | ``cosine``: the target moves from 1 to
      ``tau`` over ``tau_schedule_steps`` steps, beginning after the warm start.
    tau_schedule_steps: length of the tau curriculum, >= 0.
    distill_weight: weight of the distillation loss towards the teacher (the same net
      with every block on, or a dense run), >= 0; 0 turns it off.
    distill_temperature: distillation temperature, > 0.
    entropy_weight: weight of the policy-entropy penalty (polarises the probabilities
      towards 0/1 so that the sampled and the threshold masks agree), >= 0.
    entropy_ramp_steps: the entropy weight grows linearly from 0 over this many steps
      after the warm start, >= 0 (0: full weight at once).
    budget: ``penalty`` (only the fixed ``lambda_s`` penalties) | ``lagrange`` (plus one
      multiplier per layer on ``mean prob - tau``, updated by dual ascent).
    dual_lr: step size of the dual ascent, >= 0.
    advantage: REINFORCE advantage, ``raw`` (``c - b``) | ``standardized`` (per batch).
    reinforce_cost: token models (loss ``[batch, seq]``) only: ``sequence`` (the cost of
      all of a sequence's masks is its mean loss: unbiased) or ``position`` (each
      position's masks are charged that position's loss only: biased, lower variance).
    batch_shaping_weight: weight of the batch-shaping prior ``L_bs`` (Bejnordi et al.
      2020; :func:`ccjax.regularizers.batch_shaping_loss`), >= 0; 0 turns it off.
    batch_shaping_steps: the batch-shaping weight decays linearly to 0 over this many
      steps after the warm start (the paper anneals it), >= 0 (0: constant).
    batch_shaping_concentration: ``a + b`` of the Beta prior whose mean is each layer's
      tau, > 0 (1: the paper's Beta(0.6, 0.4) shape).
    distill_teacher: with ``distill_weight > 0`` and no teacher run: ``all_on`` (the
      same network with every block on, live) or ``snapshot`` (pretrain-then-gate: the
      network as it was after the ``warm_steps`` dense steps, frozen in
      ``TrainState.distill_snapshot``; needs ``warm_steps > 0``).
    load_balance_weight: weight of the Switch-style load-balancing loss of every gated
      layer (:func:`ccjax.regularizers.load_balance_loss`: ``n sum_j f_j P_j`` over the
      blocks' shares of the masks and of the probability), >= 0; 0 turns it off. Meant for
      the top-k estimators (``router``, ...): ``L_b`` balances each block's mean
      probability, this how often each block actually runs.
    imitation_weight: weight of the policy-imitation loss of every gated layer
      (:func:`ccjax.regularizers.imitation_loss`: the policy's probabilities towards the
      layer's ``round(tau * blocks)`` blocks of largest activation norm), in every phase,
      the dense warm start included (dense-to-sparse); >= 0, 0: off. Needs layers that
      report their activations' block norms (:class:`ccjax.GatedDense`: MLPs and the
      transformer's MLPs).
  """
  tau: float | Sequence[float] = 0.25
  lambda_s: float = 2.0
  lambda_v: float = 0.5
  l2: float = 1e-5
  lr: float = 1e-3
  policy_lr: float = 1e-3
  optimizer: str = "adam"
  baseline: str = "ema"
  baseline_decay: float = 0.99
  estimator: str = "reinforce"
  skip_nonfinite: bool = False
  max_grad_norm: float | None = None
  warm_steps: int = 0
  tau_schedule: str = "constant"
  tau_schedule_steps: int = 0
  distill_weight: float = 0.0
  distill_temperature: float = 1.0
  entropy_weight: float = 0.0
  entropy_ramp_steps: int = 0
  budget: str = "penalty"
  dual_lr: float = 0.01
  advantage: str = "raw"
  reinforce_cost: str = "sequence"
  batch_shaping_weight: float = 0.0
  batch_shaping_steps: int = 0
  batch_shaping_concentration: float = regularizers.BATCH_SHAPING_CONCENTRATION
  distill_teacher: str = "all_on"
  load_balance_weight: float = 0.0
  imitation_weight: float = 0.0

  def __post_init__(self):
    taus = (self.tau,) if isinstance(self.tau, (int, float)) else tuple(self.tau)
    if not taus:
      raise validation.ConfigError("tau", "must hold one value or one per gated layer")
    for value in taus:
      validation.check_float("tau", value, low=0.0, high=1.0, low_open=True)
    for name in ("lambda_s", "lambda_v", "l2"):
      validation.check_float(name, getattr(self, name), low=0.0)
    for name in ("lr", "policy_lr"):
      validation.check_float(name, getattr(self, name), low=0.0, low_open=True)
    validation.check_choice("optimizer", self.optimizer, OPTIMIZERS)
    validation.check_choice("baseline", self.baseline, estimators.BASELINES)
    validation.check_float("baseline_decay", self.baseline_decay, low=0.0, high=1.0,
                           high_open=True)
    validation.check_choice("estimator", self.estimator, estimators.ESTIMATORS)
    if self.max_grad_norm is not None:
      validation.check_float("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
    for name in ("warm_steps", "tau_schedule_steps", "entropy_ramp_steps"):
      validation.check_int(name, getattr(self, name), minimum=0)
    validation.check_choice("tau_schedule", self.tau_schedule, schedules.TAU_SCHEDULES)
    for name in ("distill_weight", "entropy_weight", "dual_lr"):
      validation.check_float(name, getattr(self, name), low=0.0)
    validation.check_float("distill_temperature", self.distill_temperature, low=0.0,
                           low_open=True)
    validation.check_choice("budget", self.budget, budget_lib.BUDGETS)
    validation.check_choice("advantage", self.advantage, estimators.ADVANTAGES)
    validation.check_choice("reinforce_cost", self.reinforce_cost, REINFORCE_COSTS)
    validation.check_float("batch_shaping_weight", self.batch_shaping_weight, low=0.0)
    validation.check_int("batch_shaping_steps", self.batch_shaping_steps, minimum=0)
    validation.check_float("batch_shaping_concentration", self.batch_shaping_concentration,
                           low=0.0, low_open=True)
    validation.check_choice("distill_teacher", self.distill_teacher, distill.TEACHERS)
    validation.check_float("load_balance_weight", self.load_balance_weight, low=0.0)
    validation.check_float("imitation_weight", self.imitation_weight, low=0.0)
    if self.distill_teacher == "snapshot" and (self.warm_steps == 0 or self.distill_weight == 0):
      raise validation.ConfigError(
          "distill_teacher", "=snapshot distils from the network at the end of the dense "
          f"warm start: needs --warm_steps > 0 and --distill_weight > 0, got warm_steps="
          f"{self.warm_steps}, distill_weight={self.distill_weight}")

  def taus(self, num_layers: int) -> tuple[float, ...]:
    """``tau`` (one value, a 1-tuple, or one per layer) with one value per gated layer."""
    tau = self.tau
    if not isinstance(tau, (int, float)) and len(tau) == 1:
      tau = tau[0]
    return tuple(float(value) for value in validation.per_layer_values(tau, num_layers, "tau"))

  def taus_at(self, step: jax.Array | int, num_layers: int) -> jax.Array | tuple[float, ...]:
    """The targets in force at ``step``: ``taus()`` without a curriculum, else ``[layers]``
    float32 values of the schedule (which begins after the warm start)."""
    if self.tau_schedule == "constant":
      return self.taus(num_layers)
    return schedules.tau_at(step, self.taus(num_layers), self.tau_schedule,
                            begin=self.warm_steps, length=self.tau_schedule_steps)

  def initial_taus(self, num_layers: int) -> tuple[float, ...]:
    """The targets at step 0 (what the policies are initialised to)."""
    return tuple(float(value) for value in np.asarray(self.taus_at(0, num_layers)).reshape(-1))


@flax.struct.dataclass
class TrainState:
  """Everything an exact resume needs.

  Attributes:
    step: scalar int32, number of updates done.
    params: model parameters (network and policy).
    opt_state: optimizer state of both parameter sets.
    baseline: moving-average baseline state.
    rng: the run's base PRNG key (uint32[2]); step keys are ``fold_in(rng, step)``.
    duals: ``[layers]`` Lagrange multipliers of the ``lagrange`` budget, else ``None``.
    distill_snapshot: with ``distill_teacher='snapshot'``, the parameters the
      distillation teacher uses: a copy of ``params`` up to and including step
      ``warm_steps``, frozen from then on (the network after the dense warm start);
      else ``None``.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  baseline: estimators.BaselineState
  rng: jax.Array
  duals: Any = None
  distill_snapshot: Any = None


def _base_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  if name == "adam":
    return optax.adam(learning_rate)
  if name == "momentum":
    return optax.sgd(learning_rate, momentum=0.9)
  return optax.sgd(learning_rate)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Two optimizers, one for the network parameters and one for the policies."""

  def build(learning_rate):
    parts = [_base_optimizer(config.optimizer, learning_rate)]
    if config.max_grad_norm is not None:
      parts.insert(0, optax.clip_by_global_norm(config.max_grad_norm))
    return optax.chain(*parts)

  return optax.multi_transform(
      {"network": build(config.lr), "policy": build(config.policy_lr)}, layers.param_labels)


def init_train_state(model: nn.Module, config: TrainConfig, rng: jax.Array,
                     sample_input: jax.Array) -> TrainState:
  """Initialises parameters, optimizer and baseline states.

  Args:
    model: a module returning ``(logits, aux)`` (e.g. :class:`ccjax.GatedMLP`).
    config: train hyperparameters.
    rng: base key; parameters use ``fold_in(rng, -1)``-style derived keys.
    sample_input: ``[batch, ...]`` an input of the right shape (values unused).

  Returns:
    a :class:`TrainState` at step 0.
  """
  init_key, gate_key, run_key = jax.random.split(rng, 3)
  variables, aux = _init_with_aux(model, init_key, gate_key, sample_input)
  params = variables["params"]
  opt_state = make_optimizer(config).init(params)
  duals = None
  num_gated = sum(layer_aux is not None for layer_aux in aux)
  if config.budget == "lagrange" and num_gated:
    duals = jnp.zeros((num_gated,), jnp.float32)
  distill_snapshot = None
  if config.distill_teacher == "snapshot" and num_gated:
    distill_snapshot = jax.tree_util.tree_map(jnp.copy, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    baseline=estimators.init_baseline_state(), rng=run_key, duals=duals,
                    distill_snapshot=distill_snapshot)


def _init_with_aux(model, init_key, gate_key, sample_input):
  """``model.init`` that also returns the ``aux`` of the init call (to count gates)."""
  def init_fn(rngs, x):
    (_, aux), variables = model.init_with_output(rngs, x, mode="all")
    return variables, aux
  variables, aux = init_fn({"params": init_key, "gate": gate_key}, sample_input)
  return variables, aux


def _global_norm(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return optax.global_norm(tree)


def _split_by_label(tree) -> tuple[Any, Any]:
  labels = layers.param_labels(tree)
  network = jax.tree_util.tree_map(lambda x, l: x if l == "network" else None, tree, labels)
  policy = jax.tree_util.tree_map(lambda x, l: x if l == "policy" else None, tree, labels)
  return network, policy


def check_model_matches(model: nn.Module, config: TrainConfig) -> None:
  """Raises ``ValueError`` if the estimator or the number of taus does not fit the model."""
  model_estimator = getattr(model, "estimator", config.estimator)
  if model_estimator != config.estimator:
    raise ValueError(f"estimator mismatch: model uses {model_estimator!r}, "
                     f"TrainConfig.estimator is {config.estimator!r}")
  if isinstance(model, layers.GatedMLP) and model.gated:
    config.taus(len(model.hidden))  # one tau or one per gated layer, checked before tracing


def reinforce_terms(gate_aux: Sequence[layers.GateAux], loss: jax.Array, reinforce_cost: str
                    ) -> tuple[jax.Array, jax.Array]:
  """The REINFORCE ``(cost, log_prob)`` pair, both ``[batch]`` or both ``[batch, seq]``.

  Classification (``loss [batch]``): the example's loss and the log-probability of all
  its masks. Token models (``loss [batch, seq]``, masks ``[batch, seq, blocks]``):

  * ``sequence``: cost = mean loss of the sequence, log-probability summed over layers
    and positions, ``[batch]``. The joint policy factorises as ``prod_{l,t} pi(u_lt |
    h_lt)`` (a later position's policy reads states that earlier masks changed, which the
    chain rule covers), so this is the score-function estimate of ``grad E[mean_t c_t]``:
    unbiased.
  * ``position``: cost = the position's own loss, log-probability of the masks at that
    position (summed over layers), ``[batch, seq]``. Biased: a mask at position ``t``
    also changes later positions' losses through attention, and those terms are
    dropped (``sum_t E[c_t grad log pi(u_t)]`` instead of ``sum_{t, t'} E[c_t' grad log
    pi(u_t)]``); in exchange the variance is much lower.

  Args:
    gate_aux: one :class:`GateAux` per gated layer.
    loss: ``[batch]`` or ``[batch, seq]`` task loss.
    reinforce_cost: ``sequence`` | ``position`` (ignored for ``[batch]`` losses).

  Returns:
    ``(cost, log_prob)``; ``cost`` under ``stop_gradient``.
  """
  cost = jax.lax.stop_gradient(loss)
  log_prob = sum(aux.log_prob for aux in gate_aux)
  if log_prob.shape != cost.shape:
    raise ValueError(f"mask log-probabilities {log_prob.shape} do not match the loss "
                     f"{cost.shape}")
  if cost.ndim == 2 and reinforce_cost == "sequence":
    return jnp.mean(cost, axis=1), jnp.sum(log_prob, axis=1)
  return cost, log_prob


def policy_objective(gate_aux: Sequence[layers.GateAux], per_example_loss: jax.Array,
                     config: TrainConfig, baseline_state: estimators.BaselineState, *,
                     taus: Sequence[float] | jax.Array | None = None,
                     duals: jax.Array | None = None, entropy_scale: jax.Array | float = 1.0,
                     reinforce_on: bool = True, batch_shaping_scale: jax.Array | float = 1.0
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """REINFORCE + ``lambda_s (L_b + L_e) + lambda_v L_v`` (+ recipe terms) over the gated layers.

  Args:
    gate_aux: one :class:`GateAux` per gated layer (``probs``/``mask`` ``[batch, blocks]``,
      or ``[batch, seq, blocks]`` for token models).
    per_example_loss: ``[batch]`` (or ``[batch, seq]``) the examples' own task loss
      (cross-entropy, never the distillation term); the REINFORCE cost (no gradient), see
      :func:`reinforce_terms`.
    config: hyperparameters (taus, lambdas, baseline, estimator, reinforce_cost, recipes).
    baseline_state: state of the ``ema`` baseline.
    taus: the targets in force (default ``config.taus``); one per layer.
    duals: ``[layers]`` Lagrange multipliers (``budget='lagrange'``), else ``None``.
    entropy_scale: scalar schedule factor of ``config.entropy_weight``.
    reinforce_on: ``False`` during the dense warm start (the masks were not sampled).
    batch_shaping_scale: scalar schedule factor of ``config.batch_shaping_weight``.

  Returns:
    ``(objective, terms)``: a scalar and a dict of scalar terms for logging; the
    regularizers take every (example, position) as one x.
  """
  if taus is None:
    taus = config.taus(len(gate_aux))
  if not isinstance(taus, tuple):
    taus = tuple(taus[index] for index in range(len(gate_aux)))
  cost, log_prob = reinforce_terms(gate_aux, per_example_loss, config.reinforce_cost)
  baseline = estimators.compute_baseline(config.baseline, cost, baseline_state,
                                         config.baseline_decay)
  if estimators.get(config.estimator).score_function and reinforce_on:
    if config.advantage == "standardized":
      reinforce = estimators.score_function_loss(
          log_prob, estimators.standardized_advantage(cost, baseline))
    else:
      reinforce = estimators.score_function_loss(log_prob, cost, baseline)
  else:
    reinforce = jnp.zeros((), jnp.float32)
  l_b = sum(regularizers.block_balance_loss(aux.probs, tau) for aux, tau in zip(gate_aux, taus))
  l_e = sum(regularizers.example_balance_loss(aux.probs, tau)
            for aux, tau in zip(gate_aux, taus))
  l_v = sum(regularizers.variance_loss(aux.probs) for aux in gate_aux)
  objective = reinforce + config.lambda_s * (l_b + l_e) + config.lambda_v * l_v
  mean_prob = jnp.stack([jnp.mean(aux.probs) for aux in gate_aux])
  terms = {
      "reinforce": reinforce, "l_b": l_b, "l_e": l_e, "l_v": l_v,
      "baseline": jnp.mean(baseline),
      "entropy": jnp.mean(sum(policy_lib.policy_entropy(aux.probs) for aux in gate_aux)),
      "active_fraction": jnp.stack([jnp.mean(aux.mask) for aux in gate_aux]),
      "mean_prob": mean_prob,
  }
  if config.entropy_weight > 0:
    # Mean entropy per block (nats), summed over layers: low when probabilities are 0/1.
    block_entropy = sum(jnp.mean(policy_lib.policy_entropy(aux.probs)) / aux.probs.shape[-1]
                        for aux in gate_aux)
    objective = objective + config.entropy_weight * entropy_scale * block_entropy
    terms["block_entropy"] = block_entropy
  if config.batch_shaping_weight > 0:
    l_bs = sum(regularizers.batch_shaping_loss(aux.probs, tau, config.batch_shaping_concentration)
               for aux, tau in zip(gate_aux, taus))
    objective = objective + config.batch_shaping_weight * batch_shaping_scale * l_bs
    terms["l_bs"] = l_bs
  if config.imitation_weight > 0:
    if any(aux.block_norms is None for aux in gate_aux):
      raise ValueError("imitation_weight > 0 needs gated layers that report their "
                       "activations' block norms (GatedDense: MLPs, transformer MLPs)")
    l_im = sum(regularizers.imitation_loss(
        aux.probs, aux.block_norms, policy_lib.top_k_capacity(tau, aux.probs.shape[-1]))
               for aux, tau in zip(gate_aux, config.taus(len(gate_aux))))
    objective = objective + config.imitation_weight * l_im
    terms["l_im"] = l_im
  if config.load_balance_weight > 0:
    l_lb = sum(regularizers.load_balance_loss(aux.probs, aux.mask) for aux in gate_aux)
    objective = objective + config.load_balance_weight * l_lb
    terms["l_lb"] = l_lb
  if duals is not None:
    target = jnp.stack([jnp.asarray(tau, jnp.float32) for tau in taus])
    objective = objective + budget_lib.lagrangian_term(duals, mean_prob, target)
    terms["tau_target"] = target
  return objective, terms


def top_k_capacities(model: nn.Module, params, x: jax.Array, config: TrainConfig
                     ) -> tuple[int, ...]:
  """Blocks per example of each gated layer at the final targets: ``round(tau * blocks)``.

  Args:
    model: a module whose every layer with an ``aux`` is gated.
    params: its parameters (only shapes are read).
    x: ``[batch, ...]`` an input (only its shape is read; tracers are fine).
    config: gives ``taus`` (one per gated layer).

  Returns:
    one capacity per layer, for ``model.apply(..., capacity=...)``.
  """
  aux = jax.eval_shape(lambda p, inputs: model.apply({"params": p}, inputs, mode="all")[1],
                       params, x)
  if any(layer_aux is None for layer_aux in aux):
    raise ValueError("top-k capacities need every layer of the model gated")
  return tuple(policy_lib.top_k_capacity(tau, layer_aux.probs.shape[-1])
               for layer_aux, tau in zip(aux, config.taus(len(aux))))


def _uses_recipes(config: TrainConfig) -> bool:
  return (config.warm_steps > 0 or config.tau_schedule != "constant"
          or config.distill_weight > 0 or config.entropy_weight > 0
          or config.budget != "penalty" or config.batch_shaping_weight > 0)


Teacher = Callable[[jax.Array], jax.Array]


def make_train_step(model: nn.Module, config: TrainConfig, teacher: Teacher | None = None
                    ) -> Callable[[TrainState, dict[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """Builds the pure train step ``(state, batch) -> (state, metrics)``.

  Args:
    model: a module called as ``model.apply(vars, x, mode='sample', rngs={'gate': k})``
      and returning ``(logits [batch, classes], aux)`` with one ``GateAux`` or ``None``
      per hidden layer, or, for token models, ``(logits [batch, seq, vocab], aux)``
      with per-position masks.
    config: hyperparameters.
    teacher: ``x [batch, ...] -> logits [batch, classes]`` of a distillation teacher (a
      dense run); ``None`` with ``distill_weight > 0`` distils from the same network
      with every block on (``mode='all'``, under ``stop_gradient``): the live network,
      or with ``distill_teacher='snapshot'`` its parameters frozen after the warm start
      (``state.distill_snapshot``).

  Returns:
    the un-jitted step; wrap it in ``jax.jit(step, donate_argnums=0)``. The batch is a
    dict with ``x [batch, ...]`` and integer ``y [batch]`` (``[batch, seq]`` next tokens
    for token models; ``loss`` is then the mean over tokens, in nats). Metrics are scalars
    except ``active_fraction`` and ``mean_prob``, ``[layers]``.
  """
  check_model_matches(model, config)
  if teacher is not None and config.distill_teacher == "snapshot":
    raise ValueError("distill_teacher='snapshot' distils from the run's own warm-start "
                     "snapshot; it cannot be combined with a teacher run")
  optimizer = make_optimizer(config)
  gated_model = getattr(model, "gated", True)
  recipes_on = gated_model and _uses_recipes(config)

  def objective(params, batch, step_key, baseline_state, step, duals, snapshot, warm):
    mode = "all" if warm else "sample"
    # Only estimators that train on top-k masks (e.g. the router) are told their
    # capacity: other models need no ``capacity`` argument.
    routing = {}
    if gated_model and estimators.get(config.estimator).needs_capacity and not warm:
      routing["capacity"] = top_k_capacities(model, params, batch["x"], config)
    logits, aux = model.apply({"params": params}, batch["x"], mode=mode,
                              rngs={"gate": step_key}, **routing)
    labels = batch["y"]
    per_example_loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    task_loss = jnp.mean(per_example_loss)
    l2 = config.l2 * regularizers.l2_loss(params)
    metrics = {
        "loss": task_loss,
        "error": jnp.mean((jnp.argmax(logits, -1) != labels).astype(jnp.float32)),
        "l2": l2,
    }
    total = task_loss + l2
    if recipes_on and config.distill_weight > 0:
      if teacher is not None:
        teacher_logits = teacher(batch["x"])
      elif warm:
        teacher_logits = logits  # the student is the all-on network: nothing to distil
      else:
        teacher_params = snapshot if config.distill_teacher == "snapshot" else params
        teacher_logits = model.apply({"params": teacher_params}, batch["x"], mode="all")[0]
      distill_loss = jnp.mean(distill.distillation_loss(
          logits, jax.lax.stop_gradient(teacher_logits), config.distill_temperature))
      total = total + config.distill_weight * distill_loss
      metrics["distill"] = distill_loss
    gate_aux = [layer_aux for layer_aux in aux if layer_aux is not None]
    if gate_aux:
      extra = {}
      if recipes_on:
        extra = {"taus": config.taus_at(step, len(gate_aux)), "duals": duals,
                 "reinforce_on": not warm,
                 "entropy_scale": schedules.ramp(step, begin=config.warm_steps,
                                                 length=config.entropy_ramp_steps),
                 "batch_shaping_scale": schedules.anneal(step, begin=config.warm_steps,
                                                         length=config.batch_shaping_steps)}
      # The REINFORCE cost is the examples' own task loss (never the distillation term).
      policy_loss, terms = policy_objective(gate_aux, per_example_loss, config,
                                            baseline_state, **extra)
      total = total + policy_loss
      metrics.update(terms)
    metrics["objective"] = total
    return total, (metrics, per_example_loss)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def gradients(state, batch, step_key, snapshot):
    args = (state.params, batch, step_key, state.baseline, state.step, state.duals, snapshot)
    if not recipes_on or config.warm_steps == 0:
      return grad_fn(*args, False)
    return jax.lax.cond(state.step < config.warm_steps,
                        lambda *a: grad_fn(*a, True), lambda *a: grad_fn(*a, False), *args)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    step_key = jax.random.fold_in(state.rng, state.step)
    snapshot = _distill_snapshot(state, config.warm_steps)
    (total, (metrics, per_example_loss)), grads = gradients(state, batch, step_key, snapshot)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_baseline = estimators.update_baseline_state(state.baseline, per_example_loss,
                                                    config.baseline_decay)
    network_grads, policy_grads = _split_by_label(grads)
    finite = jnp.isfinite(total) & jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
    metrics.update({
        "grad_norm_network": _global_norm(network_grads),
        "grad_norm_policy": _global_norm(policy_grads),
        "param_norm": _global_norm(state.params),
        "finite": finite.astype(jnp.float32),
    })
    new_state = state.replace(step=state.step + 1, params=new_params,
                              opt_state=new_opt_state, baseline=new_baseline)
    if state.duals is not None and "tau_target" in metrics:
      moved = budget_lib.dual_update(state.duals, metrics["mean_prob"], metrics["tau_target"],
                                     config.dual_lr)
      # No dual ascent during the warm start: the masks were all on.
      new_state = new_state.replace(duals=jnp.where(state.step < config.warm_steps,
                                                    state.duals, moved))
      metrics["duals"] = new_state.duals
    if config.skip_nonfinite:
      kept = state.replace(step=state.step + 1)
      new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                         new_state, kept)
    # Taken from the step's input parameters, so a skipped step cannot spoil it.
    new_state = new_state.replace(distill_snapshot=snapshot)
    return new_state, metrics

  return train_step


def _distill_snapshot(state: TrainState, warm_steps: int):
  """The teacher parameters of this step: ``state.params`` until step ``warm_steps``
  (inclusive: the network after the warm start's updates), then the frozen copy."""
  if state.distill_snapshot is None:
    return None
  in_warm_start = state.step <= warm_steps
  return jax.tree_util.tree_map(lambda live, frozen: jnp.where(in_warm_start, live, frozen),
                                state.params, state.distill_snapshot)


def make_eval_step(model: nn.Module, mode: str = "threshold", capacity=None
                   ) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
  """Builds ``(params, batch) -> per-example outputs`` with a test-time policy mode.

  Args:
    model: as for :func:`make_train_step`.
    mode: ``threshold`` | ``top_k`` | ``all`` | ``sample`` (``sample`` needs
      ``batch['rng']``, a key), or ``activation_top_k`` (training-free, from the
      activations; models built from :class:`ccjax.GatedDense`).
    capacity: for ``top_k`` / ``activation_top_k``.

  Returns:
    a pure function returning ``loss [batch]``, ``correct [batch]``, ``prediction
    [batch]`` and, for gated models, ``active_fraction [layers, batch]`` and
    ``probs``/``mask``: tuples of ``[batch, blocks]`` per gated layer.
  """
  layers.validate_layer_mode(mode, layers.LAYER_MODES)

  def eval_step(params, batch):
    rngs = {"gate": batch["rng"]} if mode == "sample" else {}
    logits, aux = model.apply({"params": params}, batch["x"], mode=mode, capacity=capacity,
                              rngs=rngs)
    per_example_loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["y"])
    prediction = jnp.argmax(logits, -1)
    outputs = {"loss": per_example_loss, "correct": prediction == batch["y"],
               "prediction": prediction}
    gate_aux = [layer_aux for layer_aux in aux if layer_aux is not None]
    if gate_aux:
      outputs["active_fraction"] = jnp.stack([jnp.mean(a.mask, axis=-1) for a in gate_aux])
      outputs["probs"] = tuple(a.probs for a in gate_aux)
      outputs["mask"] = tuple(a.mask for a in gate_aux)
    return outputs

  return eval_step
