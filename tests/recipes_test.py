"""Mechanics of the training recipes in the train step, and the recipe registry."""

import functools

import pytest
from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

import ccjax
from ccjax import recipes
from ccjax import validation
from tests import experiment_utils

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


class BatchShapingTest(absltest.TestCase):

  def test_term_is_the_prior_loss_of_each_layer_and_moves_only_the_policy(self):
    plain, plain_history = _run(ccjax.TrainConfig(), 1)
    self.assertNotIn("l_bs", plain_history[0])
    config = ccjax.TrainConfig(batch_shaping_weight=1.0)
    shaped, history = _run(config, 1)
    initial = ccjax.init_train_state(_model(), config, jax.random.key(1), _data()["x"][:1])
    # The second layer's policy reads the first layer's masked output: the same masks.
    _, aux = _model().apply({"params": initial.params}, _data()["x"], mode="sample",
                            rngs={"gate": jax.random.fold_in(initial.rng, 0)})
    expected = sum(ccjax.batch_shaping_loss(a.probs, 0.25) for a in aux)
    np.testing.assert_allclose(history[0]["l_bs"], expected, rtol=1e-5)
    self.assertGreater(float(history[0]["l_bs"]), 0.0)
    # The prior reaches the policies only: the network's update is unchanged.
    np.testing.assert_array_equal(plain.params["output"]["kernel"],
                                  shaped.params["output"]["kernel"])
    self.assertFalse(np.array_equal(plain.params["hidden_1"]["policy"]["logits"]["kernel"],
                                    shaped.params["hidden_1"]["policy"]["logits"]["kernel"]))

  def test_weight_anneals_to_zero_after_the_warm_start(self):
    config = ccjax.TrainConfig(batch_shaping_weight=1.0, batch_shaping_steps=2, warm_steps=1,
                               lambda_s=0.0, lambda_v=0.0, l2=0.0, estimator="straight_through")
    model = ccjax.GatedMLP(hidden=(32, 32), num_classes=3, block_size=8, policy_init_prob=0.25,
                           estimator="straight_through")
    _, history = _run(config, 4, model=model)
    # Steps 0, 1: full weight (warm start, then the anneal's start); 2: half; 3: off. The
    # objective's policy part is then exactly weight * L_bs (no other policy terms).
    for metrics, scale in zip(history, (1.0, 1.0, 0.5, 0.0)):
      policy_part = metrics["objective"] - metrics["loss"] - metrics["l2"]
      np.testing.assert_allclose(policy_part, scale * metrics["l_bs"], rtol=1e-4, atol=1e-6)

  @pytest.mark.slow  # batch shaping under every estimator; the prior-loss test stays fast
  def test_estimators_of_both_kinds_and_per_token_gates(self):
    # L_bs reads only the probabilities (ccjax.step.policy_objective never branches on the
    # estimator for it), so two estimators stand for the registry: one with a score
    # function and a capacity, one relaxed (no score function, no capacity).
    for estimator in ("reinforce_top_k", "gumbel"):
      model = ccjax.GatedMLP(hidden=(32, 32), num_classes=3, block_size=8, estimator=estimator,
                             policy_init_prob=0.25)
      config = ccjax.TrainConfig(batch_shaping_weight=1.0, estimator=estimator)
      _, history = _run(config, 2, model=model)
      self.assertTrue(np.isfinite(history[-1]["l_bs"]), estimator)
      self.assertGreater(float(history[-1]["grad_norm_policy"]), 0.0, estimator)
    # Per-token gates: [batch, seq, blocks] probabilities, every position one x.
    model = ccjax.GatedMLP(hidden=(16,), num_classes=5, block_size=4, flatten=False,
                           policy_init_prob=0.25)
    config = ccjax.TrainConfig(batch_shaping_weight=1.0)
    tokens = {"x": jax.random.normal(jax.random.key(3), (4, 6, 8)),
              "y": jax.random.randint(jax.random.key(4), (4, 6), 0, 5)}
    state = ccjax.init_train_state(model, config, jax.random.key(1), tokens["x"][:1])
    _, metrics = jax.jit(ccjax.make_train_step(model, config))(state, tokens)
    _, aux = model.apply({"params": state.params}, tokens["x"], mode="all")
    np.testing.assert_allclose(metrics["l_bs"], ccjax.batch_shaping_loss(aux[0].probs, 0.25),
                               rtol=1e-5)


class SnapshotDistillationTest(absltest.TestCase):
  """Pretrain-then-gate: warm start + distillation from the network frozen after it."""

  def _config(self, **changes):
    values = dict(warm_steps=2, distill_weight=1.0, distill_teacher="snapshot")
    values.update(changes)
    return ccjax.TrainConfig(**values)

  def test_snapshot_is_the_network_after_the_warm_start_then_frozen(self):
    after_warm, _ = _run(self._config(), 2)
    state, history = _run(self._config(), 5)
    experiment_utils.assert_trees_equal(state.distill_snapshot, after_warm.params)
    self.assertFalse(np.array_equal(state.params["output"]["kernel"],
                                    after_warm.params["output"]["kernel"]))
    # During the warm start the student is the all-on network itself: nothing to distil.
    self.assertEqual([float(m["distill"]) for m in history[:2]], [0.0, 0.0])
    self.assertTrue(all(float(m["distill"]) > 0.0 for m in history[2:]))

  def test_teacher_is_the_snapshot_not_the_live_network(self):
    model, config = _model(), self._config()
    state, _ = _run(config, 4)
    step_fn = jax.jit(ccjax.make_train_step(model, config))
    _, metrics = step_fn(state, _data())
    logits, _ = model.apply({"params": state.params}, _data()["x"], mode="sample",
                            rngs={"gate": jax.random.fold_in(state.rng, state.step)})
    teacher = model.apply({"params": state.distill_snapshot}, _data()["x"], mode="all")[0]
    expected = jnp.mean(ccjax.distillation_loss(logits, teacher))
    np.testing.assert_allclose(metrics["distill"], expected, rtol=1e-5)
    live = model.apply({"params": state.params}, _data()["x"], mode="all")[0]
    self.assertGreater(abs(float(jnp.mean(ccjax.distillation_loss(logits, live))) - float(expected)),
                       1e-6)

  def test_no_snapshot_without_the_recipe(self):
    state, _ = _run(ccjax.TrainConfig(warm_steps=2, distill_weight=1.0), 1)
    self.assertIsNone(state.distill_snapshot)

  def test_validation(self):
    for bad in (dict(warm_steps=0), dict(distill_weight=0.0)):
      with self.assertRaisesRegex(validation.ConfigError, "distill_teacher"):
        self._config(**bad)
    with self.assertRaisesRegex(validation.ConfigError, "distill_teacher"):
      ccjax.TrainConfig(distill_teacher="dense")
    with self.assertRaisesRegex(ValueError, "teacher run"):
      ccjax.make_train_step(_model(), self._config(), teacher=lambda x: x)
    for bad in (dict(batch_shaping_weight=-1.0), dict(batch_shaping_steps=-1),
                dict(batch_shaping_concentration=0.0)):
      with self.assertRaisesRegex(validation.ConfigError, "batch_shaping"):
        ccjax.TrainConfig(**bad)


if __name__ == "__main__":
  absltest.main()
