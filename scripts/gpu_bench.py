"""Checks and times the Pallas (Triton) grouped matmul on an NVIDIA GPU.

Run from the repository root on a GPU host::

  PYTHONPATH=. python scripts/gpu_bench.py --out docs/gpu_bench.json

1. Kernel vs the XLA path on ragged grouped products (float32, real kernel, 1e-5).
2. The MLP sparse path with the Pallas kernel vs the XLA path and vs masked-dense, on
   the reference net 784-4096x3-10, blocks of 64, tau = 1/8, batch 128 (1e-5).
3. Timings (interleaved medians) of dense ``x @ W`` (cuBLAS) and the sparse path with
   the Pallas and the XLA grouped products, at batch 1 and 128. Everything runs with
   ``jax.default_matmul_precision('highest')`` (true float32, as the kernel computes);
   dense is also timed at the default precision (TF32 tensor cores on Ampere+).
   At batch 1 the sparse path is the batch-1 gather path: no grouped product runs, so
   both implementations time the same code there.

Prints one JSON object (with the GPU's name) and writes it to ``--out``. Speed is not a
target of the kernel; lowering and agreement are.
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jaxlib
import jax.numpy as jnp
import numpy as np

from ccjax import flops
from ccjax import sparse
from ccjax import sparse_kernels
from ccjax import timing
from ccjax.inference.kernels import pallas_gpu

INPUT_DIM, HIDDEN, NUM_CLASSES, BLOCK_SIZE, TAU = 784, (4096, 4096, 4096), 10, 64, 0.125
# (groups, rows, k, n, weights): hidden->hidden, first layer, output layer, block 16 / 128.
KERNEL_CASES = [(256, 37, 64, 64, 4096), (64, 29, 784, 64, 64), (64, 29, 64, 10, 64),
                (40, 13, 16, 16, 40), (24, 65, 128, 128, 24)]


def _close(got, expected) -> dict:
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  return {"max_abs_err": float(np.max(np.abs(got - expected))),
          "within_1e-5": bool(np.allclose(got, expected, atol=1e-5, rtol=1e-5))}


def check_kernel() -> list[dict]:
  """The real kernel vs the XLA path on ragged groups (repeats, empty groups, ends)."""
  results = []
  for seed, (groups, rows, depth, width, num_weights) in enumerate(KERNEL_CASES):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(keys[0], (groups, rows, depth))
    weights = jax.random.normal(keys[1], (num_weights, depth, width))
    index = jax.random.randint(keys[2], (groups,), 0, num_weights)
    index = index.at[0].set(0).at[-1].set(num_weights - 1)
    sizes = jax.random.randint(keys[3], (groups,), 0, rows + 1).at[1].set(0).at[2].set(rows)
    x = jnp.where(jnp.arange(rows)[None, :, None] < sizes[:, None, None], x, 0.0)
    got = pallas_gpu.grouped_matmul(x, pallas_gpu.pad_weight_tiles(weights), index, sizes,
                                    width=width)
    expected = sparse_kernels.grouped_matmul_xla(x, weights, index)
    results.append({"shape": [groups, rows, depth, width, num_weights], **_close(got, expected)})
  return results


def check_mlp(params, model, batch: int) -> dict:
  """Sparse logits (Pallas and XLA grouped products) vs each other and masked-dense."""
  x = jax.random.normal(jax.random.PRNGKey(7), (batch, INPUT_DIM))
  outputs = {}
  for implementation in ("pallas", "xla"):
    config = sparse.make_sparse_config(model, batch, TAU, implementation=implementation)
    outputs[implementation] = sparse.make_sparse_forward(config)(model, x)
  logits, traces = outputs["pallas"]
  masks = sparse.trace_masks(traces, model.num_blocks)
  return {"batch_size": batch,
          "pallas_vs_xla": _close(logits, outputs["xla"][0]),
          "pallas_vs_masked_dense": _close(logits, sparse.masked_dense_forward(params, x, masks)),
          "overflow_rate": float(sparse.overflow_rate(traces))}


def time_mlp(params, model, batch: int, repeats: int) -> dict:
  """Interleaved medians: dense, sparse with Pallas products, sparse with XLA products."""
  num_batches = 16 if batch == 1 else 1
  x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), batch),
                        (num_batches, batch, INPUT_DIM))
  batches = [x[i] for i in range(num_batches)]
  dense_fn = jax.jit(sparse.dense_forward)
  calls = [(dense_fn, [(params, b) for b in batches])]
  traces = None
  for implementation in ("pallas", "xla"):
    config = sparse.make_sparse_config(model, batch, TAU, implementation=implementation,
                                       num_buckets=4 if batch == 1 else 1)
    calls.append((sparse.make_sparse_forward(config, with_traces=False),
                  [(model, b) for b in batches]))
    if traces is None:
      traces = [sparse.make_sparse_forward(config)(model, b)[1] for b in batches]
  dense_ms, pallas_ms, xla_ms = timing.interleaved_median_ms(calls, repeats=repeats)
  sparse_macs = float(np.mean([sparse.sparse_macs(t, model.num_blocks, INPUT_DIM, BLOCK_SIZE,
                                                  NUM_CLASSES) for t in traces]))
  return {"batch_size": batch, "dense_ms": dense_ms, "sparse_pallas_ms": pallas_ms,
          "sparse_xla_ms": xla_ms, "dense_over_sparse_pallas": dense_ms / pallas_ms,
          "dense_macs": float(flops.dense_mlp_macs(INPUT_DIM, HIDDEN, NUM_CLASSES)),
          "sparse_macs": sparse_macs}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="docs/gpu_bench.json")
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args()
  device = jax.devices()[0]
  if device.platform != "gpu":
    raise SystemExit(f"needs a GPU; the default device is {device}")
  report = {"gpu": device.device_kind, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "python": platform.python_version(),
            "net": {"input_dim": INPUT_DIM, "hidden": list(HIDDEN), "classes": NUM_CLASSES,
                    "block_size": BLOCK_SIZE, "tau": TAU}}
  params = sparse.random_gated_mlp_params(jax.random.PRNGKey(0), INPUT_DIM, HIDDEN, NUM_CLASSES,
                                          BLOCK_SIZE, TAU)
  model = sparse.to_block_major(params, BLOCK_SIZE, pallas_tiles=True)
  with jax.default_matmul_precision("highest"):
    report["kernel_vs_xla_float32"] = check_kernel()
    report["mlp_float32"] = check_mlp(params, model, 128)
    print(json.dumps(report), flush=True)
    report["timing_highest_precision"] = [time_mlp(params, model, batch, args.repeats)
                                          for batch in (1, 128)]
  dense_fn = jax.jit(sparse.dense_forward)
  report["dense_default_precision_ms"] = {
      str(batch): timing.median_ms(dense_fn, params, jnp.ones((batch, INPUT_DIM)),
                                   repeats=args.repeats) for batch in (1, 128)}
  text = json.dumps(report, indent=1)
  print(text)
  with open(args.out, "w") as handle:
    handle.write(text + "\n")


if __name__ == "__main__":
  main()
