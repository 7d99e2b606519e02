"""Baselines and advantages of the REINFORCE (score-function) term, shared by every
estimator with a score term.

Axis letters: ``batch`` examples (``[batch, seq]``: one x per position).

* REINFORCE (score function): the surrogate ``mean_x[(c_x - b_x) log pi(u_x | h_x)]``
  with the cost ``c_x`` (the example's own task loss) and baseline ``b_x`` under
  ``stop_gradient``. Its gradient is the unbiased estimate of
  ``grad E_u[c]`` as long as ``b_x`` does not depend on ``u_x``.
* Baselines: ``none``; ``batch_mean`` is the *leave-one-out* batch mean
  ``b_x = mean_{x' != x} c_{x'}``, which never uses the example's own sample and so keeps
  the estimator unbiased (the plain batch mean including ``c_x`` scales the expected
  gradient by ``(B - 1) / B``); ``ema`` is a bias-corrected exponential moving average of
  past batches' mean cost, fixed before the current masks are drawn, hence unbiased.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

BASELINES = ("none", "batch_mean", "ema")
# ``raw``: advantage ``c - b``; ``standardized``: ``c - b`` standardised over the batch.
ADVANTAGES = ("raw", "standardized")


class BaselineState(NamedTuple):
  """State of the moving-average baseline.

  Attributes:
    average: scalar running ``decay``-weighted sum of batch-mean costs (biased toward 0).
    count: scalar int32 number of updates, used for bias correction.
  """
  average: jax.Array
  count: jax.Array


def init_baseline_state() -> BaselineState:
  """An empty moving-average baseline (it predicts 0 until its first update)."""
  return BaselineState(average=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.int32))


def ema_baseline_value(state: BaselineState, decay: float) -> jax.Array:
  """Bias-corrected moving average: scalar, 0 before the first update."""
  correction = 1.0 - jnp.power(decay, state.count.astype(jnp.float32))
  return jnp.where(state.count > 0, state.average / jnp.maximum(correction, 1e-12), 0.0)


def update_baseline_state(state: BaselineState, cost: jax.Array, decay: float) -> BaselineState:
  """Folds the batch-mean of ``cost [batch]`` into the moving average."""
  batch_cost = jnp.mean(jax.lax.stop_gradient(cost)).astype(jnp.float32)
  return BaselineState(
      average=decay * state.average + (1.0 - decay) * batch_cost, count=state.count + 1)


def compute_baseline(kind: str, cost: jax.Array, state: BaselineState | None = None,
                     decay: float = 0.99) -> jax.Array:
  """Per-example baseline for the REINFORCE cost.

  Args:
    kind: one of ``none``, ``batch_mean`` (leave-one-out), ``ema``.
    cost: ``[batch]`` per-example costs, or ``[batch, seq]`` per position (``batch_mean``
      then leaves the example out at each position: the other examples' cost there).
    state: moving-average state, required for ``ema``.
    decay: moving-average decay, for ``ema``.

  Returns:
    baseline values shaped like ``cost``, under ``stop_gradient``.
  """
  cost = jax.lax.stop_gradient(cost)
  if kind == "none":
    return jnp.zeros_like(cost)
  if kind == "batch_mean":
    batch = cost.shape[0]
    if batch < 2:
      return jnp.zeros_like(cost)
    return (jnp.sum(cost, axis=0) - cost) / (batch - 1)
  if kind == "ema":
    if state is None:
      raise ValueError("baseline 'ema' needs a BaselineState")
    return jnp.broadcast_to(ema_baseline_value(state, decay), cost.shape).astype(cost.dtype)
  raise ValueError(f"baseline must be one of {'|'.join(BASELINES)}, got {kind!r}")


def score_function_loss(log_prob: jax.Array, cost: jax.Array,
                        baseline: jax.Array | float = 0.0) -> jax.Array:
  """REINFORCE surrogate whose gradient is the score-function estimate.

  ``grad score_function_loss = mean_x (c_x - b_x) grad log pi(u_x)``, computed for
  the whole batch in one backward pass (no per-example Jacobians). An ``x`` is one
  example (``[batch]``) or one (example, position) (``[batch, seq]``, the per-position
  cost of token models; see :func:`ccjax.policy_objective` for its bias).

  Args:
    log_prob: ``[batch]`` or ``[batch, seq]`` log-probability of each x's sampled
      masks (summed over blocks and layers), differentiable w.r.t. the policy parameters.
    cost: same shape as ``log_prob``, the cost of each x; no gradient flows through it.
    baseline: same shape or scalar baseline; no gradient flows through it.

  Returns:
    scalar surrogate loss.
  """
  if log_prob.ndim not in (1, 2) or cost.shape != log_prob.shape:
    raise ValueError("log_prob and cost must both be [batch] or both [batch, seq], got "
                     f"{log_prob.shape} and {cost.shape}")
  advantage = jax.lax.stop_gradient(cost - baseline)
  return jnp.mean(advantage * log_prob)


def standardized_advantage(cost: jax.Array, baseline: jax.Array | float = 0.0,
                           eps: float = 1e-6) -> jax.Array:
  """Per-batch standardised advantage ``(a - mean(a)) / (std(a) + eps)``, ``a = c - b``.

  Rescales the REINFORCE signal to unit size whatever the loss scale (e.g. late in
  training, when the task loss is small). Centring on the batch mean uses the example's
  own cost, so the estimate is biased by a factor ``(B - 1) / B`` on the centred part and
  rescaled by a batch statistic: a variance-reduction heuristic, not an unbiased estimator.

  Args:
    cost: ``[batch]`` per-example cost.
    baseline: ``[batch]`` or scalar baseline.
    eps: added to the standard deviation.

  Returns:
    ``[batch]`` advantages under ``stop_gradient``.
  """
  advantage = jax.lax.stop_gradient(cost - baseline)
  centred = advantage - jnp.mean(advantage)
  return centred / (jnp.std(advantage) + eps)
