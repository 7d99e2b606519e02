"""Bernoulli block policy as pure functions.

Axis letters used in shapes: ``batch`` examples, ``blocks`` gated blocks of one layer.
Every function works on ``[..., blocks]`` as well (e.g. one mask per token,
``[batch, seq, blocks]``); the shapes below name the common case.

A policy gives every block of a layer an independent probability of running,
``probs = eps + (1 - 2 eps) * sigmoid(logits)``; a block mask ``u ~ Bernoulli(probs)``
switches whole blocks on (1) or off (0). Squashing into ``[eps, 1 - eps]`` instead of
hard clipping keeps ``log pi(u)`` finite *and* keeps a non-zero gradient at the bounds
(a clipped sigmoid has zero gradient once clipped, so a saturated block could never
recover).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccjax import modes

DEFAULT_EPS = 0.01

# A block runs at test time when its probability exceeds this (``threshold`` mode).
THRESHOLD = 0.5
# Every way a gate's policy can choose its mask (listed once, in :mod:`ccjax.modes`); all
# but ``sample`` are deterministic. ``top_k`` runs exactly ``capacity`` blocks per example
# (fixed compute); ``capped`` runs the blocks above the threshold, at most ``capacity``.
POLICY_MODES = modes.POLICY_MODES
DETERMINISTIC_MODES = modes.DETERMINISTIC_MODES


def validate_eps(eps: float) -> float:
  """Checks the probability bound; returns it as a float."""
  if not 0.0 <= eps < 0.5:
    raise ValueError(f"policy_eps must be in [0, 0.5), got {eps!r}")
  return float(eps)


def policy_probs(logits: jax.Array, eps: float = DEFAULT_EPS) -> jax.Array:
  """Maps policy logits to block probabilities in ``[eps, 1 - eps]``.

  Args:
    logits: ``[..., blocks]`` pre-sigmoid scores ``h @ Z + d``.
    eps: lower bound of every probability (and ``1 - eps`` the upper one).

  Returns:
    ``[..., blocks]`` float probabilities ``eps + (1 - 2 eps) sigmoid(logits)``.
  """
  return eps + (1.0 - 2.0 * eps) * jax.nn.sigmoid(logits)


def sample_mask(key: jax.Array, probs: jax.Array) -> jax.Array:
  """Samples a block mask ``u ~ Bernoulli(probs)``.

  Args:
    key: a PRNG key.
    probs: ``[batch, blocks]`` probabilities.

  Returns:
    ``[batch, blocks]`` mask of 0.0/1.0 in ``probs.dtype``.
  """
  return jax.random.bernoulli(key, probs).astype(probs.dtype)


def mask_log_prob(probs: jax.Array, block_mask: jax.Array) -> jax.Array:
  """Log-probability of a mask under the policy, summed over blocks.

  Args:
    probs: ``[batch, blocks]`` probabilities, strictly inside (0, 1).
    block_mask: ``[batch, blocks]`` mask of 0/1 values.

  Returns:
    ``[batch]`` ``sum_j u_j log p_j + (1 - u_j) log(1 - p_j)``.
  """
  block_mask = jax.lax.stop_gradient(block_mask)
  log_p = block_mask * jnp.log(probs) + (1.0 - block_mask) * jnp.log1p(-probs)
  return jnp.sum(log_p, axis=-1)


def policy_entropy(probs: jax.Array) -> jax.Array:
  """Entropy of the factorised Bernoulli policy, summed over blocks.

  Args:
    probs: ``[batch, blocks]`` probabilities strictly inside (0, 1).

  Returns:
    ``[batch]`` entropy in nats.
  """
  ent = -(probs * jnp.log(probs) + (1.0 - probs) * jnp.log1p(-probs))
  return jnp.sum(ent, axis=-1)


def threshold_mask(probs: jax.Array, threshold: float = THRESHOLD) -> jax.Array:
  """Deterministic mask: a block runs when its probability exceeds ``threshold``.

  Args:
    probs: ``[batch, blocks]`` probabilities.
    threshold: the cut.

  Returns:
    ``[batch, blocks]`` mask of 0.0/1.0.
  """
  return (probs > threshold).astype(probs.dtype)


def _top_indicator(probs: jax.Array, capacity: int) -> jax.Array:
  """``[batch, blocks]`` 1.0 on each row's ``capacity`` most probable blocks (ties: lower index)."""
  num_blocks = probs.shape[-1]
  if not 1 <= capacity <= num_blocks:
    raise ValueError(f"capacity must be in [1, {num_blocks}], got {capacity!r}")
  _, top_idx = jax.lax.top_k(probs, capacity)
  return jnp.sum(jax.nn.one_hot(top_idx, num_blocks, dtype=probs.dtype), axis=-2)


def top_k_mask(probs: jax.Array, capacity: int) -> jax.Array:
  """Deterministic mask with exactly ``capacity`` blocks per example (fixed compute).

  The ``capacity`` most probable blocks of every example run, whatever their
  probability (ties broken by lower index); no threshold is applied.

  Args:
    probs: ``[batch, blocks]`` probabilities.
    capacity: blocks per example, ``1 <= capacity <= blocks``.

  Returns:
    ``[batch, blocks]`` mask of 0.0/1.0 with exactly ``capacity`` ones per row.
  """
  return _top_indicator(probs, capacity)


def capped_threshold_mask(probs: jax.Array, capacity: int,
                          threshold: float = THRESHOLD) -> jax.Array:
  """Deterministic mask: the threshold mask capped by a capacity.

  A block runs when its probability exceeds ``threshold`` *and* it is among the
  ``capacity`` most probable blocks of its example (ties broken by lower index).

  Args:
    probs: ``[batch, blocks]`` probabilities.
    capacity: at most this many blocks run per example, ``1 <= capacity <= blocks``.
    threshold: the cut.

  Returns:
    ``[batch, blocks]`` mask of 0.0/1.0 with at most ``capacity`` ones per row.
  """
  return _top_indicator(probs, capacity) * threshold_mask(probs, threshold)


def top_k_capacity(tau: float, num_blocks: int) -> int:
  """Blocks per example of the ``top_k`` policy for a target fraction: ``round(tau * blocks)``,
  at least 1."""
  return int(min(num_blocks, max(1, round(tau * num_blocks))))


def deterministic_mask(probs: jax.Array, mode: str, capacity: int | None = None) -> jax.Array:
  """Test-time mask for ``mode`` in ``threshold``, ``top_k``, ``capped`` or ``all``.

  Args:
    probs: ``[batch, blocks]`` probabilities.
    mode: ``threshold`` (p > 0.5), ``top_k`` (exactly ``capacity`` most probable blocks),
      ``capped`` (threshold capped by ``capacity``) or ``all`` (every block runs: the
      dense network).
    capacity: required for ``top_k`` and ``capped``.

  Returns:
    ``[batch, blocks]`` mask.
  """
  if mode == "threshold":
    return threshold_mask(probs)
  if mode in ("top_k", "capped"):
    if capacity is None:
      raise ValueError(f"policy mode {mode!r} needs a capacity")
    return top_k_mask(probs, capacity) if mode == "top_k" else capped_threshold_mask(
        probs, capacity)
  if mode == "all":
    return jnp.ones_like(probs)
  raise ValueError("deterministic policy mode must be one of threshold|top_k|capped|all, "
                   f"got {mode!r}")
