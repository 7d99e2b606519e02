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
