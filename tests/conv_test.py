"""Tests for ccjax.conv: gated conv modules, the gated CNN and its training."""

import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ccjax
from ccjax import conv
from ccjax import layers
from tests import param_utils

TINY = dict(stem_features=4, stage_features=(8,), residual_blocks=1, block_size=4)


def _init(model, x, seed=0, init_prob=0.5):
  """Fan-in scaled kernels, zero biases, policy biases ``logit(init_prob)``."""
  return param_utils.numpy_params(model, x, seed,
                                  policy_bias=float(np.log(init_prob / (1 - init_prob))))


def _digits_images(num=None):
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  return (images, labels) if num is None else (images[:num], labels[:num])


def test_gated_conv_masks_channel_blocks_and_keeps_policy_apart():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 6, 2))
  layer = conv.GatedConv(8, block_size=4, strides=2)
  params = _init(layer, x)
  assert set(params) == {"conv", "policy"}
  assert params["conv"]["kernel"].shape == (3, 3, 2, 8)
  assert params["policy"]["logits"]["kernel"].shape == (2, 2)
  mask = jnp.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
  y, aux = layer.apply({"params": params}, x, mode="threshold", block_mask=mask)
  dense = jax.nn.relu(jax.lax.conv_general_dilated(
      x, params["conv"]["kernel"], (2, 2), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["conv"]["bias"])
  expected = dense * jnp.repeat(mask, 4, axis=-1)[:, None, None, :]
  assert y.shape == (3, 3, 3, 8)
  np.testing.assert_allclose(y, expected, atol=1e-6)
  chex.assert_shape([aux.probs, aux.mask], (3, 2))
  chex.assert_shape(aux.log_prob, (3,))
  pooled = jnp.mean(x, axis=(1, 2))
  probs = ccjax.policy_probs(pooled @ params["policy"]["logits"]["kernel"]
                             + params["policy"]["logits"]["bias"], layer.policy_eps)
  np.testing.assert_allclose(aux.probs, probs, atol=1e-6)
  np.testing.assert_allclose(aux.log_prob, ccjax.mask_log_prob(probs, mask), atol=1e-6)


def test_residual_block_skipped_is_identity_and_run_adds_branch():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  block = conv.GatedResidualBlock(num_convs=2)
  params = _init(block, x)
  y, aux = block.apply({"params": params}, x, mode="threshold",
                       block_mask=jnp.array([[0.0], [1.0]]))
  chex.assert_shape(aux.probs, (2, 1))
  np.testing.assert_array_equal(y[0], x[0])
  ungated, none_aux = conv.GatedResidualBlock(num_convs=2, gated=False).apply(
      {"params": ccjax.strip_policy_params(params)}, x)
  assert none_aux is None
  np.testing.assert_allclose(y[1], ungated[1], atol=1e-6)
  assert not np.allclose(ungated[1], x[1])


def test_gated_cnn_contract_and_dense_baseline():
  model = conv.GatedCNN(10, **TINY)
  x = jnp.ones((5, 8, 8, 1))
  params = _init(model, x)
  logits, aux = jax.jit(lambda p: model.apply({"params": p}, x, mode="sample",
                                               rngs={"gate": jax.random.PRNGKey(3)}))(params)
  chex.assert_shape(logits, (5, 10))
  assert [a.probs.shape for a in aux] == [(5, 2), (5, 1)]
  assert [layer.name for layer in model.gate_layers()] == ["stage_0", "stage_0_res_0"]
  labels = layers.param_labels(params)
  assert labels["stage_0"]["policy"]["logits"]["kernel"] == "policy"
  assert labels["stage_0_res_0"]["conv_1"]["kernel"] == "network"
  dense_model = conv.GatedCNN(10, gated=False, **TINY)
  dense_logits, dense_aux = jax.jit(dense_model.apply)({"params": ccjax.strip_policy_params(params)},
                                                       x)
  assert dense_aux == (None, None)
  all_logits, _ = jax.jit(lambda p: model.apply({"params": p}, x, mode="all"))(params)
  np.testing.assert_allclose(dense_logits, all_logits, atol=1e-6)


def test_gated_cnn_accepts_flat_inputs_with_image_shape():
  model = conv.GatedCNN(10, image_shape=(8, 8, 1), **TINY)
  images = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 1))
  params = _init(model, images)
  flat_logits, _ = model.apply({"params": params}, images.reshape(3, -1), mode="threshold")
  logits, _ = model.apply({"params": params}, images, mode="threshold")
  np.testing.assert_allclose(flat_logits, logits, atol=1e-6)
  with pytest.raises(ValueError, match="inputs"):
    conv.GatedCNN(10, **TINY).apply({"params": params}, images.reshape(3, -1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_classes=1), "num_classes"),
    (dict(stage_features=()), "stage_features"),
    (dict(stage_features=(12,), block_size=8), "block_size"),
    (dict(strides=(2, 2)), "strides"),
    (dict(strides=0), "strides"),
    (dict(residual_blocks=-1), "residual_blocks"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(num_convs=0), "num_convs"),
    (dict(estimator="magic"), "estimator"),
    (dict(policy_init_prob=1.0), "policy_init_prob"),
    (dict(policy_init_prob=(0.5,)), "policy_init_prob"),
    (dict(policy_eps=0.5), "eps"),
    (dict(image_shape=(8, 8)), "image_shape"),
])
def test_gated_cnn_validates_arguments(kwargs, match):
  arguments = dict(num_classes=10, stage_features=(8,), block_size=4)
  arguments.update(kwargs)
  with pytest.raises(ValueError, match=match):
    conv.GatedCNN(**arguments)


