"""Tests of experiments/sweep.py and ccjax.sweep."""

from __future__ import annotations

import csv
import os

import pytest

from ccjax import flops
from ccjax import sweep
from tests import experiment_utils


def test_matched_dense_width_matches_macs():
  target = flops.dense_mlp_macs(64, [96, 96], 10)
  assert flops.matched_dense_width(64, 2, 10, target, 32) == 96
  assert flops.matched_dense_width(64, 2, 10, target + 10, 32) == 96


def test_cnn_same_macs_baseline_is_a_dense_cnn_of_the_closest_uniform_width():
  from ccjax import config as config_lib  # pylint: disable=g-import-not-at-top
  import ccjax  # pylint: disable=g-import-not-at-top
  from ccjax import tasks  # pylint: disable=g-import-not-at-top
  spec = tasks.task_for(config_lib.ExperimentConfig.create()).sweep
  gated = config_lib.ExperimentConfig.create(arch="cnn", hidden=(16, 32), block_size=8,
                                             model="condnet")

  def dense_cnn_macs(width):
    dense = spec.at_width(gated.replace(model="dense"), width)
    return ccjax.dense_macs_per_example(
        config_lib.build_model(dense, (8, 8, 1), 10), (8, 8, 1))

  macs = {width: dense_cnn_macs(width) for width in (8, 16, 24, 32)}
  assert macs[8] < macs[16] < macs[24] < macs[32]
  for target, expected in ((macs[16] + 1, 16), (macs[24] - 1, 24), (1.0, 8),
                           ((macs[16] + macs[24]) / 2, 16)):   # a tie: the narrower
    runs = [{"macs_per_example": target, "input_shape": [8, 8, 1], "num_classes": 10,
             "input_dim": 64}]
    assert spec.same_macs_width(gated, runs) == expected, target


def test_aggregate_reports_mean_and_std_over_seeds():
  runs = [{"test_error": 0.1, "active_fraction": [0.2, 0.4], "macs_per_example": 100.0,
           "latency_ms": {"dense": 2.0, "sparse": 1.0}},
          {"test_error": 0.3, "active_fraction": [0.4, 0.6], "macs_per_example": 300.0,
           "latency_ms": {"dense": 2.0, "sparse": 3.0}}]
  row = sweep.aggregate("x", "condnet", 0.25, (32,), runs)
  assert row["seeds"] == 2
  # Sample std (ddof = 1): sqrt((0.1 ** 2 + 0.1 ** 2) / 1).
  assert abs(row["test_error_mean"] - 0.2) < 1e-12
  assert abs(row["test_error_std"] - 0.02 ** 0.5) < 1e-12
  assert abs(row["active_fraction_mean"] - 0.4) < 1e-12
  assert row["macs_mean"] == 200.0 and row["latency_ms_mean"] == 2.0


@pytest.mark.slow  # a whole sweep CLI run; the library sweep tests stay fast
def test_sweep_cli_writes_tables_and_pareto(tmp_path):
  workdir = str(tmp_path / "sweep")
  process = experiment_utils.run_module(
      "experiments.sweep", f"--workdir={workdir}", "--seeds=0,1", "--taus=0.25",
      "--hidden=32,32", "--block_size=8", "--steps=8", "--batch_size=32",
      "--measure_latency=false", timeout=600)
  assert process.returncode == 0, process.stderr[-3000:]
  with open(os.path.join(workdir, "sweep.csv")) as stream:
    rows = list(csv.DictReader(stream))
  labels = [row["label"] for row in rows]
  assert labels[0] == "dense (same width)" and labels[1] == "condnet tau=0.25"
  assert labels[2].startswith("dense (MACs of condnet tau=0.25, width ")
  assert all(row["seeds"] == "2" for row in rows)
  condnet_macs = float(rows[1]["macs_mean"])
  assert condnet_macs < float(rows[0]["macs_mean"])
  # The matched baseline's MACs are the closest a multiple of the block size can get.
  assert abs(float(rows[2]["macs_mean"]) - condnet_macs) <= flops.dense_mlp_macs(64, [8, 8], 10)
  with open(os.path.join(workdir, "sweep.md")) as stream:
    table = stream.read()
  assert "±" in table and "condnet tau=0.25" in table
  assert "condnet tau=0.25" in process.stdout
  with open(os.path.join(workdir, "pareto.png"), "rb") as stream:
    assert stream.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.exists(os.path.join(workdir, "condnet_tau0.25", "seed1", "results.json"))


