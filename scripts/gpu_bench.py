r"""The prepared GPU measurement of issue 20 (one short run, < 6 minutes on an H100/H200;
``scripts/gpu_bench.sh`` runs the real-kernel tests first, then this).

1. ``experiments.bench_inference`` on the reference net (784-4096x3-10, blocks of 64,
   tau = 1/8) at batch 1, 8, 32, 128, dense vs sparse, with ``--backend=pallas-gpu``
   (float32 and bfloat16) and ``--backend=xla`` (float32), each its own JSON as the CLI
   prints it;
2. the roofline accounting of every pallas-gpu float32 call
   (:mod:`ccjax.inference.roofline`, shared with ``scripts/cpu_roofline.py``): weight bytes
   and MACs, the bound at this device's measured read bandwidth and float32 matmul rate
   (``Precision.HIGHEST``), and the measured fraction of it;
3. the train step of the reference net, gated vs dense (batch 128, medians);
4. where batch-1 time goes (:func:`kernel_parts`): an empty jitted call (the dispatch
   floor), one dense 4096x4096 layer, one :func:`gather_gemv` block product and one
   :func:`select_blocks` at the reference shapes, and the whole fused batch-1 forward,
   each synchronised per call and pipelined (many calls, one synchronisation);
5. the shape of the trained nets (784-1024-1024, tau = 1/8) on pallas-gpu float32;
6. device time per forward (:func:`device_time`): many forwards in one jitted scan, so
   that the host's dispatch and synchronisation (about 0.1 ms a call on a virtualised
   host, as long as a whole dense batch-1 forward) are paid once, not per forward.

Everything lands in ``--out_dir`` (default ``$OUT``, else ``docs/bench``) as
``gpu_bench_<device>.json`` (the summary, device named) plus the three
``bench_inference`` JSONs; a part that fails or times out is recorded with its error
and the others still run.

  python scripts/gpu_bench.py                         # on a GPU machine
  CCJAX_PALLAS_INTERPRET=1 python scripts/gpu_bench.py --tiny --out_dir=/tmp/gpu_bench
                                                      # end-to-end check on a CPU (interpreter)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

# The bench_inference runs are subprocesses on the same GPU: no process may reserve most
# of its memory up front (set before JAX starts; children inherit it).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np

import ccjax
from ccjax import atomic
from ccjax import timing
from ccjax.inference import roofline
from ccjax.inference import api
from ccjax.inference import kernels
from ccjax.inference import layout
from ccjax.inference.kernels import pallas_gpu
from ccjax.inference.kernels import pallas_gpu_gemv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = {"input_dim": 784, "hidden": (4096, 4096, 4096), "block_size": 64,
             "num_classes": 10, "tau": 0.125, "batch_sizes": (1, 8, 32, 128), "repeats": 30,
             "train_batch": 128, "bandwidth_mb": 1024, "matmul_size": 4096, "timeout_s": 100,
             "scan_steps": 64, "scan_unroll": 4, "scan_repeats": 12}
TINY = {"input_dim": 12, "hidden": (32, 32), "block_size": 8, "num_classes": 5,
        "tau": 0.25, "batch_sizes": (1, 2), "repeats": 2, "train_batch": 4,
        "bandwidth_mb": 4, "matmul_size": 64, "timeout_s": 600,
        "scan_steps": 4, "scan_unroll": 2, "scan_repeats": 2}
# (name, --backend, --dtype, changes to the net) of the bench_inference runs; the last is
# the shape of the trained nets (784-1024-1024, tau = 1/8; policies calibrated, not trained).
RUNS = (("pallas_float32", "pallas-gpu", "float32", {}), ("xla_float32", "xla", "float32", {}),
        ("pallas_bfloat16", "pallas-gpu", "bfloat16", {}),
        ("pallas_float32_1024x2", "pallas-gpu", "float32",
         {"hidden": (1024, 1024), "batch_sizes": (1, 128)}))
RUN_NAMES = tuple(run[0] for run in RUNS)
# What main() measures, in this order (--parts).
PARTS = ("bench", "device_time", "kernel_parts", "train_step", "roofline")
# Calls timed back to back before one synchronisation (the pipelined time of a call).
PIPELINED_CALLS = 50


def _net_flags(net: dict[str, Any]) -> list[str]:
  return [f"--input_dim={net['input_dim']}", f"--hidden={','.join(map(str, net['hidden']))}",
          f"--block_size={net['block_size']}", f"--num_classes={net['num_classes']}",
          f"--tau={net['tau']}"]


def run_bench_inference(net: dict[str, Any], backend: str, dtype: str,
                        changes: dict[str, Any] | None = None) -> dict[str, Any]:
  """``experiments.bench_inference --json`` in a subprocess: its JSON, or ``{"error"}``."""
  net = {**net, **(changes or {})}
  command = [sys.executable, "-m", "experiments.bench_inference", "--models=mlp", "--json",
             f"--backend={backend}", f"--dtype={dtype}", f"--repeats={net['repeats']}",
             f"--batch_sizes={','.join(map(str, net['batch_sizes']))}", *_net_flags(net)]
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=net["timeout_s"],
                            check=False, cwd=REPO)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {net['timeout_s']} s", "command": command}
  if result.returncode != 0:
    return {"error": result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"],
            "command": command}
  return json.loads(result.stdout)


def _reference_mlp(net: dict[str, Any], gated: bool = True) -> ccjax.GatedMLP:
  return ccjax.GatedMLP(hidden=tuple(net["hidden"]), num_classes=net["num_classes"],
                        block_size=net["block_size"], gated=gated)


def _calibrated_reference(net: dict[str, Any]):
  """The reference gated MLP, its parameters with policies calibrated to ``tau`` on
  random inputs, and the matching :class:`ccjax.Capacities`."""
  module = _reference_mlp(net)
  key = jax.random.PRNGKey(0)
  params = module.init({"params": key, "gate": key}, jnp.zeros((1, net["input_dim"])),
                       mode="threshold")["params"]
  params = ccjax.calibrate_policies(module, params, jax.random.normal(
      jax.random.PRNGKey(1), (512, net["input_dim"])), net["tau"])
  return module, params, ccjax.Capacities(active_fraction=net["tau"])


def accounting(net: dict[str, Any], bandwidth_gbs: float, gmacs: float) -> list[dict[str, Any]]:
  """Roofline entries (:mod:`ccjax.inference.roofline`) of pallas-gpu float32 calls, dense
  and sparse, one per batch size (own timing; sparse cost averaged over the inputs)."""
  module, params, capacities = _calibrated_reference(net)
  traced = ccjax.make_inference(module, params, capacities=capacities, backend="pallas-gpu")
  timed = ccjax.make_inference(module, params, capacities=capacities, backend="pallas-gpu",
                               with_info=False)
  entries = []
  for batch in net["batch_sizes"]:
    inputs = list(jax.random.normal(jax.random.PRNGKey(2 + batch),
                                    (4, batch, net["input_dim"])))
    latency = ccjax.measure_latency(module, params, inputs, repeats=net["repeats"],
                                    inference=timed)
    mask_sets = [[np.asarray(mask) for mask in traced(x)[1].masks] for x in inputs]
    costs = [roofline.sparse_call(masks, net["input_dim"], net["block_size"],
                                  net["num_classes"]) for masks in mask_sets]
    sparse = roofline.CallCost(macs=float(np.mean([cost.macs for cost in costs])),
                               weight_bytes=float(np.mean([c.weight_bytes for c in costs])))
    dense = roofline.dense_call(net["input_dim"], net["hidden"], net["num_classes"], batch)
    entries.append({"batch_size": batch, "backend": traced.backend,
                    "active_fraction": [float(np.mean([masks[layer] for masks in mask_sets]))
                                        for layer in range(len(net["hidden"]))],
                    "dense": dense.report(latency["dense"], bandwidth_gbs, gmacs),
                    "sparse": sparse.report(latency["sparse"], bandwidth_gbs, gmacs)})
  return entries


def device_rates(net: dict[str, Any]) -> dict[str, float]:
  """This device's read bandwidth and float32 matmul rate at ``Precision.HIGHEST`` (no
  TF32: the precision the float32 kernels and references run at)."""
  with jax.default_matmul_precision("highest"):
    gmacs = roofline.matmul_gmacs(rows=net["matmul_size"], size=net["matmul_size"])
  return {"read_bandwidth_gbs": roofline.device_read_gbs(net["bandwidth_mb"]),
          "matmul_gmacs_float32_highest": gmacs}


def train_step_times(net: dict[str, Any]) -> dict[str, Any]:
  """Median ms of one jitted train step of the reference net, gated vs dense."""
  batch = net["train_batch"]
  data = {"x": jax.random.normal(jax.random.PRNGKey(3), (batch, net["input_dim"])),
          "y": jax.random.randint(jax.random.PRNGKey(4), (batch,), 0, net["num_classes"])}
  config = ccjax.TrainConfig(tau=net["tau"])
  calls = []
  for gated in (True, False):
    module = _reference_mlp(net, gated)
    state = ccjax.init_train_state(module, config, jax.random.PRNGKey(5), data["x"][:2])
    step = jax.jit(ccjax.make_train_step(module, config))
    calls.append((step, [(state, data)]))
  gated_ms, dense_ms = timing.interleaved_median_ms(calls, repeats=net["repeats"])
  return {"batch_size": batch, "gated_ms": gated_ms, "dense_ms": dense_ms,
          "gated_over_dense": gated_ms / dense_ms}


def _pipelined_ms(fn, args, calls: int) -> float:
  """Mean ms of ``fn(*args)`` over ``calls`` calls dispatched back to back, synchronised
  once (host dispatch overlaps the device work; median of three such runs)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(3):
    start = time.perf_counter()
    outputs = [fn(*args) for _ in range(calls)]
    jax.block_until_ready(outputs)
    times.append((time.perf_counter() - start) * 1e3 / calls)
  return float(np.median(times))


