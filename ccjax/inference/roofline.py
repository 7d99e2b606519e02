"""Roofline accounting of gated-MLP inference: bytes and MACs of a call, and its bound.

A call of the dense MLP reads every float32 weight once and does ``batch`` times the dense
multiply-adds; a sparse call reads the weights some example of the batch uses (first-layer
blocks, weight tiles ``(i, j)``, policy rows of the used input blocks, output rows) and
does the MACs of the blocks that ran (policies included, :func:`ccjax.flops.gated_mlp_macs`).
The bound of a call at a read bandwidth and a multiply-add rate is
``max(bytes / bandwidth, MACs / rate)``; a measured time against it gives the fraction of
the bound reached. Pure functions of shapes and masks (the rates are measured by
:func:`read_bandwidth_gbs`, :func:`device_read_gbs`, :func:`stream_read_gbs` and
:func:`matmul_gmacs`), so the
same accounting serves the CPU and the GPU.

Axis letters: ``batch`` examples, ``blocks`` blocks of a hidden layer.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ccjax import flops
from ccjax import timing

BYTES_PER_FLOAT32 = 4


@dataclasses.dataclass(frozen=True)
class CallCost:
  """What one call of a network must do.

  Attributes:
    macs: multiply-adds of the whole call (all examples).
    weight_bytes: bytes of weights the call must read at least once.
  """
  macs: float
  weight_bytes: float

  def bound_ms(self, bandwidth_gbs: float, gmacs: float | None = None) -> float:
    """``max(bytes / bandwidth, MACs / rate)`` in milliseconds (bytes only without a rate)."""
    if bandwidth_gbs <= 0 or (gmacs is not None and gmacs <= 0):
      raise ValueError(f"rates must be positive, got {bandwidth_gbs} GB/s, {gmacs} GMAC/s")
    compute_ms = 0.0 if gmacs is None else self.macs / (gmacs * 1e6)
    return max(self.weight_bytes / (bandwidth_gbs * 1e6), compute_ms)

  def report(self, measured_ms: float, bandwidth_gbs: float,
             gmacs: float | None = None) -> dict[str, float]:
    """The accounting of one measured call: MACs, weight MB, bound, fraction reached."""
    bound = self.bound_ms(bandwidth_gbs, gmacs)
    bytes_ms = self.bound_ms(bandwidth_gbs)
    return {"macs": self.macs, "weight_mb": self.weight_bytes / 1e6, "roofline_ms": bound,
            "bound_by": "bandwidth" if bytes_ms >= bound else "compute",
            "measured_ms": measured_ms, "fraction_of_bound": bound / measured_ms,
            "achieved_gbs": self.weight_bytes / measured_ms / 1e6,
            "achieved_gmacs": self.macs / measured_ms / 1e6}


def dense_call(input_dim: int, hidden: Sequence[int], num_classes: int, batch: int) -> CallCost:
  """The dense MLP ``input_dim -> hidden... -> num_classes`` on ``batch`` examples."""
  macs = flops.dense_mlp_macs(input_dim, hidden, num_classes)
  return CallCost(macs=float(batch * macs), weight_bytes=float(BYTES_PER_FLOAT32 * macs))


def sparse_weight_bytes(masks: Sequence[np.ndarray], input_dim: int, block_size: int,
                        num_classes: int) -> float:
  """float32 weight bytes a sparse call must read: blocks / tiles / policy rows any
  example uses.

  Args:
    masks: one ``[batch, blocks]`` 0/1 mask per hidden layer (the blocks that ran).
    input_dim: input features (the first layer's input is dense).
    block_size: units per block.
    num_classes: output logits.
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
  return float(BYTES_PER_FLOAT32 * total)


def sparse_call(masks: Sequence[np.ndarray], input_dim: int, block_size: int,
                num_classes: int, policy_hidden: int = 0) -> CallCost:
  """A sparse call that ran the blocks of ``masks`` (one ``[batch, blocks]`` per layer)."""
  macs = flops.gated_mlp_macs(input_dim, masks, block_size, num_classes,
                              policy_hidden=policy_hidden)
  return CallCost(macs=float(np.sum(macs)),
                  weight_bytes=sparse_weight_bytes(masks, input_dim, block_size, num_classes))


def mean_call(costs: Sequence[CallCost]) -> CallCost:
  """The mean cost of several calls (e.g. batches of different examples)."""
  if not costs:
    raise ValueError("mean_call needs at least one call")
  return CallCost(macs=float(np.mean([c.macs for c in costs])),
                  weight_bytes=float(np.mean([c.weight_bytes for c in costs])))


def read_bandwidth_gbs(threads: int, megabytes: int = 256, repeats: int = 5) -> float:
  """Best-of host read bandwidth (GB/s): ``threads`` numpy sums over disjoint parts."""
  data = np.ones(megabytes * 2**20 // 4, np.float32)
  parts = np.array_split(data, threads)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    best = float("inf")
    for _ in range(repeats + 1):
      start = time.perf_counter()
      list(pool.map(np.sum, parts))
      best = min(best, time.perf_counter() - start)
  return data.nbytes / best / 1e9


def device_read_gbs(megabytes: int = 256, repeats: int = 5) -> float:
  """Best-of read bandwidth (GB/s) of a jitted sum on the default JAX device (GPU or CPU)."""
  data = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(data).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    total(data).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return data.nbytes / best / 1e9


def stream_read_gbs(megabytes: int = 256, repeats: int = 5) -> float:
  """The read bandwidth (GB/s) to hold a call against: a jitted sum on the default JAX
  device and, when that is the CPU, also numpy sums on one thread and on every core this
  process may use (XLA's CPU reduction may stream on fewer cores than a call can); the
  best of those."""
  rate = device_read_gbs(megabytes, repeats)
  if jax.default_backend() == "cpu":
    for threads in sorted({1, timing.usable_cores()}):
      rate = max(rate, read_bandwidth_gbs(threads, megabytes, repeats))
  return rate


def matmul_gmacs(rows: int = 128, size: int = 4096, repeats: int = 10) -> float:
  """Best-of float32 multiply-add rate (GMAC/s) of a jitted ``[rows, n] @ [n, n]``."""
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
