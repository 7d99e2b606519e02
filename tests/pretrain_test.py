"""Pretrain-then-gate (warm start + distillation from its snapshot) through the training loop:
exact resume across the switch from dense to gated, composed with the other methods."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ccjax import checkpoint as checkpoint_lib
from ccjax import config as config_lib
from ccjax import flops
from ccjax import loop
from ccjax import recipes
from tests import condnet_test
from tests import experiment_utils

WARM_STEPS = 4


def _config(**changes) -> config_lib.ExperimentConfig:
  # Every method of docs/methods.md at once: a non-linear policy, the batch-shaping prior
  # (annealed over the steps after the switch) and the snapshot teacher.
  values = dict(warm_steps=WARM_STEPS, distill_weight=1.0, distill_teacher="snapshot",
                batch_shaping_weight=1.0, batch_shaping_steps=6, policy_hidden=4)
  values.update(changes)
  return condnet_test.tiny_config(**values)


def _checkpoint(workdir: str, step: int):
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return checkpointer.restore_raw(step)
  finally:
    checkpointer.close()


@pytest.mark.slow  # interrupted and straight pretrain runs, 20 s
def test_resume_across_the_switch_is_exact(tmp_path):
  straight = str(tmp_path / "straight")
  results = loop.train_and_evaluate(_config(steps=12), straight)
  final = condnet_test.final_state(straight)
  # The teacher was frozen at the switch: it is not the final network.
  assert not np.array_equal(final["distill_snapshot"]["output"]["kernel"],
                            final["params"]["output"]["kernel"])
  for crash in (WARM_STEPS - 2, WARM_STEPS + 2):  # "killed" before and after the switch
    resumed = str(tmp_path / f"resumed_{crash}")
    loop.train_and_evaluate(_config(steps=crash), resumed)
    if crash > WARM_STEPS:  # the snapshot is the network after the dense steps
      experiment_utils.assert_trees_equal(_checkpoint(resumed, WARM_STEPS)["params"],
                                          final["distill_snapshot"])
    resumed_results = loop.train_and_evaluate(_config(steps=12), resumed)
    experiment_utils.assert_trees_equal(final, condnet_test.final_state(resumed))
    for key in ("test_error", "valid_error", "active_fraction", "macs_per_example"):
      assert results[key] == resumed_results[key], (crash, key)
  records = condnet_test.read_metrics(straight)
  distill = {r["step"]: r["distill"] for r in records if r["kind"] == "train"}
  assert distill[WARM_STEPS] == 0.0 and distill[12] > 0.0  # logged after steps 4 and 12
  # results.json counts the hidden policy layer in the MACs: at most the dense net's plus
  # the policies run on every input unit.
  assert "latency_ms" not in results
  dense_macs = flops.dense_mlp_macs(64, (32, 32), 10)
  max_policy = sum(flops.policy_macs(units, 4, 4) for units in (64, 32))
  assert results["macs_per_example"] <= dense_macs + max_policy


def test_recipe_is_warm_start_plus_snapshot_distillation():
  fields = recipes.recipe_fields("pretrain")
  assert fields == {**recipes.recipe_fields("warm+distill"), "distill_teacher": "snapshot"}
  config = config_lib.ExperimentConfig.create(**fields)
  assert config.train.warm_steps == 1000 and config.train.distill_teacher == "snapshot"
