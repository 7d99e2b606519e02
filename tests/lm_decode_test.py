"""Batch-1 decoding: the sparse path equals the masked dense model; generation; timing."""

from __future__ import annotations

from absl.testing import absltest
import jax
import numpy as np

import ccjax
from ccjax import lm_decode


class LmDecodeTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.model = ccjax.GatedTransformer(max_len=12, num_layers=2, d_model=16, num_heads=2,
                                        mlp_width=64, block_size=16)
    self.tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 12), 0, 256)
    self.params = self.model.init({"params": jax.random.PRNGKey(1),
                                   "gate": jax.random.PRNGKey(2)}, self.tokens)["params"]

  def test_sparse_and_dense_steps_match_their_references(self):
    masked, aux = self.model.apply({"params": self.params}, self.tokens, mode="threshold")
    active = [float(a.mask.mean()) for a in aux]
    self.assertTrue(all(0.0 < f < 1.0 for f in active))  # really skips, really runs
    dense_model = self.model.clone(gated=False)
    dense, _ = dense_model.apply({"params": ccjax.strip_policy_params(self.params)},
                                 self.tokens)
    for sparse, reference in ((True, masked), (False, dense)):
      fns = lm_decode.make_decode(self.model, self.params, sparse=sparse)
      cache = ccjax.init_cache(self.model, 1)
      for position in range(12):
        logits, cache = fns.step(fns.weights, cache, self.tokens[:, position:position + 1])
        np.testing.assert_allclose(logits, reference[:, position], rtol=1e-4, atol=1e-5)
    self.assertGreater(float(np.abs(masked - dense).max()), 1e-3)

  def test_generate_past_the_context(self):
    fns = lm_decode.make_decode(self.model, self.params, sparse=True)
    out = lm_decode.generate(fns, b"The ", 30, jax.random.PRNGKey(0))
    self.assertLen(out, 30)
    self.assertEqual(out, lm_decode.generate(fns, b"The ", 30, jax.random.PRNGKey(0)))
    with self.assertRaisesRegex(ValueError, "non-empty prompt"):
      lm_decode.generate(fns, b"", 3, jax.random.PRNGKey(0))

  def test_benchmark_reports_both(self):
    result = lm_decode.benchmark(self.model, self.params, np.asarray(self.tokens), [0.5, 0.5],
                                 repeats=4, num_inputs=4)
    for key in ("decode_ms_per_token", "mlp_ms_per_token"):
      self.assertGreater(result[key]["dense"], 0.0)
      self.assertGreater(result[key]["sparse"], 0.0)
    with self.assertRaisesRegex(ValueError, "gated model"):
      lm_decode.make_decode(self.model.clone(gated=False), self.params, sparse=True)


if __name__ == "__main__":
  absltest.main()
