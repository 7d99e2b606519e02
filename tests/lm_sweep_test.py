"""The LM sweep's variants and its mean +- std table."""

from __future__ import annotations

import dataclasses
import json

from absl.testing import absltest
import numpy as np
import pytest

from ccjax import lm_train
from ccjax import validation
from experiments import lm_sweep


def _result(bits, active=(0.25, 0.25), teal=None):
  result = {"bits_per_byte": bits, "active_fraction": list(active),
            "macs_per_token": {"total": 100.0},
            "mlp_ms_per_token": {"dense": 1.0, "sparse": 0.5},
            "decode_ms_per_token": {"dense": 2.0, "sparse": 1.5}}
  if teal is not None:
    result.update({"teal_bits_per_byte": teal, "teal_active_fraction": 0.25})
  return result


class LmSweepTest(absltest.TestCase):

  def test_variants(self):
    base = lm_train.LMConfig()
    self.assertEqual(lm_sweep.variant_config(base, "gated", 2).model, "gated")
    self.assertEqual(lm_sweep.variant_config(base, "gated", 2).seed, 2)
    dense = lm_sweep.variant_config(base, "dense", 1)
    self.assertEqual((dense.model, dense.mlp_width), ("dense", 512))
    small = lm_sweep.variant_config(base, "dense_same_macs", 0)
    self.assertEqual((small.model, small.mlp_width), ("dense", 128))  # tau 1/4 of 512
    router = lm_sweep.variant_config(base, "router", 0)
    self.assertEqual((router.model, router.train.estimator, router.eval_mode()),
                     ("router", "router", "top_k"))

  def test_summary_mean_std_and_teal_row(self):
    plan = lm_sweep.plan_rows(lm_train.LMConfig(), ["gated", "dense"])
    rows = lm_sweep.summarize(plan, {
        "gated": [_result(1.0), _result(1.2)],
        "dense": [_result(0.9, (), teal=2.0), _result(1.1, (), teal=2.2)]})
    self.assertAlmostEqual(rows["gated"]["bits_per_byte"]["mean"], 1.1)
    # Sample std (ddof = 1) of two values 0.2 apart: 0.2 / sqrt(2).
    self.assertAlmostEqual(rows["gated"]["bits_per_byte"]["std"], 0.2 / 2 ** 0.5)
    self.assertIsNone(rows["dense"]["active_fraction"])
    self.assertAlmostEqual(rows["teal"]["bits_per_byte"]["mean"], 2.1)
    table = lm_sweep.markdown(rows)
    self.assertIn("| gated | - | 512 | 2 | 1.1000 ± 0.1414 | - | +0.1000 ± 0.0000 | - |",
                  table)
    self.assertIn("| teal | - | 512 | 2 | 2.1000 ± 0.1414 |", table)


# Through the CLI: the sweep's rules (experiments.sweep's) for seeds and finished runs.

SWEEP_FLAGS = ("--num_layers=1", "--d_model=16", "--num_heads=2", "--mlp_width=32",
               "--block_size=8", "--context=16", "--batch_size=4", "--steps=2",
               "--eval_every=2", "--log_every=2", "--checkpoint_every=2", "--plots=false",
               "--decode_benchmark=false", "--variants=gated")


def _error_line(process) -> str:
  assert process.returncode == 2, process.stderr[-3000:]
  errors = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in process.stderr, process.stderr[-3000:]
  return errors[0]


def test_repeated_seeds_or_variants_are_refused_before_anything_is_written(tmp_path):
  from tests import experiment_utils  # pylint: disable=g-import-not-at-top
  for flag, message in (("--seeds=0,0", "--seeds lists a value twice: [0, 0]"),
                        ("--variants=gated,gated", "--variants lists a value twice")):
    process = experiment_utils.run_module("experiments.lm_sweep", f"--workdir={tmp_path}/s",
                                          *SWEEP_FLAGS, flag)
    assert message in _error_line(process)
    assert not (tmp_path / "s").exists()


def test_a_second_sweep_with_other_settings_does_not_reuse_the_first(tmp_path):
  from tests import experiment_utils  # pylint: disable=g-import-not-at-top
  workdir = f"--workdir={tmp_path}/s"
  first = experiment_utils.run_module("experiments.lm_sweep", workdir, *SWEEP_FLAGS,
                                      "--seeds=0")
  assert first.returncode == 0, first.stderr[-3000:]
  for changed, shown in (("--lr=0.01", "lr=0.001 -> 0.01"), ("--tau=0.5", "tau=[0.25] -> [0.5]"),
                         ("--lambda_s=1", "lambda_s=4.0 -> 1.0")):
    second = experiment_utils.run_module("experiments.lm_sweep", workdir, *SWEEP_FLAGS,
                                         "--seeds=0", changed)
    line = _error_line(second)
    assert "the checkpoint was trained with other settings" in line and shown in line, line
  again = experiment_utils.run_module("experiments.lm_sweep", workdir, *SWEEP_FLAGS,
                                      "--seeds=0")
  assert again.returncode == 0, again.stderr[-3000:]