def test_gated_conv_validates_arguments():
  with pytest.raises(ValueError, match="block_size"):
    conv.GatedConv(10, block_size=4)
  with pytest.raises(ValueError, match="strides"):
    conv.GatedConv(8, block_size=4, strides=-1)
  with pytest.raises(ValueError, match="num_convs"):
    conv.GatedResidualBlock(num_convs=0)


def _state(model, config, sample_x, seed=0, init_prob=0.5):
  params = _init(model, sample_x, seed, init_prob)
  return ccjax.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=ccjax.make_optimizer(config).init(params),
                          baseline=ccjax.init_baseline_state(), rng=jax.random.PRNGKey(seed))


def _train(model, config, images, labels, steps, batch_size, seed=0, state=None):
  if state is None:
    state = _state(model, config, images[:batch_size], seed, model.policy_init_prob)
  step_fn = jax.jit(ccjax.make_train_step(model, config), donate_argnums=0)
  rng = np.random.default_rng(seed)
  history = []
  for _ in range(steps):
    index = rng.choice(len(images), batch_size, replace=False)
    state, metrics = step_fn(state, {"x": jnp.asarray(images[index]),
                                     "y": jnp.asarray(labels[index])})
    history.append(jax.device_get(metrics))
  return state, history


def test_cnn_trains_on_digit_images_toward_tau():
  images, labels = _digits_images(512)
  model = conv.GatedCNN(10, policy_init_prob=0.85, **TINY)
  config = ccjax.TrainConfig(tau=0.3, lambda_s=5.0, lambda_v=0.0, lr=3e-3, policy_lr=0.05)
  # init_train_state traces for the CNN (shapes only: its initialisers are slow to compile).
  abstract = jax.eval_shape(
      lambda: ccjax.init_train_state(model, config, jax.random.PRNGKey(0), images[:32]))
  state = _state(model, config, images[:32], init_prob=0.85)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract.params, state.params)
  _, history = _train(model, config, images, labels, steps=25, batch_size=32, state=state)
  losses = np.array([m["loss"] for m in history])
  assert np.all(np.isfinite(losses))
  assert all(m["finite"] == 1.0 for m in history)
  first, last = history[0]["mean_prob"], history[-1]["mean_prob"]
  assert first.shape == (2,)
  # Every gated layer's probability moved from 0.85 toward tau = 0.3.
  assert np.all(last < first - 0.1), (first, last)
  assert np.all(np.abs(last - 0.3) < np.abs(first - 0.3))


