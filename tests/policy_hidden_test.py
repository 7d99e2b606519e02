"""The one-hidden-layer block policy (``policy_hidden``) in every gated family."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from ccjax import config as config_lib
from ccjax import conv
from ccjax import flops
from ccjax import layers
from ccjax import transformer
from ccjax import validation

X = jax.random.normal(jax.random.key(0), (8, 6))
KEYS = {"params": jax.random.key(1), "gate": jax.random.key(2)}


def _mlp(**changes):
  return ccjax.GatedMLP(**{**dict(hidden=(16, 16), num_classes=3, block_size=4), **changes})


def _policy_leaves(params) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
          if layers.is_policy_path(path)}


def test_zero_is_the_linear_policy_bit_for_bit():
  linear = _mlp().init(KEYS, X)["params"]
  zero = _mlp(policy_hidden=0).init(KEYS, X)["params"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, linear, zero)
  assert "hidden" not in linear["hidden_0"]["policy"]


def test_hidden_layer_shapes_labels_and_forward():
  model = _mlp(policy_hidden=5)
  params = model.init(KEYS, X)["params"]
  assert _policy_leaves(params) == {
      "['hidden_0']['policy']['hidden']['bias']": (5,),
      "['hidden_0']['policy']['hidden']['kernel']": (6, 5),
      "['hidden_0']['policy']['logits']['bias']": (4,),
      "['hidden_0']['policy']['logits']['kernel']": (5, 4),
      "['hidden_1']['policy']['hidden']['bias']": (5,),
      "['hidden_1']['policy']['hidden']['kernel']": (16, 5),
      "['hidden_1']['policy']['logits']['bias']": (4,),
      "['hidden_1']['policy']['logits']['kernel']": (5, 4)}
  labels = layers.param_labels(params)
  assert labels["hidden_0"]["policy"]["hidden"]["kernel"] == "policy"
  assert labels["hidden_0"]["dense"]["kernel"] == "network"
  # probs = policy_probs(relu(h V + c) Z + d) on the layer's input.
  _, aux = model.apply({"params": params}, X, mode="all")
  policy = params["hidden_0"]["policy"]
  features = jax.nn.relu(X @ policy["hidden"]["kernel"] + policy["hidden"]["bias"])
  expected = ccjax.policy_probs(features @ policy["logits"]["kernel"] + policy["logits"]["bias"],
                                model.policy_eps)
  np.testing.assert_allclose(aux[0].probs, expected, rtol=1e-6)


def test_train_step_trains_the_hidden_layer_with_the_policy_only():
  model = _mlp(policy_hidden=5, estimator="straight_through")
  config = ccjax.TrainConfig(estimator="straight_through")
  batch = {"x": X, "y": jnp.arange(8) % 3}
  state = ccjax.init_train_state(model, config, jax.random.key(3), X[:1])
  new_state, metrics = jax.jit(ccjax.make_train_step(model, config))(state, batch)
  for name in ("hidden_0", "hidden_1"):
    before = state.params[name]["policy"]["hidden"]["kernel"]
    after = new_state.params[name]["policy"]["hidden"]["kernel"]
    assert not np.array_equal(before, after)
  assert float(metrics["grad_norm_policy"]) > 0
  # The policy reads stop_gradient(input): a policy-only loss sends nothing to the network.
  def policy_only(params):
    _, aux = model.apply({"params": params}, X, mode="sample", rngs={"gate": jax.random.key(4)})
    return sum(jnp.sum(a.probs) for a in aux)
  grads = jax.jit(jax.grad(policy_only))(state.params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
    if not layers.is_policy_path(path):
      np.testing.assert_array_equal(leaf, 0.0)


def test_cnn_and_transformer_pass_it_through():
  images = jax.random.normal(jax.random.key(5), (2, 8, 8, 1))
  cnn = ccjax.GatedCNN(num_classes=3, stem_features=4, stage_features=(8,), residual_blocks=1,
                       block_size=4, policy_hidden=3)
  # Jitted: one compile per call instead of one per operation (op by op, the CNN and the
  # transformer cost ~25 s of CPU here).
  params = jax.jit(cnn.init)(KEYS, images)["params"]
  for layer in cnn.gate_layers():
    assert params[layer.name]["policy"]["hidden"]["kernel"].shape[-1] == 3
  _, aux = jax.jit(functools.partial(cnn.apply, mode="threshold"))({"params": params}, images)
  assert [a.probs.shape for a in aux] == [(2, 2), (2, 1)]
  lm = ccjax.GatedTransformer(vocab_size=11, max_len=6, num_layers=2, d_model=8, num_heads=2,
                              mlp_width=16, block_size=4, policy_hidden=3)
  tokens = jnp.zeros((2, 6), jnp.int32)
  params = jax.jit(lm.init)(KEYS, tokens)["params"]
  for mlp_params in lm.mlp_params(params):
    assert mlp_params["hidden_0"]["policy"]["hidden"]["kernel"].shape == (8, 3)
  _, aux = jax.jit(functools.partial(lm.apply, mode="threshold"))({"params": params}, tokens)
  assert aux[0].probs.shape == (2, 6, 4)
  # Per token: d * h + h * blocks policy MACs per layer.
  linear = transformer.macs_per_token(lm.clone(policy_hidden=0))["policy"]
  assert linear == 2 * 8 * 4
  assert transformer.macs_per_token(lm)["policy"] == 2 * (8 * 3 + 3 * 4)


def test_sparse_inference_refuses_in_one_line():
  model = _mlp(policy_hidden=5)
  params = model.init(KEYS, X)["params"]
  with pytest.raises(ValueError, match=r"only the linear policy.*policy_hidden=5") as error:
    ccjax.make_inference(model, params)
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match="hidden layer"):
    model.hidden_weights(params)
  images = jnp.zeros((1, 8, 8, 1))
  cnn = ccjax.GatedCNN(num_classes=3, stem_features=4, stage_features=(8,), block_size=4,
                       policy_hidden=3)
  # Parameters by jitted init: one compile instead of one per operation (see above).
  with pytest.raises(ValueError, match="only the linear policy"):
    ccjax.make_inference(cnn, jax.jit(cnn.init)(KEYS, images)["params"])
  lm = ccjax.GatedTransformer(vocab_size=11, max_len=6, num_layers=1, d_model=8, num_heads=2,
                              mlp_width=16, block_size=4, policy_hidden=3)
  with pytest.raises(ValueError, match="only the linear policy"):
    ccjax.make_inference(lm, jax.jit(lm.init)(KEYS, jnp.zeros((1, 6), jnp.int32))["params"])


def test_macs_count_the_hidden_layer():
  # One example, input 6, layers of 4 blocks of 4; layer 0 runs 2 blocks, layer 1 runs 1.
  masks = [np.array([[1, 1, 0, 0]]), np.array([[0, 1, 0, 0]])]
  h = 5
  expected = ((6 * h + h * 4) + 6 * 8) + ((8 * h + h * 4) + 8 * 4) + 4 * 3
  np.testing.assert_allclose(flops.gated_mlp_macs(6, masks, 4, 3, policy_hidden=h), [expected])
  np.testing.assert_allclose(
      ccjax.macs_per_example(_mlp(policy_hidden=h), (6,), masks), [expected])
  np.testing.assert_allclose(flops.gated_mlp_macs(6, masks, 4, 3),
                             [(6 * 4 + 6 * 8) + (8 * 4 + 8 * 4) + 4 * 3])


def test_config_validates_and_builds_it():
  with pytest.raises(validation.ConfigError, match="policy_hidden.*measure_latency=false"):
    config_lib.ExperimentConfig.create(policy_hidden=8)
  with pytest.raises(validation.ConfigError, match="policy_hidden"):
    config_lib.ExperimentConfig.create(policy_hidden=-1, measure_latency=False)
  with pytest.raises(ValueError, match="policy_hidden"):
    _mlp(policy_hidden=1.5)
  config = config_lib.ExperimentConfig.create(policy_hidden=8, measure_latency=False)
  assert config_lib.build_model(config, (6,), 3).policy_hidden == 8
  # The dense baseline has no policy: nothing to measure against, so latency is allowed.
  config_lib.ExperimentConfig.create(policy_hidden=8, model="dense")
  cnn = config_lib.build_model(config.replace(arch="cnn", hidden=(8, 8), block_size=4),
                               (8, 8, 1), 3)
  assert isinstance(cnn, conv.GatedCNN) and cnn.policy_hidden == 8


CLI_CASES = [
    (["--policy_hidden=8", "--measure_latency=true"],
     "--policy_hidden=8: sparse inference runs only the linear policy"),
    (["--policy_hidden=-1", "--measure_latency=false"], "--policy_hidden must be an integer >= 0"),
    (["--distill_teacher=snapshot", "--distill_weight=1"],
     "--distill_teacher=snapshot distils from the network at the end of the dense warm start"),
    (["--batch_shaping_weight=-1"], "--batch_shaping_weight must be >= 0"),
]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
  """``{case index: (process, workdir)}``: every CLI_CASES case in one batch."""
  from tests import bad_input_test  # pylint: disable=g-import-not-at-top
  return bad_input_test.run_condnet_cases(
      tmp_path_factory.mktemp("cli"),
      {str(index): [*bad_input_test.TINY, *args] for index, (args, _) in enumerate(CLI_CASES)})


@pytest.mark.parametrize("index", range(len(CLI_CASES)),
                         ids=[args[0] for args, _ in CLI_CASES])
def test_cli_rejects_in_one_line_and_writes_nothing(cli_runs, index):
  from tests import bad_input_test  # pylint: disable=g-import-not-at-top
  process, workdir = cli_runs[str(index)]
  bad_input_test.check_clean_failure(process, workdir, set(), CLI_CASES[index][1])
