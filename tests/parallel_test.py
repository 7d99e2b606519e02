"""Tests for ccjax.parallel.

The device-count tests run ``tests/parallel_scripts/worker.py`` in subprocesses, since
the number of (simulated CPU) devices is fixed when JAX starts:
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` gives 8 devices; no flag gives 1.
The two-process test starts two workers joined by ``jax.distributed.initialize`` on a
loopback port (CPU collectives: gloo), each with 2 CPU devices.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ccjax
from ccjax import parallel
from tests import experiment_utils

WORKER = os.path.join(os.path.dirname(__file__), "parallel_scripts", "worker.py")
TIMEOUT_S = 240
TOL = 1e-5


def _env(num_devices: int | None) -> dict[str, str]:
  return experiment_utils.xla_flags_env(num_devices)


def _run_worker(args: list[str], num_devices: int | None) -> None:
  result = subprocess.run([sys.executable, WORKER, *args], env=_env(num_devices),
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  assert result.returncode == 0, f"worker {args} failed:\n{result.stderr[-4000:]}"


def _load(path: str) -> tuple[dict[str, np.ndarray], dict]:
  with np.load(path) as data:
    arrays = {name: data[name] for name in data.files}
  with open(path + ".json") as f:
    return arrays, json.load(f)


def _assert_same(arrays, tag, reference_tag, atol=TOL, rtol=TOL, other=None):
  other = arrays if other is None else other
  keys = [k[len(reference_tag):] for k in arrays if k.startswith(reference_tag + "/")]
  assert keys
  for key in keys:
    np.testing.assert_allclose(other[tag + key], arrays[reference_tag + key], atol=atol,
                               rtol=rtol, err_msg=f"{tag}{key} vs {reference_tag}{key}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One 8-device process trains on meshes of 1, 4 and 8 devices (and 8, hidden-sharded)."""
  workdir = tmp_path_factory.mktemp("parallel")
  out = str(workdir / "train.npz")
  checkpoint = str(workdir / "ckpt_8h")
  _run_worker(["train", "--meshes", "1,4,8,8h", "--out", out, "--save_checkpoint", checkpoint,
               "--checkpoint_tag", "8h"], num_devices=8)
  arrays, report = _load(out)
  return workdir, arrays, report, checkpoint


@pytest.mark.slow  # eight simulated devices (the trained fixture); the sharding unit tests stay fast
def test_eight_devices_match_one_device(trained):
  _, arrays, report, _ = trained
  assert report["device_count"] == 8
  assert "batch_size" in report["errors"]["batch"]
  assert "batch_size" in report["errors"]["slice"]
  assert "num_devices" in report["errors"]["mesh"]
  assert report["8"]["mesh_size"] == 8 and report["1"]["mesh_size"] == 1
  assert report["8h"]["kernel_spec"] == "P(None, 'data')"
  assert report["8h"]["kernel_shard_shape"] == [20, 8]
  for tag in ("4", "8", "8h"):
    _assert_same(arrays, tag, "1")
  # The run really trained (so matching is not trivial): parameters moved and the
  # policy statistics vary over steps.
  assert not np.allclose(arrays["1/metrics/param_norm"][0], arrays["1/metrics/param_norm"][-1])
  assert np.ptp(arrays["1/metrics/l_b"]) > 0


def test_batch_statistics_are_not_per_shard_means():
  """Sanity check that the equivalence test is sensitive: per-shard statistics differ."""
  rng = np.random.default_rng(0)
  probs = jnp.asarray(rng.uniform(0.05, 0.95, size=(32, 4)), jnp.float32)
  cost = jnp.asarray(rng.uniform(size=(32,)), jnp.float32)
  shards = jnp.split(probs, 8)
  for fn in (lambda p: ccjax.block_balance_loss(p, 0.5), ccjax.variance_loss):
    per_shard = np.mean([fn(s) for s in shards])
    assert abs(float(fn(probs)) - per_shard) > 1e-3
  global_baseline = ccjax.compute_baseline("batch_mean", cost)
  shard_baseline = jnp.concatenate([ccjax.compute_baseline("batch_mean", c)
                                    for c in jnp.split(cost, 8)])
  assert float(jnp.max(jnp.abs(global_baseline - shard_baseline))) > 1e-3


@pytest.mark.slow  # uses the eight-device fixture
def test_checkpoint_moves_between_device_counts(trained):
  workdir, arrays, _, checkpoint_8 = trained
  # Written sharded on 8 devices -> restored on 1 device (a fresh 1-device process).
  out_1 = str(workdir / "restored_1.npz")
  checkpoint_1 = str(workdir / "ckpt_1")
  _run_worker(["restore", "--checkpoint", checkpoint_8, "--out", out_1,
               "--save_checkpoint", checkpoint_1], num_devices=None)
  restored_1, report_1 = _load(out_1)
  assert report_1 == {"device_count": 1, "mesh_size": 1, "placed_right": True,
                      "kernel_shard_shape": [20, 64]}
  _assert_same({**arrays, **restored_1}, "state", "8h/state", atol=0, rtol=0)
  # Written on 1 device -> restored onto 8 devices, hidden-sharded.
  out_8 = str(workdir / "restored_8.npz")
  _run_worker(["restore", "--checkpoint", checkpoint_1, "--out", out_8, "--num_devices", "8",
               "--shard_hidden"], num_devices=8)
  restored_8, report_8 = _load(out_8)
  assert report_8 == {"device_count": 8, "mesh_size": 8, "placed_right": True,
                      "kernel_shard_shape": [20, 8]}
  _assert_same({**arrays, **restored_8}, "state", "8h/state", atol=0, rtol=0)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