def kernel_parts(net: dict[str, Any]) -> dict[str, Any]:
  """Where the batch-1 time goes: the parts of the fused forward, timed alone (float32).

  ``synced_ms``: median of calls each followed by ``block_until_ready`` (what
  ``bench_inference`` measures); ``pipelined_ms``: calls dispatched back to back.
  """
  interpret = pallas_gpu.interpret_default()
  width, block = net["hidden"][1], net["block_size"]
  num_blocks = width // block
  active = max(1, round(net["tau"] * num_blocks))
  keys = jax.random.split(jax.random.PRNGKey(7), 4)
  x = jax.random.normal(keys[0], (1, net["input_dim"]))
  dense_kernel = jax.random.normal(keys[1], (width, width)) / width ** 0.5
  h_dense = jax.random.normal(keys[2], (1, width))
  tiles = jax.random.normal(keys[3], (num_blocks * num_blocks, block, block))
  h_parts = jax.random.normal(keys[2], (1, active, block))
  index = jnp.arange(active, dtype=jnp.int32) * 3 % num_blocks
  count = jnp.array([active], jnp.int32)
  logit_parts = jax.random.normal(keys[0], (4, 1, num_blocks))
  policy_bias = jnp.zeros((num_blocks,))
  gemv = jax.jit(functools.partial(pallas_gpu_gemv.gather_gemv, in_stride=num_blocks,
                                   interpret=interpret))
  select = jax.jit(functools.partial(pallas_gpu_gemv.select_blocks, capacity=active,
                                     eps=0.0, interpret=interpret))
  layer = jax.jit(functools.partial(pallas_gpu_gemv.gemv_layer, in_stride=num_blocks,
                                    in_relu=True, capacity=active, eps=0.0,
                                    interpret=interpret))
  layer_bias = jnp.zeros((num_blocks, block))
  next_tiles = jax.random.normal(keys[3], (num_blocks, block, num_blocks))
  module, params, capacities = _calibrated_reference(net)
  forward = ccjax.make_inference(module, params, capacities=capacities, backend="pallas-gpu",
                                 with_info=False)
  dense_forward = ccjax.make_dense_inference(module, params)
  with jax.default_matmul_precision("highest"):
    dense_layer = jax.jit(lambda h, kernel: h @ kernel)
    parts = {
        "noop": (jax.jit(lambda inputs: inputs), (x,)),
        f"dense_layer_{width}x{width}": (dense_layer, (h_dense, dense_kernel)),
        f"gather_gemv_{active}x{active}_blocks": (gemv, (h_parts, index, count, index, count,
                                                         tiles)),
        f"select_blocks_{active}_of_{num_blocks}": (select, (logit_parts, policy_bias)),
        f"gemv_layer_{active}_of_{num_blocks}": (layer, (logit_parts[:, 0], policy_bias,
                                                         h_parts, index, count, tiles,
                                                         layer_bias, next_tiles, layer_bias)),
        "fused_forward": (forward, (x,)),
        "dense_forward": (dense_forward, (x,)),
    }
    synced = timing.interleaved_median_ms([(fn, [args]) for fn, args in parts.values()],
                                          repeats=net["repeats"])
    pipelined = [_pipelined_ms(fn, args, PIPELINED_CALLS) for fn, args in parts.values()]
  return {name: {"synced_ms": sync_ms, "pipelined_ms": pipe_ms}
          for name, sync_ms, pipe_ms in zip(parts, synced, pipelined)}


