"""Tests of the ffi-cpu backend: the FFI handler runs the same blocks as the XLA path and
its logits equal masked-dense inference with the masks it used."""

import concurrent.futures
import dataclasses
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from ccjax.inference import capacity
from ccjax.inference import kernels
from ccjax.inference import layout
from ccjax.inference import mlp
from ccjax.inference.kernels import ffi_cpu
from ccjax.inference.kernels import ffi_cpu_helper
from tests import param_utils
from tests import tiers

INPUT_DIM, CLASSES = 37, 7
FFI = jax.jit(ffi_cpu.gated_mlp_forward, static_argnums=2)
XLA = jax.jit(mlp.sparse_forward, static_argnums=2)
TRACE_MASKS = jax.jit(capacity.trace_masks, static_argnums=1)

needs_extension = pytest.mark.skipif(
    not ffi_cpu.available(), reason=f"ffi-cpu unavailable: {ffi_cpu.unavailable_reason()}")


def test_extension_is_built_in_ci():
  """CI builds the extension: without it every other test here would only skip."""
  if os.environ.get("CI", "").lower() != "true":
    pytest.skip("only enforced when CI=true")
  assert ffi_cpu.available(), ffi_cpu.unavailable_reason()


def _module(block_size, widths):
  return ccjax.GatedMLP(hidden=tuple(widths), num_classes=CLASSES, block_size=block_size)


def _params(block_size, widths, bias_shift=0.0, seed=0):
  """Random GatedMLP params; policy logits spread so that masks are ragged, and
  ``bias_shift`` moving every policy towards on (> 0) or off (< 0)."""
  rng = np.random.default_rng(seed)
  params, fan_in = {}, INPUT_DIM
  for index, width in enumerate(widths):
    blocks = width // block_size
    params[f"hidden_{index}"] = {
        "dense": {"kernel": rng.normal(size=(fan_in, width)) * np.sqrt(2.0 / fan_in),
                  "bias": rng.normal(size=(width,)) * 0.1},
        "policy": {"logits": {"kernel": rng.normal(size=(fan_in, blocks)) * 2 / np.sqrt(fan_in),
                              "bias": rng.normal(size=(blocks,)) + bias_shift}}}
    fan_in = width
  params["output"] = {"kernel": rng.normal(size=(fan_in, CLASSES)) / np.sqrt(fan_in),
                      "bias": rng.normal(size=(CLASSES,))}
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)


def _fixed_policy_params(block_size, widths, on_blocks):
  """Params whose policies ignore the input: layer ``l`` runs exactly ``on_blocks[l]``."""
  params = _params(block_size, widths)
  for index, on in enumerate(on_blocks):
    logits = params[f"hidden_{index}"]["policy"]["logits"]
    nb = logits["bias"].shape[0]
    logits["kernel"] = jnp.zeros_like(logits["kernel"])
    logits["bias"] = jnp.where(jnp.isin(jnp.arange(nb), jnp.asarray(on, jnp.int32)), 50.0, -50.0)
  return params


def _inputs(batch, seed=0):
  return jax.random.normal(jax.random.PRNGKey(100 + seed), (batch, INPUT_DIM), jnp.float32)


def _check(module, params, x, config):
  """FFI vs XLA (same blocks, same traces) and vs masked-dense (1e-5); returns FFI masks."""
  model = layout.to_block_major(module, params)
  config = dataclasses.replace(config, backend="ffi-cpu").validate(model)
  logits, traces = FFI(model, x, config)
  xla_logits, xla_traces = XLA(model, x, dataclasses.replace(config, backend="xla"))
  for trace, xla_trace in zip(traces, xla_traces):
    np.testing.assert_array_equal(trace.block_index, xla_trace.block_index)
    np.testing.assert_array_equal(trace.kept, xla_trace.kept)
    assert int(trace.num_candidates) == int(xla_trace.num_candidates)
    assert int(trace.num_kept) == int(xla_trace.num_kept)
    np.testing.assert_allclose(trace.probs, xla_trace.probs, atol=1e-6)
  masks = TRACE_MASKS(traces, model.num_blocks)
  masked_dense = param_utils.jitted_apply(module)({"params": params}, x, mode="all",
                                                  block_masks=masks)[0]
  np.testing.assert_allclose(logits, masked_dense, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits, xla_logits, atol=1e-5, rtol=1e-5)
  return [np.asarray(mask) for mask in masks], traces


