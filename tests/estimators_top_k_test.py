"""Tests of the estimators that train at the test-time budget: ``reinforce_top_k`` (exact
conditional-Bernoulli k-subsets, REINFORCE) and ``noisy_top_k`` (Gumbel-top-k,
straight-through).

The unbiasedness test enumerates every k-subset of a tiny gated net (one hidden layer of 4
blocks of 2 units, k = 2, 4 examples): the expected surrogate gradient
``sum_S pi(S) (c(S) - b) grad log pi(S)`` must equal ``grad sum_S pi(S) c(S)``, with
``pi(S)`` written out by hand (``prod_{j in S} w_j / sum_{|T| = k} prod_{j in T} w_j``),
independently of the library's recursion.
"""

import functools
import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

import ccjax
from ccjax import estimators

BATCH = 4
INPUT_DIM = 3
NUM_BLOCKS = 4
BLOCK_SIZE = 2
CAPACITY = 2
NUM_CLASSES = 3
NUM_SAMPLES = 20000
SUBSETS = tuple(itertools.combinations(range(NUM_BLOCKS), CAPACITY))


def subset_mask(subset, num_blocks=NUM_BLOCKS):
  return jnp.zeros((num_blocks,), jnp.float32).at[jnp.array(subset, jnp.int32)].set(1.0)


def brute_force_log_prob(probs, subset, capacity):
  """``log pi(S)`` of the conditional Bernoulli by summing over every k-subset."""
  odds = probs / (1.0 - probs)
  normalizer = sum(jnp.prod(odds[..., list(other)], axis=-1)
                   for other in itertools.combinations(range(probs.shape[-1]), capacity))
  return jnp.log(jnp.prod(odds[..., list(subset)], axis=-1) / normalizer)


