"""Tests of experiments/condnet.py and the training loop behind it (ccjax.loop)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from ccjax import checkpoint as checkpoint_lib
from ccjax import data as data_lib
from ccjax import config as config_lib
from ccjax import loop
from tests import experiment_utils

RESULT_KEYS = {"model", "arch", "dataset", "seed", "steps", "test_error", "valid_error",
               "active_fraction", "macs_per_example", "dense_macs_per_example", "wall_time_s",
               "flags", "eval_policy"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_config(**changes) -> config_lib.ExperimentConfig:
  values = dict(hidden=(32, 32), block_size=8, batch_size=32, steps=12, log_every=4,
                eval_every=8, checkpoint_every=4, measure_latency=False, plots=False)
  values.update(changes)
  return config_lib.ExperimentConfig.create(**values)


def final_state(workdir: str):
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return checkpointer.restore_raw()
  finally:
    checkpointer.close()


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as stream:
    return [json.loads(line) for line in stream]


def write_npz(path, num_features=6, num_classes=3, n_train=96, n_test=30, seed=0, **overrides):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_classes, num_features)) * 3
  def split(n):
    y = rng.integers(0, num_classes, n)
    return (centers[y] + rng.normal(size=(n, num_features))).astype(np.float32), y
  x_train, y_train = split(n_train)
  x_test, y_test = split(n_test)
  arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  arrays.update(overrides)
  np.savez(path, **arrays)
  return arrays


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """``(workdir, process)`` of one tiny digits CLI run on one device, plots on."""
  workdir = str(tmp_path_factory.mktemp("cli") / "run")
  process = experiment_utils.run_module("experiments.condnet", f"--workdir={workdir}",
                                        *experiment_utils.TINY_FLAGS)
  assert process.returncode == 0, process.stderr[-3000:]
  return workdir, process


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """``(workdir, results)`` of one uninterrupted in-process run of :func:`tiny_config`."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  return workdir, loop.train_and_evaluate(tiny_config(), workdir)


def test_cli_digits_writes_every_output(cli_run):
  workdir, process = cli_run
  assert "steps/s" in process.stderr and "ETA" in process.stderr  # Progress is shown.
  # The first line says what runs and on which kernel backend, before any compiling.
  first = process.stderr.splitlines()[0]
  assert "condnet mlp on digits" in first and f"kernel backend {loop.kernel_backend()}" in first
  assert "compiling the train step" in process.stderr
  # Error rates in progress lines have 4 decimals (not 0.01388888888888884).
  assert re.search(r"final: test error \d\.\d{4}  valid error \d\.\d{4}  active", process.stderr)
  with open(os.path.join(workdir, "results.json")) as stream:
    results = json.load(stream)
  assert RESULT_KEYS <= set(results)
  assert results["steps"] == 12 and results["dataset"] == "digits"
  assert len(results["active_fraction"]) == 2
  assert 0.0 <= results["test_error"] <= 1.0
  assert results["macs_per_example"] < results["dense_macs_per_example"]
  assert results["flags"]["hidden"] == [32, 32]
  # The entrypoint's own flags (defined in experiments/condnet.py) are recorded too.
  assert results["flags"]["model"] == "condnet" and results["flags"]["seed"] == 0
  assert results["flags"]["tau"] == [0.25]
  for name in ("block_probabilities.png", "class_block_map.png", "learning_curves.png"):
    with open(os.path.join(workdir, "plots", name), "rb") as stream:
      content = stream.read()
    assert content.startswith(PNG_MAGIC) and len(content) > 1000
  records = read_metrics(workdir)
  train_steps = [r["step"] for r in records if r["kind"] == "train"]
  assert train_steps == [1, 4, 8, 12]  # step 1: a progress line within seconds
  assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
  assert any("valid_error" in r for r in records if r["kind"] == "eval")


def test_resume_ends_exactly_like_a_straight_run(tmp_path, straight_run):
  straight, straight_results = straight_run
  resumed = str(tmp_path / "resumed")
  assert straight_results["steps"] == 12
  loop.train_and_evaluate(tiny_config(steps=6), resumed)  # "Crash" after 6 steps.
  resumed_results = loop.train_and_evaluate(tiny_config(steps=12), resumed)
  experiment_utils.assert_trees_equal(final_state(straight), final_state(resumed))
  for key in ("test_error", "valid_error", "active_fraction", "macs_per_example"):
    assert straight_results[key] == resumed_results[key]
  train_steps = [r["step"] for r in read_metrics(resumed) if r["kind"] == "train"]
  assert train_steps == [1, 4, 6, 8, 12]  # 6 was the first run's last step; nothing twice.
  assert [r["step"] for r in read_metrics(resumed) if r["kind"] == "final"] == [12]
  before = [(r["step"], r["kind"]) for r in read_metrics(resumed)]
  loop.train_and_evaluate(tiny_config(steps=12), resumed)  # Finished: only re-evaluates.
  assert [(r["step"], r["kind"]) for r in read_metrics(resumed)] == before


