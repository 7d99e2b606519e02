"""Tests of the sparse MLP path (ccjax.inference.{layout,capacity,batch1,minibatch,mlp}):
sparse inference equals masked-dense inference."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from ccjax.inference import batch1
from ccjax.inference import capacity
from ccjax.inference import kernels
from ccjax.inference import layout
from ccjax.inference import minibatch
from ccjax.inference import mlp
from tests import experiment_utils
from tests import param_utils

# References at full float32 precision (XLA:GPU would use TF32 by default).
pytestmark = pytest.mark.usefixtures("full_float32_matmuls")

INPUT_DIM, HIDDEN, BLOCK, CLASSES = 12, (32, 48, 32), 8, 5
NUM_BLOCKS = tuple(width // BLOCK for width in HIDDEN)
FORWARD = jax.jit(mlp.sparse_forward, static_argnums=2)
TRACE_MASKS = jax.jit(capacity.trace_masks, static_argnums=1)
# Every equivalence test runs on every backend this machine has (CI builds ffi-cpu).
with_backends = pytest.mark.parametrize("backend", kernels.available_backends())


def _model():
  return ccjax.GatedMLP(hidden=HIDDEN, num_classes=CLASSES, block_size=BLOCK)


@jax.jit
def MASKED_DENSE(params, x, masks):  # pylint: disable=invalid-name
  """The module itself with the given block masks (the masked-dense reference)."""
  return _model().apply({"params": params}, x, mode="all", block_masks=masks)[0]


def _overflow_rate(traces):
  return ccjax.overflow_rate(capacity.traces_info(traces, NUM_BLOCKS))


def _block_major(params):
  return layout.to_block_major(_model(), params)


def _policy_probs(params, hidden, layer, eps):
  policy = _model().hidden_weights(params)[layer].policy
  return batch1.block_probs(hidden @ policy.kernel + policy.bias, eps)


def _params(seed, bias_shift=0.0, policy_scale=2.0):
  """Random params in the GatedMLP layout; policy logits spread so masks are ragged."""
  rng = np.random.default_rng(seed)
  params, fan_in = {}, INPUT_DIM
  for index, width in enumerate(HIDDEN):
    blocks = width // BLOCK
    params[f"hidden_{index}"] = {
        "dense": {"kernel": (rng.normal(size=(fan_in, width)) / np.sqrt(fan_in)).astype(np.float32),
                  "bias": (rng.normal(size=(width,)) * 0.1).astype(np.float32)},
        "policy": {"logits": {
            "kernel": (rng.normal(size=(fan_in, blocks)) * policy_scale).astype(np.float32),
            "bias": (rng.normal(size=(blocks,)) + bias_shift).astype(np.float32)}}}
    fan_in = width
  params["output"] = {"kernel": rng.normal(size=(fan_in, CLASSES)).astype(np.float32),
                      "bias": np.zeros((CLASSES,), np.float32)}
  return params


def test_params_helper_matches_gated_mlp_layout():
  shapes = jax.eval_shape(lambda: _model().init(
      {"params": jax.random.PRNGKey(0), "gate": jax.random.PRNGKey(0)},
      jnp.zeros((1, INPUT_DIM)), mode="sample")["params"])
  chex_shapes = jax.tree_util.tree_map(lambda a: a.shape, shapes)
  assert chex_shapes == jax.tree_util.tree_map(lambda a: a.shape, _params(0))


def _inputs(seed, batch):
  return jax.random.normal(jax.random.PRNGKey(1000 + seed), (batch, INPUT_DIM))


def _check_against_masked_dense(params, x, config):
  model = _block_major(params)
  logits, traces = FORWARD(model, x, config)
  masks = TRACE_MASKS(traces, NUM_BLOCKS)
  expected = MASKED_DENSE(params, x, masks)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
  return logits, masks, traces


@with_backends
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("seed", range(3))
def test_exact_capacity_equals_threshold_mode(seed, batch, backend):
  params, x = _params(seed), _inputs(seed, batch)
  model = _block_major(params)
  logits, masks, traces = _check_against_masked_dense(
      params, x, capacity.make_sparse_config(model, batch, backend=backend))
  ref_logits, aux = param_utils.jitted_apply(_model())({"params": params}, x, mode="threshold")
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
  for mask, layer_aux in zip(masks, aux):
    np.testing.assert_array_equal(mask, layer_aux.mask)
  assert _overflow_rate(traces) == 0.0


@with_backends
def test_masks_are_ragged_per_example(backend):
  params, x = _params(0), _inputs(0, 16)
  model = _block_major(params)
  _, masks, _ = _check_against_masked_dense(
      params, x, capacity.make_sparse_config(model, 16, backend=backend))
  counts = np.asarray(masks[0]).sum(axis=1)
  assert len(set(counts.tolist())) > 2


@with_backends
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("shift,expected", [(-50.0, 0.0), (50.0, 1.0)])
def test_all_blocks_off_or_on(shift, expected, batch, backend):
  params, x = _params(3, bias_shift=shift, policy_scale=0.0), _inputs(3, batch)
  model = _block_major(params)
  _, masks, _ = _check_against_masked_dense(
      params, x, capacity.make_sparse_config(model, batch, backend=backend))
  for mask in masks:
    np.testing.assert_array_equal(mask, expected)


def _reference_masks(params, x, example_cap, block_cap, pair_cap, eps=0.01):
  """The documented drop rules, written independently in numpy."""
  hidden = np.asarray(x, np.float64)
  masks, previous, candidates = [], None, 0
  for layer, nb in enumerate(NUM_BLOCKS):
    probs = np.asarray(_policy_probs(params, jnp.asarray(hidden, jnp.float32), layer, eps))
    batch = probs.shape[0]
    mask = np.zeros((batch, nb), bool)
    candidates += int(np.sum(probs > 0.5))
    for b in range(batch):                                    # threshold + per-example top-k
      order = np.argsort(-probs[b], kind="stable")[:example_cap[layer]]
      mask[b, order] = probs[b, order] > 0.5
    if batch > 1:
      for j in range(nb):                                     # per-block capacity
        users = sorted(np.flatnonzero(mask[:, j]), key=lambda b: (-probs[b, j], b))
        mask[users[block_cap[layer]:], j] = False
      if previous is not None:                                # per-weight-block capacity
        drop = np.zeros_like(mask)
        for i in range(previous.shape[1]):
          for j in range(nb):
            users = sorted(np.flatnonzero(previous[:, i] & mask[:, j]),
                           key=lambda b: (-probs[b, j], b))
            drop[users[pair_cap[layer]:], j] = True
        mask &= ~drop
    dense = _model().hidden_weights(params)[layer].dense
    hidden = np.maximum(hidden @ dense.kernel + dense.bias, 0.0)
    hidden = hidden * np.repeat(mask, BLOCK, axis=1)
    masks.append(mask.astype(np.float32))
    previous = mask
  return masks, candidates


@with_backends
@pytest.mark.parametrize("batch", [1, 9, 16])
@pytest.mark.parametrize("seed", range(3))
def test_capacity_overflow_follows_documented_rules(seed, batch, backend):
  params, x = _params(10 + seed, bias_shift=1.0), _inputs(seed, batch)
  model = _block_major(params)
  config = capacity.SparseConfig(example_capacity=(2, 3, 2), block_capacity=(3, 4, 3),
                                 pair_capacity=(1, 2, 1), backend=backend).validate(model)
  _, masks, traces = _check_against_masked_dense(params, x, config)
  expected, candidates = _reference_masks(params, x, config.example_capacity,
                                          config.block_capacity, config.pair_capacity)
  for mask, ref in zip(masks, expected):
    np.testing.assert_array_equal(mask, ref)
  kept = sum(float(np.sum(ref)) for ref in expected)
  np.testing.assert_allclose(_overflow_rate(traces),
                             (candidates - kept) / candidates, rtol=1e-6)
  if batch > 1:
    assert kept < candidates   # the capacities really overflow in this configuration


def test_overflow_rate_counts_dropped_candidates():
  params, x = _params(11, bias_shift=1.0), _inputs(1, 8)
  model = _block_major(params)
  config = capacity.SparseConfig((1, 1, 1), (8, 8, 8), (8, 8, 8)).validate(model)
  _, traces = FORWARD(model, x, config)
  _, aux = param_utils.jitted_apply(_model())({"params": params}, x, mode="threshold")
  candidates = np.asarray(aux[0].mask).sum()
  kept = np.asarray(traces[0].kept).sum()
  assert int(traces[0].num_candidates) == candidates
  assert kept == np.sum(np.asarray(aux[0].mask).sum(axis=1) > 0)


@pytest.mark.parametrize("seed", range(3))
def test_bucketed_batch1_matches_unbucketed(seed):
  params, x = _params(20 + seed), _inputs(seed, 1)
  model = _block_major(params)
  plain = capacity.make_sparse_config(model, 1)
  bucketed = capacity.make_sparse_config(model, 1, num_buckets=3)
  assert bucketed.buckets is not None
  logits, _, _ = _check_against_masked_dense(params, x, bucketed)
  np.testing.assert_allclose(logits, FORWARD(model, x, plain)[0], atol=1e-5)


def test_group_entries_orders_by_priority_and_drops_overflow():
  group = jnp.array([1, 0, 1, 1, 2, 1])
  priority = jnp.array([0.2, 0.9, 0.8, 0.8, 0.5, 0.1])
  valid = jnp.array([True, True, True, True, False, True])
  grouping = minibatch.group_entries(group, priority, valid, num_groups=3, capacity=2)
  # group 0: [1, empty]; group 1: entries 2 and 3 (tie -> lower index first); group 2: empty.
  np.testing.assert_array_equal(grouping.entry_of_slot, [1, 6, 2, 3, 6, 6])
  np.testing.assert_array_equal(grouping.slot_of_entry, [6, 0, 2, 3, 6, 6])


def test_block_major_layout_matches_dense_kernels():
  params = _params(0)
  model = _block_major(params)
  kernel = _model().hidden_weights(params)[1].dense.kernel    # [32, 48]: 4 in, 6 out blocks
  block = model.layers[1].kernel[2 * 4 + 3]                  # output block 2, input block 3
  np.testing.assert_array_equal(block, kernel[24:32, 16:24])
  np.testing.assert_array_equal(model.layers[0].kernel[1],
                                _model().hidden_weights(params)[0].dense.kernel[:, 8:16].T)
  assert model.input_dim == INPUT_DIM and model.num_blocks == NUM_BLOCKS


@with_backends
def test_trained_digits_model_sparse_predictions_match_masked_dense(backend):
  from sklearn.datasets import load_digits
  digits = load_digits()
  x = jnp.asarray(digits.data[:256] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target[:256], jnp.int32)
  model = ccjax.GatedMLP(hidden=(32, 32), num_classes=10, block_size=8)
  config = ccjax.TrainConfig(tau=0.5, lr=3e-3, policy_lr=3e-3)
  state = ccjax.init_train_state(model, config, jax.random.PRNGKey(0), x[:2])
  step = jax.jit(ccjax.make_train_step(model, config))
  for index in range(6):
    batch = slice(32 * (index % 8), 32 * (index % 8 + 1))
    state, _ = step(state, {"x": x[batch], "y": y[batch]})
  block_model = layout.to_block_major(model, state.params)
  ref_logits, aux = param_utils.jitted_apply(model)({"params": state.params}, x,
                                                    mode="threshold")
  ref_masks = [layer_aux.mask for layer_aux in aux]
  for batch, starts in ((1, (0, 37, 101)), (128, (0, 128))):
    cfg = capacity.make_sparse_config(block_model, batch, backend=backend)
    for start in starts:
      chunk = x[start:start + batch]
      logits, traces = FORWARD(block_model, chunk, cfg)
      masks = TRACE_MASKS(traces, (4, 4))
      chunk_masks = [ref[start:start + batch] for ref in ref_masks]
      for mask, ref in zip(masks, chunk_masks):
        np.testing.assert_array_equal(mask, ref)
      masked_dense = param_utils.jitted_apply(model)({"params": state.params}, chunk,
                                                     mode="all", block_masks=chunk_masks)[0]
      np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(masked_dense, -1))
      np.testing.assert_allclose(logits, ref_logits[start:start + batch], atol=1e-5)


def test_bad_configs_raise():
  model = _block_major(_params(0))
  with pytest.raises(ValueError, match="example_capacity"):
    capacity.SparseConfig((0, 1, 1), (1, 1, 1), (1, 1, 1)).validate(model)
  with pytest.raises(ValueError, match="example_capacity"):
    capacity.SparseConfig((5, 1, 1), (1, 1, 1), (1, 1, 1)).validate(model)
  with pytest.raises(ValueError, match="active_fraction"):
    capacity.make_sparse_config(model, 4, 1.5)
  with pytest.raises(ValueError, match="batch_size"):
    capacity.make_sparse_config(model, 0)
  with pytest.raises(ValueError, match="backend"):
    capacity.make_sparse_config(model, 4, backend="cuda")
  ungated = ccjax.GatedMLP(hidden=(16,), num_classes=3, block_size=8, gated=False)
  params = ungated.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)), mode="all")["params"]
  with pytest.raises(ValueError, match="gated"):
    layout.to_block_major(ungated, params)


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    import ccjax
    from ccjax.inference import capacity, layout, mlp
    assert len(jax.devices()) == 8, jax.devices()
    model = ccjax.GatedMLP(hidden=(32, 48), num_classes=5, block_size=8)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (32, 12))
    params = model.init({"params": key, "gate": key}, x, mode="sample")["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v * 40.0 if "policy" in jax.tree_util.keystr(path) else v, params)
    block_model = layout.to_block_major(model, params)
    config = capacity.SparseConfig((2, 3), (5, 6), (1, 1))
    forward = jax.jit(mlp.sparse_forward, static_argnums=2)
    expected, expected_traces = forward(block_model, x, config)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded_x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    replicated = jax.device_put(block_model, NamedSharding(mesh, PartitionSpec()))
    logits, traces = forward(replicated, sharded_x, config)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-6)
    for a, b in zip(traces, expected_traces):
      np.testing.assert_array_equal(np.asarray(a.kept), np.asarray(b.kept))
    rate = ccjax.overflow_rate(capacity.traces_info(traces, (4, 6)))
    assert 0 < rate < 1, rate
    print("OK", rate)
    """)