# Fast tier: every block size and every batch once; the other combinations are slow.
@needs_extension
@pytest.mark.parametrize("batch,block_size", tiers.split_product(
    ([1, 3, 17], [16, 32, 64, 128]), fast=[(1, 32), (3, 64), (17, 16), (17, 128)]))
def test_random_ragged_masks_exact_capacities(block_size, batch):
  widths = (4 * block_size, 3 * block_size, 5 * block_size)
  module, params = _module(block_size, widths), _params(block_size, widths, seed=batch)
  model = layout.to_block_major(module, params)
  masks, traces = _check(module, params, _inputs(batch, batch),
                         capacity.make_sparse_config(model, batch))
  assert ccjax.overflow_rate(capacity.traces_info(traces, model.num_blocks)) == 0.0
  if batch > 1:
    assert len({int(row.sum()) for mask in masks for row in mask}) > 1   # ragged


@needs_extension
@pytest.mark.parametrize("tight,batch", tiers.split_product(
    ([False, True], [1, 6, 33]), fast=[(False, 6), (True, 1), (True, 33)]))
def test_exact_top_k_policy(batch, tight):
  """The ``top_k`` test policy (exact_k): k blocks per example whatever their probability,
  with exact and with overflowing per-block / per-tile capacities."""
  block_size, widths = 16, (64, 48, 80)
  module, params = _module(block_size, widths), _params(block_size, widths, bias_shift=-3.0)
  model = layout.to_block_major(module, params)
  exact = capacity.make_sparse_config(model, batch)
  config = dataclasses.replace(
      exact, example_capacity=(2, 3, 2), buckets=None, exact_k=True,
      block_capacity=(2, 3, 2) if tight else exact.block_capacity,
      pair_capacity=(1, 1, 1) if tight else exact.pair_capacity)
  masks, traces = _check(module, params, _inputs(batch, batch), config)
  assert [int(t.num_candidates) for t in traces] == [batch * k for k in (2, 3, 2)]
  if not tight:
    assert [set(mask.sum(axis=1).tolist()) for mask in masks] == [{2.0}, {3.0}, {2.0}]


@needs_extension
@pytest.mark.parametrize("batch,block_size", tiers.split_product(
    ([1, 9, 40], [16, 64]), fast=[(1, 64), (9, 16), (40, 64)]))
def test_overflowing_capacities(block_size, batch):
  widths = (6 * block_size, 6 * block_size, 4 * block_size)
  module, params = _module(block_size, widths), _params(block_size, widths, 0.5, seed=batch)
  model = layout.to_block_major(module, params)
  config = capacity.make_sparse_config(model, batch, 0.25, example_slack=1.0)
  _, traces = _check(module, params, _inputs(batch, batch), config)
  assert ccjax.overflow_rate(capacity.traces_info(traces, model.num_blocks)) > 0.0


@needs_extension
def test_tightest_capacities_drop_by_every_rule():
  block_size, batch = 16, 11
  widths = (8 * block_size, 8 * block_size)
  module, params = _module(block_size, widths), _params(block_size, widths, 1.0, seed=3)
  x = _inputs(batch, 3)

  def kept(block_cap, pair_cap):
    config = capacity.SparseConfig(example_capacity=(3, 3), block_capacity=block_cap,
                                   pair_capacity=pair_cap)
    return [int(trace.num_kept) for trace in _check(module, params, x, config)[1]]

  loose = kept((batch, batch), (batch, batch))
  assert kept((2, 2), (batch, batch))[0] < loose[0]    # the per-block capacity binds
  assert kept((batch, batch), (1, 1))[1] < loose[1]    # the per-weight-tile capacity binds
  kept((2, 2), (1, 1))                                 # both at once