def test_same_seed_same_numbers_and_other_seed_differs(tmp_path, straight_run):
  first_dir, first = straight_run
  second = loop.train_and_evaluate(tiny_config(), str(tmp_path / "b"))
  other = loop.train_and_evaluate(tiny_config(seed=1), str(tmp_path / "c"))
  experiment_utils.assert_trees_equal(final_state(first_dir),
                                      final_state(str(tmp_path / "b")))
  assert first["test_error"] == second["test_error"]
  params_a = final_state(first_dir)["params"]
  params_c = final_state(str(tmp_path / "c"))["params"]
  assert not np.array_equal(params_a["output"]["kernel"], params_c["output"]["kernel"])
  del other


def test_npz_dataset_and_dense_model(tmp_path):
  path = str(tmp_path / "data.npz")
  write_npz(path)
  condnet = loop.train_and_evaluate(tiny_config(dataset=f"npz:{path}"), str(tmp_path / "c"))
  dense = loop.train_and_evaluate(tiny_config(dataset=f"npz:{path}", model="dense"),
                                     str(tmp_path / "d"))
  assert condnet["dense_macs_per_example"] == 6 * 32 + 32 * 32 + 32 * 3
  assert dense["macs_per_example"] == dense["dense_macs_per_example"]
  assert dense["active_fraction"] == []


@pytest.mark.slow  # a CLI run on mocked TFDS, 10 s
def test_mocked_tfds_dataset(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=80):
    results = loop.train_and_evaluate(
        tiny_config(dataset="mnist", data_dir=str(tmp_path / "tfds"), steps=4, log_every=2,
                    checkpoint_every=2, eval_every=2, batch_size=16),
        str(tmp_path / "run"))
  assert results["dataset"] == "mnist"
  assert results["dense_macs_per_example"] == 784 * 32 + 32 * 32 + 32 * 10
  assert np.isfinite(results["test_error"])


def _poisoned_npz(tmp_path, n_train=96, poisoned_examples=4) -> tuple[str, int]:
  """An npz whose first examples overflow float32 in the first layer; returns (spec, first bad step)."""
  path = str(tmp_path / "poison.npz")
  arrays = write_npz(path, n_train=n_train)
  x_train = arrays["x_train"].copy()
  x_train[:poisoned_examples] = 3e38
  np.savez(path, **{**arrays, "x_train": x_train})
  dataset = data_lib.load_dataset(f"npz:{path}", valid_fraction=0.1, seed=0)
  poisoned = set(np.where(dataset.x_train[:, 0] > 1e37)[0].tolist())
  assert poisoned
  step = next(s for s in range(1000) if poisoned & set(
      data_lib.train_batch_indices(dataset.x_train.shape[0], 16, 0, s).tolist()))
  return f"npz:{path}", step + 1


def test_nonfinite_loss_stops_with_step_and_intact_checkpoint(tmp_path):
  spec, bad_step = _poisoned_npz(tmp_path)
  assert bad_step > 1  # So that a good checkpoint exists before the bad step.
  workdir = str(tmp_path / "run")
  config = tiny_config(dataset=spec, batch_size=16, steps=bad_step + 3, checkpoint_every=1,
                       eval_every=1000)
  with pytest.raises(loop.NonFiniteError, match=f"at step {bad_step};") as error:
    loop.train_and_evaluate(config, workdir)
  assert f"step {bad_step - 1} in" in str(error.value)
  state = final_state(workdir)
  assert int(state["step"]) == bad_step - 1
  import jax  # pylint: disable=g-import-not-at-top
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(state["params"]))
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_skip_nonfinite_skips_bad_batches(tmp_path):
  # One poisoned example in ~860: about one batch in 54 is skipped, under the 10% limit.
  spec, bad_step = _poisoned_npz(tmp_path, n_train=960, poisoned_examples=1)
  workdir = str(tmp_path / "run")
  steps = max(bad_step + 2, 60)
  config = tiny_config(dataset=spec, batch_size=16, steps=steps, skip_nonfinite=True,
                       log_every=1, eval_every=1000, checkpoint_every=steps)
  results = loop.train_and_evaluate(config, workdir)
  assert np.isfinite(results["test_error"])
  last = [r for r in read_metrics(workdir) if r["kind"] == "train"][-1]
  assert 1 <= last["skipped_nonfinite"] <= loop.MAX_SKIPPED_FRACTION * steps
  import jax  # pylint: disable=g-import-not-at-top
  assert all(np.all(np.isfinite(leaf)) for leaf in
             jax.tree_util.tree_leaves(final_state(workdir)["params"]))