class TopKProblem:
  """A tiny gated net trained by ``reinforce_top_k``, its exact expected loss."""

  def __init__(self):
    self.model = ccjax.GatedMLP(hidden=(NUM_BLOCKS * BLOCK_SIZE,), num_classes=NUM_CLASSES,
                                block_size=BLOCK_SIZE, estimator="reinforce_top_k")
    key_x, key_init, key_policy = jax.random.split(jax.random.key(7), 3)
    self.x = jax.random.normal(key_x, (BATCH, INPUT_DIM))
    self.y = jnp.array([0, 1, 2, 1])
    params = jax.tree_util.tree_map(jnp.asarray, self.model.init(
        {"params": key_init, "gate": key_init}, self.x, mode="all")["params"])
    params["hidden_0"]["policy"]["logits"]["kernel"] = 0.8 * jax.random.normal(
        key_policy, (INPUT_DIM, NUM_BLOCKS))
    params["hidden_0"]["policy"]["logits"]["bias"] = jnp.array([0.5, -0.5, 0.2, 1.0])
    params["hidden_0"]["dense"]["kernel"] = 3.0 * params["hidden_0"]["dense"]["kernel"]
    self.params = params
    self.policy_params = params["hidden_0"]["policy"]
    # [subsets, batch] per-example loss with subset S applied to every example.
    self.loss_per_subset = jnp.stack([self.loss_with_mask(
        jnp.broadcast_to(subset_mask(s), (BATCH, NUM_BLOCKS))) for s in SUBSETS])

  def with_policy(self, policy_params):
    params = dict(self.params)
    params["hidden_0"] = dict(params["hidden_0"], policy=policy_params)
    return params

  def probs(self, policy_params):
    logits = self.x @ policy_params["logits"]["kernel"] + policy_params["logits"]["bias"]
    return ccjax.policy_probs(logits, self.model.policy_eps)

  def loss_with_mask(self, block_mask):
    logits, _ = self.model.apply({"params": self.params}, self.x, mode="all",
                                 block_masks=(block_mask,))
    return optax.softmax_cross_entropy_with_integer_labels(logits, self.y)

  def subset_probs(self, policy_params):
    """``[subsets, batch]`` pi_x(S), by brute force."""
    probs = self.probs(policy_params)
    return jnp.stack([jnp.exp(brute_force_log_prob(probs, s, CAPACITY)) for s in SUBSETS])

  def expected_loss(self, policy_params):
    return jnp.mean(jnp.sum(self.subset_probs(policy_params) * self.loss_per_subset, axis=0))

  def exact_gradient(self):
    return np.asarray(ravel_pytree(jax.grad(self.expected_loss)(self.policy_params))[0])

  def expected_surrogate_gradient(self, baseline=0.0, bernoulli_log_prob=False):
    """``sum_S pi(S) grad[(c(S) - b) log pi(S)]``, log pi from the model's own ``aux``
    (``mode='sample'`` with the subset as ``block_masks``)."""
    weights = jax.lax.stop_gradient(self.subset_probs(self.policy_params))

    def surrogate(policy_params):
      total = 0.0
      for index, subset in enumerate(SUBSETS):
        block_mask = jnp.broadcast_to(subset_mask(subset), (BATCH, NUM_BLOCKS))
        _, (aux,) = self.model.apply({"params": self.with_policy(policy_params)}, self.x,
                                     mode="sample", capacity=CAPACITY,
                                     block_masks=(block_mask,))
        log_prob = (ccjax.mask_log_prob(aux.probs, aux.mask) if bernoulli_log_prob
                    else aux.log_prob)
        advantage = weights[index] * (self.loss_per_subset[index] - baseline)
        total = total + ccjax.score_function_loss(log_prob, advantage)
      return total

    return np.asarray(ravel_pytree(jax.grad(surrogate)(self.policy_params))[0])

  def sampled_gradients(self, kind, seed=3):
    """``[NUM_SAMPLES, coordinates]`` single-draw estimates through ``policy_objective``."""
    config = ccjax.TrainConfig(lambda_s=0.0, lambda_v=0.0, baseline=kind,
                               estimator="reinforce_top_k")
    state = ccjax.init_baseline_state()
    for cost in (1.0, 1.3):
      state = ccjax.update_baseline_state(state, jnp.full((BATCH,), cost), config.baseline_decay)

    def one(key):
      def objective(policy_params):
        logits, aux = self.model.apply({"params": self.with_policy(policy_params)}, self.x,
                                       mode="sample", capacity=CAPACITY, rngs={"gate": key})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, self.y)
        return ccjax.policy_objective(aux, loss, config, state)[0]
      return ravel_pytree(jax.grad(objective)(self.policy_params))[0]

    keys = jax.random.split(jax.random.key(seed), NUM_SAMPLES)
    return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


@functools.lru_cache(maxsize=None)
def top_k_problem() -> TopKProblem:
  return TopKProblem()


class ConditionalBernoulliTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 3, 5)
  def test_log_prob_matches_brute_force_and_sums_to_one(self, capacity):
    probs = jnp.asarray(np.random.RandomState(0).uniform(0.02, 0.98, (3, 2, 5)), jnp.float32)
    total = jnp.zeros((3, 2))
    for subset in itertools.combinations(range(5), capacity):
      block_mask = jnp.broadcast_to(subset_mask(subset, 5), probs.shape)
      log_prob = estimators.conditional_bernoulli_log_prob(probs, block_mask, capacity)
      self.assertEqual(log_prob.shape, (3, 2))
      np.testing.assert_allclose(log_prob, brute_force_log_prob(probs, subset, capacity),
                                 rtol=1e-5, atol=1e-5)
      total = total + jnp.exp(log_prob)
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)

  def test_sample_frequencies_match_probabilities(self):
    probs = jnp.array([[0.1, 0.7, 0.4, 0.9], [0.5, 0.5, 0.2, 0.3]])
    keys = jax.random.split(jax.random.key(0), NUM_SAMPLES)
    masks = jax.jit(jax.vmap(lambda key: estimators.conditional_bernoulli_mask(
        key, probs, CAPACITY)))(keys)
    np.testing.assert_array_equal(jnp.sum(masks, -1), CAPACITY)  # every draw: exactly k
    for subset in SUBSETS:
      target = np.exp(np.asarray(brute_force_log_prob(probs, subset, CAPACITY)))
      frequency = np.asarray(jnp.mean(jnp.all(masks == subset_mask(subset), -1), 0))
      standard_error = np.sqrt(target * (1 - target) / NUM_SAMPLES)
      np.testing.assert_array_less(np.abs(frequency - target), 4.5 * standard_error + 1e-6)

  def test_sample_keeps_exactly_k_when_probabilities_are_extreme(self):
    # Rounding in the last blocks must never leave a row with fewer or more than k.
    probs = jnp.asarray(np.random.RandomState(1).choice([0.01, 0.99, 0.5], (512, 16)),
                        jnp.float32)
    for capacity in (1, 4, 15, 16):
      block_mask = estimators.conditional_bernoulli_mask(jax.random.key(capacity), probs,
                                                         capacity)
      np.testing.assert_array_equal(jnp.sum(block_mask, -1), capacity)

  def test_mode_is_the_top_k_mask(self):
    probs = jnp.array([[0.3, 0.8, 0.6, 0.1]])
    best = max(SUBSETS, key=lambda s: float(brute_force_log_prob(probs, s, CAPACITY)[0]))
    np.testing.assert_array_equal(subset_mask(best), ccjax.top_k_mask(probs, CAPACITY)[0])

  def test_bad_capacity(self):
    with self.assertRaisesRegex(ValueError, r"reinforce_top_k.*capacity in \[1, 4\]"):
      estimators.conditional_bernoulli_mask(jax.random.key(0), jnp.full((2, 4), 0.5), 5)
    with self.assertRaisesRegex(ValueError, "capacity"):
      estimators.conditional_bernoulli_log_prob(jnp.full((2, 4), 0.5), jnp.zeros((2, 4)), None)


class ReinforceTopKUnbiasednessTest(parameterized.TestCase):

  def test_problem_is_not_degenerate(self):
    problem = top_k_problem()
    np.testing.assert_allclose(jnp.sum(problem.subset_probs(problem.policy_params), 0), 1.0,
                               rtol=1e-5)
    self.assertGreater(float(jnp.ptp(problem.loss_per_subset)), 0.5)
    self.assertGreater(float(np.max(np.abs(problem.exact_gradient()))), 0.05)

  @parameterized.parameters(0.0, 1.7)
  def test_expected_surrogate_gradient_is_exact_by_enumeration(self, baseline):
    problem = top_k_problem()
    np.testing.assert_allclose(problem.expected_surrogate_gradient(baseline),
                               problem.exact_gradient(), rtol=2e-4, atol=2e-6)

  def test_enumeration_rejects_the_bernoulli_log_prob(self):
    # Sensitivity: the unconditioned Bernoulli log-probability of the same k-subsets is a
    # biased score; the same comparison must see it.
    problem = top_k_problem()
    wrong = problem.expected_surrogate_gradient(bernoulli_log_prob=True)
    self.assertGreater(float(np.max(np.abs(wrong - problem.exact_gradient()))), 0.01)

  @parameterized.parameters("none", "batch_mean", "ema")
  def test_sampled_train_objective_is_unbiased(self, kind):
    # The library's whole path: sampled masks, aux.log_prob, policy_objective, baselines.
    problem = top_k_problem()
    samples = problem.sampled_gradients(kind)
    exact = problem.exact_gradient()
    standard_error = samples.std(axis=0, ddof=1) / np.sqrt(NUM_SAMPLES)
    z = np.abs(samples.mean(axis=0) - exact) / (standard_error + 1e-12)
    self.assertLess(float(np.max(z)), 4.0)  # 15 coordinates, Bonferroni at ~1e-3