# The variants of issue 19, the statistics of ccjax.stats and the capacity regime.

def _run(bits, seed, valid=None, active=(0.25, 0.25), estimator="reinforce",
         eval_policy="threshold", teal=None):
  result = {"bits_per_byte": bits, "valid_bits_per_byte": valid, "seed": seed,
            "active_fraction": list(active), "estimator": estimator,
            "eval_policy": eval_policy, "macs_per_token": {"total": 100.0, "mlp": 10.0}}
  if teal is not None:
    result.update({"teal_bits_per_byte": teal, "teal_active_fraction": 0.25})
  return result


def test_gated_top_k_trains_reinforce_at_the_test_budget():
  config = lm_sweep.variant_config(lm_train.LMConfig(), "gated_top_k", 3)
  assert (config.model, config.train.estimator, config.eval_mode(), config.seed) == (
      "gated", "reinforce_top_k", "top_k", 3)
  assert config.layer_capacities() == (4, 4)
  assert lm_sweep.variant_config(lm_train.LMConfig(), "gated", 0).train.estimator == "reinforce"


def test_capacity_widths_keep_the_active_blocks_and_reuse_the_base_width_runs():
  base = lm_train.LMConfig()   # MLP 512 in blocks of 32, tau 1/4: 4 active blocks
  assert lm_sweep.active_width(base) == 128
  for width, tau in ((512, 0.25), (1024, 0.125), (2048, 0.0625)):
    gated = lm_sweep.variant_config(base, "gated", 0, width)
    assert (gated.mlp_width, gated.train.taus(2), gated.layer_capacities()) == (
        width, (tau, tau), (4, 4))
    dense = lm_sweep.variant_config(base, "dense", 0, width)
    assert (dense.model, dense.mlp_width, dense.top_k_capacity()) == ("dense", width, 4)
  assert lm_sweep.variant_config(base, "dense_same_macs", 1, 2048).mlp_width == 128
  plan = lm_sweep.plan_rows(base, ["gated", "dense", "dense_same_macs"], (2048, 512))
  assert [row.name for row in plan] == ["dense_same_macs", "gated_width512", "dense_width512",
                                        "gated_width2048", "dense_width2048"]
  assert plan[3].baselines == {"dense": "dense_width2048", "dense_same_macs": "dense_same_macs"}
  assert [lm_sweep.run_directory(base, row, 0) for row in plan] == [
      "dense_same_macs_seed0", "gated_seed0", "dense_seed0", "gated_width2048_seed0",
      "dense_width2048_seed0"]
  # A base tau whose blocks are not whole (0.3 * 16 = 4.8 -> 5 blocks): the base width
  # runs at 5/16, so it is not the plain sweep's run.
  odd = lm_train.LMConfig(train=dataclasses.replace(base.train, tau=(0.3,)))
  row = lm_sweep.plan_rows(odd, ["gated"], (512,))[0]
  assert lm_sweep.run_directory(odd, row, 0) == "gated_width512_seed0"


def test_capacity_widths_are_checked():
  base = lm_train.LMConfig()
  for widths, message in (((512, 512), "lists a value twice"), ((500,), "multiples of"),
                          ((96,), "at least the active width 128"), ((), "at least one")):
    with pytest.raises(validation.ConfigError, match=message):
      lm_sweep.check_capacity_widths(base, widths)
  uneven = lm_train.LMConfig(train=dataclasses.replace(base.train, tau=(0.25, 0.5)))
  with pytest.raises(validation.ConfigError, match="same active blocks in every layer"):
    lm_sweep.check_capacity_widths(uneven, (1024,))


