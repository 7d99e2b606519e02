"""Regrouping hidden units into blocks of co-active units (ccjax.regroup, regroup_step)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from ccjax import config as config_lib
from ccjax import layers
from ccjax import loop
from ccjax import regroup
from ccjax import step as step_lib
from ccjax import validation
from tests import condnet_test
from tests import experiment_utils

pytestmark = pytest.mark.usefixtures("full_float32_matmuls")


def test_co_activation_permutation_puts_units_that_fire_together_in_one_block():
  rng = np.random.default_rng(0)
  groups, block_size, examples = 4, 5, 200
  patterns = rng.random((examples, groups)) < 0.5          # when each group fires
  # Every unit of group g fires exactly when pattern g does (scaled), units shuffled.
  group_of_unit = rng.permutation(np.repeat(np.arange(groups), block_size))
  activations = patterns[:, group_of_unit] * rng.uniform(0.5, 2.0, group_of_unit.size)
  order = regroup.co_activation_permutation(activations, block_size, seed=0)
  assert sorted(order.tolist()) == list(range(groups * block_size))   # a permutation
  blocks = group_of_unit[order].reshape(groups, block_size)
  assert all(len(set(block)) == 1 for block in blocks.tolist()), blocks
  with pytest.raises(ValueError, match="block_size=3"):
    regroup.co_activation_permutation(activations, 3, seed=0)


@pytest.mark.parametrize("policy", [{}, {"policy_rank": 2}, {"policy_hidden": 3}])
def test_permuted_units_keep_the_function_and_the_next_policy(policy):
  module = ccjax.GatedMLP(hidden=(16, 24), num_classes=3, block_size=4, **policy)
  key = jax.random.PRNGKey(1)
  x = jax.random.normal(key, (10, 7))
  params = module.init({"params": key, "gate": key}, x, mode="all")["params"]
  rng = np.random.default_rng(2)
  permutations = [rng.permutation(16), rng.permutation(24)]
  permuted = regroup.permute_mlp_units(module, params, permutations)
  logits, aux = module.apply({"params": params}, x, mode="all")
  new_logits, new_aux = module.apply({"params": permuted}, x, mode="all")
  np.testing.assert_allclose(new_logits, logits, atol=1e-5)
  for layer_aux, new_layer_aux in zip(aux, new_aux):   # policies read permuted inputs alike
    np.testing.assert_allclose(new_layer_aux.probs, layer_aux.probs, atol=1e-6)
  activations = regroup.mlp_hidden_activations(module, params, x)
  new_activations = regroup.mlp_hidden_activations(module, permuted, x)
  for acts, new_acts, order in zip(activations, new_activations, permutations):
    np.testing.assert_allclose(new_acts, acts[:, order], atol=1e-6)
  assert not np.allclose(permuted["hidden_0"]["dense"]["kernel"],
                         params["hidden_0"]["dense"]["kernel"])


def test_a_regrouped_state_trains_exactly_like_the_original():
  """One Adam step after regrouping = the regrouped step of the original state: the
  optimizer's moments are permuted with the parameters."""
  module = ccjax.GatedMLP(hidden=(16, 16), num_classes=3, block_size=4, estimator="reinforce")
  config = step_lib.TrainConfig(warm_steps=100, distill_weight=1.0, distill_teacher="snapshot")
  x = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0)
  state = step_lib.init_train_state(module, config, jax.random.PRNGKey(0), jnp.asarray(x[:1]))
  train_step = jax.jit(step_lib.make_train_step(module, config))
  def batch(index):
    rows = slice(index * 16, (index + 1) * 16)
    return {"x": jnp.asarray(x[rows]), "y": jnp.asarray(y[rows])}
  for i in range(3):
    state, _ = train_step(state, batch(i))
  regrouped, permutations = regroup.regroup_mlp_state(module, state, x, seed=0)
  assert any(not np.array_equal(order, np.arange(16)) for order in permutations)
  after, _ = train_step(state, batch(3))
  regrouped_after, _ = train_step(regrouped, batch(3))
  expected = regroup.permute_mlp_units(module, after.params, permutations)
  chex.assert_trees_all_close(regrouped_after.params, expected, atol=1e-6)
  np.testing.assert_allclose(
      regrouped_after.distill_snapshot["output"]["kernel"],
      np.asarray(after.distill_snapshot["output"]["kernel"])[np.asarray(permutations[1])],
      atol=1e-6)


def _config(**changes):
  values = dict(warm_steps=6, regroup_step=4, imitation_weight=1.0, policy_rank=2)
  values.update(changes)
  return condnet_test.tiny_config(**values)


