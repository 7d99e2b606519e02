"""Mechanics of the training recipes in the train step, and the recipe registry."""

import functools

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

import ccjax
from ccjax import recipes
from ccjax import validation

BATCH = 32


@functools.lru_cache(maxsize=None)
def _data():
  key_x, key_y = jax.random.split(jax.random.key(0))
  return {"x": jax.random.normal(key_x, (BATCH, 6)),
          "y": jax.random.randint(key_y, (BATCH,), 0, 3)}


def _model(tau=0.25):
  return ccjax.GatedMLP(hidden=(32, 32), num_classes=3, block_size=8, policy_init_prob=tau)


def _run(config, steps, model=None):
  model = model or _model()
  state = ccjax.init_train_state(model, config, jax.random.key(1), _data()["x"][:1])
  step_fn = jax.jit(ccjax.make_train_step(model, config))
  history = []
  for _ in range(steps):
    state, metrics = step_fn(state, _data())
    history.append(jax.device_get(metrics))
  return state, history


class WarmStartTest(absltest.TestCase):

  def test_gating_is_frozen_for_exactly_n_steps(self):
    config = ccjax.TrainConfig(warm_steps=3)
    _, history = _run(config, 5)
    for metrics in history[:3]:
      np.testing.assert_array_equal(metrics["active_fraction"], [1.0, 1.0])
      self.assertEqual(float(metrics["reinforce"]), 0.0)
    for metrics in history[3:]:
      self.assertTrue(np.all(metrics["active_fraction"] < 0.6))
      self.assertNotEqual(float(metrics["reinforce"]), 0.0)

  def test_policy_learns_only_regularizers_during_warm_start(self):
    # With the regularizers off, the warm start leaves the policies untouched.
    config = ccjax.TrainConfig(warm_steps=3, lambda_s=0.0, lambda_v=0.0, l2=0.0)
    state, history = _run(config, 3)
    initial = ccjax.init_train_state(_model(), config, jax.random.key(1), _data()["x"][:1])
    for name in ("hidden_0", "hidden_1"):
      np.testing.assert_array_equal(state.params[name]["policy"]["logits"]["kernel"],
                                    initial.params[name]["policy"]["logits"]["kernel"])
    self.assertFalse(np.array_equal(state.params["output"]["kernel"],
                                    initial.params["output"]["kernel"]))
    self.assertTrue(all(float(m["grad_norm_policy"]) == 0.0 for m in history))


class CurriculumTest(absltest.TestCase):

  def test_regularizer_target_follows_the_schedule(self):
    config = ccjax.TrainConfig(tau=0.25, tau_schedule="linear", tau_schedule_steps=4,
                               warm_steps=2)
    self.assertEqual(config.initial_taus(2), (1.0, 1.0))
    np.testing.assert_allclose(config.taus_at(4, 2), [0.625, 0.625])
    np.testing.assert_allclose(config.taus_at(6, 2), [0.25, 0.25])
    # The step uses it: at step 0 the target is 1, so L_e = sum_l mean_x (mean_j p - 1)^2.
    model = _model(tau=0.9)
    state = ccjax.init_train_state(model, config, jax.random.key(1), _data()["x"][:1])
    _, aux = model.apply({"params": state.params}, _data()["x"], mode="all")
    _, history = _run(config, 1, model=model)
    expected = sum(ccjax.example_balance_loss(a.probs, 1.0) for a in aux)
    np.testing.assert_allclose(history[0]["l_e"], expected, rtol=1e-5)


class DistillationTest(absltest.TestCase):

  def test_reinforce_cost_is_the_task_loss_only(self):
    # Distillation changes the network's update but not the policy's: the REINFORCE cost
    # (and so the policy gradient) is the examples' own cross-entropy.
    plain, plain_metrics = _run(ccjax.TrainConfig(), 1)
    distilled, metrics = _run(ccjax.TrainConfig(distill_weight=1.0, distill_temperature=2.0), 1)
    self.assertGreater(float(metrics[0]["distill"]), 0.0)
    np.testing.assert_array_equal(plain_metrics[0]["reinforce"], metrics[0]["reinforce"])
    for name in ("hidden_0", "hidden_1"):
      np.testing.assert_array_equal(plain.params[name]["policy"]["logits"]["kernel"],
                                    distilled.params[name]["policy"]["logits"]["kernel"])
    self.assertFalse(np.array_equal(plain.params["output"]["kernel"],
                                     distilled.params["output"]["kernel"]))

  def test_external_teacher_is_used(self):
    model = _model()
    config = ccjax.TrainConfig(distill_weight=1.0)
    state = ccjax.init_train_state(model, config, jax.random.key(1), _data()["x"][:1])
    teacher = lambda x: jnp.zeros((x.shape[0], 3))  # uniform teacher
    _, metrics = jax.jit(ccjax.make_train_step(model, config, teacher=teacher))(state, _data())
    logits, _ = model.apply({"params": state.params}, _data()["x"], mode="sample",
                            rngs={"gate": jax.random.fold_in(state.rng, 0)})
    log_q = jax.nn.log_softmax(logits)
    expected = jnp.mean(jnp.sum(jnp.full((3,), 1 / 3) * (jnp.log(1 / 3) - log_q), -1))
    np.testing.assert_allclose(metrics["distill"], expected, rtol=1e-5)


