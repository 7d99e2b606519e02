"""``reinforce``: the paper's estimator, a Bernoulli mask and its score-function term.

Every block runs with its own probability, ``u_j ~ Bernoulli(p_j)``; no gradient flows
through the mask, and the policy learns from ``(c - b) grad log pi(u)`` (see
:mod:`ccjax.estimators.baselines`).
"""

from __future__ import annotations

import jax

from ccjax import policy as policy_lib
from ccjax.estimators import base


def _training_mask(probs, rng, capacity, temperature):
  del capacity, temperature  # the Bernoulli mask has no budget and no relaxation
  return policy_lib.sample_mask(rng, jax.lax.stop_gradient(probs))


def _log_prob(probs, block_mask, capacity):
  del capacity
  return policy_lib.mask_log_prob(probs, block_mask)


ESTIMATOR = base.Estimator(name="reinforce", training_mask=_training_mask, log_prob=_log_prob,
                           needs_capacity=False, needs_rng=True)