# Slow tier (multi-process): two workers joined over gloo, then a restore (~22 s of CPU);
# the eight-device run above keeps sharding in the fast tier.
@pytest.mark.slow
def test_two_processes_match_single_process(trained):
  workdir, arrays, _, _ = trained
  out = str(workdir / "two_process.npz")
  checkpoint = str(workdir / "ckpt_two_process")
  address = f"localhost:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, WORKER, "train", "--meshes", "4", "--out", out, "--local_devices", "2",
       "--save_checkpoint", checkpoint, "--checkpoint_tag", "4",
       "--coordinator_address", address, "--num_processes", "2", "--process_id", str(i)],
      env=_env(None), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  errors = []
  try:
    for proc in procs:
      errors.append(proc.communicate(timeout=TIMEOUT_S)[1])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  codes = [proc.returncode for proc in procs]
  if any(codes):
    text = "\n".join(errors)
    if "not implemented on the CPU backend" in text or "cpu_collectives" in text:
      pytest.skip(f"this JAX build has no multi-process CPU collectives: {text[-500:]}")
    pytest.fail(f"two-process run failed with codes {codes}:\n{text[-4000:]}")
  two_process, report = _load(out)
  assert report["process_count"] == 2 and report["device_count"] == 4
  assert report["4"]["mesh_size"] == 4
  assert "num_devices" in report["errors"]["uneven_mesh"]
  assert "batch_size" in report["errors"]["batch"]
  merged = {**arrays, **{"mp" + k[1:]: v for k, v in two_process.items()}}
  _assert_same(merged, "mp", "4")
  _assert_same(merged, "mp", "1")
  # The checkpoint both processes wrote restores on a single device, values identical.
  out_1 = str(workdir / "two_process_restored.npz")
  _run_worker(["restore", "--checkpoint", checkpoint, "--out", out_1], num_devices=None)
  restored, _ = _load(out_1)
  _assert_same({**two_process, **restored}, "state", "4/state", atol=0, rtol=0)


# In-process checks (this pytest process sees one CPU device unless XLA_FLAGS says more).


def test_initialize_distributed_without_settings_is_a_no_op():
  assert parallel.initialize_distributed(None, None, None) is False
  assert jax.process_count() == 1


@pytest.mark.parametrize("kwargs, flag", [
    (dict(coordinator_address="localhost:1234"), "num_processes"),
    (dict(num_processes=2, process_id=0), "coordinator_address"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "coordinator_address"),
    (dict(coordinator_address="localhost:1234", num_processes=0, process_id=0), "num_processes"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2), "process_id"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=-1), "process_id"),
    (dict(coordinator_address="auto", num_processes=2), "num_processes"),
])
def test_initialize_distributed_validates(kwargs, flag):
  with pytest.raises(ValueError, match=flag):
    parallel.initialize_distributed(**kwargs)


def test_make_mesh():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data",)
  assert mesh.devices.size == jax.device_count()
  assert parallel.make_mesh(1).devices.tolist() == [jax.devices()[0]]
  for bad in (0, jax.device_count() + 1, 1.5):
    with pytest.raises(ValueError, match="num_devices"):
      parallel.make_mesh(bad)


def test_shard_batch_and_replicate_on_one_device():
  mesh = parallel.make_mesh(1)
  batch = {"x": np.arange(12, dtype=np.float32).reshape(4, 3), "y": np.arange(4)}
  placed = parallel.shard_batch(batch, mesh)
  chex.assert_trees_all_equal(parallel.to_host(placed), batch)
  assert placed["x"].sharding == parallel.batch_sharding(mesh)
  assert parallel.process_batch_slice(4, mesh) == slice(0, 4)
  tree = {"kernel": jnp.ones((3, 8)), "bias": jnp.zeros(8), "key": jax.random.key(0)}
  placed_tree = parallel.place_state(tree, mesh, shard_hidden=True)
  assert placed_tree["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "data")
  assert placed_tree["bias"].sharding.spec == jax.sharding.PartitionSpec()
  abstract = parallel.abstract_state_for(tree, mesh)
  assert abstract["kernel"].shape == (3, 8)
  assert abstract["kernel"].sharding == parallel.replicated_sharding(mesh)
  assert parallel.is_primary_process()


def test_shard_batch_validates():
  mesh = parallel.make_mesh(1)
  with pytest.raises(ValueError, match="leading"):
    parallel.shard_batch({"x": np.zeros((4, 2)), "y": np.zeros(3)}, mesh)
  with pytest.raises(ValueError, match="leading"):
    parallel.shard_batch({}, mesh)