@pytest.mark.slow  # three tiny runs; the permuted-train-step equality stays fast
def test_resume_across_the_regroup_step_is_exact(tmp_path):
  straight = str(tmp_path / "straight")
  results = loop.train_and_evaluate(_config(), straight)
  final = condnet_test.final_state(straight)
  unregrouped = str(tmp_path / "unregrouped")
  loop.train_and_evaluate(_config(regroup_step=0), unregrouped)
  assert not np.array_equal(condnet_test.final_state(unregrouped)["params"]["output"]["kernel"],
                            final["params"]["output"]["kernel"])
  resumed = str(tmp_path / "resumed")
  loop.train_and_evaluate(_config(steps=3), resumed)      # "killed" before the regrouping
  resumed_results = loop.train_and_evaluate(_config(), resumed)
  experiment_utils.assert_trees_equal(final, condnet_test.final_state(resumed))
  for key in ("test_error", "valid_error", "active_fraction", "macs_per_example"):
    assert results[key] == resumed_results[key], key
  records = condnet_test.read_metrics(straight)
  assert all(r["l_im"] > 0 for r in records if r["kind"] == "train")


def test_regroup_and_imitation_options_are_checked_in_one_line():
  with pytest.raises(validation.ConfigError, match="regroup_step.*warm_steps >= 5"):
    config_lib.ExperimentConfig.create(regroup_step=5, warm_steps=4)
  with pytest.raises(validation.ConfigError, match="regroup_step.*--arch=mlp --model=condnet"):
    config_lib.ExperimentConfig.create(regroup_step=2, warm_steps=4, model="dense")
  with pytest.raises(validation.ConfigError, match="regroup_step.*--arch=mlp"):
    config_lib.ExperimentConfig.create(regroup_step=2, warm_steps=4, arch="cnn")
  with pytest.raises(validation.ConfigError, match="regroup_step"):
    config_lib.ExperimentConfig.create(regroup_step=-1)
  with pytest.raises(validation.ConfigError, match="imitation_weight.*--arch=mlp"):
    config_lib.ExperimentConfig.create(imitation_weight=1.0, arch="cnn")
  with pytest.raises(validation.ConfigError, match="imitation_weight"):
    config_lib.ExperimentConfig.create(imitation_weight=-1.0)


def test_the_regroup_recipe_sets_the_probe_pipeline():
  config = config_lib.ExperimentConfig.create(**ccjax.recipe_fields("regroup"), steps=6000)
  assert (config.train.warm_steps, config.regroup_step, config.block_size,
          config.policy_rank, config.train.imitation_weight) == (4000, 3000, 8, 16, 1.0)
  assert config.train.lambda_s == config.train.lambda_v == 0.0   # the imitation sets the budget
  router = config_lib.ExperimentConfig.create(**ccjax.recipe_fields("regroup+router"))
  assert (router.train.estimator, router.eval_policy) == ("router", "top_k")


def test_a_sweep_matches_the_regroup_recipe_with_a_dense_net_of_finer_width():
  """The recipe's blocks of 8 make its same-MACs width a multiple of 8 (e.g. 144), which
  the base's blocks of 32 do not divide: the dense baseline, which has no blocks, runs."""
  from ccjax import sweep   # pylint: disable=g-import-not-at-top
  from ccjax.tasks import classification   # pylint: disable=g-import-not-at-top
  base = config_lib.ExperimentConfig.create(block_size=32)
  dense = sweep._dense_config(base, classification.SWEEP, 144)
  assert dense.model == "dense" and dense.hidden == (144, 144) and 144 % dense.block_size == 0
  assert sweep._dense_config(base, classification.SWEEP, 256).block_size == 32
  with pytest.raises(validation.ConfigError, match="block_size"):   # gated nets keep the check
    classification.SWEEP.at_width(base, 144)


def test_a_transformer_regroups_every_mlp_and_keeps_its_function():
  """regroup_transformer_state: every block's MLP units regrouped (activations permuted),
  logits unchanged, a moment-like optimizer subtree permuted with the parameters."""
  from ccjax import transformer   # pylint: disable=g-import-not-at-top
  from tests import param_utils   # pylint: disable=g-import-not-at-top
  model = ccjax.GatedTransformer(num_layers=2, d_model=16, num_heads=2, mlp_width=32,
                                 block_size=8, max_len=8)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (32, 8)), jnp.int32)
  params = param_utils.numpy_params(model, tokens[:1], bias_scale=0.5)
  moments = jax.tree_util.tree_map(lambda leaf: 2 * leaf, params)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=(moments,), baseline=None, rng=jax.random.PRNGKey(0),
                              duals=None, distill_snapshot=None)
  regrouped, permutations = regroup.regroup_transformer_state(model, state, tokens, seed=0)
  assert len(permutations) == 2
  assert all(not np.array_equal(order, np.arange(32)) for order in permutations)
  apply = jax.jit(lambda params: model.apply({"params": params}, tokens, mode="all")[0])
  np.testing.assert_allclose(apply(regrouped.params), apply(params), atol=1e-5)
  before = regroup.transformer_mlp_activations(model, params, tokens)
  after = regroup.transformer_mlp_activations(model, regrouped.params, tokens)
  for acts, new_acts, order in zip(before, after, permutations):
    assert acts.shape == (tokens.size, 32)
    np.testing.assert_allclose(new_acts, acts[:, order], atol=1e-5)
  for index, name in enumerate(model.gate_names()):
    expected = regroup.permute_mlp_units(model.mlp_module(index),
                                         params[name][transformer.MLP_NAME],
                                         [permutations[index]])
    chex.assert_trees_all_close(regrouped.params[name][transformer.MLP_NAME], expected)
  chex.assert_trees_all_close(regrouped.opt_state[0],
                              jax.tree_util.tree_map(lambda leaf: 2 * leaf, regrouped.params))
  chex.assert_trees_all_close(regrouped.params["embed"], params["embed"])