BAD_GRIDS = [
    (["--taus=0.25,2"], "error: --taus must be in (0, 1]"),
    (["--num_devices=4"], "error: --num_devices must be in [1, "),
    (["--lrs=0.001,0.003", "--lr=0.01"], "error: --lr and --lrs: give one"),
    (["--lrs=0.001,0.003", "--valid_fraction=0"], "error: --lrs chooses the lr on the validation"),
    (["--capacity_widths=64", "--taus=0.5"], "error: --capacity_widths sets each tau to w/W"),
]


@pytest.fixture(scope="module")
def bad_grid_runs(tmp_path_factory):
  """``{case index: (process, workdir)}``: every :data:`BAD_GRIDS` case through the CLI,
  in one batch (tests/cli_batch: one interpreter start for all of them)."""
  root = tmp_path_factory.mktemp("bad_grids")
  workdirs = [str(root / str(index) / "s") for index in range(len(BAD_GRIDS))]
  processes = experiment_utils.run_module_cases(
      "experiments.sweep", [[f"--workdir={workdir}", *args]
                            for workdir, (args, _) in zip(workdirs, BAD_GRIDS)])
  return dict(enumerate(zip(processes, workdirs)))


# Slow tier: six trainings on two more data sources (about 35 s of CPU).
@pytest.mark.slow
def test_sweep_on_npz_and_mocked_tfds(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from ccjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ccjax import loop  # pylint: disable=g-import-not-at-top
  from tests.condnet_test import write_npz  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "data.npz")
  write_npz(path)
  tiny = dict(hidden=(16, 16), block_size=8, batch_size=16, steps=4, log_every=2,
              eval_every=2, checkpoint_every=2, measure_latency=False, plots=False)
  rows = sweep.run_sweep(config_lib.ExperimentConfig.create(dataset=f"npz:{path}", **tiny),
                         str(tmp_path / "npz"), sweep.Grid((0,), (0.5,)), loop.train_and_evaluate)
  assert [row["model"] for row in rows] == ["dense", "condnet", "dense"]
  assert all(np.isfinite(row["test_error_mean"]) for row in rows)
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=64):
    rows = sweep.run_sweep(
        config_lib.ExperimentConfig.create(dataset="mnist", data_dir=str(tmp_path / "tfds"), **tiny),
        str(tmp_path / "mnist"), sweep.Grid((0,), (0.5,)), loop.train_and_evaluate)
  assert rows[1]["macs_mean"] < rows[0]["macs_mean"]


# --- fair lr budget, paired differences, capacity regime, devices (issue 19, issue 21) ---

_TINY_SWEEP = ("--hidden=16,16", "--block_size=8", "--steps=6", "--batch_size=32",
               "--measure_latency=false", "--plots=false", "--log_every=3", "--eval_every=3",
               "--checkpoint_every=3")


def _results(path):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(path, "results.json")) as stream:
    return json.load(stream)


def _read_sweep(workdir):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "sweep.csv")) as stream:
    csv_rows = list(csv.DictReader(stream))
  with open(os.path.join(workdir, "sweep.json")) as stream:
    payload = json.load(stream)
  with open(os.path.join(workdir, "sweep.md")) as stream:
    table = stream.read()
  return csv_rows, payload, table


