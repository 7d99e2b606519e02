"""Per-position gates: shapes, regularizers over positions, and REINFORCE checked exactly.

The two token-level REINFORCE costs of :func:`ccjax.reinforce_terms` are checked by
enumerating every mask of a tiny model (2 layers x 2 positions x 2 blocks = 256 masks):
the expected estimator gradient ``sum_u pi(u) grad surrogate(u)`` is compared with the
exact gradient ``grad sum_u pi(u) cost(u)``. The ``sequence`` cost must match on a
transformer (positions interact through attention); the ``position`` cost must match when
positions do not interact (a per-token MLP) and must *not* match on the transformer, which
is the bias its docstring states.
"""

from __future__ import annotations

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ccjax
from ccjax import layers
from ccjax import transformer

SEQ, BLOCKS, LAYERS, VOCAB = 2, 2, 2, 5
ALL_MASKS = jnp.asarray(list(itertools.product((0.0, 1.0), repeat=LAYERS * SEQ * BLOCKS)),
                        jnp.float32).reshape(-1, LAYERS, 1, SEQ, BLOCKS)


def _policy_leaves(grads) -> np.ndarray:
  leaves = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]
            if layers.is_policy_path(path)]
  return np.concatenate([np.ravel(leaf) for leaf in leaves])


def _spread_policies(params, key):
  """Policy weights large enough that the probabilities differ clearly between masks."""
  def spread(path, leaf):
    if not layers.is_policy_path(path):
      return leaf
    return jax.random.normal(jax.random.fold_in(key, leaf.size), leaf.shape) * 1.5
  return jax.tree_util.tree_map_with_path(spread, params)


class TokenGradients:
  """Exact and expected-estimator policy gradients of one sequence, by enumeration."""

  def __init__(self, model, inputs, labels, params):
    self.model, self.inputs, self.labels, self.params = model, inputs, labels, params

  def forward(self, params, masks):
    logits, aux = self.model.apply({"params": params}, self.inputs, mode="all",
                                   block_masks=tuple(masks))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, self.labels)  # [1, seq]
    return aux, loss

  def exact(self) -> np.ndarray:
    def expected_cost(params):
      def one(masks):
        aux, loss = self.forward(params, masks)
        log_prob = sum(jnp.sum(a.log_prob) for a in aux)
        return jnp.exp(log_prob) * jax.lax.stop_gradient(jnp.mean(loss))
      return jnp.sum(jax.vmap(one)(ALL_MASKS))
    return _policy_leaves(jax.jit(jax.grad(expected_cost))(self.params))

  def expected_estimate(self, reinforce_cost: str) -> np.ndarray:
    config = ccjax.TrainConfig(lambda_s=0.0, lambda_v=0.0, baseline="none",
                               reinforce_cost=reinforce_cost)

    def mean_surrogate(params):
      def one(masks):
        aux, loss = self.forward(params, masks)
        weight = jnp.exp(sum(jnp.sum(a.log_prob) for a in aux))
        objective, _ = ccjax.policy_objective(aux, loss, config, ccjax.init_baseline_state())
        return jax.lax.stop_gradient(weight) * objective
      return jnp.sum(jax.vmap(one)(ALL_MASKS))
    return _policy_leaves(jax.jit(jax.grad(mean_surrogate))(self.params))


def _transformer_case() -> TokenGradients:
  model = transformer.GatedTransformer(vocab_size=VOCAB, max_len=SEQ, num_layers=LAYERS,
                                       d_model=8, num_heads=2, mlp_width=2 * BLOCKS,
                                       block_size=2)
  tokens = jnp.asarray([[1, 3]], jnp.int32)
  params = model.init({"params": jax.random.PRNGKey(0), "gate": jax.random.PRNGKey(1)},
                      tokens)["params"]
  return TokenGradients(model, tokens, jnp.asarray([[3, 4]]),
                        _spread_policies(params, jax.random.PRNGKey(2)))


def _per_token_mlp_case() -> TokenGradients:
  """Positions share weights but never interact: each one's loss sees only its masks."""
  model = ccjax.GatedMLP(hidden=(2 * BLOCKS,) * LAYERS, num_classes=VOCAB, block_size=2,
                         flatten=False)
  inputs = jax.random.normal(jax.random.PRNGKey(3), (1, SEQ, 6))
  params = model.init({"params": jax.random.PRNGKey(4), "gate": jax.random.PRNGKey(5)},
                      inputs)["params"]
  return TokenGradients(model, inputs, jnp.asarray([[0, 2]]),
                        _spread_policies(params, jax.random.PRNGKey(6)))