@pytest.mark.slow  # an LM run's init and train step (~25 s); the transformer case stays fast
def test_the_lm_regroups_every_mlp_at_its_step_and_trains_exactly_like_the_original():
  """LanguageModelRun.after_update: at regroup_step every transformer block's MLP units
  are regrouped (logits unchanged); the next Adam step equals the regrouped step of the
  original state (moments permuted); other steps leave the state alone."""
  from ccjax import transformer   # pylint: disable=g-import-not-at-top
  from ccjax.tasks import language_model   # pylint: disable=g-import-not-at-top
  from tests import lm_train_test   # pylint: disable=g-import-not-at-top
  # No imitation here: its targets are the new blocks, so the policies' step would differ.
  train = step_lib.TrainConfig(tau=0.25, reinforce_cost="position", warm_steps=4)
  run = language_model.LanguageModelRun(lm_train_test._config(
      num_layers=2, regroup_step=2, train=train))
  state = run.init_state(jax.random.PRNGKey(0))
  train_step = jax.jit(run.make_train_step())
  for step in (1, 2):
    state, _ = train_step(state, jax.tree_util.tree_map(jnp.asarray, run.batch(step)))
  assert run.after_update(state, 1) is state
  regrouped = run.after_update(state, 2)
  tokens = jnp.asarray(run.batch(3)["x"])
  apply = jax.jit(lambda params: run.module.apply({"params": params}, tokens, mode="all")[0])
  logits, new_logits = apply(state.params), apply(regrouped.params)
  np.testing.assert_allclose(new_logits, logits, atol=1e-5)
  permutations = []   # each new unit's old unit, matched by its kernel column
  hidden = (run.module.mlp_module(0).gate_names()[0], layers.DENSE_MODULE_NAME, "kernel")
  for name in run.module.gate_names():
    old = np.asarray(_at(state.params[name][transformer.MLP_NAME], hidden))
    new = np.asarray(_at(regrouped.params[name][transformer.MLP_NAME], hidden))
    permutations.append(np.argmin(
        np.abs(new[:, :, None] - old[:, None, :]).sum(0), axis=1))
    assert sorted(permutations[-1].tolist()) == list(range(32))
  assert any(not np.array_equal(order, np.arange(32)) for order in permutations)
  before = regroup.transformer_mlp_activations(run.module, state.params, tokens)
  after = regroup.transformer_mlp_activations(run.module, regrouped.params, tokens)
  for acts, new_acts, order in zip(before, after, permutations):
    assert acts.shape == (tokens.size, 32)
    np.testing.assert_allclose(new_acts, acts[:, order], atol=1e-5)
  next_batch = jax.tree_util.tree_map(jnp.asarray, run.batch(3))
  stepped, _ = train_step(state, next_batch)
  regrouped_stepped, _ = train_step(regrouped, next_batch)
  for index, name in enumerate(run.module.gate_names()):
    mlp = run.module.mlp_module(index)
    expected = regroup.permute_mlp_units(mlp, stepped.params[name][transformer.MLP_NAME],
                                         [permutations[index]])
    chex.assert_trees_all_close(regrouped_stepped.params[name][transformer.MLP_NAME], expected,
                                atol=1e-6)


def _at(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def test_the_lm_regroup_step_is_checked_in_one_line():
  from ccjax import lm_config   # pylint: disable=g-import-not-at-top
  with pytest.raises(validation.ConfigError, match="regroup_step.*--model=gated or router"):
    lm_config.LMConfig(model="dense", regroup_step=2,
                       train=step_lib.TrainConfig(warm_steps=4))
  with pytest.raises(validation.ConfigError, match="regroup_step.*warm_steps >= 5"):
    lm_config.LMConfig(regroup_step=5, train=step_lib.TrainConfig(warm_steps=4))


def test_the_lm_regroup_recipe_composes_with_the_lm_sweep_variants():
  from ccjax import lm_config   # pylint: disable=g-import-not-at-top
  from ccjax import sweep   # pylint: disable=g-import-not-at-top
  from ccjax.tasks import language_model   # pylint: disable=g-import-not-at-top
  base = lm_config.LMConfig()
  sweep.validate_grid(base, seeds=(0, 1), taus=(0.25,), recipes=("lm_regroup",),
                      variants=("gated_top_k", "router"))
  gated = sweep._gated_config(base, language_model.SWEEP, "gated_top_k", "lm_regroup", 0.25)
  assert (gated.regroup_step, gated.train.warm_steps, gated.train.imitation_weight,
          gated.train.estimator, gated.eval_mode()) == (400, 500, 1.0, "reinforce_top_k", "top_k")
  assert gated.train.lambda_s == gated.train.lambda_v == 0.0
