"""Tests for ccjax.estimators, above all that REINFORCE is unbiased.

The unbiasedness tests use a tiny gated net (one hidden layer of 3 blocks of 2 units, 4
examples) with fixed parameters. Its exact expected task loss is a sum over the 2^3 masks
of each example, so its exact gradient w.r.t. the policy parameters is ``jax.grad`` of that
sum. The mean of the REINFORCE estimate over many independent draws must agree with it
within 3 standard errors in every coordinate.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

import ccjax

BATCH = 4
INPUT_DIM = 3
NUM_BLOCKS = 3
BLOCK_SIZE = 2
NUM_CLASSES = 3
NUM_SAMPLES = 20000
EMA_DECAY = 0.9
# All 2^3 block masks, [8, blocks].
ALL_MASKS = jnp.array([[(code >> j) & 1 for j in range(NUM_BLOCKS)] for code in range(8)],
                      jnp.float32)


class TinyProblem:
  """A tiny gated net with fixed parameters and data, and its exact expected loss."""

  def __init__(self):
    self.model = ccjax.GatedMLP(hidden=(NUM_BLOCKS * BLOCK_SIZE,), num_classes=NUM_CLASSES,
                                block_size=BLOCK_SIZE)
    key_x, key_init, key_policy = jax.random.split(jax.random.key(0), 3)
    self.x = jax.random.normal(key_x, (BATCH, INPUT_DIM))
    self.y = jnp.array([0, 1, 2, 1])
    params = self.model.init({"params": key_init, "gate": key_init}, self.x)["params"]
    params = jax.tree_util.tree_map(jnp.asarray, params)
    # Spread the policy so that blocks have clearly different probabilities, and make
    # the masks matter for the loss.
    params["hidden_0"]["policy"]["logits"]["kernel"] = 0.8 * jax.random.normal(
        key_policy, (INPUT_DIM, NUM_BLOCKS))
    params["hidden_0"]["policy"]["logits"]["bias"] = jnp.array([0.5, -0.5, 0.2])
    params["hidden_0"]["dense"]["kernel"] = 3.0 * params["hidden_0"]["dense"]["kernel"]
    self.params = params
    self.policy_params = params["hidden_0"]["policy"]
    # Per-example loss under each of the 8 masks (the same mask for every example),
    # [8, batch]; it does not depend on the policy parameters.
    self.loss_per_mask = jax.vmap(
        lambda m: self.loss_with_mask(jnp.broadcast_to(m, (BATCH, NUM_BLOCKS))))(ALL_MASKS)
    # An ema baseline after two updates: a state fixed before any mask is drawn.
    state = ccjax.init_baseline_state()
    for cost in (1.0, 1.3):
      state = ccjax.update_baseline_state(state, jnp.full((BATCH,), cost), EMA_DECAY)
    self.ema_state = state

  def probs(self, policy_params):
    """``[batch, blocks]`` block probabilities, written out by hand."""
    logits = self.x @ policy_params["logits"]["kernel"] + policy_params["logits"]["bias"]
    return ccjax.policy_probs(logits, self.model.policy_eps)

  def loss_with_mask(self, block_mask):
    """``[batch]`` task loss of the net when ``block_mask [batch, blocks]`` is applied."""
    dense = self.params["hidden_0"]["dense"]
    hidden = jax.nn.relu(self.x @ dense["kernel"] + dense["bias"])
    hidden = ccjax.apply_block_mask(hidden, block_mask)
    output = self.params["output"]
    logits = hidden @ output["kernel"] + output["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, self.y)

  def expected_loss(self, policy_params):
    """Exact ``mean_x E_{u ~ pi(.|x)} loss_x(u)`` by enumerating the 8 masks."""
    probs = self.probs(policy_params)
    weights = jax.vmap(lambda m: jnp.exp(ccjax.mask_log_prob(
        probs, jnp.broadcast_to(m, (BATCH, NUM_BLOCKS)))))(ALL_MASKS)  # [8, batch]
    return jnp.mean(jnp.sum(weights * self.loss_per_mask, axis=0))

  def exact_gradient(self) -> np.ndarray:
    return np.asarray(ravel_pytree(jax.grad(self.expected_loss)(self.policy_params))[0])

  def baseline(self, kind, cost):
    if kind == "plain_batch_mean":  # includes the example's own cost: biased
      return jnp.broadcast_to(jnp.mean(cost), cost.shape)
    return ccjax.compute_baseline(kind, cost, self.ema_state, EMA_DECAY)

  def surrogate(self, policy_params, key, kind):
    """The REINFORCE surrogate for one draw of masks for the whole batch."""
    probs = self.probs(policy_params)
    block_mask = ccjax.sample_mask(key, jax.lax.stop_gradient(probs))
    cost = jax.lax.stop_gradient(self.loss_with_mask(block_mask))
    return ccjax.score_function_loss(ccjax.mask_log_prob(probs, block_mask), cost,
                                     self.baseline(kind, cost))

  def model_policy_objective(self, policy_params, key, kind):
    """The library's own path: model.apply, then ``policy_objective`` with lambdas 0."""
    params = dict(self.params)
    params["hidden_0"] = dict(params["hidden_0"], policy=policy_params)
    logits, aux = self.model.apply({"params": params}, self.x, mode="sample",
                                   rngs={"gate": key})
    per_example_loss = optax.softmax_cross_entropy_with_integer_labels(logits, self.y)
    config = ccjax.TrainConfig(lambda_s=0.0, lambda_v=0.0, baseline=kind,
                               baseline_decay=EMA_DECAY)
    objective, _ = ccjax.policy_objective(aux, per_example_loss, config, self.ema_state)
    return objective

  def sampled_gradients(self, surrogate_fn, kind, seed=1) -> np.ndarray:
    """``[NUM_SAMPLES, coordinates]`` independent single-draw gradient estimates."""

    def one(key):
      grads = jax.grad(surrogate_fn)(self.policy_params, key, kind)
      return ravel_pytree(grads)[0]

    keys = jax.random.split(jax.random.key(seed), NUM_SAMPLES)
    return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


