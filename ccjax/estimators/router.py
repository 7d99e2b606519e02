"""``router``: no sampling; every example runs exactly its ``k`` most probable blocks.

An MoE-style top-k router over blocks (fixed compute in training and at test time); the
task loss reaches the policy by a straight-through gradient, no REINFORCE term.
"""

from __future__ import annotations

import jax

from ccjax import policy as policy_lib
from ccjax.estimators import base
from ccjax.estimators import straight_through


def straight_through_top_k_mask(probs: jax.Array, capacity: int) -> jax.Array:
  """The ``capacity`` most probable blocks in the forward pass, identity gradient to ``probs``.

  The top-k router of mixture-of-experts layers, over blocks, trained like a
  straight-through estimator: ``d loss / d probs_j = d loss / d mask_j`` (how much the
  loss would change if block ``j``'s output were scaled), so blocks whose output helps
  are pushed up and the others down; no REINFORCE term, no sampling.

  Args:
    probs: ``[..., blocks]`` probabilities.
    capacity: blocks per example, ``1 <= capacity <= blocks``.

  Returns:
    ``[..., blocks]`` mask equal to :func:`ccjax.policy.top_k_mask` (exactly ``capacity``
    ones per row), with ``d mask / d probs = 1``.
  """
  hard = policy_lib.top_k_mask(jax.lax.stop_gradient(probs), capacity)
  return straight_through.straight_through(hard, probs)


def _training_mask(probs, rng, capacity, temperature):
  del rng, temperature
  return straight_through_top_k_mask(probs, capacity)


ESTIMATOR = base.Estimator(name="router", training_mask=_training_mask, log_prob=None,
                           needs_capacity=True, needs_rng=False)
