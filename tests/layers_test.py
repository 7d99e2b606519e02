"""Tests for the Linen modules in ccjax.layers (and GatedDense inside NNX via the bridge)."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ccjax

BATCH = 5
INPUT_DIM = 7
FEATURES = 12
BLOCK_SIZE = 3  # 4 blocks
NUM_BLOCKS = FEATURES // BLOCK_SIZE


def make_input(batch=BATCH, seed=0, dtype=jnp.float32):
  # numpy, not jax.random: every new shape of a jax.random call costs a compilation.
  values = np.random.RandomState(seed).standard_normal((batch, INPUT_DIM))
  return jnp.asarray(values, dtype)


def init_dense(layer, x, seed=1):
  return layer.init({"params": jax.random.key(seed), "gate": jax.random.key(seed)}, x)


class GatedDenseTest(parameterized.TestCase):

  def test_shapes_and_aux(self):
    layer = ccjax.GatedDense(FEATURES, block_size=BLOCK_SIZE)
    x = make_input()
    variables = init_dense(layer, x)
    y, aux = layer.apply(variables, x, rngs={"gate": jax.random.key(2)})
    chex.assert_shape(y, (BATCH, FEATURES))
    self.assertIsInstance(aux, ccjax.GateAux)
    chex.assert_shape([aux.probs, aux.mask], (BATCH, NUM_BLOCKS))
    chex.assert_shape(aux.log_prob, (BATCH,))
    np.testing.assert_allclose(aux.log_prob, ccjax.mask_log_prob(aux.probs, aux.mask), rtol=1e-6)
    params = variables["params"]
    chex.assert_shape(params["dense"]["kernel"], (INPUT_DIM, FEATURES))
    chex.assert_shape(params["policy"]["logits"]["kernel"], (INPUT_DIM, NUM_BLOCKS))
    chex.assert_shape(params["policy"]["logits"]["bias"], (NUM_BLOCKS,))

  def test_inactive_blocks_are_exactly_zero_and_active_blocks_are_dense(self):
    layer = ccjax.GatedDense(FEATURES, block_size=BLOCK_SIZE)
    x = make_input(batch=32)
    variables = init_dense(layer, x)
    y, aux = layer.apply(variables, x, rngs={"gate": jax.random.key(3)})
    dense = variables["params"]["dense"]
    full = jax.nn.relu(x @ dense["kernel"] + dense["bias"])
    unit_mask = ccjax.expand_block_mask(aux.mask, BLOCK_SIZE)
    # Both cases occur in this draw.
    self.assertGreater(float(jnp.sum(unit_mask == 0)), 0)
    self.assertGreater(float(jnp.sum(unit_mask == 1)), 0)
    np.testing.assert_array_equal(jnp.where(unit_mask == 0, y, 0.0), 0.0)
    np.testing.assert_allclose(jnp.where(unit_mask == 1, y, 0.0),
                               jnp.where(unit_mask == 1, full, 0.0), rtol=1e-5, atol=1e-6)

  def test_policy_reads_stop_gradient_of_input(self):
    layer = ccjax.GatedDense(FEATURES, block_size=BLOCK_SIZE)
    x = make_input()
    variables = init_dense(layer, x)

    def probs_sum(inputs):
      _, aux = layer.apply(variables, inputs, mode="threshold")
      return jnp.sum(aux.probs)

    np.testing.assert_array_equal(jax.grad(probs_sum)(x), 0.0)
    # ...yet the policy does read the input, and the layer output does depend on it.
    _, aux_other = layer.apply(variables, make_input(seed=9), mode="threshold")
    _, aux = layer.apply(variables, x, mode="threshold")
    self.assertGreater(float(jnp.max(jnp.abs(aux.probs - aux_other.probs))), 1e-4)
    output_grad = jax.grad(lambda inputs: jnp.sum(layer.apply(variables, inputs, mode="all")[0]))(x)
    self.assertGreater(float(jnp.max(jnp.abs(output_grad))), 0.0)

  def test_reinforce_mask_passes_no_gradient_but_straight_through_does(self):
    x = make_input()
    for estimator, expect_zero in (("reinforce", True), ("straight_through", False),
                                   ("gumbel", False)):
      layer = ccjax.GatedDense(FEATURES, block_size=BLOCK_SIZE, estimator=estimator)
      variables = init_dense(layer, x)

      def output_sum(params, layer=layer):
        y, _ = layer.apply({"params": params}, x, rngs={"gate": jax.random.key(4)})
        return jnp.sum(y)

      policy_grad = jax.grad(output_sum)(variables["params"])["policy"]
      largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(policy_grad))
      if expect_zero:
        self.assertEqual(largest, 0.0, estimator)
      else:
        self.assertGreater(largest, 0.0, estimator)

  def test_ungated_layer_is_plain_dense(self):
    x = make_input()
    ungated = ccjax.GatedDense(FEATURES, block_size=BLOCK_SIZE, gated=False)
    variables = init_dense(ungated, x)
    self.assertEqual(set(variables["params"]), {"dense"})
    y, aux = ungated.apply(variables, x)
    self.assertIsNone(aux)
    dense = variables["params"]["dense"]
    np.testing.assert_allclose(y, jax.nn.relu(x @ dense["kernel"] + dense["bias"]), rtol=1e-6)
    # The gated layer in mode 'all' with the same dense parameters computes the same.
    gated = ccjax.GatedDense(FEATURES, block_size=BLOCK_SIZE)
    gated_params = dict(init_dense(gated, x)["params"], dense=dense)
    y_all, aux_all = gated.apply({"params": gated_params}, x, mode="all")
    np.testing.assert_allclose(y_all, y, rtol=1e-6)
    np.testing.assert_array_equal(aux_all.mask, 1.0)

  @parameterized.parameters(0.1, 0.25, 0.5, 0.9)
  def test_initial_probability(self, init_prob):
    layer = ccjax.GatedDense(FEATURES, block_size=BLOCK_SIZE, policy_init_prob=init_prob)
    x = make_input(batch=32)
    variables = init_dense(layer, x)
    bias = variables["params"]["policy"]["logits"]["bias"]
    np.testing.assert_allclose(ccjax.policy_probs(bias, layer.policy_eps), init_prob, rtol=1e-5)
    _, aux = layer.apply(variables, x, mode="threshold")
    self.assertAlmostEqual(float(jnp.mean(aux.probs)), init_prob, delta=0.03)

  @parameterized.parameters(
      (jnp.float16, None), (jnp.bfloat16, None), (jnp.float32, jnp.bfloat16),
      (jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float16))
  def test_low_precision_is_finite(self, input_dtype, compute_dtype):
    layer = ccjax.GatedDense(FEATURES, block_size=BLOCK_SIZE, dtype=compute_dtype)
    x = make_input(dtype=input_dtype)
    variables = init_dense(layer, x)
    for mode in ("sample", "threshold", "all"):
      y, aux = layer.apply(variables, x, mode=mode, rngs={"gate": jax.random.key(1)})
      self.assertTrue(bool(jnp.all(jnp.isfinite(y.astype(jnp.float32)))), mode)
      self.assertTrue(bool(jnp.all(jnp.isfinite(aux.log_prob))), mode)
      chex.assert_type(aux.probs, jnp.float32)  # the policy always runs in float32
      if compute_dtype is not None:
        chex.assert_type(y, compute_dtype)

  def test_batch_of_one(self):
    layer = ccjax.GatedDense(FEATURES, block_size=BLOCK_SIZE)
    x = make_input(batch=1)
    variables = init_dense(layer, x)
    for mode, capacity in (("sample", None), ("threshold", None), ("top_k", 2), ("all", None)):
      y, aux = layer.apply(variables, x, mode=mode, capacity=capacity,
                           rngs={"gate": jax.random.key(1)})
      chex.assert_shape(y, (1, FEATURES))
      chex.assert_shape(aux.log_prob, (1,))

  def test_deterministic_modes(self):
    layer = ccjax.GatedDense(FEATURES, block_size=BLOCK_SIZE)
    x = make_input(batch=32)
    variables = init_dense(layer, x)
    variables = jax.tree_util.tree_map(lambda v: v, variables)
    # Spread the probabilities around 0.5 so that the modes differ.
    variables["params"]["policy"]["logits"]["kernel"] = jnp.asarray(
        2.0 * np.random.RandomState(5).standard_normal((INPUT_DIM, NUM_BLOCKS)), jnp.float32)
    _, aux = layer.apply(variables, x, mode="threshold")
    np.testing.assert_array_equal(aux.mask, ccjax.threshold_mask(aux.probs))
    _, aux_top = layer.apply(variables, x, mode="top_k", capacity=1)
    np.testing.assert_array_equal(aux_top.mask, ccjax.top_k_mask(aux.probs, 1))
    self.assertLessEqual(float(jnp.max(jnp.sum(aux_top.mask, -1))), 1.0)
    _, aux_all = layer.apply(variables, x, mode="all")
    np.testing.assert_array_equal(aux_all.mask, 1.0)
    # Deterministic modes need no gate key and are repeatable.
    _, aux_again = layer.apply(variables, x, mode="threshold")
    np.testing.assert_array_equal(aux_again.mask, aux.mask)
    with self.assertRaisesRegex(ValueError, "mode must be one of"):
      layer.apply(variables, x, mode="greedy")

  def test_sampled_mask_follows_key(self):
    layer = ccjax.GatedDense(FEATURES, block_size=BLOCK_SIZE)
    x = make_input(batch=32)
    variables = init_dense(layer, x)
    masks = [layer.apply(variables, x, rngs={"gate": jax.random.key(k)})[1].mask
             for k in (0, 0, 1)]
    np.testing.assert_array_equal(masks[0], masks[1])
    self.assertFalse(bool(jnp.all(masks[0] == masks[2])))

  @parameterized.named_parameters(
      ("block_size_not_dividing", dict(features=10, block_size=3), "block_size"),
      ("zero_features", dict(features=0, block_size=1), "features"),
      ("negative_features", dict(features=-8, block_size=4), "features"),
      ("zero_block_size", dict(features=8, block_size=0), "block_size"),
      ("bad_estimator", dict(features=8, block_size=4, estimator="gumble"), "estimator"),
      ("init_prob_zero", dict(features=8, block_size=4, policy_init_prob=0.0),
       "policy_init_prob"),
      ("init_prob_one", dict(features=8, block_size=4, policy_init_prob=1.0),
       "policy_init_prob"),
      ("eps_half", dict(features=8, block_size=4, policy_eps=0.5), "policy_eps"),
  )
  def test_bad_arguments_raise_at_construction(self, kwargs, name):
    with self.assertRaisesRegex(ValueError, name):
      ccjax.GatedDense(**kwargs)


class GatedMLPTest(parameterized.TestCase):

  def test_outputs_params_and_labels(self):
    model = ccjax.GatedMLP(hidden=(8, 12), num_classes=3, block_size=4)
    x = jnp.ones((2, 2, 3))  # flattened to [2, 6]
    params = model.init({"params": jax.random.key(0), "gate": jax.random.key(1)}, x)["params"]
    logits, aux = model.apply({"params": params}, x, rngs={"gate": jax.random.key(2)})
    chex.assert_shape(logits, (2, 3))
    self.assertLen(aux, 2)
    chex.assert_shape([aux[0].probs, aux[1].probs], [(2, 2), (2, 3)])
    chex.assert_shape(params["hidden_0"]["policy"]["logits"]["kernel"], (6, 2))
    chex.assert_shape(params["hidden_1"]["policy"]["logits"]["kernel"], (8, 3))
    labels = ccjax.param_labels(params)
    self.assertEqual(labels["hidden_1"]["policy"]["logits"]["bias"], "policy")
    self.assertEqual(labels["hidden_1"]["dense"]["kernel"], "network")
    self.assertEqual(labels["output"]["kernel"], "network")

  def test_ungated_model_is_the_dense_baseline(self):
    model = ccjax.GatedMLP(hidden=(8, 12), num_classes=3, block_size=4, gated=False)
    x = jnp.ones((2, 6))
    params = model.init(jax.random.key(0), x)["params"]
    self.assertEqual(set(params["hidden_0"]), {"dense"})
    logits, aux = model.apply({"params": params}, x)
    self.assertEqual(aux, (None, None))
    chex.assert_shape(logits, (2, 3))

  def test_per_layer_init_prob_and_capacity(self):
    model = ccjax.GatedMLP(hidden=(8, 12), num_classes=3, block_size=4,
                           policy_init_prob=(0.2, 0.8))
    x = jnp.asarray(np.random.RandomState(0).standard_normal((32, 6)), jnp.float32)
    params = model.init({"params": jax.random.key(0), "gate": jax.random.key(1)}, x)["params"]
    _, aux = model.apply({"params": params}, x, rngs={"gate": jax.random.key(2)})
    self.assertAlmostEqual(float(jnp.mean(aux[0].probs)), 0.2, delta=0.05)
    self.assertAlmostEqual(float(jnp.mean(aux[1].probs)), 0.8, delta=0.05)
    _, aux = model.apply({"params": params}, x, mode="top_k", capacity=(1, 2))
    self.assertLessEqual(float(jnp.max(jnp.sum(aux[0].mask, -1))), 1.0)
    self.assertLessEqual(float(jnp.max(jnp.sum(aux[1].mask, -1))), 2.0)

  def test_all_blocks_inactive_gives_zeros_and_finite_loss(self):
    model = ccjax.GatedMLP(hidden=(8, 12), num_classes=3, block_size=4)
    x = jnp.asarray(np.random.RandomState(0).standard_normal((4, 6)), jnp.float32)
    y = jnp.array([0, 1, 2, 0])
    params = model.init({"params": jax.random.key(0), "gate": jax.random.key(1)}, x)["params"]
    params = jax.tree_util.tree_map(lambda v: v, params)
    for layer, num_blocks in (("hidden_0", 2), ("hidden_1", 3)):
      params[layer]["policy"]["logits"]["bias"] = jnp.full((num_blocks,), -1e4)

    def loss_fn(p):
      logits, aux = model.apply({"params": p}, x, mode="threshold")
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), (logits, aux)

    (loss, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    np.testing.assert_array_equal(aux[0].mask, 0.0)
    np.testing.assert_array_equal(aux[1].mask, 0.0)
    # Nothing reaches the output layer but its bias.
    np.testing.assert_allclose(logits, jnp.broadcast_to(params["output"]["bias"], (4, 3)))
    self.assertTrue(bool(jnp.isfinite(loss)))
    self.assertTrue(all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads)))
    self.assertTrue(bool(jnp.all(jnp.isfinite(aux[1].log_prob))))
    # Under sampling, the policy bound eps keeps log-probs finite too.
    _, aux = model.apply({"params": params}, x, rngs={"gate": jax.random.key(3)})
    self.assertTrue(bool(jnp.all(jnp.isfinite(aux[0].log_prob))))

  @parameterized.named_parameters(
      ("no_layers", dict(hidden=()), "hidden"),
      ("block_size_not_dividing", dict(hidden=(64, 100)), "block_size=16 must divide hidden"),
      ("zero_width", dict(hidden=(0,)), r"hidden\[0\]"),
      ("negative_width", dict(hidden=(64, -16)), r"hidden\[1\]"),
      ("zero_block_size", dict(hidden=(64,), block_size=0), "block_size"),
      ("one_class", dict(num_classes=1), "num_classes"),
      ("bad_estimator", dict(estimator="reinforcee"), "estimator"),
      ("init_prob_above_one", dict(policy_init_prob=1.5), "policy_init_prob"),
      ("init_prob_per_layer_length", dict(hidden=(64, 64), policy_init_prob=(0.5,)),
       "policy_init_prob"),
      ("init_prob_per_layer_value", dict(hidden=(64, 64), policy_init_prob=(0.5, 0.0)),
       "policy_init_prob"),
      ("eps_too_big", dict(policy_eps=0.6), "policy_eps"),
  )
  def test_bad_arguments_raise_at_construction(self, overrides, pattern):
    kwargs = dict(hidden=(64,), num_classes=10, block_size=16)
    kwargs.update(overrides)
    with self.assertRaisesRegex(ValueError, pattern):
      ccjax.GatedMLP(**kwargs)

  def test_make_block_mask_errors(self):
    probs = jnp.full((2, 3), 0.5)
    with self.assertRaisesRegex(ValueError, "rng"):
      ccjax.make_block_mask(probs, "sample", "reinforce")
    with self.assertRaisesRegex(ValueError, "estimator"):
      ccjax.make_block_mask(probs, "sample", "nope", rng=jax.random.key(0))


class NnxBridgeTest(absltest.TestCase):

  def test_gated_dense_inside_an_nnx_model(self):
    gated_dense = ccjax.GatedDense(FEATURES, block_size=BLOCK_SIZE)

    class NnxClassifier(nnx.Module):
      """A user's NNX model with a ccjax gated layer in the middle."""

      def __init__(self, rngs: nnx.Rngs):
        self.gated = nnx.bridge.ToNNX(gated_dense, rngs=rngs)
        self.head = nnx.Linear(FEATURES, 3, rngs=rngs)

      def __call__(self, x, *, mode="sample", rngs=None):
        hidden, aux = self.gated(x, mode=mode, rngs=rngs)
        return self.head(hidden), hidden, aux

    x = make_input()
    model = NnxClassifier(nnx.Rngs(params=0, gate=1))
    nnx.bridge.lazy_init(model, x)
    params = nnx.state(model.gated, nnx.Param).to_pure_dict()
    chex.assert_shape(params["policy"]["logits"]["kernel"], (INPUT_DIM, NUM_BLOCKS))

    # Sample mode: the NNX call with gate stream Rngs(gate=7) draws from the same key a
    # fresh Rngs(gate=7) stream yields, so the Linen apply with that key must agree.
    logits, hidden, aux = model(x, rngs=nnx.Rngs(gate=7))
    gate_key = nnx.Rngs(gate=7).gate()
    linen_hidden, linen_aux = gated_dense.apply({"params": params}, x, rngs={"gate": gate_key})
    chex.assert_trees_all_close((hidden, aux), (linen_hidden, linen_aux), rtol=1e-6)
    np.testing.assert_allclose(logits, model.head(linen_hidden), rtol=1e-6)
    chex.assert_shape(logits, (BATCH, 3))

    # Deterministic mode needs no key.
    _, hidden, aux = model(x, mode="threshold")
    linen_hidden, linen_aux = gated_dense.apply({"params": params}, x, mode="threshold")
    chex.assert_trees_all_close((hidden, aux), (linen_hidden, linen_aux), rtol=1e-6)

    # The bridged parameters train with nnx.grad like any NNX parameter.
    def loss_fn(module):
      out, _, _ = module(x, mode="all")
      return jnp.mean(out ** 2)

    grads = nnx.grad(loss_fn)(model)
    dense_grad = nnx.state(grads, nnx.Param).to_pure_dict()["gated"]["dense"]["kernel"]
    self.assertGreater(float(jnp.max(jnp.abs(dense_grad))), 0.0)


if __name__ == "__main__":
  absltest.main()
