"""Step schedules of the training recipes, as pure functions of the step.

Everything a recipe changes over training is a function of ``state.step`` only (no
host-side counters), so a resumed run sees exactly the values an uninterrupted one saw.

* :func:`tau_at`: the target fraction ``tau`` moves from ``start`` (1: every block on)
  to its final value over ``length`` steps after ``begin`` (``constant`` | ``linear`` |
  ``cosine``), then stays there -- a BlockDrop-style curriculum.
* :func:`ramp`: a weight that grows linearly from 0 to 1 over ``length`` steps after
  ``begin`` (1 at once when ``length == 0``).
* :func:`anneal`: a weight that decays linearly from 1 to 0 over ``length`` steps after
  ``begin`` (no decay when ``length == 0``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

TAU_SCHEDULES = ("constant", "linear", "cosine")


def tau_at(step: jax.Array | int, taus: Sequence[float], schedule: str, *, begin: int = 0,
           length: int = 0, start: float = 1.0) -> jax.Array:
  """Target fraction per gated layer at ``step``.

  Args:
    step: scalar int, updates done so far.
    taus: final targets, one per gated layer.
    schedule: ``constant`` (always ``taus``), ``linear`` or ``cosine`` (from ``start``
      to ``taus`` over ``length`` steps beginning at ``begin``).
    begin: first step of the move (before it the target is ``start``).
    length: steps the move takes, >= 0 (0: a jump at ``begin``).
    start: target before and at ``begin``.

  Returns:
    ``[layers]`` float32 targets.
  """
  final = jnp.asarray(taus, jnp.float32)
  if schedule == "constant":
    return final
  if schedule not in TAU_SCHEDULES:
    raise ValueError(f"tau_schedule must be one of {'|'.join(TAU_SCHEDULES)}, got {schedule!r}")
  length = max(int(length), 1)
  if schedule == "linear":
    progress = optax.linear_schedule(0.0, 1.0, length, transition_begin=begin)(step)
  else:
    shifted = jnp.maximum(jnp.asarray(step, jnp.float32) - begin, 0.0)
    progress = 1.0 - optax.cosine_decay_schedule(1.0, length)(shifted)
  return start + (final - start) * jnp.asarray(progress, jnp.float32)


def ramp(step: jax.Array | int, *, begin: int = 0, length: int = 0) -> jax.Array:
  """Scalar float32 in [0, 1]: 0 before ``begin``, linear to 1 over ``length`` steps.

  With ``length == 0`` the ramp is a step from 0 to 1 at ``begin``.
  """
  if length <= 0:
    return (jnp.asarray(step) >= begin).astype(jnp.float32)
  return jnp.asarray(optax.linear_schedule(0.0, 1.0, length, transition_begin=begin)(step),
                     jnp.float32)


def anneal(step: jax.Array | int, *, begin: int = 0, length: int = 0) -> jax.Array:
  """Scalar float32 in [0, 1]: 1 until ``begin``, then linear to 0 over ``length`` steps.

  ``1 - ramp``; with ``length == 0`` there is no annealing (always 1).
  """
  if length <= 0:
    return jnp.ones((), jnp.float32)
  return 1.0 - ramp(step, begin=begin, length=length)