class _RecordingTrainer:
  """``train_fn`` for :func:`sweep.run_sweep` that records each run and returns results
  that depend on its config: the validation error is lowest at lr 0.01 for the dense nets
  and at 0.001 for the condnets, so each configuration must pick its own lr."""

  def __init__(self):
    self.calls = []

  def __call__(self, config, workdir):
    self.calls.append((os.path.relpath(workdir, self.root), config))
    gated = config.model == "condnet"
    lr_bonus = (config.train.lr == 0.001) if gated else (config.train.lr == 0.01)
    width = config.hidden[0]
    valid = 0.5 - 0.2 * lr_bonus + 0.01 * config.seed
    test = valid + 0.001 * width + 0.03 * config.seed * gated
    return {"test_error": test, "valid_error": valid, "active_fraction": [0.5] if gated else [],
            "macs_per_example": flops.dense_mlp_macs(64, [width // (2 if gated else 1)] * 2, 10),
            "train_time_s": 1.0, "input_dim": 64, "num_classes": 10}


def test_run_sweep_lr_grid_trains_every_configuration_at_every_lr(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ccjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ccjax import stats  # pylint: disable=g-import-not-at-top
  base = config_lib.ExperimentConfig.create(hidden=(32, 32), block_size=8)
  grid = sweep.validate_grid(base, seeds=(0, 1, 2), taus=(0.5,), lrs=(0.001, 0.01))
  trainer = _RecordingTrainer()
  trainer.root = str(tmp_path)
  rows = sweep.run_sweep(base, str(tmp_path), grid, trainer)
  matched = rows[2]["hidden"][0]
  assert matched == 16   # the width whose dense MACs match the chosen condnet's
  expected_dirs = {os.path.join(configuration, f"lr{lr}", f"seed{seed}")
                   for configuration in ("dense_same_width", "condnet_tau0.5",
                                         f"dense_width{matched}")
                   for lr in ("0.001", "0.01") for seed in (0, 1, 2)}
  assert {directory for directory, _ in trainer.calls} == expected_dirs
  for directory, config in trainer.calls:
    assert config.train.lr == float(directory.split(os.sep)[1][2:])
    assert config.seed == int(directory.split(os.sep)[2][4:])
  assert [(row["lr"], row["lr_chosen_on"]) for row in rows] == [
      (0.01, "validation"), (0.001, "validation"), (0.01, "validation")]
  # Rows report the chosen lr's runs, with sample std and per-seed values.
  gated_test = [0.5 - 0.2 + 0.01 * seed + 0.032 + 0.03 * seed for seed in (0, 1, 2)]
  dense_test = [0.5 - 0.2 + 0.01 * seed + 0.032 for seed in (0, 1, 2)]
  np.testing.assert_allclose(rows[1]["per_seed"]["test_error"], gated_test)
  assert abs(rows[1]["test_error_std"] - np.std(gated_test, ddof=1)) < 1e-12
  assert rows[1]["valid_error_by_lr"] == pytest.approx({"0.001": 0.31, "0.01": 0.51})
  expected = stats.paired_difference(gated_test, dense_test)
  assert rows[1]["test_error_minus_dense_width_mean"] == pytest.approx(0.03)
  assert rows[1]["test_error_minus_dense_width_ci95"] == pytest.approx(expected.ci95)
  assert rows[1]["test_error_minus_dense_width_ci95"] == pytest.approx(
      stats.t_quantile(0.975, 2) * 0.03 / 3 ** 0.5)
  paths = sweep.write_tables(rows, str(tmp_path), grid)
  with open(paths.markdown) as stream:
    table = stream.read()
  assert "lr: chosen per configuration from 0.001, 0.01 on the validation split" in table
  assert "| +3.00 ± " in table and "gated − dense same MACs" in table.splitlines()[0]
  with open(paths.csv) as stream:
    csv_rows = list(csv.DictReader(stream))
  assert csv_rows[0]["test_error_minus_dense_width_mean"] == ""   # dense rows have none
  assert float(csv_rows[1]["test_error_minus_dense_width_ci95"]) == pytest.approx(expected.ci95)


def test_run_sweep_lr_grid_needs_validation_errors(tmp_path):
  from ccjax import config as config_lib  # pylint: disable=g-import-not-at-top
  base = config_lib.ExperimentConfig.create(hidden=(32, 32), block_size=8)
  grid = sweep.validate_grid(base, seeds=(0,), taus=(0.5,), lrs=(0.001, 0.01))
  def no_validation(config, workdir):
    del config, workdir
    return {"test_error": 0.1, "valid_error": None, "active_fraction": [],
            "macs_per_example": 1.0}
  with pytest.raises(ValueError, match="needs a validation metric"):
    sweep.run_sweep(base, str(tmp_path), grid, no_validation)


# Slow tier: eight CLI trainings (about 30 s of CPU); validate_grid's capacity rules
# stay in the fast tier below.
@pytest.mark.slow
def test_sweep_cli_capacity_regime_holds_active_macs(tmp_path):
  workdir = str(tmp_path / "capacity")
  process = experiment_utils.run_module(
      "experiments.sweep", f"--workdir={workdir}", "--seeds=0,1", "--capacity_widths=64,32",
      *_TINY_SWEEP, timeout=900)
  assert process.returncode == 0, process.stderr[-3000:]
  csv_rows, payload, table = _read_sweep(workdir)
  assert [row["label"] for row in csv_rows] == [
      "dense (width 16: the active MACs)", "condnet width=32 tau=0.5", "dense (width 32)",
      "condnet width=64 tau=0.25", "dense (width 64)"]
  assert [row["hidden"] for row in csv_rows] == ["16x16", "32x32", "32x32", "64x64", "64x64"]
  dense_active = flops.dense_mlp_macs(64, [16, 16], 10)
  assert float(csv_rows[0]["macs_mean"]) == dense_active
  for row, width in ((csv_rows[1], 32), (csv_rows[3], 64)):
    # top_k runs exactly w / block_size blocks of W / block_size: the MACs of dense w plus
    # the two policies (64 inputs, then 16 active units, onto W / 8 blocks each).
    assert float(row["macs_mean"]) == dense_active + (64 + 16) * width // 8
    assert float(row["active_fraction_mean"]) == 16 / width
  for name, baseline in (("dense_width", "dense_width32"), ("dense_macs", "dense_width16")):
    gated = [_results(os.path.join(workdir, "condnet_width32_tau0.5", f"seed{seed}"))
             for seed in (0, 1)]
    dense = [_results(os.path.join(workdir, baseline, f"seed{seed}")) for seed in (0, 1)]
    expected = sum(g["test_error"] - d["test_error"] for g, d in zip(gated, dense)) / 2
    assert abs(payload["rows"][1][f"test_error_minus_{name}_mean"] - expected) < 1e-12
  assert payload["grid"]["capacity_widths"] == [64, 32]
  assert payload["command"].startswith("python -m experiments.sweep --workdir=")
  assert "--capacity_widths=64,32" in payload["command"] and "Command: `python -m" in table
  assert "Capacity regime" in table and "'dense same width' is dense W" in table


@pytest.mark.parametrize("index", range(len(BAD_GRIDS)),
                         ids=[" ".join(args) for args, _ in BAD_GRIDS])
def test_sweep_bad_grid_is_one_line_and_writes_nothing(bad_grid_runs, index):
  process, workdir = bad_grid_runs[index]
  message = BAD_GRIDS[index][1]
  assert process.returncode == 2, process.stderr[-2000:]
  assert process.stderr.strip().startswith(message), process.stderr[-2000:]
  assert len(process.stderr.strip().splitlines()) == 1
  assert not os.path.exists(workdir)   # neither the workdir nor its lock


@pytest.mark.parametrize("grid, message", [
    (dict(lrs=(0.001, 0.001)), "--lrs values [0.001, 0.001] give the same run directory"),
    (dict(lrs=(0.001, -1.0)), "--lrs must be"),
    (dict(capacity_widths=(20,), recipes=("regroup",)),
     "--capacity_widths must be multiples of --block_size=8"),
    (dict(capacity_widths=(64, 64)), "--capacity_widths lists a value twice"),
    (dict(capacity_widths=(64,), hidden=(32, 16)), "--capacity_widths needs one --hidden width"),
    (dict(capacity_widths=(20,)), "--capacity_widths must be multiples of --block_size=8"),
    (dict(capacity_widths=(8,)), "--capacity_widths must be multiples of --block_size=8 and at "
                                 "least the active width w = 16, got 8"),
    (dict(capacity_widths=(64,), arch="cnn"), "--capacity_widths needs --arch=mlp"),
])
def test_validate_grid_rejects_bad_lrs_and_capacity_widths(grid, message):
  from ccjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ccjax import validation  # pylint: disable=g-import-not-at-top
  base_fields = {"hidden": grid.pop("hidden", (16, 16)), "arch": grid.pop("arch", "mlp")}
  base = config_lib.ExperimentConfig.create(block_size=8, **base_fields)
  with pytest.raises(validation.ConfigError) as error:
    sweep.validate_grid(base, seeds=(0,), taus=() if "capacity_widths" in grid else (0.5,),
                        **grid)
  assert str(error.value).startswith(message), str(error.value)


def test_run_capacity_sweep_runs_each_recipe_at_its_own_block_size(tmp_path):
  from ccjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ccjax import recipes  # pylint: disable=g-import-not-at-top
  from ccjax import validation  # pylint: disable=g-import-not-at-top
  base = config_lib.ExperimentConfig.create(hidden=(16, 16), block_size=4)
  assert sweep.validate_grid(base, seeds=(0,), taus=(), capacity_widths=(20,)).taus == (0.8,)
  with pytest.raises(validation.ConfigError, match="--block_size=8 and at least"):
    sweep.validate_grid(base, seeds=(0,), taus=(), capacity_widths=(20,),
                        recipes=("router", "regroup"))   # regroup: blocks of 8
  grid = sweep.validate_grid(base, seeds=(0, 1), taus=(), capacity_widths=(32, 64),
                             recipes=("regroup", "router"))
  trainer = _RecordingTrainer()
  trainer.root = str(tmp_path)
  rows = sweep.run_capacity_sweep(base, str(tmp_path), grid, trainer)
  assert [row["label"] for row in rows] == [
      "dense (width 16: the active MACs)",
      "condnet regroup width=32 tau=0.5", "condnet router width=32 tau=0.5", "dense (width 32)",
      "condnet regroup width=64 tau=0.25", "condnet router width=64 tau=0.25",
      "dense (width 64)"]
  configs = dict(trainer.calls)
  assert set(configs) == {os.path.join(directory, f"seed{seed}") for seed in (0, 1)
                          for directory in ("dense_width16", "dense_width32", "dense_width64",
                                            "regroup/condnet_width32_tau0.5",
                                            "regroup/condnet_width64_tau0.25",
                                            "router/condnet_width32_tau0.5",
                                            "router/condnet_width64_tau0.25")}
  for name in ("regroup", "router"):
    config = configs[os.path.join(name, "condnet_width64_tau0.25", "seed1")]
    assert config.hidden == (64, 64) and config.taus() == (0.25, 0.25) and config.seed == 1
    assert config.replace(**recipes.recipe_fields(name)) == config   # the recipe is set
  for row in rows[1:3] + rows[4:6]:   # every gated row is paired with dense W and dense w
    assert row["test_error_minus_dense_macs_mean"] is not None
    assert row["test_error_minus_dense_width_mean"] is not None
  # ... and, past the narrowest W, with the same recipe at the narrower W (the MoE trend):
  # the recording trainer's test error grows by 0.001 per unit of width.
  assert "test_error_minus_narrower_mean" not in rows[1]
  for row in rows[4:6]:
    assert row["test_error_minus_narrower_mean"] == pytest.approx(0.001 * (64 - 32))
  paths = sweep.write_tables(rows, str(tmp_path), grid)
  with open(paths.markdown) as stream:
    table = stream.read()
  assert "Capacity trend: gated − the same recipe at the next narrower W" in table
  assert "| condnet router width=64 tau=0.25 | " in table.split("Capacity trend")[1]
  assert "| +3.20 ± 0.00 |" in table.split("Capacity trend")[1]
  with open(paths.csv) as stream:
    assert "test_error_minus_narrower_mean" in stream.readline()


def test_validate_grid_capacity_taus_are_w_over_width():
  from ccjax import config as config_lib  # pylint: disable=g-import-not-at-top
  base = config_lib.ExperimentConfig.create(hidden=(128, 128), block_size=32)
  grid = sweep.validate_grid(base, seeds=(0, 1), taus=(), capacity_widths=(256, 512, 2048),
                             lrs=(0.001, 0.003))
  assert grid.taus == (0.5, 0.25, 1 / 16) and grid.lrs == (0.001, 0.003)
