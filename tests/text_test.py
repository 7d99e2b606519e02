"""The generated corpus is fixed, splits are by position, batches are pure in (seed, step)."""

from __future__ import annotations

import os
import tempfile

from absl.testing import absltest
import numpy as np

from ccjax import text

# Changing the grammar changes every number in docs/lm.md: update both together.
GRAMMAR_SHA256 = "40e5051a7b1f99b93bf970bb09b830cff4bba2e1b265fc9266f4ab08ada21b22"


class TextTest(absltest.TestCase):

  def _tempdir(self) -> str:
    directory = tempfile.TemporaryDirectory()
    self.addCleanup(directory.cleanup)
    return directory.name

  def test_default_corpus_is_fixed(self):
    data = text.grammar_corpus()
    self.assertLen(data, text.DEFAULT_CORPUS_BYTES)
    self.assertEqual(text.fingerprint(data), GRAMMAR_SHA256)
    classes = np.bincount(text.char_classes(np.frombuffer(data, np.uint8)), minlength=4)
    self.assertTrue(np.all(classes > 0.03 * len(data)))  # letters, digits, spaces, punctuation

  def test_splits_by_position(self):
    splits = text.load_text("grammar", 64)
    whole = np.concatenate([splits.train, splits.valid, splits.test])
    np.testing.assert_array_equal(whole, np.frombuffer(text.grammar_corpus(), np.uint8))
    self.assertEqual(splits.sha256, GRAMMAR_SHA256)

  def test_text_file_and_errors(self):
    path = os.path.join(self._tempdir(), "corpus.txt")
    with open(path, "w") as stream:
      stream.write("abc 123, def!\n" * 300)
    splits = text.load_text(f"text:{path}", 16)
    self.assertEqual(len(splits.train) + len(splits.valid) + len(splits.test), 14 * 300)
    with self.assertRaisesRegex(ValueError, "fewer than"):
      text.load_text(f"text:{path}", 512)
    with self.assertRaisesRegex(ValueError, "not a readable file"):
      text.load_text("text:/nonexistent/file", 16)
    with self.assertRaisesRegex(ValueError, "grammar or text:PATH"):
      text.load_text("wiki", 16)

  def test_train_batch_is_pure_and_shifted(self):
    data = np.frombuffer(text.grammar_corpus(5000), np.uint8)
    first = text.train_batch(data, 4, 8, seed=1, step=3)
    np.testing.assert_array_equal(first["x"], text.train_batch(data, 4, 8, 1, 3)["x"])
    np.testing.assert_array_equal(first["x"][:, 1:], first["y"][:, :-1])
    self.assertFalse(np.array_equal(first["x"], text.train_batch(data, 4, 8, 1, 4)["x"]))

  def test_eval_windows_and_classes(self):
    data = np.arange(20, dtype=np.uint8)
    windows = text.eval_windows(data, 6)
    self.assertEqual(windows["x"].shape, (3, 6))
    np.testing.assert_array_equal(windows["y"].ravel(), np.arange(1, 19))
    classes = text.char_classes(np.frombuffer(b"aZ09 \n.$", np.uint8))
    np.testing.assert_array_equal(classes, [0, 0, 1, 1, 2, 2, 3, 3])


if __name__ == "__main__":
  absltest.main()
