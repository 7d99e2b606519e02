"""scripts/probe_dense_to_sparse.py: the regrouping keeps the dense function; a tiny run."""

import functools
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "probe_dense_to_sparse.py"


@functools.cache
def _probe():
  """The script as a module, loaded once (it defines absl flags)."""
  spec = importlib.util.spec_from_file_location("probe_dense_to_sparse", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_imports_beside_an_entrypoint_with_flags_of_the_same_names():
  """The script defines its flags only when run, so a process that also imports
  experiments.sweep (--seeds, --dataset, --json ...) can import its functions. A fresh
  process: a test worker may already hold another entrypoint's --seeds."""
  code = ("import importlib.util, sys; import experiments.sweep; "
          f"spec = importlib.util.spec_from_file_location('probe', {str(SCRIPT)!r}); "
          "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
          "print(callable(module.summary))")
  process = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
  assert process.returncode == 0, process.stderr[-2000:]
  assert process.stdout.strip() == "True"


def test_co_activation_permutation_is_a_balanced_grouping():
  probe = _probe()
  rng = np.random.default_rng(0)
  # Two families of units: each active on its own half of the examples.
  examples = np.zeros((64, 16))
  examples[:32, 0::2] = rng.uniform(0.5, 1.0, (32, 8))
  examples[32:, 1::2] = rng.uniform(0.5, 1.0, (32, 8))
  order = probe.co_activation_permutation(examples, block_size=8, seed=0)
  assert sorted(order.tolist()) == list(range(16))
  blocks = {frozenset(order[:8].tolist()), frozenset(order[8:].tolist())}
  assert blocks == {frozenset(range(0, 16, 2)), frozenset(range(1, 16, 2))}


def test_permute_units_keeps_the_dense_function():
  probe = _probe()
  params = probe.init_mlp(jax.random.PRNGKey(0), [32, 32], 10, 4)
  x = jax.random.normal(jax.random.PRNGKey(1), (50, 10))
  permuted = probe.permute_units(params, x, block_size=8, seed=0)
  assert not np.array_equal(np.asarray(permuted[0][0]), np.asarray(params[0][0]))
  np.testing.assert_allclose(probe.dense_logits(permuted, x), probe.dense_logits(params, x),
                             rtol=1e-5, atol=1e-5)


def test_gated_logits_with_every_block_chosen_equal_dense(monkeypatch):
  probe = _probe()
  monkeypatch.setattr(probe, "WIDTH", 32)
  monkeypatch.setattr(probe, "TAU", 1.0)
  params = probe.init_mlp(jax.random.PRNGKey(0), [32, 32], 10, 4)
  policies = [(jnp.zeros((10, 4)), jnp.zeros(4)), (jnp.zeros((32, 4)), jnp.zeros(4))]
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 10))
  logits, _, oracle = probe.gated_logits(params, policies, x, block_size=8)
  np.testing.assert_allclose(logits, probe.dense_logits(params, x), rtol=1e-6)
  assert all(float(mask.min()) == 1.0 for mask in oracle)


@pytest.mark.slow
def test_tiny_run_writes_every_row(tmp_path):
  out = tmp_path / "probe.json"
  process = subprocess.run(
      [sys.executable, str(SCRIPT), "--dataset=digits", "--dense_steps=20", "--imitate_steps=5",
       "--finetune_steps=5", "--block_sizes=128", f"--json={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert process.returncode == 0, process.stderr[-2000:]
  rows = json.loads(out.read_text())["seeds"]["0"]
  assert set(rows) == {"dense 512 (20 steps)", "dense 128, same MACs (20 steps)",
                       "dense 128, same MACs (30 steps)",
                       "dense 128, MACs of the gated net with blocks of 128 (30 steps)",
                       "gated blocks of 128, contiguous blocks (30 steps)",
                       "gated blocks of 128, co-activation blocks (30 steps)"}
  assert all(0 <= row["test"] <= 100 for row in rows.values())
  assert "| gated blocks of 128, co-activation blocks (30 steps) |" in process.stdout


def test_summary_pairs_gated_rows_with_dense_of_the_same_steps():
  probe = _probe()
  rows = lambda gated, dense: {"dense 128, same MACs (3 steps)": {"valid": 1.0, "test": dense},
                               "dense 160 (3 steps)": {"valid": 1.0, "test": 10.0},
                               "gated b (3 steps)": {"valid": 1.0, "test": gated}}
  results = {"dense_steps": 1, "imitate_steps": 1, "finetune_steps": 1,
             "matched_dense": {"gated b (3 steps)": "dense 160 (3 steps)"},
             "seeds": {"0": rows(10.0, 12.0), "1": rows(11.0, 12.0)}}
  table = probe.summary(results)
  # Differences -2 and -1: mean -1.5, sample std 0.707, t(0.975, 1) = 12.71 -> ±6.35;
  # against dense 160: 0 and +1.
  assert ("| gated b (3 steps) | 1.00 ± 0.00 | 10.50 ± 0.71 | -1.50 ± 6.35 | +0.50 ± 6.35 |"
          in table)


def test_gated_macs_count_the_active_blocks_and_both_policies():
  probe = _probe()
  # 40 inputs, 10 classes, 512 units at tau 1/4 (128 active), blocks of 8 (64 blocks):
  # 40*128 + 128*128 + 128*10 + (40 + 128) * 64.
  assert probe.gated_macs(40, 10, 8) == 22784 + 10752


def test_low_rank_policy_is_the_product_and_costs_its_rank():
  probe = _probe()
  policy = probe.init_policy(jax.random.PRNGKey(0), 12, 4, rank=3)
  policy = (policy[0], jax.random.normal(jax.random.PRNGKey(1), (3, 4)), jnp.ones(4))
  hidden = jax.random.normal(jax.random.PRNGKey(2), (5, 12))
  np.testing.assert_allclose(probe.policy_logits_of(policy, hidden),
                             hidden @ (policy[0] @ policy[1]) + 1.0, rtol=1e-5, atol=1e-5)
  # Rank 16 on blocks of 8: 40*16 + 16*64 and 128*16 + 16*64 instead of (40 + 128) * 64.
  assert probe.gated_macs(40, 10, 8, rank=16) == 22784 + 40 * 16 + 128 * 16 + 2 * 16 * 64
