"""Both tasks through the one driver (ccjax.tasks): outputs, load_run, predict, and the
same error for the same mistake in either task. Tiny models, a few steps each."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import ccjax
from ccjax import config as config_lib
from ccjax import lm_config
from ccjax import lock
from ccjax import step as step_lib
from ccjax import tasks
from ccjax import validation
from tests import experiment_utils

_SCHEDULE = dict(steps=6, eval_every=3, log_every=2, checkpoint_every=3, plots=False)


def _classifier(**fields) -> config_lib.ExperimentConfig:
  values = dict(hidden=(16, 16), block_size=8, batch_size=32, measure_latency=False,
                **_SCHEDULE)
  values.update(fields)
  return config_lib.ExperimentConfig.create(**values)


def _language_model(**fields) -> lm_config.LMConfig:
  values = dict(num_layers=1, d_model=16, num_heads=2, mlp_width=32, block_size=8, context=16,
                batch_size=4, decode_benchmark=False,
                train=step_lib.TrainConfig(tau=0.25, reinforce_cost="position"), **_SCHEDULE)
  values.update(fields)
  return lm_config.LMConfig.create(**values)


CONFIGS = {"classify": _classifier, "lm": _language_model}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """``{task: (workdir, results)}``: one finished tiny run of each task, by the driver."""
  runs = {}
  for name, make in CONFIGS.items():
    workdir = str(tmp_path_factory.mktemp(name) / "run")
    runs[name] = workdir, tasks.train_and_evaluate(tasks.TASKS[name], make(), workdir)
  return runs


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as stream:
    return [json.loads(line) for line in stream]


@pytest.mark.slow  # trains both tasks (the module fixture)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_driver_runs_both_tasks_with_the_same_outputs(finished, name):
  workdir, results = finished[name]
  with open(os.path.join(workdir, "results.json")) as stream:
    assert json.load(stream) == json.loads(json.dumps(results))
  assert results["task"] == name and results["steps"] == 6 and results["trained_steps"] == 6
  assert {"flags", "wall_time_s", "train_time_s", "active_fraction"} <= set(results)
  records = _records(workdir)
  assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 4, 6]
  assert [r["step"] for r in records if r["kind"] == "eval"] == [3]
  assert [r["kind"] for r in records][-1] == "final"
  assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]


@pytest.mark.slow  # uses the trained fixture
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_finished_run_is_only_re_evaluated(finished, name, tmp_path):
  workdir, results = finished[name]
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  again = tasks.train(CONFIGS[name](), copy)   # the task follows from the config's type
  assert again["trained_steps"] == 0 and again["train_time_s"] == results["train_time_s"]
  score = "test_error" if name == "classify" else "bits_per_byte"
  assert again[score] == results[score]


@pytest.mark.slow  # uses the trained fixture
def test_load_run_loads_an_lm_run(finished):
  workdir, results = finished["lm"]
  run = ccjax.load_run(workdir)
  assert run.task == "lm" and run.step == 6
  assert isinstance(run.module, ccjax.GatedTransformer) and run.module.gated
  assert run.config == _language_model().replace(tau=(0.25,))  # tau is stored as a list
  assert run.input_shape == (16,) and run.num_classes == 256
  logits, _ = run.module.apply({"params": run.params}, np.zeros((1, 16), np.int32),
                               mode="threshold")
  assert logits.shape == (1, 16, 256)
  assert results["model"] == "gated"
  classifier = ccjax.load_run(finished["classify"][0])
  assert classifier.task == "classify" and isinstance(classifier.module, ccjax.GatedMLP)


@pytest.mark.slow  # uses the trained fixture
def test_predict_reports_an_lm_run_s_test_bits_per_byte(finished):
  workdir, results = finished["lm"]
  process = experiment_utils.run_module("experiments.predict", f"--workdir={workdir}",
                                        "--json")
  assert process.returncode == 0, process.stderr[-3000:]
  report = json.loads(process.stdout.strip().splitlines()[-1])
  assert report["task"] == "lm" and report["checkpoint_step"] == 6
  assert report["bits_per_byte"] == results["bits_per_byte"]
  assert report["active_fraction"] == results["active_fraction"]


@pytest.mark.slow  # uses the trained fixture
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_same_mistake_raises_the_same_error_in_both_tasks(finished, name, tmp_path):
  make = CONFIGS[name]
  task = tasks.TASKS[name]
  with pytest.raises(validation.ConfigError, match=r"^--batch_size must be in \[1, \d+\] "
                     r"\(the training (examples|windows) of --dataset=.*\), got 10000000$"):
    tasks.train_and_evaluate(task, make(batch_size=10_000_000), str(tmp_path / "big"))
  with pytest.raises(validation.ConfigError, match=r"^--seed must be in \[0, 2\*\*63\)"):
    make(seed=2**63)
  with pytest.raises(validation.ConfigError, match=r"^--eval_every must be"):
    make(eval_every=0)
  with pytest.raises(validation.ConfigError, match=r"^--eval_policy must be one of"):
    make(eval_policy="nope")
  assert not os.path.exists(tmp_path / "big")
  workdir = finished[name][0]
  with pytest.raises(ValueError, match=r"^the checkpoint was trained with other settings "
                     r"\(lr=0.001 -> 0.01\); only "):
    tasks.train_and_evaluate(task, make(lr=0.01), workdir)
  with lock.WorkdirLock(str(tmp_path)):
    with pytest.raises(lock.WorkdirBusyError, match="in use by another run"):
      tasks.train_and_evaluate(task, make(), str(tmp_path))


def test_a_config_belongs_to_one_task(tmp_path):
  with pytest.raises(TypeError, match="task 'lm' takes a LMConfig, got ExperimentConfig"):
    tasks.train_and_evaluate(tasks.TASKS["lm"], _classifier(), str(tmp_path))
  with pytest.raises(TypeError, match="is not the config of a task"):
    tasks.task_for(step_lib.TrainConfig())
  assert tasks.task_for(_language_model()) is tasks.TASKS["lm"]
  assert not os.listdir(tmp_path)