def test_skip_nonfinite_beyond_the_limit_fails_without_results(tmp_path):
  spec, bad_step = _poisoned_npz(tmp_path)
  workdir = str(tmp_path / "run")
  config = tiny_config(dataset=spec, batch_size=16, steps=bad_step + 2, skip_nonfinite=True,
                       checkpoint_every=1, eval_every=1000)
  with pytest.raises(loop.NonFiniteError, match="more than 10% of the"):
    loop.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_epochs_flag_sets_steps():
  config = tiny_config(steps=None, epochs=2, batch_size=32)
  assert config.total_steps(100) == 6
  assert tiny_config(steps=None).total_steps(100) == config_lib.DEFAULT_STEPS


@pytest.mark.slow  # a CNN CLI run, 11 s
def test_cnn_arch_trains_and_reports_costs(tmp_path):
  # One stage (a channel-gated conv and a skippable residual block): multi-stage CNNs are
  # covered by tests/conv_test.py and tests/inference_cnn_test.py.
  results = loop.train_and_evaluate(
      tiny_config(arch="cnn", hidden=(8,), block_size=8, tau=(0.5,), steps=4, log_every=2,
                  checkpoint_every=4, eval_every=2, measure_latency=True, plots=True),
      str(tmp_path / "cnn"))
  assert results["arch"] == "cnn" and len(results["active_fraction"]) == 2
  assert 0 < results["macs_per_example"] <= results["dense_macs_per_example"]
  assert set(results["latency_ms"]) == {"dense", "sparse"}
  assert os.path.exists(os.path.join(str(tmp_path / "cnn"), "plots", "block_probabilities.png"))


def test_cnn_arch_needs_images(tmp_path):
  path = str(tmp_path / "flat.npz")
  write_npz(path)
  with pytest.raises(ValueError, match="--arch=cnn needs image inputs"):
    loop.train_and_evaluate(tiny_config(arch="cnn", hidden=(8,), dataset=f"npz:{path}"),
                               str(tmp_path / "run"))
  assert not os.path.exists(str(tmp_path / "run"))


@pytest.mark.slow  # eight-device CLI run, 16 s
def test_eight_simulated_devices_match_one_device(tmp_path, monkeypatch, cli_run):
  """The CLI's data-parallel path: 8 CPU devices give the 1-device parameters (1e-5).

  The 1-device run is ``cli_run`` (this pytest process and its subprocesses see one CPU
  device unless ``XLA_FLAGS`` says otherwise)."""
  one_device_dir, one_device_process = cli_run
  assert "on 1 device(s)" in one_device_process.stderr
  workdir = str(tmp_path / "devices8")
  monkeypatch.setenv("XLA_FLAGS", experiment_utils.xla_flags_env(8)["XLA_FLAGS"])
  process = experiment_utils.run_module(
      "experiments.condnet", f"--workdir={workdir}", *experiment_utils.TINY_FLAGS,
      "--num_devices=8", "--plots=false")
  assert process.returncode == 0, process.stderr[-3000:]
  assert "on 8 device(s)" in process.stderr
  import jax  # pylint: disable=g-import-not-at-top
  one, eight = final_state(one_device_dir), final_state(workdir)
  assert jax.tree_util.tree_structure(one) == jax.tree_util.tree_structure(eight)
  for one_leaf, eight_leaf in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(eight)):
    np.testing.assert_allclose(np.asarray(one_leaf), np.asarray(eight_leaf), rtol=1e-5, atol=1e-5)


def test_nonfinite_between_checkpoints_names_the_exact_step(tmp_path):
  spec, bad_step = _poisoned_npz(tmp_path)
  workdir = str(tmp_path / "run")
  config = tiny_config(dataset=spec, batch_size=16, steps=bad_step + 6, checkpoint_every=3,
                       log_every=5, eval_every=1000)
  with pytest.raises(loop.NonFiniteError, match=f"at step {bad_step};") as error:
    loop.train_and_evaluate(config, workdir)
  last_good = (bad_step - 1) // 3 * 3
  if last_good:
    assert f"checkpoint: step {last_good} in" in str(error.value)
    assert int(final_state(workdir)["step"]) == last_good
  else:
    assert "no checkpoint was written yet" in str(error.value)
