"""Budget control of the active fraction by Lagrange multipliers (dual ascent).

Axis letters: ``layers`` gated layers.

Instead of (or on top of) the fixed quadratic penalties ``lambda_s (L_b + L_e)``, each
gated layer ``l`` carries a multiplier ``mu_l`` of the equality constraint
``mean_x,j sigma_lj = tau_l``. The policy minimises ``sum_l mu_l (mean sigma_l - tau_l)``
(with the quadratic penalties this is an augmented Lagrangian) while the multipliers
ascend: ``mu_l <- mu_l + dual_lr (mean sigma_l - tau_l)``. A layer above budget gets a
growing positive ``mu_l`` (its probabilities pushed down), one below budget a negative
one. The multipliers live in :class:`ccjax.TrainState` and are checkpointed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BUDGETS = ("penalty", "lagrange")


def lagrangian_term(duals: jax.Array, mean_probs: jax.Array, taus: jax.Array) -> jax.Array:
  """Scalar ``sum_l mu_l (mean_probs_l - tau_l)``, gradient to ``mean_probs`` only.

  Args:
    duals: ``[layers]`` multipliers (no gradient).
    mean_probs: ``[layers]`` batch- and block-mean probability of each layer.
    taus: ``[layers]`` targets.
  """
  return jnp.sum(jax.lax.stop_gradient(duals) * (mean_probs - taus))


def dual_update(duals: jax.Array, mean_probs: jax.Array, taus: jax.Array,
                dual_lr: float) -> jax.Array:
  """One dual-ascent step: ``[layers]`` ``duals + dual_lr (mean_probs - taus)``."""
  violation = jax.lax.stop_gradient(mean_probs - taus).astype(jnp.float32)
  return duals + dual_lr * violation
