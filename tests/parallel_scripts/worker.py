"""Subprocess worker for tests/parallel_test.py (needs its own device count / processes).

Subcommands:
  train    trains a tiny GatedMLP for a few steps on one or more meshes (tags ``1``,
           ``4``, ``8``: a mesh of that many devices, replicated state; suffix ``h``:
           kernels sharded along the hidden axis) and writes the final states and
           per-step metrics to ``--out`` (``.npz``, process 0 only); optionally saves
           one tag's final state with orbax (all processes take part).
  restore  restores an orbax checkpoint onto a mesh of ``--num_devices`` devices,
           checks its placement, writes the restored values to ``--out`` and
           optionally saves it again.

Multi-process runs pass ``--coordinator_address --num_processes --process_id`` and
``--local_devices`` (CPU devices per process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

GLOBAL_BATCH = 32
FEATURES = 20
CLASSES = 10
STEPS = 5
SEED = 0


def parse_args(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("command", choices=("train", "restore"))
  parser.add_argument("--meshes", default="1,8")
  parser.add_argument("--out", required=True)
  parser.add_argument("--save_checkpoint", default=None)
  parser.add_argument("--checkpoint_tag", default=None)
  parser.add_argument("--checkpoint", default=None)
  parser.add_argument("--num_devices", type=int, default=None)
  parser.add_argument("--shard_hidden", action="store_true")
  parser.add_argument("--local_devices", type=int, default=None)
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  return parser.parse_args(argv)


def make_data():
  """Deterministic generated classification data: ``x [steps, batch, features]``."""
  rng = np.random.default_rng(SEED)
  centers = rng.normal(size=(CLASSES, FEATURES)).astype(np.float32)
  y = rng.integers(0, CLASSES, size=(STEPS, GLOBAL_BATCH)).astype(np.int32)
  x = centers[y] + 0.5 * rng.normal(size=(STEPS, GLOBAL_BATCH, FEATURES)).astype(np.float32)
  return x, y


def make_model_and_config():
  import ccjax  # pylint: disable=g-import-not-at-top
  model = ccjax.GatedMLP(hidden=(64, 64), num_classes=CLASSES, block_size=16)
  # batch_mean (leave-one-out) baseline and the L_b/L_e/L_v batch statistics all
  # depend on the whole batch: the strongest check of global-batch semantics.
  config = ccjax.TrainConfig(baseline="batch_mean", lr=1e-2, policy_lr=1e-2, tau=0.5)
  return model, config


def initial_state(model, config):
  import jax  # pylint: disable=g-import-not-at-top
  import ccjax  # pylint: disable=g-import-not-at-top
  init = jax.jit(lambda: ccjax.init_train_state(
      model, config, jax.random.PRNGKey(SEED), np.zeros((GLOBAL_BATCH, FEATURES), np.float32)))
  return init()


def flatten(tree, prefix):
  import jax  # pylint: disable=g-import-not-at-top
  from ccjax import parallel  # pylint: disable=g-import-not-at-top
  host = parallel.to_host(tree)
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]:
    flat[f"{prefix}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  return flat


def validation_errors():
  """Messages of the ValueErrors that bad sizes raise on this device count."""
  import jax  # pylint: disable=g-import-not-at-top
  from ccjax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  attempts = {
      "batch": lambda: parallel.shard_batch({"x": np.zeros((mesh.devices.size + 2, 3))}, mesh),
      "slice": lambda: parallel.process_batch_slice(mesh.devices.size + 2, mesh),
      "mesh": lambda: parallel.make_mesh(jax.device_count() + 1),
  }
  if jax.process_count() > 1:
    attempts["uneven_mesh"] = lambda: parallel.make_mesh(jax.process_count() + 1)
  errors = {}
  for name, attempt in attempts.items():
    try:
      attempt()
      errors[name] = None
    except ValueError as error:
      errors[name] = str(error)
  return errors


def train(args):
  import jax  # pylint: disable=g-import-not-at-top
  import ccjax  # pylint: disable=g-import-not-at-top
  from ccjax import parallel  # pylint: disable=g-import-not-at-top

  model, config = make_model_and_config()
  step_fn = ccjax.make_train_step(model, config)
  xs, ys = make_data()
  results = {}
  report = {"process_count": jax.process_count(), "device_count": jax.device_count(),
            "errors": validation_errors()}
  for tag in args.meshes.split(","):
    shard_hidden = tag.endswith("h")
    mesh = parallel.make_mesh(int(tag.rstrip("h")))
    state = parallel.place_state(initial_state(model, config), mesh, shard_hidden=shard_hidden)
    shardings = parallel.state_sharding(state, mesh, shard_hidden=shard_hidden)
    jitted = parallel.make_parallel_train_step(step_fn, mesh, shardings)
    metrics_by_step = []
    for step in range(STEPS):
      batch = {"x": xs[step], "y": ys[step]}
      if jax.process_count() > 1 and step % 2:
        # Odd steps: each process feeds only its own rows.
        rows = parallel.process_batch_slice(GLOBAL_BATCH, mesh)
        batch = parallel.shard_batch({k: v[rows] for k, v in batch.items()}, mesh,
                                     process_local=True)
      else:
        batch = parallel.shard_batch(batch, mesh)
      state, metrics = jitted(state, batch)
      metrics_by_step.append(parallel.to_host(metrics))
    kernel = state.params["hidden_0"]["dense"]["kernel"]
    report[tag] = {"mesh_size": int(mesh.devices.size),
                   "kernel_spec": str(kernel.sharding.spec),
                   "kernel_shard_shape": list(kernel.addressable_shards[0].data.shape)}
    results.update(flatten(state, f"{tag}/state"))
    for name in metrics_by_step[0]:
      results[f"{tag}/metrics/{name}"] = np.stack([m[name] for m in metrics_by_step])
    if args.save_checkpoint and tag == args.checkpoint_tag:
      import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(args.save_checkpoint), state)
        checkpointer.wait_until_finished()
  if parallel.is_primary_process():
    np.savez(args.out, **results)
    with open(args.out + ".json", "w") as f:
      json.dump(report, f)


def restore(args):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from ccjax import parallel  # pylint: disable=g-import-not-at-top

  model, config = make_model_and_config()
  mesh = parallel.make_mesh(args.num_devices)
  shape = jax.eval_shape(lambda: initial_state(model, config))
  target = parallel.abstract_state_for(shape, mesh, shard_hidden=args.shard_hidden)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(os.path.abspath(args.checkpoint), target)
  expected = parallel.state_sharding(shape, mesh, shard_hidden=args.shard_hidden)
  placed_right = all(
      leaf.sharding.is_equivalent_to(sharding, leaf.ndim) for leaf, sharding in zip(
          jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(expected)))
  kernel = state.params["hidden_0"]["dense"]["kernel"]
  report = {"device_count": jax.device_count(), "mesh_size": int(mesh.devices.size),
            "placed_right": bool(placed_right),
            "kernel_shard_shape": list(kernel.addressable_shards[0].data.shape)}
  if args.save_checkpoint:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.abspath(args.save_checkpoint), state)
      checkpointer.wait_until_finished()
  if parallel.is_primary_process():
    np.savez(args.out, **flatten(state, "state"))
    with open(args.out + ".json", "w") as f:
      json.dump(report, f)


def main(argv):
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  if args.local_devices is not None:
    jax.config.update("jax_num_cpu_devices", args.local_devices)
  from ccjax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                  args.process_id, initialization_timeout=60)
  if args.command == "train":
    train(args)
  else:
    restore(args)
  if jax.process_count() > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1:])
