"""Per-draw exact check of the REINFORCE term of ``ccjax.policy_objective`` (issue 21, (a)).

The enumeration tests check that the estimator is unbiased in expectation; a baseline
subtracted twice stays unbiased there (a baseline that does not depend on the draw
changes no expectation), so they cannot see it. Here one fixed draw, with a non-zero
baseline, must give exactly ``mean((c - b) * log pi(u))`` and its gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from ccjax.estimators import baselines

COST = jnp.asarray([0.5, 2.0, 1.25, 3.0])          # [batch] per-example task loss
MASK = jnp.asarray([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]], jnp.float32)
THETA = jnp.asarray([[0.3, -1.2, 0.8], [1.5, 0.1, -0.4], [-0.7, 0.9, 0.2], [0.6, -0.3, 1.1]])


def _gate(theta):
  """One gated layer whose policy is ``sigmoid(theta)``, with the fixed draw ``MASK``."""
  probs = jax.nn.sigmoid(theta)
  log_prob = jnp.sum(MASK * jnp.log(probs) + (1 - MASK) * jnp.log1p(-probs), axis=-1)
  return (ccjax.GateAux(probs=probs, mask=MASK, log_prob=log_prob),)


def _config(baseline):
  # Only the score-function term: no regularizers, no entropy or batch-shaping terms.
  return ccjax.TrainConfig(tau=0.5, lambda_s=0.0, lambda_v=0.0, estimator="reinforce",
                           baseline=baseline)


def _ema_state(value):
  """A moving-average state whose bias-corrected value is ``value`` (one update)."""
  decay = _config("ema").baseline_decay
  return baselines.BaselineState(average=jnp.asarray(value * (1 - decay), jnp.float32),
                                 count=jnp.asarray(1, jnp.int32))


@pytest.mark.parametrize("baseline,state,expected_b", [
    ("batch_mean", None,
     (jnp.sum(COST) - COST) / (COST.shape[0] - 1)),          # leave-one-out, non-zero
    ("ema", 1.75, jnp.full_like(COST, 1.75)),
])
def test_reinforce_term_of_one_draw_is_mean_advantage_times_log_prob(baseline, state,
                                                                    expected_b):
  state = _ema_state(state) if state is not None else baselines.init_baseline_state()
  config = _config(baseline)
  assert float(jnp.max(jnp.abs(expected_b))) > 0.5   # the baseline matters here

  def objective(theta):
    return ccjax.policy_objective(_gate(theta), COST, config, state)

  def by_hand(theta):
    return jnp.mean((COST - expected_b) * _gate(theta)[0].log_prob)

  value, terms = objective(THETA)
  np.testing.assert_allclose(terms["reinforce"], by_hand(THETA), rtol=1e-5)
  np.testing.assert_allclose(value, by_hand(THETA), rtol=1e-5)
  np.testing.assert_allclose(terms["baseline"], jnp.mean(expected_b), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(lambda t: objective(t)[0])(THETA),
                             jax.grad(by_hand)(THETA), rtol=1e-5, atol=1e-7)
