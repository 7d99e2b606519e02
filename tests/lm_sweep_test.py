"""The LM sweep's variants and its mean +- std table."""

from __future__ import annotations

import json
import os
import tempfile

from absl.testing import absltest

from ccjax import lm_train
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
    rows = lm_sweep.summarize({
        "gated": [_result(1.0), _result(1.2)],
        "dense": [_result(0.9, (), teal=2.0), _result(1.1, (), teal=2.2)]})
    self.assertAlmostEqual(rows["gated"]["bits_per_byte"]["mean"], 1.1)
    self.assertAlmostEqual(rows["gated"]["bits_per_byte"]["std"], 0.1)
    self.assertIsNone(rows["dense"]["active_fraction"])
    self.assertAlmostEqual(rows["teal"]["bits_per_byte"]["mean"], 2.1)
    table = lm_sweep.markdown(rows)
    self.assertIn("| gated | 2 | 1.1000 ± 0.1000 | - |", table)
    self.assertIn("| teal | 2 | 2.1000 ± 0.1000 |", table)

  def test_finished_run_with_other_settings_is_refused(self):
    directory = tempfile.TemporaryDirectory()
    self.addCleanup(directory.cleanup)
    path = os.path.join(directory.name, "results.json")
    config = lm_train.LMConfig(steps=10)
    with open(path, "w") as stream:
      json.dump({"model": "gated", "seed": 0, "steps": 5, "dataset": config.dataset}, stream)
    with self.assertRaisesRegex(ValueError, "fresh --workdir"):
      lm_sweep._finished_run(path, config)  # pylint: disable=protected-access
    self.assertEqual(lm_sweep._finished_run(  # pylint: disable=protected-access
        path, lm_train.LMConfig(steps=5))["steps"], 5)


if __name__ == "__main__":
  absltest.main()
