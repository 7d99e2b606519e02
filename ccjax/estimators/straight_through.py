"""``straight_through``: a hard Bernoulli mask with an identity gradient to ``probs``.

Biased; the task loss reaches the policy through the mask, and no REINFORCE term is added.
"""

from __future__ import annotations

import jax

from ccjax.estimators import base


def straight_through_mask(key: jax.Array, probs: jax.Array) -> jax.Array:
  """Hard Bernoulli sample in the forward pass, identity gradient to ``probs``.

  Args:
    key: PRNG key.
    probs: ``[batch, blocks]`` probabilities.

  Returns:
    ``[batch, blocks]`` mask equal to a 0/1 sample, with ``d mask / d probs = 1``.
  """
  hard = jax.random.bernoulli(key, probs).astype(probs.dtype)
  return straight_through(hard, probs)


def straight_through(hard: jax.Array, probs: jax.Array) -> jax.Array:
  """``hard`` in the forward pass, ``d / d probs = 1`` in the backward pass.

  Args:
    hard: ``[..., blocks]`` 0/1 mask (no gradient of its own).
    probs: ``[..., blocks]`` probabilities.

  Returns:
    ``[..., blocks]``, equal to ``hard`` exactly.
  """
  # Parenthesised so the forward value is exactly the 0/1 sample (``(hard + p) - p`` is not).
  return hard + (probs - jax.lax.stop_gradient(probs))


def _training_mask(probs, rng, capacity, temperature):
  del capacity, temperature
  return straight_through_mask(rng, probs)


ESTIMATOR = base.Estimator(name="straight_through", training_mask=_training_mask,
                           log_prob=None, needs_capacity=False, needs_rng=True)
