"""LM runs: outputs, exact resume, incompatible workdirs, the entrypoint's errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import tempfile

from absl.testing import absltest
import numpy as np
import pytest

from ccjax import checkpoint as checkpoint_lib
from ccjax import lm_train
from ccjax import lock
from ccjax import step as step_lib
from ccjax import validation
from tests import experiment_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**fields) -> lm_train.LMConfig:
  defaults = dict(num_layers=1, d_model=16, num_heads=2, mlp_width=32, block_size=8, context=16,
                  batch_size=4, steps=6, eval_every=3, log_every=2, checkpoint_every=3,
                  plots=False, decode_benchmark=False,
                  train=step_lib.TrainConfig(tau=0.25, reinforce_cost="position"))
  defaults.update(fields)
  return lm_train.LMConfig(**defaults)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as stream:
    return [json.loads(line) for line in stream]


class LmTrainTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # One uninterrupted run of _config(), shared (read-only) by the tests below.
    cls._straight_dir = tempfile.TemporaryDirectory()
    cls.straight = os.path.join(cls._straight_dir.name, "run")
    cls.straight_results = lm_train.train_and_evaluate_lm(_config(), cls.straight)

  @classmethod
  def tearDownClass(cls):
    cls._straight_dir.cleanup()
    super().tearDownClass()

  def _tempdir(self) -> str:
    directory = tempfile.TemporaryDirectory()
    self.addCleanup(directory.cleanup)
    return directory.name

  def test_resume_is_exact_and_outputs_complete(self):
    straight, full = self.straight, self.straight_results
    for key in ("bits_per_byte", "active_fraction", "macs_per_token", "corpus_sha256", "seed",
                "flags"):
      self.assertIn(key, full)
    self.assertLen(full["active_fraction"], 1)
    self.assertTrue(np.isfinite(full["bits_per_byte"]))

    resumed = self._tempdir()
    lm_train.train_and_evaluate_lm(_config(steps=3), resumed)  # "killed" after step 3
    again = lm_train.train_and_evaluate_lm(_config(), resumed)
    self.assertEqual(again["bits_per_byte"], full["bits_per_byte"])
    self.assertEqual(again["active_fraction"], full["active_fraction"])
    straight_train = [r for r in _records(straight) if r["kind"] == "train"]
    resumed_train = [r for r in _records(resumed) if r["kind"] == "train"]
    # The interrupted run also logged its last step (3); every step both logged agrees.
    resumed_loss = {r["step"]: r["loss"] for r in resumed_train}
    self.assertEqual(set(resumed_loss), {r["step"] for r in straight_train} | {3})
    for record in straight_train:
      self.assertEqual(resumed_loss[record["step"]], record["loss"])

    with self.assertRaisesRegex(ValueError, "architecture"):
      lm_train.train_and_evaluate_lm(_config(d_model=32), resumed)
    with self.assertRaisesRegex(ValueError, r"other settings \(lr=0.001 -> 0.01"):
      lm_train.train_and_evaluate_lm(
          _config(train=step_lib.TrainConfig(tau=0.25, reinforce_cost="position", lr=0.01)),
          resumed)
    # Length and cadence may change: more steps continue the same run.
    longer = lm_train.train_and_evaluate_lm(_config(steps=7, log_every=7), resumed)
    self.assertEqual(longer["steps"], 7)

  def test_damaged_latest_checkpoint_falls_back_to_the_intact_one(self):
    straight = self.straight_results
    workdir = os.path.join(self._tempdir(), "run")
    shutil.copytree(self.straight, workdir)  # a finished run: checkpoints at steps 3 and 6
    step_dir = os.path.join(workdir, "checkpoints", "6")
    largest = max((os.path.join(root, name) for root, _, names in os.walk(step_dir)
                   for name in names if name != checkpoint_lib.CHECKSUM_FILE),
                  key=os.path.getsize)
    with open(largest, "r+b") as stream:  # one flipped bit in the newest checkpoint
      first = stream.read(1)
      stream.seek(0)
      stream.write(bytes([first[0] ^ 1]))
    os.remove(os.path.join(workdir, "results.json"))
    again = lm_train.train_and_evaluate_lm(_config(), workdir)  # resumes from step 3
    self.assertEqual(again["bits_per_byte"], straight["bits_per_byte"])
    self.assertTrue(os.path.isdir(os.path.join(workdir, "checkpoints" +
                                               checkpoint_lib.DAMAGED_SUFFIX)))

  def test_busy_workdir_is_refused(self):
    workdir = self._tempdir()
    with lock.WorkdirLock(workdir):
      with self.assertRaisesRegex(lock.WorkdirBusyError, "in use by another run"):
        lm_train.train_and_evaluate_lm(_config(), workdir)
    self.assertFalse(os.path.exists(os.path.join(workdir, "checkpoints")))

  def test_router_runs_exactly_k_blocks_per_token(self):
    result = lm_train.train_and_evaluate_lm(_config(model="router", mlp_width=64),
                                            self._tempdir())
    self.assertEqual(result["estimator"], "router")
    self.assertEqual(result["eval_policy"], "top_k")
    self.assertEqual(result["active_fraction"], [0.25])  # 2 of 8 blocks, every token
    self.assertTrue(np.isfinite(result["bits_per_byte"]))

  def test_router_estimator_belongs_to_the_router_model(self):
    with self.assertRaisesRegex(validation.ConfigError, "estimator"):
      _config(train=step_lib.TrainConfig(estimator="router"))
    self.assertEqual(_config(model="router").train.estimator, "router")
    self.assertEqual(_config().eval_mode(), "threshold")
    self.assertEqual(_config(model="router").eval_mode(), "top_k")

  @pytest.mark.slow  # two-device LM run, 30 s
  def test_two_devices_match_one_device(self):
    env = experiment_utils.xla_flags_env(2)
    results = {}
    for num_devices in (1, 2):
      workdir = os.path.join(self._tempdir(), "run")
      proc = subprocess.run(
          [sys.executable, "-m", "experiments.lm", f"--workdir={workdir}", "--num_layers=1",
           "--d_model=16", "--num_heads=2", "--mlp_width=32", "--block_size=8", "--context=16",
           "--batch_size=4", "--steps=4", "--eval_every=4", "--checkpoint_every=4",
           "--plots=false", "--decode_benchmark=false", f"--num_devices={num_devices}"],
          cwd=REPO, env=env, capture_output=True, text=True, check=False)
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      with open(os.path.join(workdir, "results.json")) as stream:
        results[num_devices] = json.load(stream)
    np.testing.assert_allclose(results[2]["bits_per_byte"], results[1]["bits_per_byte"],
                               rtol=1e-5)
    np.testing.assert_allclose(results[2]["active_fraction"], results[1]["active_fraction"],
                               atol=1e-6)

  @pytest.mark.slow  # a dense LM run with TEAL rows; the gated LM runs stay fast
  def test_dense_run_reports_teal(self):
    result = lm_train.train_and_evaluate_lm(_config(model="dense", steps=2),
                                            self._tempdir())
    self.assertEqual(result["teal_capacity"], 1)
    self.assertEqual(result["active_fraction"], [])
    self.assertTrue(np.isfinite(result["teal_bits_per_byte"]))

  def test_entrypoint_bad_input_writes_nothing(self):
    workdir = os.path.join(self._tempdir(), "run")
    cases = ((["--num_heads=3"], "--num_heads=3 must divide"),
             (["--dataset=text:/no/such/file"], "not a readable file"),
             (["--tau=1.5"], "--tau"),
             (["--sample=5"], "no checkpoints"))
    processes = experiment_utils.run_module_cases(
        "experiments.lm", [[f"--workdir={workdir}", *args] for args, _ in cases])
    for proc, (_, message) in zip(processes, cases):
      self.assertEqual(proc.returncode, 2, proc.stderr)
      lines = proc.stderr.strip().splitlines()
      self.assertLen(lines, 1)
      self.assertIn(message, lines[0])
      self.assertFalse(os.path.exists(workdir))


if __name__ == "__main__":
  absltest.main()