@functools.lru_cache(maxsize=None)
def tiny_problem() -> TinyProblem:
  return TinyProblem()


def assert_mean_within_3_standard_errors(samples, target):
  mean = samples.mean(axis=0)
  standard_error = samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])
  np.testing.assert_array_less(np.abs(mean - target), 3.0 * standard_error + 1e-6)


class UnbiasednessTest(parameterized.TestCase):

  def test_hand_written_forward_matches_model(self):
    problem = tiny_problem()
    logits, (aux,) = problem.model.apply({"params": problem.params}, problem.x, mode="sample",
                                         rngs={"gate": jax.random.key(5)})
    np.testing.assert_allclose(aux.probs, problem.probs(problem.policy_params), rtol=1e-6)
    np.testing.assert_allclose(
        optax.softmax_cross_entropy_with_integer_labels(logits, problem.y),
        problem.loss_with_mask(aux.mask), rtol=1e-5)
    # The problem is not degenerate: the masks change the loss and the gradient is sizable.
    self.assertGreater(float(jnp.ptp(problem.loss_per_mask)), 0.5)
    self.assertGreater(float(np.max(np.abs(problem.exact_gradient()))), 0.05)

  def test_expected_loss_weights_sum_to_one(self):
    problem = tiny_problem()
    probs = problem.probs(problem.policy_params)
    weights = jax.vmap(lambda m: jnp.exp(ccjax.mask_log_prob(
        probs, jnp.broadcast_to(m, (BATCH, NUM_BLOCKS)))))(ALL_MASKS)
    np.testing.assert_allclose(jnp.sum(weights, axis=0), 1.0, rtol=1e-5)

  @parameterized.parameters("none", "batch_mean", "ema")
  def test_reinforce_is_unbiased(self, kind):
    problem = tiny_problem()
    samples = problem.sampled_gradients(problem.surrogate, kind)
    assert_mean_within_3_standard_errors(samples, problem.exact_gradient())

  def test_plain_batch_mean_baseline_scales_gradient_by_b_minus_1_over_b(self):
    problem = tiny_problem()
    samples = problem.sampled_gradients(problem.surrogate,
                                        "plain_batch_mean")
    exact = problem.exact_gradient()
    assert_mean_within_3_standard_errors(samples, (BATCH - 1) / BATCH * exact)
    # ...and the bias is detectable: the mean is far from the true gradient.
    standard_error = samples.std(axis=0, ddof=1) / np.sqrt(NUM_SAMPLES)
    self.assertGreater(np.max(np.abs(samples.mean(axis=0) - exact) / standard_error), 10.0)

  def test_plain_batch_mean_is_leave_one_out_times_b_minus_1_over_b_per_draw(self):
    # c_x - mean(c) = (B - 1) / B * (c_x - mean_{x' != x} c_x'), draw by draw.
    problem = tiny_problem()
    for seed in range(3):
      key = jax.random.key(seed)
      plain = jax.grad(problem.surrogate)(problem.policy_params, key, "plain_batch_mean")
      leave_one_out = jax.grad(problem.surrogate)(problem.policy_params, key, "batch_mean")
      chex.assert_trees_all_close(
          plain, jax.tree_util.tree_map(lambda g: (BATCH - 1) / BATCH * g, leave_one_out),
          rtol=1e-5, atol=1e-7)

  @parameterized.parameters("none", "batch_mean", "ema")
  def test_policy_objective_through_model_is_unbiased(self, kind):
    problem = tiny_problem()
    samples = problem.sampled_gradients(
        problem.model_policy_objective, kind, seed=2)
    assert_mean_within_3_standard_errors(samples, problem.exact_gradient())


class ScoreFunctionLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_value_and_gradient(self):
    log_prob = jnp.array([-1.0, -2.0, -0.5])
    cost = jnp.array([2.0, 1.0, 4.0])
    baseline = jnp.array([1.0, 1.0, 1.0])
    value, grad = self.variant(jax.value_and_grad(ccjax.score_function_loss, argnums=(0, 1, 2)))(
        log_prob, cost, baseline)
    np.testing.assert_allclose(value, (1 * -1.0 + 0 * -2.0 + 3 * -0.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(grad[0], [1 / 3, 0.0, 1.0], rtol=1e-6)
    # No gradient flows into the cost or the baseline.
    np.testing.assert_array_equal(grad[1], 0.0)
    np.testing.assert_array_equal(grad[2], 0.0)

  def test_scalar_baseline(self):
    value = ccjax.score_function_loss(jnp.array([-1.0, -3.0]), jnp.array([2.0, 2.0]), 1.0)
    np.testing.assert_allclose(value, -2.0)

  def test_shape_errors(self):
    # [batch, seq] (per-position costs of token models) is accepted; rank 3 is not.
    ccjax.score_function_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    with self.assertRaisesRegex(ValueError, r"\[batch\]"):
      ccjax.score_function_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)))
    with self.assertRaisesRegex(ValueError, r"\[batch\]"):
      ccjax.score_function_loss(jnp.zeros((2,)), jnp.zeros((3,)))


class BaselineTest(chex.TestCase):

  def test_none(self):
    np.testing.assert_array_equal(ccjax.compute_baseline("none", jnp.array([1.0, 5.0])), 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_batch_mean_is_leave_one_out(self):
    cost = jnp.array([1.0, 2.0, 3.0, 6.0])  # sum 12
    baseline = self.variant(lambda c: ccjax.compute_baseline("batch_mean", c))(cost)
    np.testing.assert_allclose(baseline, [11 / 3, 10 / 3, 9 / 3, 6 / 3], rtol=1e-6)

  def test_batch_mean_of_one_example_is_zero(self):
    np.testing.assert_array_equal(ccjax.compute_baseline("batch_mean", jnp.array([4.0])), 0.0)

  def test_ema_state_updates_and_bias_correction(self):
    decay = 0.9
    state = ccjax.init_baseline_state()
    np.testing.assert_array_equal(ccjax.ema_baseline_value(state, decay), 0.0)
    state = ccjax.update_baseline_state(state, jnp.array([1.0, 3.0]), decay)  # mean 2
    np.testing.assert_allclose(state.average, 0.1 * 2.0, rtol=1e-6)
    self.assertEqual(int(state.count), 1)
    np.testing.assert_allclose(ccjax.ema_baseline_value(state, decay), 2.0, rtol=1e-5)
    state = ccjax.update_baseline_state(state, jnp.array([4.0, 4.0]), decay)
    # average = 0.9 * 0.2 + 0.1 * 4 = 0.58, corrected by 1 - 0.81 = 0.19.
    np.testing.assert_allclose(ccjax.ema_baseline_value(state, decay), 0.58 / 0.19, rtol=1e-5)
    baseline = ccjax.compute_baseline("ema", jnp.zeros(3), state, decay)
    np.testing.assert_allclose(baseline, [0.58 / 0.19] * 3, rtol=1e-5)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "BaselineState"):
      ccjax.compute_baseline("ema", jnp.zeros(2))
    with self.assertRaisesRegex(ValueError, "baseline must be one of none|batch_mean|ema"):
      ccjax.compute_baseline("mean", jnp.zeros(2))


