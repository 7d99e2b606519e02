"""Roofline accounting of one gated-MLP inference call on the default JAX device (a GPU).

For each call: the bytes it must move (the weight blocks, tiles and policy rows that at
least one example of the batch uses, plus inputs and logits), its multiply-adds, the
device's measured read bandwidth and multiply-add rate, the bound
``max(bytes / bandwidth, MACs / rate)`` and the measured fraction of it
(``bound / measured``: 1.0 is at the roofline). Dense calls are counted the same way
(every weight once).

Axis letters: ``batch`` examples, ``blocks`` (``nb``) blocks of a layer.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def sparse_mlp_weight_elements(masks: Sequence[np.ndarray], input_dim: int, block_size: int,
                               num_classes: int) -> int:
  """Weight elements a sparse call reads: what at least one example of the batch uses.

  Args:
    masks: one ``[batch, blocks]`` 0/1 mask per hidden layer (the blocks that ran).
    input_dim: input features.
    block_size: units per block.
    num_classes: logits.

  Returns:
    the first policy (dense input), the first layer's active blocks, per later layer the
    policy rows of its used input blocks and the weight tiles ``(i, j)`` some example
    uses, and the output rows of the used last-layer blocks (biases not counted).
  """
  used = [np.asarray(mask) > 0 for mask in masks]
  total = input_dim * used[0].shape[1]
  total += int(used[0].any(axis=0).sum()) * input_dim * block_size
  for previous, current in zip(used[:-1], used[1:]):
    total += int(previous.any(axis=0).sum()) * block_size * current.shape[1]
    tiles = (previous.T.astype(np.int64) @ current.astype(np.int64)) > 0
    total += int(tiles.sum()) * block_size * block_size
  total += int(used[-1].any(axis=0).sum()) * block_size * num_classes
  return total


def dense_mlp_weight_elements(input_dim: int, hidden: Sequence[int], num_classes: int) -> int:
  """Weight elements of the dense MLP (no policies)."""
  widths = (input_dim, *hidden, num_classes)
  return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def _best_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def read_bandwidth(megabytes: int = 1024, repeats: int = 10) -> float:
  """Best-of read bandwidth (bytes/s) of the default device: a float32 sum over
  ``megabytes`` (use well over the last-level cache: 1 GiB on an H100/H200)."""
  data = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  return data.nbytes / _best_seconds(jax.jit(jnp.sum), data, repeats=repeats)


def matmul_rate(size: int = 4096, dtype=jnp.float32, repeats: int = 10) -> float:
  """Best-of multiply-add rate (MAC/s) of a ``[size, size] @ [size, size]`` product at
  ``Precision.HIGHEST`` (float32 without TF32, like the kernels)."""
  a = jnp.ones((size, size), dtype)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST,
                                     preferred_element_type=jnp.float32))
  return size ** 3 / _best_seconds(dot, a, a, repeats=repeats)


def call_roofline(num_bytes: float, macs: float, measured_ms: float, bandwidth: float,
                  mac_rate: float) -> dict[str, Any]:
  """One call against the roofline.

  Args:
    num_bytes: bytes the call must move.
    macs: multiply-adds of the call.
    measured_ms: its measured median time.
    bandwidth: device bytes/s (:func:`read_bandwidth`).
    mac_rate: device MAC/s (:func:`matmul_rate`).

  Returns:
    ``{"bytes", "macs", "bound_ms", "bound_by" ("bandwidth" | "compute"), "measured_ms",
    "fraction_of_bound", "achieved_gbs"}``.
  """
  byte_ms, mac_ms = 1e3 * num_bytes / bandwidth, 1e3 * macs / mac_rate
  bound_ms = max(byte_ms, mac_ms)
  return {"bytes": float(num_bytes), "macs": float(macs), "bound_ms": bound_ms,
          "bound_by": "bandwidth" if byte_ms >= mac_ms else "compute",
          "measured_ms": float(measured_ms), "fraction_of_bound": bound_ms / measured_ms,
          "achieved_gbs": num_bytes / (measured_ms * 1e-3) / 1e9}


def mlp_call_accounting(mask_sets: Sequence[Sequence[np.ndarray]], *, input_dim: int,
                        hidden: Sequence[int], block_size: int, num_classes: int,
                        itemsize: int, sparse_macs: float, dense_macs: float,
                        sparse_ms: float, dense_ms: float, bandwidth: float,
                        mac_rate: float) -> dict[str, Any]:
  """Dense and sparse roofline entries of a call at one batch size.

  Args:
    mask_sets: the effective masks of the timed calls (their inputs differ): per call one
      ``[batch, blocks]`` mask per hidden layer; sparse bytes are their mean.
    input_dim, hidden, block_size, num_classes: the MLP.
    itemsize: bytes per weight / activation element.
    sparse_macs, dense_macs: mean multiply-adds per example (policies included for sparse).
    sparse_ms, dense_ms: measured medians of a whole call.
    bandwidth, mac_rate: the device's (:func:`read_bandwidth`, :func:`matmul_rate`).

  Returns:
    ``{"dense": call_roofline(...), "sparse": call_roofline(...)}``; bytes include the
    inputs and logits of the batch.
  """
  batch = np.asarray(mask_sets[0][0]).shape[0]
  io = batch * (input_dim + num_classes)
  sparse = np.mean([sparse_mlp_weight_elements(masks, input_dim, block_size, num_classes)
                    for masks in mask_sets]) + io
  dense = dense_mlp_weight_elements(input_dim, hidden, num_classes) + io
  return {"dense": call_roofline(dense * itemsize, dense_macs * batch, dense_ms, bandwidth,
                                 mac_rate),
          "sparse": call_roofline(sparse * itemsize, sparse_macs * batch, sparse_ms,
                                  bandwidth, mac_rate)}
