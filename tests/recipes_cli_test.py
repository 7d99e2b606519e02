"""End-to-end recipes: a CLI smoke test on digits, exact resume with every recipe on,
--init_from and --distill_from (including the one-line shape-mismatch error)."""

import os

import numpy as np
import pytest

from ccjax import loop
from tests import condnet_test
from tests import experiment_utils

EVERY_RECIPE = dict(warm_steps=4, tau_schedule="linear", tau_schedule_steps=6,
                    distill_weight=0.5, distill_temperature=2.0, entropy_weight=0.1,
                    entropy_ramp_steps=4, budget="lagrange", dual_lr=0.1,
                    advantage="standardized", eval_policy="top_k")


# Slow tier: three in-process runs with every recipe on, ~20 s; condnet_test keeps resume
# exactness in the fast tier and recipes_test each recipe's mechanics.
@pytest.mark.slow
def test_resume_mid_schedule_is_exact_with_every_recipe(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  config = condnet_test.tiny_config(steps=12, **EVERY_RECIPE)
  straight_results = loop.train_and_evaluate(config, straight)
  # "Crash" at step 6: inside the warm-up of the entropy ramp's end and the tau schedule.
  loop.train_and_evaluate(condnet_test.tiny_config(steps=6, **EVERY_RECIPE), resumed)
  resumed_results = loop.train_and_evaluate(config, resumed)
  straight_state = condnet_test.final_state(straight)
  experiment_utils.assert_trees_equal(straight_state, condnet_test.final_state(resumed))
  assert straight_state["duals"] is not None and np.any(straight_state["duals"] != 0)
  for key in ("test_error", "valid_error", "active_fraction", "macs_per_example"):
    assert straight_results[key] == resumed_results[key]
  # top_k: exactly round(tau * blocks) = 1 of 4 blocks per example and layer.
  assert straight_results["active_fraction"] == [0.25, 0.25]


@pytest.mark.slow  # two whole CLI runs, 18 s
def test_cli_smoke_on_digits_with_recipes_and_init_from(tmp_path):
  # The source run: the same tiny dense net, trained in-process (what the CLI reads of it
  # is its workdir).
  dense = str(tmp_path / "dense")
  loop.train_and_evaluate(condnet_test.tiny_config(model="dense"), dense)
  gated = str(tmp_path / "gated")
  process = experiment_utils.run_module(
      "experiments.condnet", f"--workdir={gated}", f"--init_from={dense}",
      f"--distill_from={dense}", "--distill_weight=1", "--warm_steps=4",
      "--tau_schedule=cosine", "--tau_schedule_steps=4", "--entropy_weight=0.1",
      "--budget=lagrange", "--advantage=standardized", "--eval_policy=top_k", "--tau=0.25",
      "--plots=false", *experiment_utils.TINY_FLAGS)
  assert process.returncode == 0, process.stderr[-3000:]
  assert os.path.exists(os.path.join(gated, "results.json"))
  # A run of another shape: one line, exit 2, nothing written.
  other = str(tmp_path / "other")
  process = experiment_utils.run_module(
      "experiments.condnet", f"--workdir={other}", f"--init_from={dense}", "--hidden=16,16",
      *experiment_utils.TINY_FLAGS[1:])
  assert process.returncode == 2
  assert process.stderr.startswith("error: --init_from") and process.stderr.count("\n") == 1
  assert not os.path.exists(other)
  process = experiment_utils.run_module(
      "experiments.condnet", f"--workdir={other}", "--tau_schedule=step",
      *experiment_utils.TINY_FLAGS)
  assert process.returncode == 2 and "tau_schedule" in process.stderr
