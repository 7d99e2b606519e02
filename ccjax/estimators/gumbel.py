"""``gumbel``: a relaxed Bernoulli (Gumbel-sigmoid) mask, hard in the forward pass.

Biased; the gradient of the relaxed sample reaches the policy, no REINFORCE term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccjax.estimators import base


def gumbel_sigmoid_mask(key: jax.Array, probs: jax.Array, temperature: float = 0.5,
                        hard: bool = True) -> jax.Array:
  """Relaxed Bernoulli (binary Concrete / Gumbel-sigmoid) mask.

  ``soft = sigmoid((logit(p) + logistic_noise) / temperature)``; with ``hard`` the
  forward value is ``soft > 0.5`` (a valid Bernoulli(p) sample) and the gradient is
  that of ``soft``.

  Args:
    key: PRNG key.
    probs: ``[batch, blocks]`` probabilities in (0, 1).
    temperature: relaxation temperature, > 0.
    hard: straight-through discretisation of the relaxed sample.

  Returns:
    ``[batch, blocks]`` mask.
  """
  uniform = jax.random.uniform(key, probs.shape, probs.dtype, minval=1e-6, maxval=1 - 1e-6)
  noise = jnp.log(uniform) - jnp.log1p(-uniform)
  logits = jnp.log(probs) - jnp.log1p(-probs)
  soft = jax.nn.sigmoid((logits + noise) / temperature)
  if not hard:
    return soft
  hard_mask = (soft > 0.5).astype(probs.dtype)
  return hard_mask + (soft - jax.lax.stop_gradient(soft))


def _training_mask(probs, rng, capacity, temperature):
  del capacity
  return gumbel_sigmoid_mask(rng, probs, temperature)


ESTIMATOR = base.Estimator(name="gumbel", training_mask=_training_mask, log_prob=None,
                           needs_capacity=False, needs_rng=True)