class TokenReinforceTest(parameterized.TestCase):

  def test_transformer_sequence_cost_unbiased_position_cost_biased(self):
    case = _transformer_case()
    exact = case.exact()
    self.assertGreater(np.abs(exact).max(), 1e-3)  # a non-trivial gradient
    np.testing.assert_allclose(case.expected_estimate("sequence"), exact, rtol=1e-4, atol=1e-6)
    # Attention carries a mask's effect to the next position, which "position" ignores.
    position = case.expected_estimate("position")
    self.assertGreater(np.abs(position - exact).max(), 1e-2 * np.abs(exact).max())

  @parameterized.parameters("sequence", "position")
  def test_both_costs_unbiased_without_interaction(self, reinforce_cost):
    case = _per_token_mlp_case()
    np.testing.assert_allclose(case.expected_estimate(reinforce_cost), case.exact(),
                               rtol=1e-4, atol=1e-6)

  def test_reinforce_terms_shapes(self):
    aux = [layers.GateAux(probs=jnp.full((3, 4, 2), 0.5), mask=jnp.ones((3, 4, 2)),
                          log_prob=jnp.full((3, 4), -1.0))] * 2
    loss = jnp.arange(12.0).reshape(3, 4)
    cost, log_prob = ccjax.reinforce_terms(aux, loss, "sequence")
    np.testing.assert_allclose(cost, loss.mean(axis=1))
    np.testing.assert_allclose(log_prob, jnp.full((3,), -8.0))
    cost, log_prob = ccjax.reinforce_terms(aux, loss, "position")
    self.assertEqual(cost.shape, (3, 4))
    np.testing.assert_allclose(log_prob, jnp.full((3, 4), -2.0))
    with self.assertRaisesRegex(ValueError, "do not match"):
      ccjax.reinforce_terms(aux, loss[:, :2], "position")

  def test_leave_one_out_baseline_per_position(self):
    cost = jnp.asarray([[1.0, 10.0], [3.0, 20.0], [5.0, 60.0]])
    baseline = ccjax.compute_baseline("batch_mean", cost)
    np.testing.assert_allclose(baseline, [[4.0, 40.0], [3.0, 35.0], [2.0, 15.0]])

  def test_regularizers_count_every_position(self):
    probs = jax.random.uniform(jax.random.PRNGKey(0), (3, 5, 4))
    rows = probs.reshape(15, 4)
    for fn in (ccjax.block_balance_loss, ccjax.example_balance_loss):
      np.testing.assert_allclose(fn(probs, 0.25), fn(rows, 0.25), rtol=1e-6)
    np.testing.assert_allclose(ccjax.variance_loss(probs), ccjax.variance_loss(rows), rtol=1e-6)
    self.assertNotAlmostEqual(float(ccjax.variance_loss(probs)),
                              float(-jnp.sum(jnp.var(probs, axis=0))), places=4)

  def test_gated_dense_per_position_equals_per_row(self):
    dense = ccjax.GatedDense(8, block_size=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 6))
    variables = dense.init({"params": jax.random.PRNGKey(1), "gate": jax.random.PRNGKey(2)}, x)
    y, aux = dense.apply(variables, x, mode="threshold")
    y_rows, aux_rows = dense.apply(variables, x.reshape(15, 6), mode="threshold")
    self.assertEqual(aux.mask.shape, (3, 5, 4))
    self.assertEqual(aux.log_prob.shape, (3, 5))
    np.testing.assert_allclose(y.reshape(15, 8), y_rows, rtol=1e-6)
    np.testing.assert_allclose(aux.log_prob.reshape(15), aux_rows.log_prob, rtol=1e-6)

  def test_activation_top_k_keeps_largest_blocks(self):
    activations = jnp.asarray([[0.0, 3.0, 1.0, 1.0, 2.0, 2.0, 0.1, 0.0]])
    mask = layers.activation_top_k_mask(activations, 4, 2)
    np.testing.assert_array_equal(mask, [[1.0, 0.0, 1.0, 0.0]])  # norms^2 9, 2, 8, 0.01
    dense = ccjax.GatedDense(8, block_size=2, gated=False)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 6))
    variables = dense.init(jax.random.PRNGKey(1), x)
    y, aux = dense.apply(variables, x, mode=layers.ACTIVATION_TOP_K, capacity=1)
    self.assertIsNone(aux)
    nonzero_blocks = jnp.sum(jnp.any(y.reshape(2, 3, 4, 2) != 0, axis=-1), axis=-1)
    self.assertTrue(bool(jnp.all(nonzero_blocks <= 1)))
    with self.assertRaisesRegex(ValueError, "capacity"):
      dense.apply(variables, x, mode=layers.ACTIVATION_TOP_K)


if __name__ == "__main__":
  absltest.main()