@needs_extension
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("on_blocks,expected", [
    (((), (), ()), "off"),                      # empty active sets everywhere
    (((0, 3), (0, 2), (0, 4)), "first_last"),   # first and last block of every layer
    (((0, 1, 2, 3), (0, 1, 2), (0, 1, 2, 3, 4)), "on"),
    (((1,), (), (2,)), "middle_off"),           # a layer whose input is empty
])
def test_fixed_active_sets(on_blocks, expected, batch):
  block_size = 16
  widths = (4 * block_size, 3 * block_size, 5 * block_size)
  module, params = _module(block_size, widths), _fixed_policy_params(block_size, widths, on_blocks)
  model = layout.to_block_major(module, params)
  masks, _ = _check(module, params, _inputs(batch), capacity.make_sparse_config(model, batch))
  for mask, on in zip(masks, on_blocks):
    want = np.zeros(mask.shape[1], bool)
    want[list(on)] = True
    np.testing.assert_array_equal(mask, np.broadcast_to(want, mask.shape), err_msg=expected)


@needs_extension
def test_batch1_matches_bucketed_xla_path():
  block_size = 32
  widths = (8 * block_size, 8 * block_size)
  module, params = _module(block_size, widths), _params(block_size, widths, -0.5, seed=5)
  model = layout.to_block_major(module, params)
  config = capacity.make_sparse_config(model, 1, num_buckets=4)
  for seed in range(4):
    _check(module, params, _inputs(1, seed), config)


def _run_with_threads(monkeypatch, threads, model, x, config):
  """The FFI call traced afresh under ``$CCJAX_FFI_THREADS=threads`` (read at trace time:
  a jit of the module function would reuse the first trace), checked to ask for them."""
  monkeypatch.setenv(ffi_cpu.THREADS_ENV, str(threads))
  forward = jax.jit(lambda model, x: ffi_cpu.gated_mlp_forward(model, x, config))
  assert f"num_threads = {threads} " in forward.lower(model, x).as_text()
  return forward(model, x)


@needs_extension
def test_two_threads_equal_one(monkeypatch):
  block_size, batch = 32, 24
  widths = (6 * block_size, 6 * block_size)
  module, params = _module(block_size, widths), _params(block_size, widths, seed=7)
  model = layout.to_block_major(module, params)
  config = capacity.make_sparse_config(model, batch, 0.4, backend="ffi-cpu")
  x = _inputs(batch, 7)
  outputs = [_run_with_threads(monkeypatch, threads, model, x, config) for threads in (1, 2)]
  np.testing.assert_array_equal(outputs[0][0], outputs[1][0])


@needs_extension
def test_bad_inputs_are_rejected_before_the_call():
  block_size = 16
  widths = (2 * block_size, 2 * block_size)
  model = layout.to_block_major(_module(block_size, widths), _params(block_size, widths))
  config = capacity.make_sparse_config(model, 2, backend="ffi-cpu")
  with pytest.raises(ValueError, match="x must be"):
    ffi_cpu.gated_mlp_forward(model, jnp.zeros((2, INPUT_DIM + 1)), config)
  half = model.replace(output_bias=model.output_bias.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="float32 models only"):
    ffi_cpu.gated_mlp_forward(half, jnp.zeros((2, INPUT_DIM)), config)
  bad = model.replace(output_kernel=model.output_kernel[:, :-1])
  with pytest.raises(ValueError, match="output_kernel"):
    ffi_cpu.gated_mlp_forward(bad, jnp.zeros((2, INPUT_DIM)), config)
  assert ffi_cpu.supports(model)
  assert not ffi_cpu.supports(jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), model))


def test_threads_env_is_validated(monkeypatch):
  monkeypatch.setenv(ffi_cpu.THREADS_ENV, "zero")
  with pytest.raises(ValueError, match=ffi_cpu.THREADS_ENV):
    ffi_cpu.num_threads()
  monkeypatch.setenv(ffi_cpu.THREADS_ENV, "3")
  assert ffi_cpu.num_threads() == 3