class LagrangeTest(absltest.TestCase):

  def test_multipliers_move_with_the_violation(self):
    # Policies start at 0.9 while the target is 0.25: above budget, so mu grows.
    config = ccjax.TrainConfig(tau=0.25, budget="lagrange", dual_lr=0.5)
    state, history = _run(config, 3, model=_model(tau=0.9))
    self.assertEqual(state.duals.shape, (2,))
    self.assertTrue(np.all(np.asarray(state.duals) > 0.5))
    self.assertTrue(np.all(np.diff([m["duals"][0] for m in history]) > 0))

  def test_no_multipliers_with_penalties(self):
    state, _ = _run(ccjax.TrainConfig(), 1)
    self.assertIsNone(state.duals)


class EntropyAndAdvantageTest(absltest.TestCase):

  def test_entropy_term_reported_and_ramped(self):
    config = ccjax.TrainConfig(entropy_weight=1.0, entropy_ramp_steps=10)
    _, history = _run(config, 2)
    self.assertGreater(float(history[0]["block_entropy"]), 0.5)  # two layers, p = 0.25

  def test_standardized_advantage_changes_only_reinforce_scale(self):
    cost = jnp.array([1.0, 2.0, 3.0, 6.0])
    advantage = ccjax.standardized_advantage(cost, 1.0)
    np.testing.assert_allclose(jnp.mean(advantage), 0.0, atol=1e-6)
    np.testing.assert_allclose(jnp.std(advantage), 1.0, rtol=1e-4)
    _, history = _run(ccjax.TrainConfig(advantage="standardized"), 2)
    self.assertTrue(np.isfinite(history[-1]["reinforce"]))


class TopKEvalTest(absltest.TestCase):

  def test_exactly_k_blocks_per_example_and_layer(self):
    model = _model()
    state = ccjax.init_train_state(model, ccjax.TrainConfig(), jax.random.key(1),
                                   _data()["x"][:1])
    config = ccjax.ExperimentConfig.create(hidden=(32, 32), block_size=8, tau=(0.25,))
    capacity = config.top_k_capacities()
    self.assertEqual(capacity, (1, 1))
    outputs = ccjax.make_eval_step(model, "top_k", (1, 2))(state.params, _data())
    np.testing.assert_array_equal(np.sum(outputs["mask"][0], -1), 1)
    np.testing.assert_array_equal(np.sum(outputs["mask"][1], -1), 2)


class RegistryTest(absltest.TestCase):

  def test_composition(self):
    self.assertEqual(recipes.recipe_fields("baseline"), {})
    fields = recipes.recipe_fields("warm+distill")
    self.assertEqual(fields["warm_steps"], recipes.RECIPES["warm"]["warm_steps"])
    self.assertIn("distill_weight", fields)
    for name in recipes.RECIPES:  # every recipe builds a valid config
      ccjax.ExperimentConfig.create(**recipes.recipe_fields(name))

  def test_errors_name_the_flag(self):
    with self.assertRaisesRegex(validation.ConfigError, "recipes"):
      recipes.recipe_fields("nope")
    with self.assertRaisesRegex(validation.ConfigError, "both"):
      recipes.recipe_fields("straight_through+gumbel")

  def test_train_config_validation(self):
    for bad in (dict(warm_steps=-1), dict(tau_schedule="step"), dict(distill_temperature=0.0),
                dict(budget="hard"), dict(advantage="x"), dict(entropy_weight=float("nan"))):
      with self.assertRaises(validation.ConfigError):
        ccjax.TrainConfig(**bad)
    with self.assertRaisesRegex(validation.ConfigError, "distill_weight"):
      ccjax.ExperimentConfig.create(distill_from="/tmp/x")


if __name__ == "__main__":
  absltest.main()
