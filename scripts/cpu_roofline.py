r"""Roofline of gated-MLP inference on this CPU: bytes and MACs vs measured rates.

Measures this machine's read bandwidth (numpy reduction over 256 MB, 1 and 2 threads) and
float32 matmul rate (XLA ``dot``), then for the benchmark MLP (random weights, policies
calibrated to ``--tau``) counts, per call, the multiply-adds and the weight bytes the
sparse path must read (blocks, tiles and policy rows used by at least one example of
the batch), times dense and sparse (interleaved medians), and prints one JSON object
with the achieved rates and the roofline bound ``max(bytes / bandwidth, MACs / rate)``
(the accounting is :mod:`ccjax.inference.roofline`'s).

  python scripts/cpu_roofline.py --hidden=4096,4096,4096 --block_size=64 --tau=0.125
"""

from __future__ import annotations

import argparse
import json

import jax

import ccjax
from ccjax import timing
from ccjax.inference import roofline
from experiments import bench_inference


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
  parser.add_argument("--bandwidth_mb", type=int, default=256, help="MB read per bandwidth probe")
  parser.add_argument("--matmul_size", type=int, default=4096, help="n of the [128, n] @ [n, n] "
                      "matmul-rate probe")
  args = parser.parse_args()
  config = {"input_dim": args.input_dim, "hidden": [int(w) for w in args.hidden.split(",")],
            "block_size": args.block_size, "num_classes": args.num_classes, "tau": args.tau,
            "dtype": "float32", "seed": 0}
  bandwidth = {threads: roofline.read_bandwidth_gbs(threads, args.bandwidth_mb)
               for threads in (1, 2)}
  rate = roofline.matmul_gmacs(size=args.matmul_size)
  # The benchmark's own network: random weights, policies calibrated to run tau.
  module, params, example_shape, fraction = bench_inference.build_model(config, "mlp")
  capacities = ccjax.Capacities(active_fraction=fraction)
  traced = ccjax.make_inference(module, params, capacities=capacities, backend=args.backend)
  timed = ccjax.make_inference(module, params, capacities=capacities, backend=args.backend,
                               with_info=False)
  report = {"cpu": timing.cpu_model(), "backend": traced.backend, "read_gbs": bandwidth,
            "matmul_gmacs": rate, "config": vars(args), "results": []}
  for batch in (int(value) for value in args.batch_sizes.split(",")):
    key = jax.random.fold_in(jax.random.PRNGKey(1), batch)
    xs = list(jax.random.normal(key, (16 if batch == 1 else 2, batch, *example_shape)))
    costs = [roofline.sparse_call(traced(x)[1].masks, args.input_dim, args.block_size,
                                  args.num_classes, module.policy_hidden) for x in xs]
    latency = ccjax.measure_latency(module, params, xs, repeats=args.repeats, inference=timed)
    entry = {"batch_size": batch, "dense_ms": latency["dense"], "sparse_ms": latency["sparse"],
             "ratio": latency["dense"] / latency["sparse"]}
    calls = {"dense": roofline.dense_call(args.input_dim, config["hidden"], args.num_classes,
                                          batch),
             "sparse": roofline.mean_call(costs)}
    for name, call in calls.items():
      entry[name] = call.report(latency[name], max(bandwidth.values()), rate)
    report["results"].append(entry)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