def _scan_forward(forward, unroll: int):
  """``xs [steps, batch, in] -> [steps, batch, classes]``: one forward per step of a
  jitted scan (``unroll`` forwards per loop iteration), chained: each step's input gets
  ``1e-30 *`` the sum of the previous step's output, so that no two forwards are
  independent (XLA would otherwise merge the unrolled forwards' products with the shared
  weights into one larger product: batch ``unroll``, not batch ``batch``)."""
  def body(previous, x):
    logits = forward(x + 1e-30 * jnp.sum(previous))
    return jnp.sum(logits), logits
  return jax.jit(lambda xs: jax.lax.scan(body, jnp.zeros(()), xs, unroll=unroll)[1])


def device_time(net: dict[str, Any]) -> list[dict[str, Any]]:
  """Per-forward time of dense and sparse inference with dispatch amortised (float32).

  ``steps`` different inputs run through one jitted scan per call (``unroll`` forwards
  per iteration); the median call time over the steps, minus that of a scan that only
  copies its input through the same chain (``loop_ms``: the loop's own cost), is the
  time of one forward on the device, kernels and launches included, the host excluded.
  """
  module, params, capacities = _calibrated_reference(net)
  forwards = {"dense": ccjax.make_dense_inference(module, params)}
  for backend in ("pallas-gpu", "xla"):
    forwards[backend] = ccjax.make_inference(module, params, capacities=capacities,
                                             backend=backend, with_info=False)
  # Batch 1 also with one launch per hidden layer (gemv_layer; not the default).
  block_major = layout.to_block_major(module, params, pallas_tiles=True)
  config = api.sparse_config(block_major, 1, mode="threshold", capacities=capacities,
                             backend="pallas-gpu")
  one_launch = functools.partial(pallas_gpu_gemv.fused_forward_single, block_major,
                                 config=config, interpret=pallas_gpu.interpret_default(),
                                 one_launch_layers=True)
  steps, unroll = net["scan_steps"], net["scan_unroll"]
  entries = []
  for batch in net["batch_sizes"]:
    xs = jax.random.normal(jax.random.PRNGKey(11 + batch), (steps, batch, net["input_dim"]))
    calls = {"loop": _scan_forward(lambda x: x, unroll)}
    calls.update({name: _scan_forward(fn, unroll) for name, fn in forwards.items()})
    if batch == 1:
      calls["pallas-gpu-1-launch"] = _scan_forward(lambda x: one_launch(x[0])[0][None],
                                                   unroll)
    times = timing.interleaved_median_ms([(fn, [(xs,)]) for fn in calls.values()],
                                         repeats=net["scan_repeats"], warmup=2)
    loop_ms = times[0] / steps
    per_forward = {name: max(total / steps - loop_ms, 0.0)
                   for name, total in zip(list(calls)[1:], times[1:])}
    entries.append({"batch_size": batch, "steps": steps, "unroll": unroll,
                    "loop_ms": loop_ms,
                    **{f"{name}_with_loop_ms": total / steps
                       for name, total in zip(list(calls)[1:], times[1:])},
                    **{f"{name}_ms": value for name, value in per_forward.items()},
                    **{f"dense_over_{name}": per_forward["dense"] / value
                       for name, value in per_forward.items() if name != "dense" and value}})
  return entries


