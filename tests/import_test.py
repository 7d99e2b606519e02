"""`import ccjax` must stay light: no TensorFlow."""

import subprocess
import sys

from absl.testing import absltest


class ImportTest(absltest.TestCase):

  def test_import_does_not_load_tensorflow(self):
    result = subprocess.run(
        [sys.executable, "-c", "import ccjax, sys; print('tensorflow' in sys.modules)"],
        capture_output=True, text=True, check=True, timeout=120)
    self.assertEqual(result.stdout.strip().splitlines()[-1], "False")

  def test_public_names_are_exported(self):
    import ccjax  # pylint: disable=g-import-not-at-top
    for name in ("GatedDense", "GatedMLP", "TrainConfig", "make_train_step", "policy_probs",
                 "score_function_loss", "block_balance_loss", "gated_mlp_macs"):
      self.assertTrue(hasattr(ccjax, name), name)


if __name__ == "__main__":
  absltest.main()
