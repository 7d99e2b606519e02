"""make_inference on a GatedTransformer: every layer's MLP on the sparse MLP path, logits
equal to the model applied with ``block_masks=info.masks`` on every CPU backend."""

import jax
import numpy as np
import pytest

import ccjax
from tests import param_utils

pytestmark = pytest.mark.usefixtures("full_float32_matmuls")

MODEL = ccjax.GatedTransformer(max_len=12, num_layers=2, d_model=16, num_heads=2, mlp_width=64,
                               block_size=16)
BACKENDS = [b for b in ("xla", "ffi-cpu") if b in ccjax.available_backends()]
CASES = {
    "threshold": ("threshold", None),
    "top_k": ("top_k", ccjax.Capacities(top_k=2)),
    "capped": ("capped", ccjax.Capacities(top_k=(1, 2))),
    "overflow": ("threshold", ccjax.Capacities(active_fraction=0.1, example_slack=1.0)),
}
# The references, jitted: one compile per mode instead of one per operation (op by op, the
# transformer costs seconds of CPU per call).
APPLY = param_utils.jitted_apply(MODEL)


@pytest.fixture(scope="module")
def trained():
  tokens = jax.random.randint(jax.random.PRNGKey(0), (3, 12), 0, 256)
  params = jax.jit(MODEL.init)({"params": jax.random.PRNGKey(1), "gate": jax.random.PRNGKey(2)},
                               tokens)["params"]
  return params, tokens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_sparse_equals_masked_dense(trained, backend, case):
  params, tokens = trained
  mode, capacities = CASES[case]
  inference = ccjax.make_inference(MODEL, params, mode=mode, capacities=capacities,
                                   backend=backend)
  assert inference.backend == backend
  logits, info = inference(tokens)
  assert logits.shape == (3, 12, MODEL.vocab_size)
  assert len(info.masks) == len(info.probs) == MODEL.num_layers
  for mask, probs in zip(info.masks, info.probs):
    assert mask.shape == probs.shape == (3, 12, MODEL.num_blocks)
  masked_dense, aux = APPLY({"params": params}, tokens, mode="all", block_masks=info.masks)
  np.testing.assert_allclose(logits, masked_dense, atol=1e-5, rtol=1e-5)
  for probs, layer_aux in zip(info.probs, aux):  # the policies saw the same inputs
    np.testing.assert_allclose(probs, layer_aux.probs, atol=1e-6)
  dropped = int(np.sum(info.dropped))
  if case == "threshold":
    assert dropped == 0
    reference, aux = APPLY({"params": params}, tokens, mode="threshold")
    np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5)
    fractions = [float(np.mean(np.asarray(m))) for m in info.masks]
    assert all(0.0 < f < 1.0 for f in fractions)  # really skips, really runs
    assert int(np.sum(info.requested)) == int(sum(np.sum(a.mask) for a in aux))
  elif case == "overflow":
    assert dropped > 0 and ccjax.overflow_rate(info) > 0.0
  else:
    k = capacities.top_k
    reference, aux = APPLY({"params": params}, tokens, mode=mode, capacity=k)
    np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5)
    for mask, layer_aux in zip(info.masks, aux):
      np.testing.assert_array_equal(mask, layer_aux.mask)
    if mode == "top_k":
      for mask in info.masks:
        np.testing.assert_array_equal(np.sum(np.asarray(mask), -1), k)
      assert dropped == 0


def test_batch_one_and_without_info(trained):
  params, tokens = trained
  logits, info = ccjax.make_inference(MODEL, params)(tokens[:1, :5])
  reference, _ = APPLY({"params": params}, tokens[:1, :5], mode="threshold")
  np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5)
  assert info.masks[0].shape == (1, 5, MODEL.num_blocks)
  only_logits = ccjax.make_inference(MODEL, params, with_info=False)(tokens)
  np.testing.assert_allclose(only_logits, APPLY({"params": params}, tokens,
                                                mode="threshold")[0], atol=1e-5, rtol=1e-5)


def test_dense_inference_and_macs(trained):
  params, tokens = trained
  dense = ccjax.make_dense_inference(MODEL, params)(tokens)
  dense_apply = jax.jit(MODEL.clone(gated=False).apply, static_argnames="mode")
  reference, _ = dense_apply({"params": ccjax.strip_policy_params(params)}, tokens, mode="all")
  np.testing.assert_allclose(dense, reference, atol=1e-5, rtol=1e-5)
  _, info = ccjax.make_inference(MODEL, params)(tokens)
  dense_macs = ccjax.dense_macs_per_example(MODEL, (12,))
  expected = 12 * ccjax.transformer.macs_per_token(MODEL.clone(gated=False),
                                                   context=6.5)["total"]
  assert dense_macs == round(expected)
  macs = ccjax.macs_per_example(MODEL, (12,), info.masks)
  assert macs.shape == (3,) and np.all(macs > 0) and np.all(macs < dense_macs)
  every_block = [np.ones_like(np.asarray(m)) for m in info.masks]
  policies = 12 * MODEL.num_layers * MODEL.d_model * MODEL.num_blocks
  np.testing.assert_allclose(ccjax.macs_per_example(MODEL, (12,), every_block),
                             dense_macs + policies)


def test_bad_arguments(trained):
  params, tokens = trained
  with pytest.raises(ValueError, match="top_k"):
    ccjax.make_inference(MODEL, params, mode="top_k", capacities=ccjax.Capacities(top_k=(1, 2, 3)))
  with pytest.raises(ValueError, match=r"tokens must be \[batch, seq\]"):
    ccjax.make_inference(MODEL, params)(tokens[0])
  with pytest.raises(ValueError, match=r"input_shape of a transformer must be \(seq,\)"):
    ccjax.dense_macs_per_example(MODEL, (3, 12))
  with pytest.raises(ValueError, match="calibrate a transformer's MLPs one by one"):
    ccjax.calibrate_policies(MODEL, params, tokens, 0.5)