def test_backend_selection_and_fallback(monkeypatch):
  """ffi-cpu is chosen on CPU when built; without it: one warning, XLA, a clear error
  when forced."""
  monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
  on_cpu = jax.default_backend() == "cpu"
  assert ("ffi-cpu" in kernels.available_backends()) == (on_cpu and ffi_cpu.available())
  assert "ffi-cpu" not in kernels.available_backends(float32=False)
  monkeypatch.setattr(ffi_cpu, "unavailable_reason", lambda: "not built (test)")
  kernels._warn_unavailable.cache_clear()  # pylint: disable=protected-access
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert kernels.select_backend() == ("pallas-gpu" if not on_cpu else "xla")
    kernels.select_backend()
  messages = [str(w.message) for w in caught if "ffi-cpu" in str(w.message)]
  assert len(messages) == int(on_cpu) and (not messages or "XLA path" in messages[0])
  monkeypatch.setenv(kernels.BACKEND_ENV, "ffi-cpu")
  with pytest.raises(ValueError, match="CCJAX_BACKEND=ffi-cpu is not available .*xla"):
    kernels.select_backend()


@needs_extension
def test_make_inference_reports_and_runs_ffi_cpu(monkeypatch):
  monkeypatch.setenv(kernels.BACKEND_ENV, "ffi-cpu")
  block_size, widths = 16, (4 * 16, 4 * 16)
  module, params = _module(block_size, widths), _params(block_size, widths, seed=9)
  infer = ccjax.make_inference(module, params)
  assert infer.backend == "ffi-cpu"
  x = _inputs(6, 9)
  logits, info = infer(x)
  masked_dense = param_utils.jitted_apply(module)({"params": params}, x, mode="all",
                                                  block_masks=info.masks)[0]
  np.testing.assert_allclose(logits, masked_dense, atol=1e-5, rtol=1e-5)
  half = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
  with pytest.raises(ValueError, match="ffi-cpu is not available for this model's dtype"):
    ccjax.make_inference(module, half)
  monkeypatch.delenv(kernels.BACKEND_ENV)
  assert ccjax.make_inference(module, half).backend == "xla"


@needs_extension
def test_kernel_names_a_mismatched_buffer():
  """The kernel's own shape check (behind the Python one) names the layer and the buffer."""
  model = layout.to_block_major(_module(16, (32, 32)), _params(16, (32, 32)))
  x = jnp.ones((2, model.input_dim), jnp.float32)
  wrong = [jax.ShapeDtypeStruct((2, 10), jnp.float32)]  # logits
  for nb in model.num_blocks:
    wrong += [jax.ShapeDtypeStruct((2, 1), jnp.int32), jax.ShapeDtypeStruct((2, 1), jnp.bool_),
              jax.ShapeDtypeStruct((2,), jnp.int32),
              jax.ShapeDtypeStruct((2, nb + 1), jnp.float32)]  # probs: one column too many
  call = jax.ffi.ffi_call(ffi_cpu.TARGET_NAME, wrong)
  operands = ffi_cpu._layer_operands(model)  # pylint: disable=protected-access
  with pytest.raises(Exception, match=r"layer 0 probs: expected shape \[2, 2\]"):
    jax.block_until_ready(call(
        x, *operands, example_capacity=np.asarray([1, 1], np.int64),
        block_capacity=np.asarray([2, 2], np.int64), pair_capacity=np.asarray([4, 4], np.int64),
        policy_eps=np.float32(0.01), policy_scale=np.float32(0.98), exact_k=np.int64(0),
        num_threads=np.int64(1)))


@needs_extension
@pytest.mark.parametrize("batch,block_size", tiers.split_product(
    ([1, 4], [24, 48]), fast=[(1, 48), (4, 24)]))
