r"""Batch-1 cost of one gated MLP on the sparse path against k, the blocks it runs.

  python scripts/probe_ffi_batch1.py [--d_model=128 --mlp_width=512 --block_size=32]

One ``d -> mlp_width -> d`` gated MLP (the MLP of a transformer layer, random weights);
each variant runs 64 different tokens one after another inside one jitted ``lax.scan``
(dispatch amortised). Prints one JSON line: microseconds per token for the dense MLP and
for the sparse path with the ``top_k`` policy at k = 1, 2, 4, ... blocks, per backend,
with the machine. Splits the sparse time into a fixed part and a part per block.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
import jax

from ccjax import layers
from ccjax import timing
from ccjax.inference import api
from ccjax.inference import kernels
from ccjax.inference import layout
from ccjax.inference import mlp

_D_MODEL = flags.DEFINE_integer("d_model", 128, "MLP input and output width.")
_MLP_WIDTH = flags.DEFINE_integer("mlp_width", 512, "Hidden units.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 32, "Units per block.")
_TOKENS = 64


def _scan(apply_row):
  return jax.jit(lambda rows: jax.lax.scan(lambda carry, row: (carry, apply_row(row)), 0,
                                           rows)[1])


def main(argv):
  del argv
  module = layers.GatedMLP(hidden=(_MLP_WIDTH.value,), num_classes=_D_MODEL.value,
                           block_size=_BLOCK_SIZE.value, flatten=False)
  rows = jax.random.normal(jax.random.PRNGKey(0), (_TOKENS, 1, _D_MODEL.value))
  params = module.init({"params": jax.random.PRNGKey(1), "gate": jax.random.PRNGKey(2)},
                       rows[0], mode="all")["params"]
  dense = module.clone(gated=False)
  dense_params = layers.strip_policy_params(params)
  calls = {"dense": _scan(lambda row: dense.apply({"params": dense_params}, row, mode="all")[0])}
  block_major = layout.to_block_major(module, params)
  num_blocks = _MLP_WIDTH.value // _BLOCK_SIZE.value
  ks = sorted({k for k in (1, 2, 4, 8, num_blocks) if k <= num_blocks})
  backends = [b for b in ("ffi-cpu", "xla") if b == "xla" or kernels.ffi_cpu.available()]
  for backend in backends:
    for k in ks:
      config = api.sparse_config(block_major, 1, mode="top_k",
                                 capacities=api.Capacities(top_k=k), backend=backend)
      calls[f"{backend}/k={k}"] = _scan(
          lambda row, config=config: mlp.sparse_forward(block_major, row, config)[0])
  times = timing.interleaved_median_ms([(fn, [(rows,)]) for fn in calls.values()], repeats=200)
  us_per_token = {name: ms * 1e3 / _TOKENS for name, ms in zip(calls, times)}
  result = {"us_per_token": us_per_token, "d_model": _D_MODEL.value,
            "mlp_width": _MLP_WIDTH.value, "block_size": _BLOCK_SIZE.value,
            "machine": timing.machine_info()}
  for backend in backends:
    first, last = us_per_token[f"{backend}/k={ks[0]}"], us_per_token[f"{backend}/k={ks[-1]}"]
    per_block = (last - first) / (ks[-1] - ks[0])
    result[f"{backend}_fixed_us"] = first - per_block * ks[0]
    result[f"{backend}_per_block_us"] = per_block
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
