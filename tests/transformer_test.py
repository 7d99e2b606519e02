"""GatedTransformer: per-token gates, causality, KV-cache decoding, train step, MACs."""

from __future__ import annotations

import functools

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

import ccjax
from ccjax import transformer

TINY = dict(max_len=8, num_layers=2, d_model=16, num_heads=2, mlp_width=32, block_size=8)


def _init(model, tokens):
  return model.init({"params": jax.random.PRNGKey(1), "gate": jax.random.PRNGKey(2)},
                    tokens)["params"]


class TransformerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.model = ccjax.GatedTransformer(**TINY)
    self.tokens = jax.random.randint(jax.random.PRNGKey(0), (3, 8), 0, 256)
    self.params = _init(self.model, self.tokens)

  def test_shapes_and_dense_baseline(self):
    logits, aux = self.model.apply({"params": self.params}, self.tokens, mode="threshold")
    self.assertEqual(logits.shape, (3, 8, 256))
    self.assertEqual(aux[0].mask.shape, (3, 8, 4))
    self.assertEqual(aux[0].log_prob.shape, (3, 8))
    dense = self.model.clone(gated=False)
    dense_params = ccjax.strip_policy_params(self.params)
    self.assertEqual(jax.tree_util.tree_structure(dense_params),
                     jax.tree_util.tree_structure(_init(dense, self.tokens)))
    dense_logits, dense_aux = dense.apply({"params": dense_params}, self.tokens)
    all_logits, _ = self.model.apply({"params": self.params}, self.tokens, mode="all")
    np.testing.assert_allclose(dense_logits, all_logits, rtol=1e-5, atol=1e-5)
    self.assertEqual(dense_aux, (None, None))

  def test_causal(self):
    changed = self.tokens.at[:, 5].set((self.tokens[:, 5] + 1) % 256)
    before, _ = self.model.apply({"params": self.params}, self.tokens, mode="threshold")
    after, _ = self.model.apply({"params": self.params}, changed, mode="threshold")
    np.testing.assert_allclose(before[:, :5], after[:, :5], rtol=1e-6, atol=1e-6)
    self.assertGreater(float(jnp.abs(before[:, 5:] - after[:, 5:]).max()), 1e-4)

  def test_kv_cache_decoding_matches_full_forward(self):
    full, _ = self.model.apply({"params": self.params}, self.tokens, mode="threshold")
    cache = ccjax.init_cache(self.model, 3)
    # One compiled decode step for every position (op by op, each position took ~1 s).
    decode_step = jax.jit(functools.partial(self.model.apply, mode="threshold", decode=True,
                                            mutable=["cache"]))
    steps = []
    for position in range(8):
      (logits, _), mutated = decode_step({"params": self.params, "cache": cache},
                                         self.tokens[:, position:position + 1])
      cache = mutated["cache"]
      steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-4, atol=1e-5)

  def test_train_step_learns_and_keeps_tau(self):
    config = ccjax.TrainConfig(tau=0.25, lr=3e-3, policy_lr=3e-3, reinforce_cost="position")
    state = ccjax.init_train_state(self.model, config, jax.random.PRNGKey(0), self.tokens)
    step = jax.jit(ccjax.make_train_step(self.model, config))
    batch = {"x": self.tokens, "y": jnp.roll(self.tokens, -1, axis=1)}
    first = None
    for _ in range(60):
      state, metrics = step(state, batch)
      first = metrics if first is None else first
    self.assertLess(float(metrics["loss"]), float(first["loss"]) - 0.5)
    self.assertEqual(metrics["active_fraction"].shape, (2,))
    # The regularizers pull the block probabilities from 0.5 toward tau = 0.25.
    self.assertLess(float(jnp.max(metrics["mean_prob"])), 0.42)

  def test_validation(self):
    with self.assertRaisesRegex(ValueError, "num_heads"):
      ccjax.GatedTransformer(**{**TINY, "num_heads": 3})
    with self.assertRaisesRegex(ValueError, "block_size"):
      ccjax.GatedTransformer(**{**TINY, "block_size": 7})
    with self.assertRaisesRegex(ValueError, "max_len"):
      self.model.apply({"params": self.params}, jnp.zeros((1, 9), jnp.int32))

  def test_macs_per_token(self):
    macs = transformer.macs_per_token(self.model, [0.25, 0.5], context=4)
    self.assertEqual(macs["mlp"], 2 * 16 * 32 * 0.75)
    self.assertEqual(macs["policy"], 2 * 16 * 4)
    self.assertEqual(macs["attention"], 2 * (4 * 16 * 16 + 2 * 4 * 16))
    self.assertEqual(macs["total"], macs["mlp"] + macs["policy"] + macs["attention"] + 16 * 256)


if __name__ == "__main__":
  absltest.main()
