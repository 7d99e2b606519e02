r"""Roofline of gated-MLP inference on this CPU: bytes and MACs vs measured rates.

Measures this machine's read bandwidth (numpy reduction over 256 MB, 1 and 2 threads) and
float32 matmul rate (XLA ``dot``), then for the benchmark MLP (random weights, policies
calibrated to ``--tau``) counts, per call, the multiply-adds and the weight bytes the
sparse path must read (blocks, tiles and policy rows used by at least one example of
the batch), times dense and sparse (interleaved medians), and prints one JSON object
with the achieved rates and the roofline bound ``max(bytes / bandwidth, MACs / rate)``.

  python scripts/cpu_roofline.py --hidden=4096,4096,4096 --block_size=64 --tau=0.125
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import ccjax
from ccjax import timing
from experiments import bench_inference


def read_bandwidth_gbs(threads: int, megabytes: int = 256, repeats: int = 5) -> float:
  """Best-of read bandwidth (GB/s): ``threads`` numpy sums over disjoint halves."""
  data = np.ones(megabytes * 2**20 // 4, np.float32)
  parts = np.array_split(data, threads)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    best = float("inf")
    for _ in range(repeats + 1):
      start = time.perf_counter()
      list(pool.map(np.sum, parts))
      best = min(best, time.perf_counter() - start)
  return data.nbytes / best / 1e9


def matmul_gmacs(rows: int = 128, size: int = 4096, repeats: int = 10) -> float:
  """Best-of float32 multiply-add rate (GMAC/s) of an XLA ``[rows, n] @ [n, n]``."""
  a = jnp.ones((rows, size), jnp.float32)
  b = jnp.ones((size, size), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return rows * size * size / best / 1e9


def weight_bytes(masks, input_dim: int, block_size: int, num_classes: int) -> float:
  """float32 weight bytes a call must read: blocks / tiles / policy rows any example uses.

  Args:
    masks: one ``[batch, blocks]`` 0/1 mask per hidden layer (the blocks that ran).
  """
  bs = block_size
  used = [np.asarray(mask, bool) for mask in masks]
  total = input_dim * used[0].shape[1]                          # first policy (dense input)
  total += used[0].any(axis=0).sum() * input_dim * bs          # first-layer blocks
  for previous, current in zip(used[:-1], used[1:]):
    rows_used = previous.any(axis=0).sum()
    total += rows_used * bs * current.shape[1]                 # policy rows of used inputs
    tiles = (previous.T.astype(np.int64) @ current.astype(np.int64)) > 0
    total += tiles.sum() * bs * bs                             # tiles (i, j) some example uses
  total += used[-1].any(axis=0).sum() * bs * num_classes       # output rows
  return 4.0 * float(total)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input_dim", type=int, default=784)
  parser.add_argument("--hidden", default="4096,4096,4096")
  parser.add_argument("--block_size", type=int, default=64)
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--tau", type=float, default=0.125)
  parser.add_argument("--batch_sizes", default="1,128")
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--backend", default=None, help="kernel backend (default: the best)")
  args = parser.parse_args()
  config = {"input_dim": args.input_dim, "hidden": [int(w) for w in args.hidden.split(",")],
            "block_size": args.block_size, "num_classes": args.num_classes, "tau": args.tau,
            "dtype": "float32", "seed": 0}
  bandwidth = {threads: read_bandwidth_gbs(threads) for threads in (1, 2)}
  rate = matmul_gmacs()
  # The benchmark's own network: random weights, policies calibrated to run tau.
  module, params, example_shape, fraction = bench_inference.build_model(config, "mlp")
  capacities = ccjax.Capacities(active_fraction=fraction)
  traced = ccjax.make_inference(module, params, capacities=capacities, backend=args.backend)
  timed = ccjax.make_inference(module, params, capacities=capacities, backend=args.backend,
                               with_info=False)
  dense_macs = float(ccjax.dense_macs_per_example(module, example_shape))
  dense_bytes = 4.0 * dense_macs
  report = {"cpu": timing.cpu_model(), "backend": traced.backend, "read_gbs": bandwidth,
            "matmul_gmacs": rate, "config": vars(args), "results": []}
  for batch in (int(value) for value in args.batch_sizes.split(",")):
    key = jax.random.fold_in(jax.random.PRNGKey(1), batch)
    xs = list(jax.random.normal(key, (16 if batch == 1 else 2, batch, *example_shape)))
    macs, moved = [], []
    for x in xs:
      masks = traced(x)[1].masks
      macs.append(float(np.sum(ccjax.macs_per_example(module, example_shape, masks))))
      moved.append(weight_bytes(masks, args.input_dim, args.block_size, args.num_classes))
    latency = ccjax.measure_latency(module, params, xs, repeats=args.repeats, inference=timed)
    entry = {"batch_size": batch, "dense_ms": latency["dense"], "sparse_ms": latency["sparse"],
             "ratio": latency["dense"] / latency["sparse"]}
    for name, call_macs, call_bytes, ms in (
        ("dense", batch * dense_macs, dense_bytes, latency["dense"]),
        ("sparse", float(np.mean(macs)), float(np.mean(moved)), latency["sparse"])):
      bound_ms = 1e3 * max(call_bytes / (max(bandwidth.values()) * 1e9),
                           call_macs / (rate * 1e9))
      entry[name] = {"macs": call_macs, "weight_mb": call_bytes / 1e6,
                     "achieved_gbs": call_bytes / ms / 1e6,
                     "achieved_gmacs": call_macs / ms / 1e6, "roofline_ms": bound_ms}
    report["results"].append(entry)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
