"""ccjax.nnx: NNX twins equal the Linen modules; one train step, checkpoint and inference."""

import shutil
import tempfile

import pytest
from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ccjax
from ccjax import nnx as ccnnx

_IN, _HIDDEN, _CLASSES, _BLOCK = 12, (32, 64), 5, 8


def _models(estimator="reinforce", seed=0, **fields):
  model = ccnnx.GatedMLP(_IN, _HIDDEN, _CLASSES, block_size=_BLOCK, estimator=estimator,
                         policy_init_prob=0.4, rngs=nnx.Rngs(seed), **fields)
  return model, model.to_linen(), ccnnx.params_of(model)


def _inputs(batch=7, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, _IN))


class NNXTwinTest(parameterized.TestCase):

  def test_same_parameter_tree_as_linen(self):
    model, linen, params = _models()
    linen_params = linen.init({"params": jax.random.PRNGKey(3), "gate": jax.random.PRNGKey(4)},
                              _inputs(), mode="all")["params"]
    chex.assert_trees_all_equal_shapes(params, linen_params)
    self.assertIn("policy", params["hidden_0"])

  def test_initial_block_probability(self):
    model, _, _ = _models()
    _, aux = model(_inputs(batch=256), mode="all")
    self.assertAlmostEqual(float(jnp.mean(aux[0].probs)), 0.4, delta=0.05)

  @parameterized.parameters("threshold", "top_k", "capped", "all")
  def test_outputs_equal_linen(self, mode):
    model, linen, params = _models()
    x = _inputs()
    capacity = 2 if mode in ("top_k", "capped") else None
    logits, aux = model(x, mode=mode, capacity=capacity)
    linen_logits, linen_aux = linen.apply({"params": params}, x, mode=mode, capacity=capacity)
    np.testing.assert_allclose(logits, linen_logits, rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(aux, linen_aux):
      np.testing.assert_array_equal(ours.mask, theirs.mask)
      np.testing.assert_allclose(ours.log_prob, theirs.log_prob, rtol=1e-6, atol=1e-6)

  def test_gradients_equal_linen(self):
    """Task loss plus the REINFORCE log-probability term: network and policy gradients."""
    model, linen, params = _models()
    x, y = _inputs(), jnp.arange(7) % _CLASSES
    masks = tuple(jax.random.bernoulli(jax.random.PRNGKey(index), 0.5, (7, width // _BLOCK))
                  .astype(jnp.float32) for index, width in enumerate(_HIDDEN))
    functional = ccnnx.FunctionalModel(model)

    def loss(apply, params):
      logits, aux = apply({"params": params}, x, mode="sample", block_masks=masks,
                          rngs={"gate": jax.random.PRNGKey(0)})
      task = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.mean(task) + jnp.mean(task * sum(a.log_prob for a in aux))

    # Jitted: one compile each instead of one per operation.
    ours = jax.jit(jax.grad(lambda p: loss(functional.apply, p)))(params)
    theirs = jax.jit(jax.grad(lambda p: loss(linen.apply, p)))(params)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-6)
    self.assertGreater(float(jnp.abs(ours["hidden_1"]["policy"]["logits"]["kernel"]).sum()), 0)

  def test_train_step_equals_linen(self):
    """The same train step on both APIs (router: deterministic masks) gives the same state."""
    model, linen, params = _models(estimator="router")
    config = ccjax.TrainConfig(tau=0.5, estimator="router", lambda_s=1.0)
    batch = {"x": _inputs(batch=16), "y": jnp.arange(16) % _CLASSES}
    functional = ccnnx.FunctionalModel(model)
    ours = ccjax.init_train_state(functional, config, jax.random.PRNGKey(0), batch["x"])
    chex.assert_trees_all_equal(ours.params, params)
    theirs = ours.replace(params=params)
    ours_step = jax.jit(ccjax.make_train_step(functional, config))
    theirs_step = jax.jit(ccjax.make_train_step(linen, config))
    for _ in range(3):
      ours, ours_metrics = ours_step(ours, batch)
      theirs, theirs_metrics = theirs_step(theirs, batch)
    chex.assert_trees_all_close(ours.params, theirs.params, rtol=1e-5, atol=1e-6)
    self.assertAlmostEqual(float(ours_metrics["loss"]), float(theirs_metrics["loss"]), places=5)

  def test_sampled_training_learns_and_writes_back(self):
    model, _, before = _models(estimator="straight_through")
    functional = ccnnx.FunctionalModel(model)
    config = ccjax.TrainConfig(tau=0.5, estimator="straight_through", lr=1e-2)
    x = _inputs(batch=32)
    batch = {"x": x, "y": (jnp.sum(x, axis=1) > 0).astype(jnp.int32)}
    state = ccjax.init_train_state(functional, config, jax.random.PRNGKey(0), x)
    step = jax.jit(ccjax.make_train_step(functional, config))
    first = None
    for _ in range(30):
      state, metrics = step(state, batch)
      first = float(metrics["loss"]) if first is None else first
    self.assertLess(float(metrics["loss"]), first)
    ccnnx.load_params(model, state.params)
    chex.assert_trees_all_equal(ccnnx.params_of(model), state.params)
    with self.assertRaises(AssertionError):
      chex.assert_trees_all_close(ccnnx.params_of(model), before)

  def test_load_params_refuses_other_tree(self):
    model, _, params = _models()
    with self.assertRaisesRegex(ValueError, "parameter tree"):
      ccnnx.load_params(model, {"hidden_0": params["hidden_0"]})

  def test_inference_skips_and_equals_masked_dense(self):
    model, linen, params = _models()
    x = _inputs(batch=9)
    for batch in (x[:1], x):
      infer = ccnnx.make_inference(model, mode="threshold")
      logits, info = infer(batch)
      reference, _ = linen.apply({"params": params}, batch, mode="all", block_masks=info.masks)
      np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)

  def test_user_model_with_gated_dense(self):
    class Net(nnx.Module):

      def __init__(self, rngs):
        self.stem = nnx.Linear(_IN, 16, rngs=rngs)
        self.gated = ccnnx.GatedDense(16, 32, block_size=8, estimator="straight_through",
                                      rngs=rngs)
        self.head = nnx.Linear(32, _CLASSES, rngs=rngs)

      def __call__(self, x, *, mode="sample", rng=None, capacity=None):
        h, gate = self.gated(nnx.relu(self.stem(x)), mode=mode, rng=rng, capacity=capacity)
        return self.head(h), (gate,)

    functional = ccnnx.FunctionalModel(Net(nnx.Rngs(0)))
    self.assertEqual(functional.estimator, "straight_through")
    config = ccjax.TrainConfig(tau=0.25, estimator="straight_through")
    batch = {"x": _inputs(batch=8), "y": jnp.arange(8) % _CLASSES}
    state = ccjax.init_train_state(functional, config, jax.random.PRNGKey(0), batch["x"])
    state, metrics = jax.jit(ccjax.make_train_step(functional, config))(state, batch)
    self.assertTrue(bool(metrics["finite"]))
    self.assertEqual(metrics["active_fraction"].shape, (1,))

  @pytest.mark.slow  # NNX checkpoint round trip; the NNX/Linen equality tests stay fast
  def test_checkpoint_round_trip(self):
    from ccjax import checkpoint  # pylint: disable=g-import-not-at-top
    model, _, params = _models()
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    saver = checkpoint.Checkpointer(directory)
    saver.save(1, {"params": params}, {"api": "nnx"})
    saver.close()
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    restored = checkpoint.Checkpointer(directory, read_only=True).restore({"params": zeros})
    fresh, _, _ = _models(seed=5)
    ccnnx.load_params(fresh, restored["params"])
    x = _inputs()
    np.testing.assert_array_equal(fresh(x, mode="threshold")[0], model(x, mode="threshold")[0])


if __name__ == "__main__":
  absltest.main()
