"""``reinforce_top_k``: REINFORCE that trains at the test-time budget of exactly ``k`` blocks.

Axis letters: ``blocks`` (``n``) blocks of a layer; every function takes ``[..., blocks]``.

The policy is the paper's factorised Bernoulli policy *conditioned on running exactly*
``k = capacity`` *blocks* (the conditional Bernoulli, or conditional Poisson, distribution):

``pi(S) = prod_{j in S} w_j / e_k(w),   w_j = p_j / (1 - p_j),   |S| = k``

where ``e_k`` is the k-th elementary symmetric polynomial of the odds. Its mode is the
``top_k`` test-time mask (the ``k`` largest odds are the ``k`` largest probabilities), so
the policy trains at the budget and on the masks it is tested with. Both the sample and the
log-probability are exact and cost ``O(n k)`` per example: ``log e_k`` comes from the
recursion ``e_r(w_j..w_n) = e_r(w_{j+1}..w_n) + w_j e_{r-1}(w_{j+1}..w_n)`` (in log space,
one ``lax.scan`` over blocks), and a sample is drawn block by block, block ``j`` running
with probability ``w_j e_{r-1}(w_{j+1}..) / e_r(w_j..)`` given ``r`` blocks still to run.

Why not Gumbel-top-k with Plackett-Luce probabilities: the exact log-probability of the
*unordered* set under Plackett-Luce sums over the ``k!`` orders (``2^k`` terms by dynamic
programming), too dear per token at the LM's block counts, and the log-probability of the
*ordered* sample needs the order, which a 0/1 mask does not carry (and has more variance).
The conditional Bernoulli's log-probability is a function of the mask alone, exact and
cheap for every ``k``, and its parameters are the same ``probs`` the regularizers act on.
Its unbiasedness is checked by exact enumeration in ``tests/estimators_top_k_test.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccjax.estimators import base

# Stands for log(0) in the recursions: finite, so that gradients stay finite too.
_LOG_ZERO = -1e30


def _log_odds(probs: jax.Array) -> jax.Array:
  return jnp.log(probs) - jnp.log1p(-probs)


def _check_capacity(num_blocks: int, capacity: int | None) -> int:
  if capacity is None or not 1 <= capacity <= num_blocks:
    raise ValueError(f"estimator 'reinforce_top_k' needs a capacity in [1, {num_blocks}], "
                     f"got {capacity!r}")
  return int(capacity)


def _suffix_log_elementary(log_odds: jax.Array, capacity: int) -> jax.Array:
  """``[blocks + 1, ..., capacity + 1]``: entry ``[j, ..., r] = log e_r(w_j, .., w_{n-1})``.

  Row ``n`` is the empty suffix (``e_0 = 1``, ``e_r = 0`` for ``r > 0``).
  """
  lead = log_odds.shape[:-1]
  empty = jnp.concatenate([jnp.zeros(lead + (1,), log_odds.dtype),
                           jnp.full(lead + (capacity,), _LOG_ZERO, log_odds.dtype)], axis=-1)

  def add_block(suffix, block_log_odds):
    # e_r(w_j..) = e_r(w_{j+1}..) + w_j e_{r-1}(w_{j+1}..)
    shifted = jnp.concatenate([jnp.full(lead + (1,), _LOG_ZERO, log_odds.dtype),
                               suffix[..., :-1]], axis=-1) + block_log_odds[..., None]
    longer = jnp.logaddexp(suffix, shifted)
    return longer, longer

  _, rows = jax.lax.scan(add_block, empty, jnp.moveaxis(log_odds, -1, 0)[::-1])
  return jnp.concatenate([rows[::-1], empty[None]], axis=0)


def conditional_bernoulli_log_prob(probs: jax.Array, block_mask: jax.Array,
                                   capacity: int) -> jax.Array:
  """``log pi(mask)`` under the Bernoulli policy conditioned on exactly ``capacity`` blocks.

  Args:
    probs: ``[..., blocks]`` block probabilities, strictly inside (0, 1).
    block_mask: ``[..., blocks]`` 0/1 masks with exactly ``capacity`` ones per row (no
      gradient flows through it).
    capacity: blocks per row, ``1 <= capacity <= blocks``.

  Returns:
    ``[...]`` ``sum_{j in S} log w_j - log e_k(w)``, differentiable w.r.t. ``probs``.
  """
  capacity = _check_capacity(probs.shape[-1], capacity)
  log_odds = _log_odds(probs.astype(jnp.float32))
  block_mask = jax.lax.stop_gradient(block_mask).astype(jnp.float32)
  log_normalizer = _suffix_log_elementary(log_odds, capacity)[0, ..., capacity]
  return jnp.sum(block_mask * log_odds, axis=-1) - log_normalizer


def conditional_bernoulli_mask(key: jax.Array, probs: jax.Array, capacity: int) -> jax.Array:
  """An exact sample of the Bernoulli policy conditioned on exactly ``capacity`` blocks.

  Args:
    key: PRNG key.
    probs: ``[..., blocks]`` block probabilities, strictly inside (0, 1).
    capacity: blocks per row, ``1 <= capacity <= blocks``.

  Returns:
    ``[..., blocks]`` 0/1 mask in ``probs.dtype`` with exactly ``capacity`` ones per row;
    no gradient flows through it.
  """
  num_blocks = probs.shape[-1]
  capacity = _check_capacity(num_blocks, capacity)
  log_odds = _log_odds(jax.lax.stop_gradient(probs).astype(jnp.float32))
  table = _suffix_log_elementary(log_odds, capacity)
  lead = probs.shape[:-1]
  uniforms = jax.random.uniform(key, (num_blocks,) + lead, jnp.float32)

  def visit(remaining, inputs):
    index, block_log_odds, here, after, uniform = inputs
    # P(block runs | r to go) = w_j e_{r-1}(w_{j+1}..) / e_r(w_j..).
    log_numerator = block_log_odds + jnp.take_along_axis(
        after, jnp.maximum(remaining - 1, 0)[..., None], axis=-1)[..., 0]
    log_denominator = jnp.take_along_axis(here, remaining[..., None], axis=-1)[..., 0]
    run = (remaining > 0) & ((uniform < jnp.exp(log_numerator - log_denominator))
                             | (remaining >= num_blocks - index))  # as many to go as left
    return remaining - run.astype(remaining.dtype), run

  start = jnp.full(lead, capacity, jnp.int32)
  _, runs = jax.lax.scan(visit, start, (jnp.arange(num_blocks), jnp.moveaxis(log_odds, -1, 0),
                                        table[:-1], table[1:], uniforms))
  return jnp.moveaxis(runs, 0, -1).astype(probs.dtype)


def _training_mask(probs, rng, capacity, temperature):
  del temperature
  return conditional_bernoulli_mask(rng, probs, capacity)


def _log_prob(probs, block_mask, capacity):
  return conditional_bernoulli_log_prob(probs, block_mask, capacity)


ESTIMATOR = base.Estimator(name="reinforce_top_k", training_mask=_training_mask,
                           log_prob=_log_prob, needs_capacity=True, needs_rng=True)
