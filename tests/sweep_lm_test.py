"""The one sweep (ccjax.sweep, experiments.sweep) on the language-modelling task."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from ccjax import lm_config
from ccjax import stats
from ccjax import sweep
from ccjax import validation
from tests import experiment_utils


class _RecordingTrainer:
  """``train_fn`` that records each run's directory and config and returns LM results
  that depend on the config (gated nets worse by 0.1 per seed index, dense ones by
  their width), with TEAL numbers for dense runs."""

  def __init__(self, root):
    self.root = root
    self.calls = []

  def __call__(self, config, workdir):
    self.calls.append((os.path.relpath(workdir, self.root), config))
    gated = config.model != "dense"
    bits = 1.0 + 0.1 * config.seed * gated - config.mlp_width / 10_000
    result = {"bits_per_byte": bits, "valid_bits_per_byte": bits + 0.01, "seed": config.seed,
              "active_fraction": [0.25] * config.num_layers if gated else [],
              "macs_per_token": {"total": 1000.0 + config.mlp_width}, "train_time_s": 2.0,
              "estimator": config.train.estimator, "eval_policy": config.eval_mode()}
    if not gated:
      result.update({"teal_bits_per_byte": bits + 0.5, "teal_active_fraction": 0.25})
    return result


def _sweep(tmp_path, base, **grid):
  grid = sweep.validate_grid(base, **{"seeds": (0, 1, 2), "taus": (), **grid})
  trainer = _RecordingTrainer(str(tmp_path))
  return sweep.run_sweep(base, str(tmp_path), grid, trainer), trainer, grid


def test_every_variant_against_both_dense_baselines(tmp_path):
  base = lm_config.LMConfig()   # MLP 512 in blocks of 32, tau 1/4: 4 active blocks
  rows, trainer, grid = _sweep(tmp_path, base, taus=(0.25,))
  assert grid.variants == ("gated", "gated_top_k", "router")
  configs = {directory.split(os.sep)[0]: config for directory, config in trainer.calls}
  assert sorted(configs) == ["dense_same_width", "dense_width128", "gated_tau0.25",
                             "gated_top_k_tau0.25", "router_tau0.25"]
  described = {name: (c.model, c.train.estimator, c.eval_mode(), c.mlp_width)
               for name, c in configs.items()}
  assert described == {
      "dense_same_width": ("dense", "reinforce", "threshold", 512),
      "dense_width128": ("dense", "reinforce", "threshold", 128),   # the 4 active blocks
      "gated_tau0.25": ("gated", "reinforce", "threshold", 512),
      "gated_top_k_tau0.25": ("gated", "reinforce_top_k", "top_k", 512),
      "router_tau0.25": ("router", "router", "top_k", 512)}
  assert [row["label"] for row in rows] == [
      "dense (same width)", "teal (dense, top-4 activations)", "gated tau=0.25",
      "dense (MACs of gated tau=0.25, width 128)", "gated_top_k tau=0.25", "router tau=0.25"]
  gated = rows[2]
  gated_bits = [1.0 + 0.1 * seed - 0.0512 for seed in (0, 1, 2)]
  np.testing.assert_allclose(gated["per_seed"]["bits_per_byte"], gated_bits)
  assert gated["bits_per_byte_std"] == pytest.approx(0.1)   # ddof = 1
  assert gated["macs_mean"] == 1512.0 and gated["active_fraction_mean"] == 0.25
  expected = stats.paired_difference(gated_bits, [1.0 - 0.0512] * 3)
  assert gated["bits_per_byte_minus_dense_width_mean"] == pytest.approx(expected.mean)
  assert gated["bits_per_byte_minus_dense_width_ci95"] == pytest.approx(expected.ci95)
  assert gated["bits_per_byte_minus_dense_macs_mean"] == pytest.approx(0.1 - 0.0512 + 0.0128)
  assert rows[1]["bits_per_byte_mean"] == pytest.approx(1.5 - 0.0512)   # TEAL on dense 512
  assert "bits_per_byte_minus_dense_width_mean" not in rows[0]
  paths = sweep.write_tables(rows, str(tmp_path), grid, command="python -m experiments.sweep x",
                             spec=sweep.spec_of(base))
  table = open(paths.markdown).read()
  assert "| test bits/byte |" in table.splitlines()[0]
  assert f"| +0.1000 ± {expected.ci95:.4f} |" in table
  assert "ddof = 1" in table and "Command: `python -m experiments.sweep x`" in table
  payload = json.load(open(paths.json))
  assert payload["metric"] == "bits_per_byte" and payload["grid"]["variants"] == list(grid.variants)


def test_capacity_regime_keeps_the_active_blocks(tmp_path):
  base = lm_config.LMConfig()
  rows, trainer, grid = _sweep(tmp_path, base, capacity_widths=(2048, 512, 1024),
                               variants=("gated",))
  assert grid.taus == (0.0625, 0.25, 0.125)
  for directory, config in trainer.calls:
    if directory.startswith("gated"):
      assert config.layer_capacities() == (4, 4)
      assert directory.startswith(f"gated_width{config.mlp_width}_tau")
  assert [row["label"] for row in rows] == [
      "dense (width 128: the active MACs)", "gated width=512 tau=0.25", "dense (width 512)",
      "teal (dense, top-4 activations)", "gated width=1024 tau=0.125", "dense (width 1024)",
      "teal (dense, top-8 activations)", "gated width=2048 tau=0.0625", "dense (width 2048)",
      "teal (dense, top-16 activations)"]
  # Each gated row: paired with dense of its width and with dense 128.
  for row, width in ((rows[1], 512), (rows[4], 1024), (rows[7], 2048)):
    assert row["hidden"] == [width, width]
    assert row["bits_per_byte_minus_dense_width_mean"] == pytest.approx(0.1)
    assert row["bits_per_byte_minus_dense_macs_mean"] == pytest.approx(
        0.1 - width / 10_000 + 128 / 10_000)


@pytest.mark.parametrize("widths, message", [
    ((512, 512), "lists a value twice"), ((500,), "multiples of --block_size=32"),
    ((96,), "at least the active width w = 128, got 96")])
def test_capacity_widths_are_checked(widths, message):
  with pytest.raises(validation.ConfigError, match=message):
    sweep.validate_grid(lm_config.LMConfig(), seeds=(0,), taus=(), capacity_widths=widths)


def test_capacity_regime_needs_the_same_active_blocks_in_every_layer():
  base = lm_config.LMConfig()
  uneven = dataclasses.replace(base, train=dataclasses.replace(base.train, tau=(0.25, 0.5)))
  with pytest.raises(validation.ConfigError, match="same active blocks in every layer"):
    sweep.validate_grid(uneven, seeds=(0,), taus=(), capacity_widths=(1024,))


def test_variants_are_the_tasks():
  for variants, message in ((("gated", "gated"), "lists a value twice"),
                            (("condnet",), "--variants must be one of gated|gated_top_k|router")):
    with pytest.raises(validation.ConfigError, match=message):
      sweep.validate_grid(lm_config.LMConfig(), seeds=(0,), taus=(0.25,), variants=variants)


# Through the CLI: experiments.sweep --task=lm, the sweep's rules for seeds and finished runs.

SWEEP_FLAGS = ("--task=lm", "--num_layers=1", "--d_model=16", "--num_heads=2", "--mlp_width=32",
               "--block_size=8", "--context=16", "--batch_size=4", "--steps=2",
               "--eval_every=2", "--log_every=2", "--checkpoint_every=2", "--plots=false",
               "--decode_benchmark=false", "--variants=gated")


def _error_line(process) -> str:
  assert process.returncode == 2, process.stderr[-3000:]
  errors = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in process.stderr, process.stderr[-3000:]
  return errors[0]


BAD_GRIDS = {
    "--seeds=0,0": "--seeds lists a value twice: [0, 0]",
    "--variants=gated,gated": "--variants lists a value twice",
    "--capacity_widths=32,36": "--capacity_widths must be multiples of --block_size=8",
    "--recipes=mlp_policy": "--recipes sets a field a lm run does not have",
}


@pytest.fixture(scope="module")
def bad_grid_runs(tmp_path_factory):
  """``{flag: (process, workdir)}``: each :data:`BAD_GRIDS` flag through the CLI, in one
  batch (tests/cli_batch: one interpreter start for all of them)."""
  root = tmp_path_factory.mktemp("bad_lm_grids")
  workdirs = {flag: root / str(index) / "s" for index, flag in enumerate(BAD_GRIDS)}
  processes = experiment_utils.run_module_cases(
      "experiments.sweep", [[f"--workdir={workdirs[flag]}", *SWEEP_FLAGS, flag]
                            for flag in BAD_GRIDS])
  return {flag: (process, workdirs[flag]) for flag, process in zip(BAD_GRIDS, processes)}


@pytest.mark.parametrize("flag", list(BAD_GRIDS))
def test_bad_grids_are_refused_before_anything_is_written(bad_grid_runs, flag):
  process, workdir = bad_grid_runs[flag]
  assert BAD_GRIDS[flag] in _error_line(process)
  assert not workdir.exists()


# Slow tier: a whole LM sweep through the CLI (four trainings) and a second sweep, ~20 s;
# the bad-grid refusals above keep the LM sweep CLI in the fast tier.
@pytest.mark.slow
def test_a_second_sweep_with_other_settings_does_not_reuse_the_first(tmp_path):
  workdir = f"--workdir={tmp_path}/s"
  first = experiment_utils.run_module("experiments.sweep", workdir, *SWEEP_FLAGS, "--seeds=0")
  assert first.returncode == 0, first.stderr[-3000:]
  table = (tmp_path / "s" / "sweep.md").read_text()
  assert "| gated tau=0.25 | 1 |" in table and "| teal (dense, top-1 activations) | 1 |" in table
  second = experiment_utils.run_module("experiments.sweep", workdir, *SWEEP_FLAGS, "--seeds=0",
                                       "--lambda_s=1")
  line = _error_line(second)
  assert "the checkpoint was trained with other settings" in line, line
  assert "lambda_s=4.0 -> 1.0" in line, line


# Slow tier: five LM trainings through the CLI; the capacity rules above stay fast.
@pytest.mark.slow
def test_capacity_sweep_end_to_end(tmp_path):
  """Tiny LMs, 2 steps: the base MLP 16 in blocks of 8 at tau 1/2 runs 1 block (8 units);
  widths 16 (tau 1/2) and 32 (tau 1/4)."""
  flags = [f for f in SWEEP_FLAGS if not f.startswith("--mlp_width")]
  process = experiment_utils.run_module(
      "experiments.sweep", f"--workdir={tmp_path}/s", *flags, "--mlp_width=16",
      "--tau=0.5", "--capacity_widths=16,32", "--seeds=0", timeout=900)
  assert process.returncode == 0, process.stderr[-3000:]
  payload = json.loads((tmp_path / "s" / "sweep.json").read_text())
  rows = {row["label"]: row for row in payload["rows"]}
  assert list(rows) == ["dense (width 8: the active MACs)", "gated width=16 tau=0.5",
                        "dense (width 16)", "teal (dense, top-1 activations)",
                        "gated width=32 tau=0.25", "dense (width 32)",
                        "teal (dense, top-2 activations)"]
  assert payload["grid"]["capacity_widths"] == [16, 32]
  assert "--capacity_widths=16,32" in payload["command"]
  for width in (16, 32):
    gated = rows[f"gated width={width} tau={8 / width:g}"]
    assert gated["bits_per_byte_minus_dense_width_mean"] == pytest.approx(
        gated["bits_per_byte_mean"] - rows[f"dense (width {width})"]["bits_per_byte_mean"])
    assert gated["bits_per_byte_minus_dense_macs_mean"] == pytest.approx(
        gated["bits_per_byte_mean"] - rows["dense (width 8: the active MACs)"]["bits_per_byte_mean"])
  def dense_mlp_macs(run):
    path = tmp_path / "s" / run / "seed0" / "results.json"
    return json.loads(path.read_text())["dense_macs_per_token"]["mlp"]
  assert dense_mlp_macs("gated_width32_tau0.25") == 2 * dense_mlp_macs("gated_width16_tau0.5")
  assert dense_mlp_macs("gated_width16_tau0.5") == 2 * dense_mlp_macs("dense_width8")
  assert "Capacity regime" in (tmp_path / "s" / "sweep.md").read_text()