def test_block_sizes_off_the_vector_panels(block_size, batch):
  """Block sizes that are no panel width of the kernel (16, 32, 64): the generic product,
  at batch 1 (its own path) and in a minibatch."""
  widths = (5 * block_size, 4 * block_size)
  module, params = _module(block_size, widths), _params(block_size, widths, seed=11)
  model = layout.to_block_major(module, params)
  masks, _ = _check(module, params, _inputs(batch, 11), capacity.make_sparse_config(model, batch))
  assert all(mask.sum() > 0 for mask in masks)


@needs_extension
def test_batch1_two_threads_equal_one(monkeypatch):
  """Batch 1 with work the batch-1 path shares with its helper thread (>= 512 KB of tiles
  in the gated layer), asked for 1 and 2 threads: same bits either way (each task writes
  its own partial sum, added in task order), same blocks as XLA."""
  block_size, widths = 64, (16 * 64, 16 * 64)
  module, params = _module(block_size, widths), _params(block_size, widths, 1.0, seed=12)
  model = layout.to_block_major(module, params)
  config = capacity.make_sparse_config(model, 1)
  x = _inputs(1, 12)
  masks, _ = _check(module, params, x, config)
  assert masks[0].sum() * masks[1].sum() * block_size**2 * 4 >= 512 * 1024
  config = dataclasses.replace(config, backend="ffi-cpu")
  outputs = [_run_with_threads(monkeypatch, threads, model, x, config) for threads in (1, 2)]
  np.testing.assert_array_equal(outputs[0][0], outputs[1][0])


@needs_extension
def test_batch1_helper_thread_shares_the_work_and_falls_back(monkeypatch):
  """The two-thread batch-1 path really runs tasks on the helper thread (a test hook
  offers every job and makes the caller wait for the helper to join), and with the
  helper paused, so that it never joins, every task runs on the caller (the fallback
  when the helper is asleep, descheduled or busy): the same bits as one thread in both
  cases, equal to XLA and masked dense (1e-5)."""
  block_size, widths = 64, (16 * 64, 16 * 64)
  module, params = _module(block_size, widths), _params(block_size, widths, 1.0, seed=13)
  model = layout.to_block_major(module, params)
  config = capacity.make_sparse_config(model, 1)
  x = _inputs(1, 13)
  _check(module, params, x, config)
  config = dataclasses.replace(config, backend="ffi-cpu")
  alone = _run_with_threads(monkeypatch, 1, model, x, config)
  helper = ffi_cpu_helper.HelperHooks()
  try:
    for pause, join_wait_us in ((False, 1_000_000), (True, 1_000)):
      helper.test_mode(pause, join_wait_us)
      before = helper.stats()
      for _ in range(3):
        logits, traces = _run_with_threads(monkeypatch, 2, model, x, config)
        np.testing.assert_array_equal(logits, alone[0])
        for trace, alone_trace in zip(traces, alone[1]):
          np.testing.assert_array_equal(trace.kept, alone_trace.kept)
      counts = helper.stats() - before
      if pause:
        assert counts.shared == 0 and counts.helper_tasks == 0 and counts.run_alone >= 3
      else:
        assert counts.shared >= 3 and counts.helper_tasks > 0
  finally:
    helper.test_mode()


@needs_extension
def test_batch1_concurrent_calls_agree():
  """Calls from several threads at once: one holds the helper, the others run alone; all
  give the single-thread result."""
  block_size, widths = 64, (16 * 64, 16 * 64)
  module, params = _module(block_size, widths), _params(block_size, widths, 1.0, seed=14)
  model = layout.to_block_major(module, params)
  config = dataclasses.replace(capacity.make_sparse_config(model, 1), backend="ffi-cpu")
  xs = [_inputs(1, seed) for seed in range(8)]
  expected = [np.asarray(FFI(model, x, config)[0]) for x in xs]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for _ in range(3):
      results = list(pool.map(lambda x: np.asarray(FFI(model, x, config)[0]), xs))
      for result, want in zip(results, expected):
        np.testing.assert_array_equal(result, want)