class RelaxedEstimatorsTest(chex.TestCase):

  def test_straight_through_forward_is_hard_and_gradient_is_identity(self):
    probs = jnp.full((1000, 3), 0.3)
    weights = jnp.array([1.0, -2.0, 0.5])
    block_mask = ccjax.straight_through_mask(jax.random.key(0), probs)
    self.assertTrue(bool(jnp.all((block_mask == 0) | (block_mask == 1))))
    grad = jax.grad(lambda p: jnp.sum(
        ccjax.straight_through_mask(jax.random.key(0), p) * weights))(probs)
    np.testing.assert_allclose(grad, jnp.broadcast_to(weights, probs.shape), rtol=1e-6)

  def test_straight_through_top_k_is_the_top_k_mask_with_identity_gradient(self):
    probs = jnp.asarray(np.random.RandomState(0).uniform(0.05, 0.95, (5, 2, 6)), jnp.float32)
    weights = jnp.arange(6.0) - 2.0
    block_mask = ccjax.straight_through_top_k_mask(probs, 2)
    np.testing.assert_array_equal(block_mask, ccjax.top_k_mask(probs, 2))
    np.testing.assert_array_equal(jnp.sum(block_mask, -1), 2.0)  # every position: exactly k
    grad = jax.grad(lambda p: jnp.sum(ccjax.straight_through_top_k_mask(p, 2) * weights))(probs)
    np.testing.assert_allclose(grad, jnp.broadcast_to(weights, probs.shape), rtol=1e-6)

  def test_gumbel_hard_sample_frequency_and_gradient(self):
    num_samples = 20000
    block_probs = jnp.array([0.1, 0.5, 0.8])
    probs = jnp.broadcast_to(block_probs, (num_samples, 3))
    block_mask = ccjax.gumbel_sigmoid_mask(jax.random.key(1), probs)
    self.assertTrue(bool(jnp.all((block_mask == 0) | (block_mask == 1))))
    standard_error = jnp.sqrt(block_probs * (1 - block_probs) / num_samples)
    np.testing.assert_array_less(jnp.abs(jnp.mean(block_mask, 0) - block_probs),
                                 4 * standard_error)
    grad = jax.grad(lambda p: jnp.sum(ccjax.gumbel_sigmoid_mask(jax.random.key(1), p)))(probs)
    self.assertTrue(bool(jnp.all(jnp.isfinite(grad))))
    self.assertTrue(bool(jnp.all(grad >= 0)))
    self.assertGreater(float(jnp.mean(grad)), 0.0)

  def test_gumbel_soft_is_in_unit_interval(self):
    soft = ccjax.gumbel_sigmoid_mask(jax.random.key(2), jnp.full((8, 4), 0.4), hard=False)
    self.assertTrue(bool(jnp.all((soft >= 0) & (soft <= 1))))
    self.assertFalse(bool(jnp.all((soft == 0) | (soft == 1))))


if __name__ == "__main__":
  absltest.main()


# ------------------------------------------------------------------ two gated layers
# Two gated layers of 2 blocks of 2 units: the second policy reads the first layer's
# masked output, so the exact expected loss sums over the 4 x 4 joint masks with weight
# pi_1(u_1 | x) pi_2(u_2 | h_1(x, u_1)), and REINFORCE must use log pi_1 + log pi_2.
TWO_LAYER_BLOCKS = 2
TWO_LAYER_MASKS = [jnp.array([[(code >> j) & 1 for j in range(TWO_LAYER_BLOCKS)]], jnp.float32)
                   for code in range(2 ** TWO_LAYER_BLOCKS)]
# Family-wise false-alarm rate of the per-coordinate checks (Bonferroni-corrected).
FAMILY_ALPHA = 1e-3


