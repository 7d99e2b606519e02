"""Tests of the inference-backend registry (ccjax.inference.kernels): one Backend object
per backend, chosen once per model, honoured by every family (MLP, CNN, transformer)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from ccjax.inference import capacity
from ccjax.inference import kernels
from ccjax.inference import layout
from ccjax.inference import mlp
from ccjax.inference.kernels import base
from tests import param_utils

pytestmark = pytest.mark.usefixtures("full_float32_matmuls")


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
  monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)


def test_registry_lists_every_backend_once_by_name():
  names = [backend.name for backend in kernels.REGISTRY]
  assert tuple(names) == kernels.BACKENDS == ccjax.BACKENDS
  assert len(set(names)) == len(names)
  assert set(names) == {"xla", "ffi-cpu", "pallas-gpu"}       # the strings runs report
  for backend in kernels.REGISTRY:
    assert kernels.get(backend.name) is backend
    assert set(backend.families) <= set(base.FAMILIES)


def test_unknown_name_is_one_line_listing_the_registered_names():
  for call in (lambda: kernels.get("tpu-magic"), lambda: kernels.select_backend("tpu-magic")):
    with pytest.raises(ValueError) as error:
      call()
    message = str(error.value)
    assert "\n" not in message and "'tpu-magic'" in message
    assert "xla|ffi-cpu|pallas-gpu" in message


def test_xla_runs_everything_everywhere():
  xla = kernels.get("xla")
  assert xla.unavailable_reason(jax.default_backend()) is None
  for family in base.FAMILIES:
    assert "xla" in kernels.available_backends(family=family)
    assert "xla" in kernels.available_backends(float32=False, family=family)


def test_unavailable_backends_say_why():
  reasons = kernels.unavailable_reasons()
  available = kernels.available_backends()
  assert set(reasons).isdisjoint(available)
  assert all(isinstance(reason, str) and reason for reason in reasons.values())
  assert "pallas-gpu" in kernels.unavailable_reasons("tpu")
  assert "CPU only" in kernels.unavailable_reasons("gpu")["ffi-cpu"]


def test_cnn_default_is_a_backend_that_runs_cnns():
  chosen = kernels.select_backend(family=base.CNN)
  assert base.CNN in kernels.get(chosen).families


def _cnn():
  module = ccjax.GatedCNN(num_classes=3, stem_features=4, stage_features=(8,),
                          residual_blocks=1, block_size=4)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1))
  params = param_utils.jitted_init(module)(
      {"params": jax.random.PRNGKey(1), "gate": jax.random.PRNGKey(2)}, x, mode="all")["params"]
  return module, params, x


def test_cnn_honours_the_chosen_backend():
  module, params, x = _cnn()
  infer = ccjax.make_inference(module, params, backend="xla")
  assert infer.backend == "xla"
  logits, info = infer(x)
  masked = param_utils.jitted_apply(module)({"params": params}, x, mode="threshold",
                                            block_masks=info.masks)[0]
  np.testing.assert_allclose(logits, masked, atol=1e-5, rtol=1e-5)
  for name in kernels.BACKENDS:
    if base.CNN not in kernels.get(name).families:
      with pytest.raises(ValueError, match=f"backend={name} does not run cnn models "
                                           r"\(backends that do: xla"):
        ccjax.make_inference(module, params, backend=name)


def test_cnn_rejects_a_forced_environment_backend_it_cannot_use(monkeypatch):
  module, params, _ = _cnn()
  monkeypatch.setenv(kernels.BACKEND_ENV, "pallas-gpu")
  with pytest.raises(ValueError, match="CCJAX_BACKEND=pallas-gpu does not run cnn models"):
    ccjax.make_inference(module, params)


def _mlp():
  module = ccjax.GatedMLP(hidden=(16, 16), num_classes=3, block_size=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
  params = param_utils.jitted_init(module)(
      {"params": jax.random.PRNGKey(1), "gate": jax.random.PRNGKey(2)}, x, mode="all")["params"]
  return module, params, x


def test_backend_is_chosen_once_per_model(monkeypatch):
  """make_inference selects once; later environment changes do not change a built model."""
  module, params, x = _mlp()
  calls = []
  select = kernels.select_backend
  monkeypatch.setattr(kernels, "select_backend",
                      lambda *args, **kwargs: calls.append(kwargs) or select(*args, **kwargs))
  infer = ccjax.make_inference(module, params, backend="xla")
  infer(x)
  infer(x[:1])
  assert infer.backend == "xla" and len(calls) == 1 and calls[0]["family"] == base.MLP


def test_a_new_backend_is_one_object_and_one_registry_line(monkeypatch):
  """A backend that brings only a grouped matmul runs the MLP minibatch path on it."""
  used = []

  def grouped_matmul(x, weights, weight_index, group_sizes, *, tiles, transpose_rhs=False):
    used.append(x.shape)
    return kernels.xla.grouped_matmul_xla(x, weights, weight_index, transpose_rhs)

  counting = base.Backend(name="counting", unavailable_reason=lambda platform: None,
                          families=(base.MLP,), grouped_matmul=grouped_matmul)
  monkeypatch.setattr(kernels, "REGISTRY", kernels.REGISTRY + (counting,))
  monkeypatch.setattr(kernels, "BACKENDS", kernels.BACKENDS + ("counting",))
  monkeypatch.setattr(kernels, "_BY_NAME", {**kernels._BY_NAME, "counting": counting})
  module, params, x = _mlp()
  model = layout.to_block_major(module, params)
  reference = mlp.sparse_forward(model, x, capacity.make_sparse_config(model, 3, backend="xla"))
  config = capacity.make_sparse_config(model, 3, backend="counting")
  got = mlp.sparse_forward(model, x, config)
  assert used
  np.testing.assert_allclose(got[0], reference[0], atol=1e-6)
  with pytest.raises(ValueError, match="does not run cnn models"):
    kernels.select_backend("counting", family=base.CNN)


def test_float32_only_backends_refuse_other_dtypes():
  module, params, _ = _mlp()
  half = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
  model = layout.to_block_major(module, half)
  assert not model.float32 and layout.to_block_major(module, params).float32
  for name in kernels.FLOAT32_ONLY:
    assert name not in kernels.available_backends(float32=False)
    config = dataclasses.replace(capacity.make_sparse_config(model, 2, backend="xla"),
                                 backend=name)
    with pytest.raises(ValueError, match=f"backend {name} runs float32 models only"):
      config.validate(model)
