"""Named training recipes: sets of config fields the recipe study compares.

A recipe is a mapping ``{field: value}`` of :class:`ccjax.ExperimentConfig` /
:class:`ccjax.TrainConfig` fields applied on top of a base config; recipes compose with
``+`` (``warm+distill``: both sets of fields; a field named twice must agree). Every
recipe is also reachable with the flags of the same names, so a study row can be
reproduced with ``experiments.condnet`` alone.

``baseline`` is the empty recipe: the base config as given (after the study, the
default config *is* the chosen recipe, so ``baseline`` then means "the defaults").
"""

from __future__ import annotations

from typing import Any, Mapping

from ccjax import validation

_WARM = {"warm_steps": 1000}
_DISTILL = {"distill_weight": 1.0, "distill_temperature": 2.0}

# Values were set once before the study (not tuned on its results); see docs/recipes.md
# and, for batchshape / mlp_policy / pretrain, docs/methods.md; regroup: the probe of
# docs/studies/mnist1d_dense_to_sparse.md.
RECIPES: Mapping[str, Mapping[str, Any]] = {
    "baseline": {},
    # Dense warm start: 1,000 steps with every block on, policy learns only L_b/L_e/L_v.
    "warm": _WARM,
    # Tau curriculum from 1 to tau over 1,500 steps (cosine).
    "curriculum": {"tau_schedule": "cosine", "tau_schedule_steps": 1500},
    # Distillation from the same net with every block on, T = 2.
    "distill": _DISTILL,
    # Entropy penalty ramped in over 2,000 steps: polarises the policies.
    "entropy": {"entropy_weight": 0.5, "entropy_ramp_steps": 2000},
    # Per-layer Lagrange multipliers on (mean prob - tau), dual ascent.
    "lagrange": {"budget": "lagrange", "dual_lr": 0.05},
    # Per-batch standardised REINFORCE advantage.
    "stdadv": {"advantage": "standardized"},
    # Fixed compute at test time: exactly round(tau * blocks) blocks per example and layer.
    "topk": {"eval_policy": "top_k"},
    # The biased relaxed estimators.
    "straight_through": {"estimator": "straight_through"},
    "gumbel": {"estimator": "gumbel"},
    # The paper's method: REINFORCE (Bernoulli masks) and the threshold test policy.
    "paper": {"estimator": "reinforce", "eval_policy": "threshold"},
    # REINFORCE trained at the test-time budget: exact k-subsets (score function of the
    # conditional Bernoulli), top_k at test time.
    "reinforce_topk": {"estimator": "reinforce_top_k", "eval_policy": "top_k"},
    # Batch-shaping prior Beta(tau, 1 - tau) on every gate, weight 1 annealed to 0 over
    # 2,000 steps (Bejnordi et al. 2020 anneal it).
    "batchshape": {"batch_shaping_weight": 1.0, "batch_shaping_steps": 2000},
    # One hidden layer of 32 ReLU units in every policy (sparse inference runs only the
    # linear policy, so no latency is measured).
    "mlp_policy": {"policy_hidden": 32, "measure_latency": False},
    # Pretrain-then-gate: the warm start's 1,000 dense steps on the same weights, then
    # gates with distillation from the network frozen at the switch.
    "pretrain": {**_WARM, **_DISTILL, "distill_teacher": "snapshot"},
    # Dense-to-sparse (docs/studies/mnist1d_dense_to_sparse.md): 3,000 dense steps, the
    # hidden units regrouped into blocks of 8 co-active units, 1,000 more dense steps in
    # which the rank-16 policies learn to imitate the blocks of largest activation, then
    # gates (the policies keep imitating). The imitation sets the budget (exactly
    # round(tau * blocks) oracle blocks), so the paper's L_b / L_e / L_v are off: L_v, summed
    # over blocks, outweighs the imitation and fights it (seed-0 screen in the study).
    # Meant for runs of > 4,000 steps; compose with an estimator (router, reinforce_topk).
    "regroup": {"warm_steps": 4000, "regroup_step": 3000, "imitation_weight": 1.0,
                "block_size": 8, "policy_rank": 16, "lambda_s": 0.0, "lambda_v": 0.0},
    # The same pipeline for the 1,000-step byte LM (docs/studies/lm_bible_regroup.md): 400
    # dense steps, every transformer MLP's units regrouped into blocks of co-active units,
    # 100 more dense steps of imitation, then gates. Compose with an estimator
    # (experiments.sweep --task=lm --variants=gated_top_k: REINFORCE at the test budget).
    "lm_regroup": {"warm_steps": 500, "regroup_step": 400, "imitation_weight": 1.0,
                   "lambda_s": 0.0, "lambda_v": 0.0},
    # The MoE-style router: every example runs exactly its round(tau * blocks) most probable
    # blocks in training and at test (straight-through gradient to the probabilities).
    "router": {"estimator": "router", "eval_policy": "top_k"},
}


def recipe_fields(name: str) -> dict[str, Any]:
  """The config fields of a recipe name (``a+b`` composes ``a`` and ``b``).

  Raises:
    validation.ConfigError: an unknown recipe, or two parts setting a field differently
      (field ``recipes``).
  """
  if not isinstance(name, str) or not name.strip():
    raise validation.ConfigError("recipes", f"names a recipe, got {name!r}")
  fields: dict[str, Any] = {}
  for part in name.split("+"):
    if part not in RECIPES:
      raise validation.ConfigError(
          "recipes", f"must be names from {'|'.join(RECIPES)} joined by '+', got {part!r}")
    for field, value in RECIPES[part].items():
      if field in fields and fields[field] != value:
        raise validation.ConfigError(
            "recipes", f"{name!r} sets {field} to both {fields[field]!r} and {value!r}")
      fields[field] = value
  return fields
