"""``noisy_top_k``: the straight-through family at the test-time budget.

Every example runs exactly ``k = capacity`` blocks: the top ``k`` of the policy's log-odds
plus Gumbel noise (a Gumbel-top-k, i.e. Plackett-Luce without replacement, sample over
the odds ``p / (1 - p)``), and the task loss reaches the policy by the straight-through
gradient ``d mask / d probs = 1``, as in ``straight_through`` and ``router``. Without the
noise this is the ``router``; the noise lets blocks outside the current top ``k`` be tried.
Biased like every straight-through estimator; no REINFORCE term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccjax import policy as policy_lib
from ccjax.estimators import base
from ccjax.estimators import straight_through


def noisy_top_k_mask(key: jax.Array, probs: jax.Array, capacity: int) -> jax.Array:
  """Top ``capacity`` of ``logit(probs) + Gumbel noise``, straight-through to ``probs``.

  Args:
    key: PRNG key.
    probs: ``[..., blocks]`` probabilities strictly inside (0, 1).
    capacity: blocks per row, ``1 <= capacity <= blocks``.

  Returns:
    ``[..., blocks]`` mask with exactly ``capacity`` ones per row in the forward pass and
    ``d mask / d probs = 1``.
  """
  fixed = jax.lax.stop_gradient(probs)
  noisy_scores = (jnp.log(fixed) - jnp.log1p(-fixed)
                  + jax.random.gumbel(key, probs.shape, probs.dtype))
  hard = policy_lib.top_k_mask(noisy_scores, capacity)
  return straight_through.straight_through(hard, probs)


def _training_mask(probs, rng, capacity, temperature):
  del temperature
  return noisy_top_k_mask(rng, probs, capacity)


ESTIMATOR = base.Estimator(name="noisy_top_k", training_mask=_training_mask, log_prob=None,
                           needs_capacity=True, needs_rng=True)
