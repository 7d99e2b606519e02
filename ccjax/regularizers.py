"""Policy regularizers of Bengio et al. (2015), as pure functions of ``probs``.

Axis letters: ``batch`` examples (x), ``blocks`` blocks (j) of one layer; ``tau`` is
the target fraction of active blocks.

* ``L_b = sum_j (mean_x sigma_j - tau)^2``: every block is used ``tau`` of the time.
* ``L_e = mean_x (mean_j sigma_j - tau)^2``: every example uses ``tau`` of its blocks.
* ``L_v = -sum_j var_x sigma_j``: policies differ across examples.
* ``L2 = sum of squared weights`` (kernels only).

Batch statistics are taken over every leading axis: ``probs`` may be ``[batch, blocks]``
or per position ``[batch, seq, blocks]``, where every (example, position) counts as one
x. Under ``jax.jit`` with a batch sharded over devices they are global-batch statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccjax import policy as policy_lib


def _rows(probs: jax.Array) -> jax.Array:
  """``[..., blocks]`` -> ``[x, blocks]``: every leading index is one x."""
  return probs.reshape(-1, probs.shape[-1])


def block_balance_loss(probs: jax.Array, tau: float | jax.Array) -> jax.Array:
  """``L_b``: scalar, ``sum_j (mean_x probs[x, j] - tau)^2`` for ``probs [..., blocks]``."""
  return jnp.sum(jnp.square(jnp.mean(_rows(probs), axis=0) - tau))


def example_balance_loss(probs: jax.Array, tau: float | jax.Array) -> jax.Array:
  """``L_e``: scalar, ``mean_x (mean_j probs[x, j] - tau)^2`` for ``probs [..., blocks]``."""
  return jnp.mean(jnp.square(jnp.mean(probs, axis=-1) - tau))


def variance_loss(probs: jax.Array) -> jax.Array:
  """``L_v``: scalar, ``-sum_j var_x probs[x, j]`` (population variance) for ``[..., blocks]``."""
  return -jnp.sum(jnp.var(_rows(probs), axis=0))


def l2_loss(params) -> jax.Array:
  """Sum of squares of every ``kernel`` leaf (biases are not decayed).

  Args:
    params: a parameter pytree (Flax variables dict or sub-tree).

  Returns:
    scalar ``sum ||W||^2`` over leaves whose path ends in ``kernel``.
  """
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    if name == "kernel":
      total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return total


# Concentration ``a + b`` of the batch-shaping prior. Bejnordi et al. (2020) use
# Beta(0.6, 0.4): a + b = 1 (U-shaped, so a gate is mostly off or mostly on per example)
# with mean 0.6; ccjax keeps a + b = 1 and puts the mean at the layer's tau.
BATCH_SHAPING_CONCENTRATION = 1.0
# A target of 0 or 1 has no Beta prior; it is clipped into [_TAU_CLIP, 1 - _TAU_CLIP].
_TAU_CLIP = 1e-3


def batch_shaping_prior(tau: float | jax.Array, concentration: float = BATCH_SHAPING_CONCENTRATION
                        ) -> tuple[jax.Array, jax.Array]:
  """``(a, b)`` of the Beta prior with mean ``tau`` and ``a + b = concentration``.

  ``tau = 0.6``, ``concentration = 1`` is the paper's Beta(0.6, 0.4).
  """
  tau = jnp.clip(jnp.asarray(tau, jnp.float32), _TAU_CLIP, 1.0 - _TAU_CLIP)
  return concentration * tau, concentration * (1.0 - tau)


def batch_shaping_loss(probs: jax.Array, tau: float | jax.Array,
                       concentration: float = BATCH_SHAPING_CONCENTRATION) -> jax.Array:
  """``L_bs``: batch-shaping prior of Bejnordi et al. (ICLR 2020), a scalar.

  For each block ``j`` the batch's probabilities are sorted, ``x_(1) <= ... <= x_(N)``,
  and their empirical CDF ``i / (N + 1)`` is pulled towards the CDF ``F`` of the prior
  ``Beta(a, b)`` (:func:`batch_shaping_prior`) at the sorted values:

  ``L_bs = sum_j (1 / N) sum_i (i / (N + 1) - F(x_(i)j))^2``.

  The gradient flows through the sorted values (``jnp.sort`` routes it back to each
  example) and through ``F`` (``jax.scipy.special.betainc``, differentiable in ``x``):
  ``d L / d x_(i)j = -2 f(x_(i)j) (i / (N + 1) - F(x_(i)j)) / N`` with ``f`` the Beta
  density, the paper's gradient. Each ``x_(i)`` is pulled towards the prior's
  ``i / (N + 1)`` quantile, so the batch's spread of probabilities takes the prior's
  shape: per example a gate is on or off (the U shape), on ``tau`` of the time (the mean).

  Args:
    probs: ``[..., blocks]`` block probabilities; every leading index is one x (per-token
      gates ``[batch, seq, blocks]`` give ``N = batch * seq``).
    tau: the layer's target fraction (the prior's mean), a scalar.
    concentration: ``a + b`` of the prior, > 0.

  Returns:
    scalar float32.
  """
  rows = _rows(probs).astype(jnp.float32)
  count = rows.shape[0]
  sorted_probs = jnp.sort(rows, axis=0)                                   # [x, blocks]
  empirical_cdf = jnp.arange(1, count + 1, dtype=jnp.float32) / (count + 1)
  a, b = batch_shaping_prior(tau, concentration)
  prior_cdf = jax.scipy.special.betainc(a, b, sorted_probs)               # [x, blocks]
  return jnp.sum(jnp.square(empirical_cdf[:, None] - prior_cdf)) / count


def load_balance_loss(probs: jax.Array, block_mask: jax.Array) -> jax.Array:
  """Switch-Transformer-style load balancing over blocks: ``n sum_j f_j P_j``.

  ``f_j`` is block ``j``'s share of the blocks that ran (``mean_x mask[x, j]``, normalised
  over blocks; no gradient) and ``P_j`` its share of the probability mass (``mean_x
  probs[x, j]``, normalised over blocks). Switch (Fedus et al. 2021) uses the raw fraction
  and mean probability because its softmax router's probabilities and top-1 dispatch each
  sum to 1; a block policy's independent probabilities and ``k``-block masks do not, so both
  are normalised into shares: the loss is 1 when every block gets the same share of
  examples and of probability, at most ``n`` (everything on one block), whatever ``k`` and
  ``tau``; it is invariant to scaling every probability, so its gradient moves probability
  from overused blocks to underused ones and leaves the total to the budget terms.

  Args:
    probs: ``[..., blocks]`` block probabilities; every leading index is one x.
    block_mask: ``[..., blocks]`` the masks that ran (0/1).

  Returns:
    scalar float32; 0 when no block ran in the batch.
  """
  rows = _rows(probs).astype(jnp.float32)
  routed = jnp.mean(_rows(jax.lax.stop_gradient(block_mask)).astype(jnp.float32), axis=0)
  mean_probs = jnp.mean(rows, axis=0)
  routed_share = routed / jnp.maximum(jnp.sum(routed), 1e-12)
  prob_share = mean_probs / jnp.maximum(jnp.sum(mean_probs), 1e-12)
  return rows.shape[-1] * jnp.sum(routed_share * prob_share)


def imitation_loss(probs: jax.Array, block_norms: jax.Array, capacity: int) -> jax.Array:
  """Policy imitation of the activation oracle (dense-to-sparse, MoEfication-style).

  The oracle mask of an example is its ``capacity`` blocks of largest activation norm
  (the blocks a policy at that budget would ideally run); the loss is the binary
  cross-entropy of the policy's probabilities towards it, mean over every (x, block).

  Args:
    probs: ``[..., blocks]`` block probabilities (in ``(0, 1)``: the policy's eps bound).
    block_norms: ``[..., blocks]`` squared L2 norm of each block's activations (no gradient).
    capacity: oracle blocks per x, in ``[1, blocks]``.

  Returns:
    scalar float32.
  """
  oracle = policy_lib.top_k_mask(jax.lax.stop_gradient(block_norms), capacity)
  probs = probs.astype(jnp.float32)
  return -jnp.mean(oracle * jnp.log(probs) + (1.0 - oracle) * jnp.log1p(-probs))