@pytest.mark.slow  # a multi-device subprocess, 13 s
def test_sharded_batch_equals_unsharded():
  env = experiment_utils.xla_flags_env(8)
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], capture_output=True,
                          text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout


def test_pair_buckets_are_sorted_distinct_products():
  assert batch1.pair_buckets((2, 4), (1, 3)) == (2, 4, 6, 12)
  assert batch1.pair_buckets((4,), (4,)) == (16,)


@with_backends
@pytest.mark.parametrize("shift", [-50.0, 0.0, 1.0, 50.0])
def test_bucketed_batch1_follows_documented_rules(shift, backend):
  """Pair-count buckets (all off, ragged, overflowing, all on) never change the result."""
  params = _params(30, bias_shift=shift, policy_scale=0.0 if abs(shift) > 10 else 2.0)
  model = _block_major(params)
  config = capacity.SparseConfig(example_capacity=(3, 5, 4), block_capacity=(1, 1, 1),
                                 pair_capacity=(1, 1, 1), buckets=((1, 2, 3), (2, 5), (1, 3, 4)),
                                 backend=backend).validate(model)
  for seed in range(4):
    x = _inputs(40 + seed, 1)
    _, masks, _ = _check_against_masked_dense(params, x, config)
    expected, _ = _reference_masks(params, x, config.example_capacity, config.block_capacity,
                                   config.pair_capacity)
    for mask, ref in zip(masks, expected):
      np.testing.assert_array_equal(mask, ref)


def test_group_entries_packed_sort_matches_two_key_sort():
  rng = np.random.default_rng(5)
  group = jnp.asarray(rng.integers(0, 6, size=200), jnp.int32)
  # Probabilities above 0.5 with exact ties and neighbours one ulp apart, and 1.0.
  base = np.float32(0.75)
  choices = np.array([0.5000001, base, np.nextafter(base, np.float32(1)), 0.99, 1.0], np.float32)
  priority = jnp.asarray(rng.choice(choices, size=200))
  valid = jnp.asarray(rng.random(200) < 0.8)
  plain = minibatch.group_entries(group, priority, valid, num_groups=6, capacity=9)
  packed = minibatch.group_entries(group, priority, valid, num_groups=6, capacity=9,
                                priority_above_half=True)
  np.testing.assert_array_equal(packed.entry_of_slot, plain.entry_of_slot)
  np.testing.assert_array_equal(packed.slot_of_entry, plain.slot_of_entry)
