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
3. the train step of the reference net, gated vs dense (batch 128, medians).

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
from ccjax.inference import kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = {"input_dim": 784, "hidden": (4096, 4096, 4096), "block_size": 64,
             "num_classes": 10, "tau": 0.125, "batch_sizes": (1, 8, 32, 128), "repeats": 30,
             "train_batch": 128, "bandwidth_mb": 1024, "matmul_size": 4096, "timeout_s": 120}
TINY = {"input_dim": 12, "hidden": (32, 32), "block_size": 8, "num_classes": 5,
        "tau": 0.25, "batch_sizes": (1, 2), "repeats": 2, "train_batch": 4,
        "bandwidth_mb": 4, "matmul_size": 64, "timeout_s": 600}
# (name, --backend, --dtype) of the bench_inference runs.
RUNS = (("pallas_float32", "pallas-gpu", "float32"), ("xla_float32", "xla", "float32"),
        ("pallas_bfloat16", "pallas-gpu", "bfloat16"))
RUN_NAMES = tuple(name for name, _, _ in RUNS)


def _net_flags(net: dict[str, Any]) -> list[str]:
  return [f"--input_dim={net['input_dim']}", f"--hidden={','.join(map(str, net['hidden']))}",
          f"--block_size={net['block_size']}", f"--num_classes={net['num_classes']}",
          f"--tau={net['tau']}"]


def run_bench_inference(net: dict[str, Any], backend: str, dtype: str) -> dict[str, Any]:
  """``experiments.bench_inference --json`` in a subprocess: its JSON, or ``{"error"}``."""
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


def accounting(net: dict[str, Any], bandwidth_gbs: float, gmacs: float) -> list[dict[str, Any]]:
  """Roofline entries (:mod:`ccjax.inference.roofline`) of pallas-gpu float32 calls, dense
  and sparse, one per batch size (own timing; sparse cost averaged over the inputs)."""
  module = _reference_mlp(net)
  key = jax.random.PRNGKey(0)
  params = module.init({"params": key, "gate": key}, jnp.zeros((1, net["input_dim"])),
                       mode="threshold")["params"]
  params = ccjax.calibrate_policies(module, params, jax.random.normal(
      jax.random.PRNGKey(1), (512, net["input_dim"])), net["tau"])
  capacities = ccjax.Capacities(active_fraction=net["tau"])
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
  args = parser.parse_args()
  unknown = sorted(set(args.runs.split(",")) - set(RUN_NAMES))
  if unknown:
    parser.exit(2, f"gpu_bench.py: --runs must list entries of {'|'.join(RUN_NAMES)}, "
                   f"got {','.join(unknown)}\n")
  runs = [run for run in RUNS if run[0] in args.runs.split(",")]
  net = TINY if args.tiny else REFERENCE
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
  bench = summary.setdefault("bench_inference", {})
  for name, backend, dtype in runs:
    report = _attempt(bench, name, run_bench_inference, net, backend, dtype)
    if "error" not in report:
      atomic.write_json(os.path.join(args.out_dir, f"{device}_bench_{name}.json"), report)
      bench[name] = [{key: entry.get(key) for key in ("batch_size", "dense_ms", "sparse_ms",
                                                      "ratio", "overflow_rate", "backend")}
                     for entry in report["results"]]
  rates = _attempt(summary, "device_rates", device_rates, net)
  if "error" not in rates:
    _attempt(summary, "roofline", accounting, net, rates["read_bandwidth_gbs"],
             rates["matmul_gmacs_float32_highest"])
  _attempt(summary, "train_step", train_step_times, net)
  path = os.path.join(args.out_dir, f"gpu_bench_{device}.json")
  atomic.write_json(path, summary)
  print(path)


if __name__ == "__main__":
  main()