def bonferroni_z(num_coordinates: int, alpha: float = FAMILY_ALPHA) -> float:
  """Two-sided z threshold so that ``num_coordinates`` checks together fail w.p. <= alpha."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.norm.isf(alpha / (2 * num_coordinates)))


class TwoLayerProblem:
  """A fixed two-gated-layer net, its exact expected loss and single-draw estimates."""

  def __init__(self):
    self.model = ccjax.GatedMLP(hidden=(4, 4), num_classes=NUM_CLASSES, block_size=2)
    key_x, key_init, key_1, key_2 = jax.random.split(jax.random.key(3), 4)
    self.x = jax.random.normal(key_x, (BATCH, INPUT_DIM))
    self.y = jnp.array([0, 1, 2, 1])
    params = jax.tree_util.tree_map(jnp.asarray, self.model.init(
        {"params": key_init, "gate": key_init}, self.x)["params"])
    params["hidden_0"]["policy"]["logits"]["kernel"] = 0.8 * jax.random.normal(key_1, (3, 2))
    params["hidden_0"]["policy"]["logits"]["bias"] = jnp.array([0.4, -0.3])
    params["hidden_1"]["policy"]["logits"]["kernel"] = 0.3 * jax.random.normal(key_2, (4, 2))
    params["hidden_1"]["policy"]["logits"]["bias"] = jnp.array([-0.2, 0.3])
    for name in ("hidden_0", "hidden_1"):
      params[name]["dense"]["kernel"] = 3.0 * params[name]["dense"]["kernel"]
    self.params = params
    self.policies = {name: params[name]["policy"] for name in ("hidden_0", "hidden_1")}

  def with_policies(self, policies):
    params = dict(self.params)
    for name, policy in policies.items():
      params[name] = dict(params[name], policy=policy)
    return params

  def expected_loss(self, policies):
    """Exact ``mean_x E_{u_1, u_2} loss_x`` over the 16 joint masks."""
    params = self.with_policies(policies)
    total = jnp.zeros((BATCH,))
    for mask_1 in TWO_LAYER_MASKS:
      for mask_2 in TWO_LAYER_MASKS:
        masks = (jnp.broadcast_to(mask_1, (BATCH, 2)), jnp.broadcast_to(mask_2, (BATCH, 2)))
        logits, aux = self.model.apply({"params": params}, self.x, mode="all",
                                       block_masks=masks)
        loss = jax.lax.stop_gradient(
            optax.softmax_cross_entropy_with_integer_labels(logits, self.y))
        total = total + jnp.exp(aux[0].log_prob + aux[1].log_prob) * loss
    return jnp.mean(total)

  def exact_gradient(self) -> np.ndarray:
    return np.asarray(ravel_pytree(jax.grad(self.expected_loss)(self.policies))[0])

  def objective(self, policies, key, first_layer_only=False):
    """The library path (``policy_objective``, lambdas 0, no baseline) for one draw;
    ``first_layer_only`` is the bug the test must catch (layer 2's log-prob dropped)."""
    logits, aux = self.model.apply({"params": self.with_policies(policies)}, self.x,
                                   mode="sample", rngs={"gate": key})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, self.y)
    config = ccjax.TrainConfig(lambda_s=0.0, lambda_v=0.0, baseline="none")
    if first_layer_only:
      aux = (aux[0], aux[1]._replace(log_prob=jax.lax.stop_gradient(aux[1].log_prob)))
    return ccjax.policy_objective(aux, loss, config, ccjax.init_baseline_state())[0]

  def sampled_gradients(self, first_layer_only=False, seed=4) -> np.ndarray:
    def one(key):
      return ravel_pytree(jax.grad(self.objective)(self.policies, key, first_layer_only))[0]
    keys = jax.random.split(jax.random.key(seed), NUM_SAMPLES)
    return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


@functools.lru_cache(maxsize=None)
def two_layer_problem() -> TwoLayerProblem:
  return TwoLayerProblem()


def max_z_score(samples: np.ndarray, target: np.ndarray) -> float:
  standard_error = samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])
  return float(np.max(np.abs(samples.mean(axis=0) - target) / (standard_error + 1e-12)))


class TwoLayerUnbiasednessTest(absltest.TestCase):

  def test_joint_mask_weights_sum_to_one(self):
    problem = two_layer_problem()
    params = problem.params
    total = jnp.zeros((BATCH,))
    for mask_1 in TWO_LAYER_MASKS:
      for mask_2 in TWO_LAYER_MASKS:
        masks = (jnp.broadcast_to(mask_1, (BATCH, 2)), jnp.broadcast_to(mask_2, (BATCH, 2)))
        _, aux = problem.model.apply({"params": params}, problem.x, mode="all",
                                     block_masks=masks)
        total = total + jnp.exp(aux[0].log_prob + aux[1].log_prob)
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)

  def test_reinforce_sums_log_probs_over_layers(self):
    problem = two_layer_problem()
    exact = problem.exact_gradient()
    threshold = bonferroni_z(exact.size)
    # Both layers' policies have a sizable gradient (the test can see either).
    half = exact.size - 10  # hidden_1's policy: kernel [4, 2] + bias [2]
    self.assertGreater(float(np.max(np.abs(exact[:half]))), 0.02)
    self.assertGreater(float(np.max(np.abs(exact[half:]))), 0.02)
    self.assertLess(max_z_score(problem.sampled_gradients(), exact), threshold)
    # Sensitivity: the estimate that keeps only the first layer's log-prob is rejected.
    self.assertGreater(max_z_score(problem.sampled_gradients(first_layer_only=True), exact),
                       2 * threshold)
