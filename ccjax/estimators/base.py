"""The :class:`Estimator` record every registered estimator is.

Axis letters: ``batch`` examples (or ``[batch, seq]`` positions), ``blocks`` blocks of a
layer; every function works on ``[..., blocks]``.

An estimator says how a gated layer draws its training mask (``mode='sample'``) and, for the
score-function family, the log-probability that the REINFORCE term differentiates. Like
rlax's distributions it is a NamedTuple of pure functions; the registry in
:mod:`ccjax.estimators` maps its name to it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

# ``(probs [..., blocks], rng | None, capacity | None, temperature) -> mask [..., blocks]``.
MaskFn = Callable[[jax.Array, "jax.Array | None", "int | None", float], jax.Array]
# ``(probs [..., blocks], mask [..., blocks], capacity | None) -> log_prob [...]``.
LogProbFn = Callable[[jax.Array, jax.Array, "int | None"], jax.Array]


class Estimator(NamedTuple):
  """How one estimator trains a block policy.

  Attributes:
    name: the registry name (``TrainConfig.estimator``, ``--estimator``).
    training_mask: draws the ``mode='sample'`` mask from ``probs``; its gradient w.r.t.
      ``probs`` (if any) is the estimator's pathwise part.
    log_prob: the log-probability of a training mask under the distribution it was drawn
      from (``[...]``, differentiable w.r.t. ``probs``), which the REINFORCE term
      multiplies by the advantage; ``None`` for estimators without a score-function term.
    needs_capacity: the training mask has exactly ``capacity`` blocks per example, so the
      train step passes ``capacity = round(tau * blocks)`` to the model.
    needs_rng: the training mask is random (the layer draws a ``'gate'`` key).
  """
  name: str
  training_mask: MaskFn
  log_prob: LogProbFn | None
  needs_capacity: bool
  needs_rng: bool

  @property
  def score_function(self) -> bool:
    """True when the policy objective adds a REINFORCE term for this estimator."""
    return self.log_prob is not None
