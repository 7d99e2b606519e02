"""LM runs: outputs, exact resume, incompatible workdirs, the entrypoint's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import tempfile

from absl.testing import absltest
import numpy as np

from ccjax import lm_train
from ccjax import step as step_lib

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

  def _tempdir(self) -> str:
    directory = tempfile.TemporaryDirectory()
    self.addCleanup(directory.cleanup)
    return directory.name

  def test_resume_is_exact_and_outputs_complete(self):
    straight = self._tempdir()
    full = lm_train.train_and_evaluate_lm(_config(), straight)
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

  def test_dense_run_reports_teal(self):
    result = lm_train.train_and_evaluate_lm(_config(model="dense", steps=2),
                                            self._tempdir())
    self.assertEqual(result["teal_capacity"], 1)
    self.assertEqual(result["active_fraction"], [])
    self.assertTrue(np.isfinite(result["teal_bits_per_byte"]))

  def test_entrypoint_bad_input_writes_nothing(self):
    workdir = os.path.join(self._tempdir(), "run")
    for args, message in ((["--num_heads=3"], "--num_heads=3 must divide"),
                          (["--dataset=text:/no/such/file"], "not a readable file"),
                          (["--tau=1.5"], "--tau"),
                          (["--sample=5"], "no checkpoints")):
      proc = subprocess.run([sys.executable, "-m", "experiments.lm", f"--workdir={workdir}"] +
                            args, cwd=REPO, capture_output=True, text=True, check=False)
      self.assertEqual(proc.returncode, 2, proc.stderr)
      lines = proc.stderr.strip().splitlines()
      self.assertLen(lines, 1)
      self.assertIn(message, lines[0])
      self.assertFalse(os.path.exists(workdir))


if __name__ == "__main__":
  absltest.main()
