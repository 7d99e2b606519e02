"""Policy imitation of the activation oracle (regularizers.imitation_loss, imitation_weight)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from ccjax import regularizers
from ccjax import step as step_lib


def test_imitation_loss_is_the_cross_entropy_towards_the_top_blocks():
  probs = jnp.array([[0.9, 0.2, 0.6, 0.1], [0.3, 0.3, 0.8, 0.5]])
  norms = jnp.array([[5.0, 1.0, 3.0, 0.0], [0.0, 2.0, 1.0, 4.0]])
  oracle = np.array([[1, 0, 1, 0], [0, 1, 0, 1]], np.float32)   # top 2 norms per row
  expected = -np.mean(oracle * np.log(probs) + (1 - oracle) * np.log(1 - probs))
  np.testing.assert_allclose(regularizers.imitation_loss(probs, norms, 2), expected, rtol=1e-6)
  # Per-token gates: every leading index is one x.
  np.testing.assert_allclose(
      regularizers.imitation_loss(probs[None], norms[None], 2), expected, rtol=1e-6)
  grad_norms = jax.grad(lambda n: regularizers.imitation_loss(probs, n, 2))(norms)
  np.testing.assert_array_equal(grad_norms, 0.0)


def test_gated_dense_reports_its_block_norms():
  module = ccjax.GatedDense(8, block_size=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  variables = module.init({"params": jax.random.PRNGKey(1), "gate": jax.random.PRNGKey(2)}, x,
                          mode="all")
  outputs, aux = module.apply(variables, x, mode="all")
  np.testing.assert_allclose(aux.block_norms,
                             np.square(np.asarray(outputs)).reshape(5, 2, 4).sum(-1), rtol=1e-6)


def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(256, 6)).astype(np.float32)
  y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0)).astype(np.int32)
  return x, y


def test_imitation_trains_only_the_policies_towards_the_oracle():
  module = ccjax.GatedMLP(hidden=(32, 32), num_classes=3, block_size=8,
                          estimator="straight_through")
  x, y = _data()
  with_imitation = step_lib.TrainConfig(estimator="straight_through", warm_steps=200,
                                        imitation_weight=1.0, lambda_s=0.0, lambda_v=0.0,
                                        l2=0.0, policy_lr=0.01)
  without = step_lib.TrainConfig(**{**with_imitation.__dict__, "imitation_weight": 0.0})
  states, losses = {}, {}
  for name, config in (("with", with_imitation), ("without", without)):
    state = step_lib.init_train_state(module, config, jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    train_step = jax.jit(step_lib.make_train_step(module, config))
    for index in range(60):   # dense warm start: every block on
      rows = slice((index % 8) * 32, (index % 8 + 1) * 32)
      state, metrics = train_step(state, {"x": jnp.asarray(x[rows]), "y": jnp.asarray(y[rows])})
      losses.setdefault(name, []).append(float(metrics.get("l_im", np.nan)))
    states[name] = state
  # The network's parameters do not see the imitation term; the policies do.
  for layer in ("hidden_0", "hidden_1"):
    np.testing.assert_array_equal(states["with"].params[layer]["dense"]["kernel"],
                                  states["without"].params[layer]["dense"]["kernel"])
    assert not np.allclose(states["with"].params[layer]["policy"]["logits"]["kernel"],
                           states["without"].params[layer]["policy"]["logits"]["kernel"])
  assert losses["with"][-1] < 0.8 * losses["with"][0]
  assert np.isnan(losses["without"]).all()
  # The imitating policy's top 1 of 4 blocks matches the oracle's more often.
  def agreement(params):
    _, aux = module.apply({"params": params}, jnp.asarray(x), mode="all")
    oracle = np.asarray(aux[0].block_norms).argmax(-1)
    return np.mean(np.asarray(aux[0].probs).argmax(-1) == oracle)
  assert agreement(states["with"].params) > agreement(states["without"].params) + 0.2


def test_layers_without_block_norms_are_refused():
  probs = jnp.full((4, 2), 0.5)
  no_norms = ccjax.GateAux(probs=probs, mask=jnp.ones((4, 2)), log_prob=jnp.zeros(4))
  config = step_lib.TrainConfig(estimator="straight_through", imitation_weight=1.0)
  with pytest.raises(ValueError, match="imitation_weight > 0 needs gated layers"):
    step_lib.policy_objective([no_norms], jnp.zeros(4), config,
                              ccjax.estimators.init_baseline_state())