def test_summary_sample_std_and_paired_differences_to_both_baselines():
  plan = lm_sweep.plan_rows(lm_train.LMConfig(), ["gated", "dense", "dense_same_macs"])
  gated, dense, small = [1.0, 1.2, 1.1], [0.9, 1.0, 1.05], [1.1, 1.1, 1.2]
  rows = lm_sweep.summarize(plan, {
      "gated": [_run(b, s) for s, b in enumerate(gated)],
      "dense": [_run(b, s, active=(), teal=2.0 + b) for s, b in enumerate(dense)],
      "dense_same_macs": [_run(b, s, active=()) for s, b in enumerate(small)]})
  assert rows["gated"]["bits_per_byte"]["std"] == pytest.approx(0.1)        # ddof = 1
  assert rows["gated"]["per_seed"]["bits_per_byte"] == gated
  # gated - dense: 0.1, 0.2, 0.05 -> mean 0.11667, sample std 0.07638, t(0.975, 2) 4.3027
  minus_dense = rows["gated"]["minus_dense"]
  assert minus_dense["mean"] == pytest.approx(0.35 / 3)
  assert minus_dense["std"] == pytest.approx(0.0763763, rel=1e-5)
  assert minus_dense["ci95"] == pytest.approx(4.3026527 * 0.0763763 / 3 ** 0.5, rel=1e-5)
  assert rows["gated"]["minus_dense_same_macs"]["mean"] == pytest.approx(-0.1 / 3)
  assert rows["teal"]["bits_per_byte"]["mean"] == pytest.approx(2.0 + np.mean(dense))
  assert "minus_dense" not in rows["dense"]
  table = lm_sweep.markdown(rows, lm_sweep.notes(command="python -m experiments.lm_sweep x"))
  assert ("| gated | reinforce / threshold | 512 | 3 | 1.1000 ± 0.1000 | - | "
          f"+0.1167 ± {minus_dense['ci95']:.4f} | -0.0333 ± ") in table
  assert "ddof = 1" in table and "Command: `python -m experiments.lm_sweep x`" in table
  # Without a baseline among the variants, its difference is absent, not made up.
  only = lm_sweep.plan_rows(lm_train.LMConfig(), ["gated", "dense_same_macs"])
  rows = lm_sweep.summarize(only, {"gated": [_run(1.0, 0)], "dense_same_macs": [_run(0.9, 0)]})
  assert rows["gated"]["minus_dense"] is None
  assert rows["gated"]["minus_dense_same_macs"] == {"mean": pytest.approx(0.1), "std": None,
                                                    "n": 1, "ci95": None}


def test_bad_capacity_widths_exit_2_before_anything_is_written(tmp_path):
  from tests import experiment_utils  # pylint: disable=g-import-not-at-top
  process = experiment_utils.run_module("experiments.lm_sweep", f"--workdir={tmp_path}/s",
                                        *SWEEP_FLAGS, "--capacity_widths=32,36")
  assert "--capacity_widths must be multiples of --block_size=8" in _error_line(process)
  assert not (tmp_path / "s").exists()


# Slow tier: five LM trainings through the CLI; the capacity rules above stay fast.
@pytest.mark.slow
def test_capacity_sweep_end_to_end(tmp_path):
  """Tiny LMs, 2 steps: the base MLP 16 in blocks of 8 at tau 1/2 runs 1 block (8 units);
  widths 16 (tau 1/2: the plain sweep's runs) and 32 (tau 1/4)."""
  from tests import experiment_utils  # pylint: disable=g-import-not-at-top
  flags = [f for f in SWEEP_FLAGS if not f.startswith(("--mlp_width", "--variants"))]
  process = experiment_utils.run_module(
      "experiments.lm_sweep", f"--workdir={tmp_path}/s", *flags, "--mlp_width=16",
      "--tau=0.5", "--capacity_widths=16,32", "--variants=gated,dense,dense_same_macs", "--seeds=0",
      timeout=900)
  assert process.returncode == 0, process.stderr[-3000:]
  summary = json.loads((tmp_path / "s" / "summary.json").read_text())
  rows = summary["rows"]
  assert summary["row_order"] == ["dense_same_macs", "gated_width16", "dense_width16", "teal_width16",
                        "gated_width32", "dense_width32", "teal_width32"]
  assert [rows[name]["mlp_width"] for name in ("dense_same_macs", "gated_width32")] == [8, 32]
  assert summary["capacity_widths"] == [16, 32]
  assert "--capacity_widths=16,32" in summary["command"]
  # Each gated row: one run per width, paired with dense W and dense 8 on seed 0.
  for width in (16, 32):
    gated = rows[f"gated_width{width}"]
    assert gated["per_seed"]["seed"] == [0]
    assert gated["minus_dense"]["mean"] == pytest.approx(
        gated["bits_per_byte"]["mean"] - rows[f"dense_width{width}"]["bits_per_byte"]["mean"])
    assert gated["minus_dense_same_macs"]["mean"] == pytest.approx(
        gated["bits_per_byte"]["mean"] - rows["dense_same_macs"]["bits_per_byte"]["mean"])
  def dense_mlp_macs(run):
    path = tmp_path / "s" / run / "results.json"
    return json.loads(path.read_text())["dense_macs_per_token"]["mlp"]
  assert dense_mlp_macs("gated_width32_seed0") == 2 * dense_mlp_macs("gated_seed0")
  assert dense_mlp_macs("gated_seed0") == 2 * dense_mlp_macs("dense_same_macs_seed0")
  assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == [
      "dense_same_macs_seed0", "dense_seed0", "dense_width32_seed0", "gated_seed0",
      "gated_width32_seed0"]
  assert "Capacity regime" in (tmp_path / "s" / "summary.md").read_text()


if __name__ == "__main__":
  absltest.main()
