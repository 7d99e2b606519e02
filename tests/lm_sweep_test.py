"""The LM sweep's variants and its mean +- std table."""

from __future__ import annotations

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


if __name__ == "__main__":
  absltest.main()