@pytest.mark.slow  # CNN training on mocked TFDS, 8 s
def test_cnn_trains_on_mocked_tfds_cifar10():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=16):
    dataset = tfds.load("cifar10", split="train", data_dir=tempfile.mkdtemp())
    batch = next(iter(tfds.as_numpy(dataset.batch(16))))
  images = batch["image"].astype(np.float32) / 255.0
  labels = batch["label"].astype(np.int32)
  assert images.shape == (16, 32, 32, 3)
  model = conv.GatedCNN(10, policy_init_prob=0.85, **TINY)
  config = ccjax.TrainConfig(tau=0.3, lambda_s=5.0, lambda_v=0.0, policy_lr=0.05)
  _, history = _train(model, config, images, labels, steps=6, batch_size=8)
  assert all(np.isfinite(m["loss"]) and m["finite"] == 1.0 for m in history)
  assert np.all(history[-1]["mean_prob"] < history[0]["mean_prob"])


def _network_and_policy(tree):
  labels = layers.param_labels(tree)
  network = jax.tree_util.tree_map(lambda x, l: x if l == "network" else None, tree, labels)
  policy = jax.tree_util.tree_map(lambda x, l: x if l == "policy" else None, tree, labels)
  return network, policy


def test_gradient_separation():
  images, labels = _digits_images(16)
  batch = {"x": jnp.asarray(images), "y": jnp.asarray(labels)}
  model = conv.GatedCNN(10, policy_init_prob=0.6, **TINY)
  small = ccjax.TrainConfig(tau=0.3, lambda_s=0.0, lambda_v=0.0, l2=0.0, lr=1.0,
                            policy_lr=1.0, optimizer="sgd", baseline="none")
  large = ccjax.TrainConfig(tau=0.3, lambda_s=100.0, lambda_v=100.0, l2=0.0, lr=1.0,
                            policy_lr=1.0, optimizer="sgd", baseline="batch_mean")
  state = _state(model, small, batch["x"], init_prob=0.6)
  new_small, _ = jax.jit(ccjax.make_train_step(model, small))(state, batch)
  new_large, _ = jax.jit(ccjax.make_train_step(model, large))(state, batch)
  network_small, policy_small = _network_and_policy(new_small.params)
  network_large, policy_large = _network_and_policy(new_large.params)
  # Network parameters see only the task loss: identical whatever the policy terms.
  chex.assert_trees_all_close(network_small, network_large, atol=0, rtol=0)
  # ... and the policy terms do change the policy.
  assert not np.allclose(policy_small["stage_0"]["policy"]["logits"]["bias"],
                         policy_large["stage_0"]["policy"]["logits"]["bias"])

  step_key = jax.random.fold_in(state.rng, state.step)

  def task_loss(params):
    logits, _ = model.apply({"params": params}, batch["x"], mode="sample",
                            rngs={"gate": step_key})
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))

  grads = jax.jit(jax.grad(task_loss))(state.params)
  network_grads, policy_grads = _network_and_policy(grads)
  # The task loss sends no gradient into the policies ...
  for leaf in jax.tree_util.tree_leaves(policy_grads):
    np.testing.assert_array_equal(leaf, 0.0)
  assert any(np.any(leaf != 0) for leaf in jax.tree_util.tree_leaves(network_grads))
  # ... and the network's SGD step (lr 1) is exactly minus the task-loss gradient.
  expected = jax.tree_util.tree_map(lambda p, g: p - g, _network_and_policy(state.params)[0],
                                    network_grads)
  chex.assert_trees_all_close(network_small, expected, atol=1e-6)
