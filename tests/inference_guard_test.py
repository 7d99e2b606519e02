"""What ``make_inference`` refuses or propagates (issue 21, items 2, 4, 15, 16).

Non-finite inputs give NaN logits like masked dense on every family and backend;
parameters that are not the module's raise one ``ValueError`` naming the path and both
shapes (or what was expected); token ids outside the vocabulary are refused.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from tests import tiers

pytestmark = pytest.mark.usefixtures("full_float32_matmuls")

MLP = ccjax.GatedMLP(hidden=(16, 24), num_classes=5, block_size=8)
CNN = ccjax.GatedCNN(5, stem_features=4, stage_features=(8, 8), strides=(2, 1),
                     residual_blocks=1, block_size=4)
SHAPES = {"mlp": (12,), "cnn": (8, 8, 1)}
MODES = (("threshold", None), ("top_k", ccjax.Capacities(top_k=1)),
         ("capped", ccjax.Capacities(top_k=1)))


def _init(module, shape, key=0):
  rng = jax.random.PRNGKey(key)
  x = jax.random.normal(rng, (32, *shape))
  # Jitted: one compile instead of one per operation (op by op costs seconds of CPU).
  init = jax.jit(functools.partial(module.init, mode="threshold"))
  params = init({"params": rng, "gate": rng}, x[:1])["params"]
  return ccjax.calibrate_policies(module, params, x, 0.5), np.asarray(x)


def _with_nonfinite_rows(x):
  """Rows 0, 1, 2 hold one NaN, +inf and -inf; row 3 is finite."""
  x = np.array(x[:4])
  flat = x.reshape(4, -1)
  flat[0, 3], flat[1, 2], flat[2, 5] = np.nan, np.inf, -np.inf
  return flat.reshape(x.shape)


# Fast tier: the MLP on every backend and mode; the CNN (11 s) runs in the slow tier.
@pytest.mark.parametrize("family", tiers.split([("mlp",), ("cnn",)], fast=[("mlp",)]))
def test_nonfinite_inputs_give_nan_logits_like_masked_dense(family):
  module = MLP if family == "mlp" else CNN
  params, x = _init(module, SHAPES[family])
  x = _with_nonfinite_rows(x)
  apply_masked_dense = jax.jit(
      lambda params, x, masks: module.apply({"params": params}, x, mode="all",
                                            block_masks=masks)[0])
  for backend in ccjax.available_backends(family=family):
    for mode, capacities in MODES:
      logits, info = ccjax.make_inference(module, params, mode=mode, capacities=capacities,
                                          backend=backend)(x)
      masked_dense = apply_masked_dense(params, x, info.masks)
      where = f"{family} {backend} {mode}"
      assert np.isnan(np.asarray(masked_dense)[:3]).all(), where  # what dense gives
      np.testing.assert_allclose(logits, masked_dense, atol=1e-5, rtol=1e-5, err_msg=where)
      assert np.isfinite(np.asarray(logits)[3]).all(), where
      timing_fn = ccjax.make_inference(module, params, mode=mode, capacities=capacities,
                                       backend=backend, with_info=False)
      np.testing.assert_array_equal(timing_fn(x), logits, err_msg=where)


def test_transformer_takes_integer_ids_in_the_vocabulary_only():
  model = ccjax.GatedTransformer(vocab_size=256, max_len=8, num_layers=1, d_model=16,
                                 num_heads=2, mlp_width=32, block_size=8)
  tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
  rng = jax.random.PRNGKey(0)
  init = jax.jit(functools.partial(model.init, mode="all"))  # one compile, as in _init
  params = init({"params": rng, "gate": rng}, tokens)["params"]
  inference = ccjax.make_inference(model, params)
  logits, _ = inference(tokens)
  assert np.isfinite(np.asarray(logits)).all()
  for bad, shown in ((300, "got 300"), (-1, "got -1"), (256, "got 256")):
    wrong = tokens.copy()
    wrong[1, 3] = bad
    with pytest.raises(ValueError, match=rf"tokens must be ids in \[0, 256\), {shown}"):
      inference(wrong)
  with pytest.raises(ValueError, match="integer token ids"):
    inference(tokens.astype(np.float32))
  with pytest.raises(ValueError, match="more than the model's max_len 8"):
    inference(np.zeros((1, 9), np.int32))


def test_params_of_another_shape_are_refused_naming_path_and_shapes():
  params_32, _ = _init(ccjax.GatedMLP(hidden=(32, 32), num_classes=10, block_size=8), (12,))
  with pytest.raises(ValueError, match=r"hidden_0/dense/bias has shape \[32\], the module "
                                       r"expects \[64\]"):
    ccjax.make_inference(ccjax.GatedMLP(hidden=(64, 64), num_classes=10, block_size=8),
                         params_32)
  params_5, _ = _init(ccjax.GatedMLP(hidden=(32, 32), num_classes=5, block_size=8), (12,))
  with pytest.raises(ValueError, match=r"output/bias has shape \[5\], the module expects "
                                       r"\[10\]"):
    ccjax.make_inference(ccjax.GatedMLP(hidden=(32, 32), num_classes=10, block_size=8),
                         params_5)
  # A block-size mismatch used to be "TypeError: cannot reshape array".
  with pytest.raises(ValueError, match=r"policy/logits/bias has shape \[4\], the module "
                                       r"expects \[2\]"):
    ccjax.make_inference(ccjax.GatedMLP(hidden=(32, 32), num_classes=10, block_size=16),
                         params_32)
  cnn_params, _ = _init(CNN, SHAPES["cnn"])
  wider = CNN.clone(stage_features=(8, 12))
  with pytest.raises(ValueError, match=r"output/kernel has shape \[8, 5\], the module "
                                       r"expects \[12, 5\]"):
    ccjax.make_inference(wider, cnn_params)


def test_params_in_the_wrong_form_are_named():
  params, _ = _init(MLP, SHAPES["mlp"])
  with pytest.raises(ValueError, match=r"params is wrapped in \{'params': \.\.\.\}.*"
                                       r"variables\['params'\]"):
    ccjax.make_inference(MLP, {"params": params})
  dense = ccjax.layers.strip_policy_params(params)
  with pytest.raises(ValueError, match="params has no policy parameters.*dense parameters"):
    ccjax.make_inference(MLP, dense)
  for wrong, name in ((3.0, "float"), ([params], "list"), (None, "NoneType")):
    with pytest.raises(ValueError, match=rf"params must be the parameter dict of a GatedMLP "
                                         rf".*got {name}"):
      ccjax.make_inference(MLP, wrong)
  extra = {**params, "stray": {"kernel": jnp.zeros((2, 2))}}
  with pytest.raises(ValueError, match=r"params hold stray/kernel \(shape \[2, 2\]\)"):
    ccjax.make_inference(MLP, extra)
