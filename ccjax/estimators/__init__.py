"""Gradient estimators for the block policy: a registry, name -> :class:`Estimator`.

Axis letters: ``batch`` examples, ``blocks`` blocks of a layer.

Each estimator lives in its own file of this package and says how a gated layer draws its
training mask, the log-probability of its score-function (REINFORCE) term, if any, and
whether it needs a capacity (blocks per example) or a PRNG key. The shared REINFORCE
baselines and advantages are in :mod:`ccjax.estimators.baselines`.

* ``reinforce``: the paper's Bernoulli mask and its score-function term (unbiased).
* ``straight_through`` / ``gumbel``: hard Bernoulli / relaxed Bernoulli masks whose
  gradients flow through the task loss into the policy (biased, no REINFORCE term).
* ``router``: no sampling at all: every example runs exactly its ``k`` most probable
  blocks (an MoE-style top-k router over blocks, fixed compute in training and at test
  time) and the task loss reaches the policy by a straight-through gradient.
* ``reinforce_top_k``: REINFORCE at the test-time budget: exactly ``k`` blocks drawn from
  the Bernoulli policy conditioned on ``k`` blocks, with its exact log-probability
  (unbiased).
* ``noisy_top_k``: the top ``k`` of the log-odds plus Gumbel noise, straight-through
  gradient (biased, no REINFORCE term).

Adding an estimator: one file defining ``ESTIMATOR = base.Estimator(...)`` plus its line
in :data:`REGISTRY` below.
"""

from __future__ import annotations

from ccjax.estimators import gumbel
from ccjax.estimators import noisy_top_k
from ccjax.estimators import reinforce
from ccjax.estimators import reinforce_top_k
from ccjax.estimators import router
from ccjax.estimators import straight_through
from ccjax.estimators.base import Estimator
from ccjax.estimators.baselines import ADVANTAGES
from ccjax.estimators.baselines import BASELINES
from ccjax.estimators.baselines import BaselineState
from ccjax.estimators.baselines import compute_baseline
from ccjax.estimators.baselines import ema_baseline_value
from ccjax.estimators.baselines import init_baseline_state
from ccjax.estimators.baselines import score_function_loss
from ccjax.estimators.baselines import standardized_advantage
from ccjax.estimators.baselines import update_baseline_state
from ccjax.estimators.gumbel import gumbel_sigmoid_mask
from ccjax.estimators.noisy_top_k import noisy_top_k_mask
from ccjax.estimators.reinforce_top_k import conditional_bernoulli_log_prob
from ccjax.estimators.reinforce_top_k import conditional_bernoulli_mask
from ccjax.estimators.router import straight_through_top_k_mask
from ccjax.estimators.straight_through import straight_through_mask

# name -> estimator, in the order the CLI lists them.
REGISTRY: dict[str, Estimator] = {
    reinforce.ESTIMATOR.name: reinforce.ESTIMATOR,
    straight_through.ESTIMATOR.name: straight_through.ESTIMATOR,
    gumbel.ESTIMATOR.name: gumbel.ESTIMATOR,
    router.ESTIMATOR.name: router.ESTIMATOR,
    reinforce_top_k.ESTIMATOR.name: reinforce_top_k.ESTIMATOR,
    noisy_top_k.ESTIMATOR.name: noisy_top_k.ESTIMATOR,
}
ESTIMATORS = tuple(REGISTRY)
# Estimators whose training mask has exactly ``capacity`` blocks (they need a capacity).
TOP_K_ESTIMATORS = tuple(name for name, estimator in REGISTRY.items()
                         if estimator.needs_capacity)


def get(name: str) -> Estimator:
  """The registered estimator called ``name``.

  Raises:
    ValueError: naming the allowed estimators, for an unknown ``name``.
  """
  try:
    return REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f"estimator must be one of {'|'.join(ESTIMATORS)}, "
                     f"got {name!r}") from None


__all__ = (
    "ADVANTAGES", "BASELINES", "ESTIMATORS", "REGISTRY", "TOP_K_ESTIMATORS",
    "BaselineState", "Estimator", "compute_baseline", "conditional_bernoulli_log_prob",
    "conditional_bernoulli_mask", "ema_baseline_value", "get", "gumbel_sigmoid_mask",
    "init_baseline_state", "noisy_top_k_mask", "score_function_loss",
    "standardized_advantage", "straight_through_mask", "straight_through_top_k_mask",
    "update_baseline_state",
)
