r"""ffi-cpu at batch 1: one thread vs two (the batch-1 helper thread), same process.

  python scripts/ffi_batch1_threads.py [--hidden=4096,4096,4096 --rounds=8]

Builds the benchmark's reference MLP (``experiments.bench_inference``: random weights,
policies calibrated to ``--tau``) and times four functions on the same 16 inputs, in
alternating runs of 16 calls (the order of the benchmark's interleaved medians):

- ``one_thread``: ``CCJAX_FFI_THREADS=1`` (the batch-1 tasks all on the calling thread);
- ``two_threads``: ``CCJAX_FFI_THREADS=2`` as shipped: a job is offered to the helper thread
  only while a core is idle (``/proc/loadavg``) and not right after a stall;
- ``two_threads_forced``: the same, with every job offered (the extension's test hook, so
  the helper shares even on a busy machine);
- ``dense``: the dense network.

Prints one JSON line: 10th percentile and median ms of each, the helper's counters (jobs
shared, jobs offered but run alone, tasks the helper ran, stalls) per phase, the machine
and the load average at start and end. Read it on an idle machine (load average < 1):
on a busy one the helper is rarely offered work and the medians are noise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

import ccjax
from ccjax import timing
from ccjax.inference.kernels import ffi_cpu
from ccjax.inference.kernels import ffi_cpu_helper
from experiments import bench_inference

# --hidden, --block_size and --tau are experiments.bench_inference's flags (same defaults).
FLAGS = flags.FLAGS
_ROUNDS = flags.DEFINE_integer("rounds", 8, "Alternating runs of 16 calls per function.",
                               lower_bound=1)
_INPUTS = 16


def main(argv):
  del argv
  if not ffi_cpu.available():
    raise SystemExit(f"ffi-cpu unavailable: {ffi_cpu.unavailable_reason()}")
  config = {"input_dim": 784, "hidden": [int(w) for w in FLAGS.hidden],
            "block_size": FLAGS.block_size, "num_classes": 10, "tau": FLAGS.tau,
            "dtype": "float32", "seed": 0}
  module, params, shape, fraction = bench_inference.build_model(config, "mlp")
  capacities = ccjax.Capacities(active_fraction=fraction)
  xs = list(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(1), 1),
                              (_INPUTS, 1, *shape)))
  sparse = {}
  for name, threads in (("one_thread", 1), ("two_threads", 2)):
    os.environ[ffi_cpu.THREADS_ENV] = str(threads)  # read when the call is traced
    sparse[name] = ccjax.make_inference(module, params, capacities=capacities,
                                        backend="ffi-cpu", with_info=False)
    for x in xs:
      jax.block_until_ready(sparse[name](x))
  del os.environ[ffi_cpu.THREADS_ENV]
  dense = ccjax.make_dense_inference(module, params)
  hooks = ffi_cpu_helper.HelperHooks()
  load_at_start = list(os.getloadavg())

  def timed(fn, inputs):
    times = []
    for x in inputs:
      start = time.perf_counter()
      jax.block_until_ready(fn(x))
      times.append((time.perf_counter() - start) * 1e3)
    return times

  phases = {"shipped": ["one_thread", "two_threads", "dense"], "forced": ["two_threads_forced"]}
  times = {name: [] for names in phases.values() for name in names}
  counters = {}
  for phase, names in phases.items():
    hooks.test_mode(join_wait_us=1 if phase == "forced" else 0)
    before = hooks.stats()
    for _ in range(_ROUNDS.value):
      for name in names:
        fn = dense if name == "dense" else sparse[name.replace("_forced", "")]
        times[name] += timed(fn, xs if name != "dense" else xs[:4])
      if phase == "forced":  # alternate with one thread here too
        times.setdefault("one_thread_during_forced", []).extend(timed(sparse["one_thread"], xs))
    counters[phase] = dataclasses.asdict(hooks.stats() - before)
  hooks.test_mode()
  result = {name: {"p10_ms": float(np.percentile(values, 10)),
                   "median_ms": float(np.median(values))} for name, values in times.items()}
  print(json.dumps({"hidden": config["hidden"], "block_size": config["block_size"],
                    "tau": config["tau"], "times": result, "helper": counters,
                    "machine": timing.machine_info(),
                    "load_average": {"start": load_at_start, "end": list(os.getloadavg())}}))


if __name__ == "__main__":
  app.run(main)