def _attempt(results: dict[str, Any], name: str, fn, *args) -> Any:
  start = time.perf_counter()
  try:
    results[name] = fn(*args)
  except Exception as error:  # pylint: disable=broad-except  # recorded; the others still run
    results[name] = {"error": f"{type(error).__name__}: {error}"}
  print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
  return results[name]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", default=os.environ.get("OUT") or "docs/bench",
                      help="where the JSON files go (default: $OUT, else docs/bench)")
  parser.add_argument("--tiny", action="store_true",
                      help="a tiny net and batch sizes 1, 2 (checks the script on a CPU)")
  parser.add_argument("--runs", default=",".join(RUN_NAMES),
                      help=f"bench_inference runs, a comma-separated subset of "
                           f"{'|'.join(RUN_NAMES)}")
  parser.add_argument("--parts", default=",".join(PARTS),
                      help=f"what to measure, a comma-separated subset of {'|'.join(PARTS)} "
                           f"(a subset names the summary gpu_bench_<device>_<parts>.json)")
  parser.add_argument("--batch_sizes", default="",
                      help="comma-separated batch sizes instead of the net's (e.g. 1)")
  args = parser.parse_args()
  for flag, allowed in (("runs", RUN_NAMES), ("parts", PARTS)):
    unknown = sorted(set(getattr(args, flag).split(",")) - set(allowed))
    if unknown:
      parser.exit(2, f"gpu_bench.py: --{flag} must list entries of {'|'.join(allowed)}, "
                     f"got {','.join(unknown)}\n")
  parts = [part for part in PARTS if part in args.parts.split(",")]
  runs = [run for run in RUNS if run[0] in args.runs.split(",")]
  if args.tiny:  # the tiny net keeps its own shape in every run
    runs = [(name, backend, dtype, {}) for name, backend, dtype, _ in runs]
  net = dict(TINY if args.tiny else REFERENCE)
  if args.batch_sizes:
    try:
      net["batch_sizes"] = tuple(int(size) for size in args.batch_sizes.split(","))
      if min(net["batch_sizes"]) < 1:
        raise ValueError
    except ValueError:
      parser.exit(2, f"gpu_bench.py: --batch_sizes must be positive integers, got "
                     f"{args.batch_sizes!r}\n")
  if jax.default_backend() != "gpu" and not args.tiny:
    parser.exit(2, "gpu_bench.py: no GPU here (jax backend "
                   f"{jax.default_backend()!r}); to check the script on a CPU run it with "
                   f"--tiny and {kernels.PALLAS_INTERPRET_ENV}=1\n")
  if "pallas-gpu" not in kernels.available_backends():
    parser.exit(2, f"gpu_bench.py: the pallas-gpu backend is not available here (set "
                   f"{kernels.PALLAS_INTERPRET_ENV}=1 for the interpreter off a GPU)\n")
  os.makedirs(args.out_dir, exist_ok=True)
  machine = timing.machine_info()
  device = re.sub(r"[^a-z0-9]+", "_", machine["device"].lower()).strip("_")
  summary: dict[str, Any] = {"device": machine["device"], "machine": machine,
                             "net": {k: net[k] for k in ("input_dim", "hidden", "block_size",
                                                         "num_classes", "tau")},
                             "tiny": args.tiny}
  suffix = "" if parts == list(PARTS) else "_" + "_".join(parts)
  path = os.path.join(args.out_dir, f"gpu_bench_{device}{suffix}.json")
  summary["parts"] = parts
  # The summary is rewritten after every part: a run stopped at its time limit keeps
  # what it measured.
  if "bench" in parts:
    bench = summary.setdefault("bench_inference", {})
    for name, backend, dtype, changes in runs:
      report = _attempt(bench, name, run_bench_inference, net, backend, dtype, changes)
      if "error" not in report:
        atomic.write_json(os.path.join(args.out_dir, f"{device}_bench_{name}.json"), report)
        bench[name] = [{key: entry.get(key) for key in ("batch_size", "dense_ms", "sparse_ms",
                                                        "ratio", "overflow_rate", "backend")}
                       for entry in report["results"]]
      atomic.write_json(path, summary)
  for part, fn in (("device_time", device_time), ("kernel_parts", kernel_parts),
                   ("train_step", train_step_times)):
    if part in parts:
      _attempt(summary, part, fn, net)
      atomic.write_json(path, summary)
  if "roofline" in parts:
    rates = _attempt(summary, "device_rates", device_rates, net)
    if "error" not in rates:
      _attempt(summary, "roofline", accounting, net, rates["read_bandwidth_gbs"],
               rates["matmul_gmacs_float32_highest"])
    atomic.write_json(path, summary)
  print(path)


if __name__ == "__main__":
  main()