class NoisyTopKTest(absltest.TestCase):

  def test_exactly_k_and_identity_gradient(self):
    probs = jnp.asarray(np.random.RandomState(2).uniform(0.05, 0.95, (5, 3, 6)), jnp.float32)
    weights = jnp.arange(6.0) - 2.0
    block_mask = estimators.noisy_top_k_mask(jax.random.key(0), probs, 2)
    self.assertTrue(bool(jnp.all((block_mask == 0) | (block_mask == 1))))
    np.testing.assert_array_equal(jnp.sum(block_mask, -1), 2.0)
    grad = jax.grad(lambda p: jnp.sum(
        estimators.noisy_top_k_mask(jax.random.key(0), p, 2) * weights))(probs)
    np.testing.assert_allclose(grad, jnp.broadcast_to(weights, probs.shape), rtol=1e-6)

  def test_one_block_is_chosen_with_softmax_of_log_odds(self):
    # Gumbel-top-1 of the log-odds picks block j with probability w_j / sum w.
    block_probs = jnp.array([0.2, 0.5, 0.9])
    odds = block_probs / (1 - block_probs)
    target = np.asarray(odds / jnp.sum(odds))
    masks = estimators.noisy_top_k_mask(jax.random.key(3),
                                        jnp.broadcast_to(block_probs, (NUM_SAMPLES, 3)), 1)
    frequency = np.asarray(jnp.mean(masks, 0))
    standard_error = np.sqrt(target * (1 - target) / NUM_SAMPLES)
    np.testing.assert_array_less(np.abs(frequency - target), 4.5 * standard_error)


class TopKTrainStepTest(parameterized.TestCase):

  @parameterized.parameters("reinforce_top_k", "noisy_top_k")
  def test_train_step_runs_exactly_k_blocks(self, estimator):
    model = ccjax.GatedMLP(hidden=(16, 16), num_classes=3, block_size=2, estimator=estimator)
    config = ccjax.TrainConfig(tau=0.25, estimator=estimator, baseline="batch_mean")
    x = jax.random.normal(jax.random.key(0), (8, 5))
    batch = {"x": x, "y": jnp.arange(8) % 3}
    state = ccjax.init_train_state(model, config, jax.random.key(1), x)
    step = jax.jit(ccjax.make_train_step(model, config))
    for _ in range(3):
      state, metrics = step(state, batch)
    np.testing.assert_array_equal(metrics["active_fraction"], [0.25, 0.25])  # k = 2 of 8
    self.assertEqual(float(metrics["finite"]), 1.0)
    self.assertGreater(float(metrics["grad_norm_policy"]), 0.0)
    # Only the score-function estimator adds a REINFORCE term.
    self.assertEqual(float(metrics["reinforce"]) != 0.0, estimator == "reinforce_top_k")

  @parameterized.parameters("reinforce_top_k", "noisy_top_k")
  def test_composes_with_recipes_advantage_and_load_balance(self, estimator):
    model = ccjax.GatedMLP(hidden=(16,), num_classes=3, block_size=2, estimator=estimator)
    config = ccjax.TrainConfig(tau=0.25, estimator=estimator, advantage="standardized",
                               warm_steps=1, tau_schedule="linear", tau_schedule_steps=4,
                               load_balance_weight=0.1, batch_shaping_weight=0.1)
    x = jax.random.normal(jax.random.key(2), (8, 5))
    batch = {"x": x, "y": jnp.arange(8) % 3}
    state = ccjax.init_train_state(model, config, jax.random.key(3), x)
    step = jax.jit(ccjax.make_train_step(model, config))
    state, metrics = step(state, batch)
    np.testing.assert_array_equal(metrics["active_fraction"], [1.0])  # dense warm start
    self.assertEqual(float(metrics["reinforce"]), 0.0)
    for _ in range(2):
      state, metrics = step(state, batch)
    # After the warm start: exactly k = round(0.25 * 8) = 2 blocks (the final tau).
    np.testing.assert_array_equal(metrics["active_fraction"], [0.25])
    self.assertEqual(float(metrics["finite"]), 1.0)
    self.assertTrue(0.0 < float(metrics["l_lb"]) <= 8.0)  # at most n = 8 blocks
    self.assertIn("l_bs", metrics)


if __name__ == "__main__":
  absltest.main()
