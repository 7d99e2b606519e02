"""Tests for ccjax.train: gradient separation, jit, determinism, config checks, digits."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import ccjax

INPUT_DIM = 6
NUM_CLASSES = 3
BATCH = 8


def tiny_model(estimator="reinforce", gated=True):
  return ccjax.GatedMLP(hidden=(8, 12), num_classes=NUM_CLASSES, block_size=4,
                        estimator=estimator, gated=gated)


def tiny_batch(batch=BATCH, seed=0):
  rng = np.random.RandomState(seed)
  return {"x": rng.standard_normal((batch, INPUT_DIM)).astype(np.float32),
          "y": rng.randint(0, NUM_CLASSES, batch).astype(np.int32)}


def init_state(model, config, seed, sample_x):
  return ccjax.init_train_state(model, config, jax.random.key(seed), sample_x)


# Adam with the leave-one-out baseline: the config the jitted step tests share (skipping
# non-finite steps changes nothing on finite batches).
ADAM_CONFIG = ccjax.TrainConfig(baseline="batch_mean", skip_nonfinite=True)


@functools.lru_cache(maxsize=None)
def jitted_step(config, estimator="reinforce", gated=True):
  """The jitted train step of the tiny model, compiled once per config for this file."""
  return jax.jit(ccjax.make_train_step(tiny_model(estimator, gated), config))


def sgd_config(**overrides):
  """Plain SGD with learning rate 1 and no L2: ``params - new_params`` is the gradient."""
  kwargs = dict(optimizer="sgd", lr=1.0, policy_lr=1.0, l2=0.0)
  kwargs.update(overrides)
  return ccjax.TrainConfig(**kwargs)


@functools.lru_cache(maxsize=None)
def step_gradients(config, seed=0):
  """One train step of the tiny model on the tiny batch, cached per config.

  The step runs op by op (un-jitted): on CPU that is far cheaper than compiling one step
  per config, and jit vs no-jit agreement is tested separately.

  Returns:
    ``(grads, state, metrics)``, where ``grads = params - new_params``: with
    :func:`sgd_config` these are exactly the gradients the step applied.
  """
  model, batch = tiny_model(config.estimator), tiny_batch()
  state = init_state(model, config, seed, batch["x"])
  new_state, metrics = ccjax.make_train_step(model, config)(state, batch)
  grads = jax.tree_util.tree_map(lambda old, new: old - new, state.params, new_state.params)
  return grads, state, metrics


REGULARIZED_CONFIGS = (
    sgd_config(lambda_s=2.0, lambda_v=0.5, baseline="none"),
    sgd_config(lambda_s=5.0, lambda_v=0.0, baseline="batch_mean"),
    sgd_config(lambda_s=0.0, lambda_v=3.0, baseline="ema"),
)


def split(tree):
  """``(network, policy)`` sub-trees by :func:`ccjax.param_labels` (others set to None)."""
  labels = ccjax.param_labels(tree)
  network = jax.tree_util.tree_map(lambda x, l: x if l == "network" else None, tree, labels)
  policy = jax.tree_util.tree_map(lambda x, l: x if l == "policy" else None, tree, labels)
  return network, policy


def max_abs(tree):
  return max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


def task_loss(model, params, batch, key):
  logits, aux = model.apply({"params": params}, batch["x"], mode="sample", rngs={"gate": key})
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
  return jnp.mean(per_example), (per_example, aux)


class GradientSeparationTest(parameterized.TestCase):

  def test_task_loss_gives_policy_exactly_zero_gradient(self):
    model, batch = tiny_model(), tiny_batch()
    state = init_state(model, sgd_config(), 0, batch["x"])
    grads = jax.grad(lambda p: task_loss(model, p, batch, jax.random.key(1))[0])(state.params)
    network, policy = split(grads)
    self.assertEqual(max_abs(policy), 0.0)
    self.assertGreater(max_abs(network), 0.0)

  def test_policy_objective_gives_network_exactly_zero_gradient(self):
    model, batch = tiny_model(), tiny_batch()
    config = sgd_config(lambda_s=2.0, lambda_v=1.0, baseline="batch_mean")
    state = init_state(model, config, 0, batch["x"])

    def objective(params):
      _, (per_example, aux) = task_loss(model, params, batch, jax.random.key(1))
      return ccjax.policy_objective(aux, per_example, config, state.baseline)[0]

    network, policy = split(jax.grad(objective)(state.params))
    self.assertEqual(max_abs(network), 0.0)
    self.assertGreater(max_abs(policy), 0.0)

  def test_straight_through_task_loss_does_reach_the_policy(self):
    # The documented exception, and proof that the zero above is not vacuous.
    model, batch = tiny_model("straight_through"), tiny_batch()
    config = sgd_config(estimator="straight_through")
    state = init_state(model, config, 0, batch["x"])
    grads = jax.grad(lambda p: task_loss(model, p, batch, jax.random.key(1))[0])(state.params)
    self.assertGreater(max_abs(split(grads)[1]), 0.0)

  def test_router_trains_on_exactly_k_blocks_without_reinforce(self):
    model, batch = tiny_model("router"), tiny_batch()
    config = sgd_config(estimator="router", tau=0.5)
    state = init_state(model, config, 0, batch["x"])
    capacities = ccjax.top_k_capacities(model, state.params, batch["x"], config)
    self.assertEqual(capacities, (1, 2))  # round(0.5 * 2 blocks), round(0.5 * 3 blocks)

    def routed_loss(params):
      logits, _ = model.apply({"params": params}, batch["x"], mode="sample",
                              capacity=capacities)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))

    self.assertGreater(max_abs(split(jax.grad(routed_loss)(state.params))[1]), 0.0)
    _, metrics = ccjax.make_train_step(model, config)(state, batch)
    np.testing.assert_allclose(metrics["active_fraction"], [1 / 2, 2 / 3])
    self.assertEqual(float(metrics["reinforce"]), 0.0)
    self.assertGreater(float(metrics["grad_norm_policy"]), 0.0)
    with self.assertRaisesRegex(ValueError, "needs a capacity"):
      model.apply({"params": state.params}, batch["x"], mode="sample")

  def test_network_gradients_do_not_depend_on_lambdas_or_reinforce(self):
    model, batch = tiny_model(), tiny_batch()
    configs = [sgd_config(lambda_s=0.0, lambda_v=0.0, baseline="none"), *REGULARIZED_CONFIGS]
    results = [step_gradients(config) for config in configs]
    # "REINFORCE off": the gradient of the task loss alone, with the step's own mask key.
    state = results[0][1]
    step_key = jax.random.fold_in(state.rng, state.step)
    task_grads = jax.grad(lambda p: task_loss(model, p, batch, step_key)[0])(state.params)
    reference_network = split(task_grads)[0]
    for (grads, _, metrics), config in zip(results, configs):
      chex.assert_trees_all_close(split(grads)[0], reference_network, rtol=1e-5, atol=1e-6,
                                  custom_message=str(config))
      np.testing.assert_allclose(metrics["grad_norm_network"], optax.global_norm(
          jax.tree_util.tree_leaves(reference_network)), rtol=1e-5)
    # The policy gradients, in contrast, do change with the lambdas and the baseline.
    for grads, _, _ in results[1:]:
      self.assertGreater(max_abs(jax.tree_util.tree_map(
          lambda a, b: a - b, split(results[0][0])[1], split(grads)[1])), 1e-4)

  @parameterized.parameters(0, 1, 2)
  def test_policy_gradients_are_exactly_the_policy_objective(self, config_index):
    config = REGULARIZED_CONFIGS[config_index]
    model, batch = tiny_model(), tiny_batch()
    grads, state, _ = step_gradients(config)
    step_key = jax.random.fold_in(state.rng, state.step)

    def objective(params):
      _, (per_example, aux) = task_loss(model, params, batch, step_key)
      return ccjax.policy_objective(aux, per_example, config, state.baseline)[0]

    expected = split(jax.grad(objective)(state.params))[1]
    chex.assert_trees_all_close(split(grads)[1], expected, rtol=1e-5, atol=1e-6)

  @pytest.mark.slow  # op-by-op gradients of every config; the gradient-separation cases stay fast
  def test_l2_reaches_kernels_of_both_parameter_sets(self):
    without, state, _ = step_gradients(REGULARIZED_CONFIGS[0])
    with_l2, _, _ = step_gradients(sgd_config(lambda_s=2.0, lambda_v=0.5, baseline="none",
                                              l2=0.5))
    params = state.params
    for path in (("hidden_0", "dense", "kernel"), ("hidden_1", "policy", "logits", "kernel")):
      get = lambda tree, path=path: functools.reduce(lambda t, k: t[k], path, tree)
      np.testing.assert_allclose(get(with_l2) - get(without), 2 * 0.5 * get(params),
                                 rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(with_l2["output"]["bias"], without["output"]["bias"], atol=1e-6)


class TrainStepTest(parameterized.TestCase):

  def test_jit_and_no_jit_agree(self):
    model, batch = tiny_model(), tiny_batch()
    initial = init_state(model, ADAM_CONFIG, 0, batch["x"])
    results = []
    for step_fn in (ccjax.make_train_step(model, ADAM_CONFIG), jitted_step(ADAM_CONFIG)):
      state, history = initial, []
      for _ in range(2):
        state, metrics = step_fn(state, batch)
        history.append(metrics)
      results.append((state.replace(rng=jax.random.key_data(state.rng)), history))
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)
    self.assertEqual(int(results[0][0].step), 2)

  def test_same_seed_gives_identical_metrics(self):
    model = tiny_model()

    def run(train_step):
      state = init_state(model, ADAM_CONFIG, 3, tiny_batch()["x"])
      history = []
      for index in range(4):
        state, metrics = train_step(state, tiny_batch(seed=index))
        history.append(jax.device_get(metrics))
      return history, jax.device_get(state.params)

    # Once with the shared compiled step, once with a freshly built and compiled one.
    first = run(jitted_step(ADAM_CONFIG))
    second = run(jax.jit(ccjax.make_train_step(model, ADAM_CONFIG), donate_argnums=0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, first, second)
    self.assertLen(first[0], 4)

  def test_metrics(self):
    model, batch = tiny_model(), tiny_batch()
    state = init_state(model, ADAM_CONFIG, 0, batch["x"])
    new_state, metrics = ccjax.make_train_step(model, ADAM_CONFIG)(state, batch)
    for name in ("loss", "error", "l_b", "l_e", "l_v", "entropy", "grad_norm_network",
                 "grad_norm_policy", "objective", "reinforce", "baseline", "finite"):
      chex.assert_shape(metrics[name], ())
      self.assertTrue(bool(jnp.isfinite(metrics[name])), name)
    chex.assert_shape([metrics["active_fraction"], metrics["mean_prob"]], (2,))
    self.assertEqual(float(metrics["finite"]), 1.0)
    self.assertEqual(int(new_state.step), 1)
    self.assertEqual(int(new_state.baseline.count), 1)
    # Masks come from fold_in(rng, step): the step's active fraction is that of the mask
    # drawn with that key.
    _, (_, aux) = task_loss(model, state.params, batch, jax.random.fold_in(state.rng, 0))
    np.testing.assert_allclose(metrics["active_fraction"],
                               [jnp.mean(aux[0].mask), jnp.mean(aux[1].mask)])

  def test_batch_of_one(self):
    # The leave-one-out baseline has no other example to use: it falls back to 0.
    model, batch = tiny_model(), tiny_batch(batch=1)
    state = init_state(model, ADAM_CONFIG, 0, tiny_batch()["x"])  # parameters fit any batch
    _, metrics = jitted_step(ADAM_CONFIG)(state, batch)
    self.assertEqual(float(metrics["finite"]), 1.0)
    self.assertEqual(float(metrics["baseline"]), 0.0)

  def test_dense_baseline_trains_with_the_same_step(self):
    model, batch = tiny_model(gated=False), tiny_batch()
    state = init_state(model, ADAM_CONFIG, 0, batch["x"])
    new_state, metrics = ccjax.make_train_step(model, ADAM_CONFIG)(state, batch)
    self.assertNotIn("active_fraction", metrics)
    self.assertEqual(float(metrics["grad_norm_policy"]), 0.0)
    self.assertGreater(max_abs(jax.tree_util.tree_map(
        lambda a, b: a - b, new_state.params, state.params)), 0.0)

  def test_skip_nonfinite_keeps_parameters(self):
    model = tiny_model()
    batch = tiny_batch()
    batch["x"][0, 0] = np.nan
    state = init_state(model, ADAM_CONFIG, 0, batch["x"])
    new_state, metrics = jitted_step(ADAM_CONFIG)(state, batch)
    self.assertEqual(float(metrics["finite"]), 0.0)
    self.assertEqual(int(new_state.step), 1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_state.params, state.params)

  def test_eval_step(self):
    model, batch = tiny_model(), tiny_batch()
    state = init_state(model, ADAM_CONFIG, 0, batch["x"])
    for mode, capacity in (("threshold", None), ("top_k", 1), ("all", None)):
      outputs = ccjax.make_eval_step(model, mode, capacity)(state.params, batch)
      chex.assert_shape([outputs["loss"], outputs["correct"], outputs["prediction"]], (BATCH,))
      chex.assert_shape(outputs["active_fraction"], (2, BATCH))
      if mode == "all":
        np.testing.assert_array_equal(outputs["active_fraction"], 1.0)
    outputs = ccjax.make_eval_step(model, "sample")(state.params,
                                                    dict(batch, rng=jax.random.key(1)))
    chex.assert_shape(outputs["mask"][1], (BATCH, 3))
    with self.assertRaisesRegex(ValueError, "mode"):
      ccjax.make_eval_step(model, "random")


class BadInputTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("tau_zero", dict(tau=0.0), "tau"),
      ("tau_negative", dict(tau=-0.1), "tau"),
      ("tau_above_one", dict(tau=1.5), "tau"),
      ("tau_per_layer", dict(tau=(0.25, 1.2)), "tau"),
      ("tau_empty", dict(tau=()), "tau"),
      ("lambda_s_negative", dict(lambda_s=-1.0), "lambda_s"),
      ("lambda_v_negative", dict(lambda_v=-0.1), "lambda_v"),
      ("l2_negative", dict(l2=-1e-5), "l2"),
      ("lr_zero", dict(lr=0.0), "lr"),
      ("lr_negative", dict(lr=-1e-3), "lr"),
      ("policy_lr_zero", dict(policy_lr=0.0), "policy_lr"),
      ("bad_optimizer", dict(optimizer="adamw"), "optimizer"),
      ("bad_baseline", dict(baseline="mean"), "baseline must be one of none|batch_mean|ema"),
      ("bad_estimator", dict(estimator="reinforc"), "estimator"),
      ("decay_one", dict(baseline_decay=1.0), "baseline_decay"),
      ("bad_clip", dict(max_grad_norm=0.0), "max_grad_norm"),
  )
  def test_train_config_rejects(self, kwargs, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      ccjax.TrainConfig(**kwargs)

  def test_tau_one_and_per_layer_taus_are_valid(self):
    self.assertEqual(ccjax.TrainConfig(tau=1.0).taus(2), (1.0, 1.0))
    self.assertEqual(ccjax.TrainConfig(tau=(0.2, 0.3)).taus(2), (0.2, 0.3))

  def test_make_train_step_checks_model_against_config(self):
    with self.assertRaisesRegex(ValueError, "estimator"):
      ccjax.make_train_step(tiny_model("gumbel"), ccjax.TrainConfig())
    with self.assertRaisesRegex(ValueError, "tau"):
      ccjax.make_train_step(tiny_model(), ccjax.TrainConfig(tau=(0.25, 0.25, 0.25)))
    ccjax.make_train_step(tiny_model(), ccjax.TrainConfig(tau=(0.25, 0.5)))


def digits_split():
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.RandomState(0).permutation(len(x))
  x, y = x[order], y[order]
  return (x[:1500], y[:1500]), (x[1500:], y[1500:])


class DigitsTest(absltest.TestCase):

  @pytest.mark.slow  # 300 training steps on digits, 9 s
  def test_training_lowers_loss_and_reaches_tau(self):
    (x_train, y_train), (x_test, y_test) = digits_split()
    tau, batch_size, num_steps = 0.25, 64, 300
    model = ccjax.GatedMLP(hidden=(128, 128), num_classes=10, block_size=16)
    config = ccjax.TrainConfig(tau=tau, lambda_s=8.0, lambda_v=0.1, lr=3e-3, policy_lr=3e-2,
                               baseline="ema")
    state = init_state(model, config, 0, x_train[:batch_size])
    train_step = jax.jit(ccjax.make_train_step(model, config), donate_argnums=0)
    order = np.random.RandomState(1)
    losses, fractions = [], []
    for _ in range(num_steps):
      index = order.randint(0, len(x_train), batch_size)
      state, metrics = train_step(state, {"x": x_train[index], "y": y_train[index]})
      losses.append(float(metrics["loss"]))
      fractions.append(np.asarray(metrics["active_fraction"]))
    self.assertTrue(np.all(np.isfinite(losses)))
    self.assertLess(np.mean(losses[-50:]), 0.5 * np.mean(losses[:20]))
    # Policies start at probability 0.5 and end near tau, in every layer.
    self.assertGreater(np.mean(fractions[0]), 0.4)
    np.testing.assert_allclose(np.mean(fractions[-50:], axis=0), tau, atol=0.05)
    test_batch = {"x": x_test, "y": y_test, "rng": jax.random.key(5)}
    outputs = jax.jit(ccjax.make_eval_step(model, "sample"))(state.params, test_batch)
    np.testing.assert_allclose(np.mean(outputs["active_fraction"], axis=1), tau, atol=0.05)
    self.assertLess(1.0 - float(np.mean(outputs["correct"])), 0.3)


if __name__ == "__main__":
  absltest.main()
