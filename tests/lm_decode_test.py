"""Batch-1 decoding: the sparse path equals the masked dense model; generation; timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest import mock

from absl.testing import absltest
import jax
import numpy as np
import pytest

import ccjax
from ccjax import lm_decode
from tests import param_utils

BACKENDS = [b for b in ("xla", "ffi-cpu") if b in ccjax.available_backends()]


class LmDecodeTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.model = ccjax.GatedTransformer(max_len=12, num_layers=2, d_model=16, num_heads=2,
                                        mlp_width=64, block_size=16)
    self.tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 12), 0, 256)
    # Jitted init and references (tests/param_utils): one compile each instead of one per
    # operation.
    self.params = param_utils.jitted_init(self.model)(
        {"params": jax.random.PRNGKey(1), "gate": jax.random.PRNGKey(2)}, self.tokens)["params"]
    self.apply = param_utils.jitted_apply(self.model)

  def test_sparse_and_dense_steps_match_their_references(self):
    masked, aux = self.apply({"params": self.params}, self.tokens, mode="threshold")
    active = [float(a.mask.mean()) for a in aux]
    self.assertTrue(all(0.0 < f < 1.0 for f in active))  # really skips, really runs
    dense_model = self.model.clone(gated=False)
    dense, _ = param_utils.jitted_apply(dense_model)(
        {"params": ccjax.strip_policy_params(self.params)}, self.tokens)
    fns = lm_decode.make_decode(self.model, self.params, sparse=False)
    self.assertEqual(fns.backend, "xla")
    self._assert_decodes(fns, dense)
    self.assertGreater(float(np.abs(masked - dense).max()), 1e-3)

  def test_sparse_step_equals_masked_dense_on_every_backend(self):
    for backend in BACKENDS:
      for mode, top_k in (("threshold", None), ("top_k", 2), ("top_k", (1, 3))):
        with self.subTest(backend=backend, mode=mode, top_k=top_k):
          reference, aux = self.apply({"params": self.params}, self.tokens, mode=mode,
                                      capacity=top_k)
          if top_k is not None:  # a top-k router decodes exactly k blocks per token
            for mask, k in zip((a.mask for a in aux), np.broadcast_to(top_k, (2,))):
              np.testing.assert_array_equal(np.sum(np.asarray(mask), -1), k)
          masked, _ = self.apply({"params": self.params}, self.tokens, mode="all",
                                 block_masks=[a.mask for a in aux])
          np.testing.assert_allclose(masked, reference, rtol=1e-5, atol=1e-6)
          fns = lm_decode.make_decode(self.model, self.params, sparse=True, mode=mode,
                                      top_k=top_k, backend=backend)
          self.assertEqual(fns.backend, backend)
          self._assert_decodes(fns, masked)

  def test_backend_env_override(self):
    with mock.patch.dict(os.environ, {"CCJAX_BACKEND": "xla"}):
      self.assertEqual(lm_decode.make_decode(self.model, self.params, sparse=True).backend,
                       "xla")
    with mock.patch.dict(os.environ):
      os.environ.pop("CCJAX_BACKEND", None)
      self.assertEqual(lm_decode.make_decode(self.model, self.params, sparse=True).backend,
                       ccjax.available_backends()[-1])

  def _assert_decodes(self, fns, reference):
    cache = ccjax.init_cache(self.model, 1)
    for position in range(12):
      logits, cache = fns.step(fns.weights, cache, self.tokens[:, position:position + 1])
      np.testing.assert_allclose(logits, reference[:, position], rtol=1e-4, atol=1e-5)

  @pytest.mark.slow  # the scan path; the per-step sparse decode equality stays fast
  def test_mlp_scan_equals_masked_dense_and_times(self):
    hidden = lm_decode.mlp_inputs(self.model, self.params, np.asarray(self.tokens))
    scan_hidden = lm_decode.scan_inputs(hidden, 16)  # 12 positions, cycled
    self.assertEqual(scan_hidden.shape, (16, 2, 1, 16))
    np.testing.assert_array_equal(scan_hidden[13], hidden[:, 1])
    for backend in BACKENDS:
      for mode, top_k in (("threshold", None), ("top_k", 2)):
        with self.subTest(backend=backend, mode=mode):
          fns = lm_decode.make_decode(self.model, self.params, sparse=True, mode=mode,
                                      top_k=top_k, backend=backend)
          out = np.asarray(fns.mlp_scan(fns.weights, scan_hidden))
          self.assertEqual(out.shape, (16, 2, 1, 16))
          for layer in range(2):
            mlp = self.model.mlp_module(layer)
            mlp_params = self.model.mlp_params(self.params)[layer]
            mlp_apply = param_utils.jitted_apply(mlp)
            _, mlp_aux = mlp_apply({"params": mlp_params}, scan_hidden[:, layer], mode=mode,
                                   capacity=top_k)
            masked, _ = mlp_apply({"params": mlp_params}, scan_hidden[:, layer], mode="all",
                                  block_masks=[mlp_aux[0].mask])
            np.testing.assert_allclose(out[:, layer], masked, rtol=1e-5, atol=1e-5)
          np.testing.assert_allclose(np.asarray(fns.mlp(fns.weights, scan_hidden[3])), out[3],
                                     rtol=1e-5, atol=1e-6)
    dense = lm_decode.make_decode(self.model, self.params, sparse=False)
    sparse = lm_decode.make_decode(self.model, self.params, sparse=True)
    times = lm_decode.mlp_ms_per_token_in_scan([dense, sparse], scan_hidden, repeats=2)
    self.assertLen(times, 2)
    self.assertTrue(all(np.isfinite(t) and t > 0.0 for t in times))

  def test_generate_past_the_context(self):
    fns = lm_decode.make_decode(self.model, self.params, sparse=True)
    out = lm_decode.generate(fns, b"The ", 30, jax.random.PRNGKey(0))
    self.assertLen(out, 30)
    self.assertEqual(out, lm_decode.generate(fns, b"The ", 30, jax.random.PRNGKey(0)))
    with self.assertRaisesRegex(ValueError, "non-empty prompt"):
      lm_decode.generate(fns, b"", 3, jax.random.PRNGKey(0))

  @pytest.mark.slow  # the decode benchmark end to end; decode exactness stays fast
  def test_benchmark_reports_both(self):
    result = lm_decode.benchmark(self.model, self.params, np.asarray(self.tokens), [0.5, 0.5],
                                 repeats=4, num_inputs=4)
    for key in ("decode_ms_per_token", "mlp_ms_per_token", "mlp_call_ms_per_token"):
      self.assertGreater(result[key]["dense"], 0.0)
      self.assertGreater(result[key]["sparse"], 0.0)
    self.assertIn(result["backend"], ccjax.BACKENDS)
    self.assertEqual(result["mode"], "threshold")
    top_k = lm_decode.benchmark(self.model, self.params, np.asarray(self.tokens), None,
                                repeats=2, num_inputs=2, scan_length=4, mode="top_k", top_k=1)
    self.assertGreater(top_k["mlp_ms_per_token"]["sparse"], 0.0)

  @pytest.mark.slow  # the probe script end to end
  def test_batch1_probe_script_prints_its_json(self):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(repo, "scripts", "probe_ffi_batch1.py"), "--d_model=16",
         "--mlp_width=32", "--block_size=16"], cwd=repo, capture_output=True, text=True,
        check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    self.assertEqual(set(result["us_per_token"]) & {"dense", "xla/k=1", "xla/k=2"},
                     {"dense", "xla/k=1", "xla/k=2"})
    self.assertTrue(all(value > 0 for value in result["us_per_token"].values()))
    self.assertIn("cpu", result["machine"])

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "gated model"):
      lm_decode.make_decode(self.model.clone(gated=False), self.params, sparse=True)
    with self.assertRaisesRegex(ValueError, "mode must be one of threshold"):
      lm_decode.make_decode(self.model, self.params, sparse=True, mode="sample")
    with self.assertRaisesRegex(ValueError, "top_k"):
      lm_decode.make_decode(self.model, self.params, sparse=True, mode="top_k")
    with self.assertRaisesRegex(ValueError, "backend must be one of"):
      lm_decode.make_decode(self.model, self.params, sparse=True, backend="tpu")


if __name__ == "__main__":
  absltest.main()
