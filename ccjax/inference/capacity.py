"""Static capacities of the sparse MLP path, the masks it used, and its overflow rate.

See :mod:`ccjax.inference.mlp` for which blocks run and what overflow means.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from ccjax import policy as policy_lib
from ccjax.inference import kernels
from ccjax.inference.info import InferenceInfo
from ccjax.inference.layout import BlockMajorMLP
from ccjax.inference.layout import LayerTrace


@dataclasses.dataclass(frozen=True)
class SparseConfig:
  """Static capacities of the sparse path (hashable: pass it as a static argument).

  Attributes:
    example_capacity: ``k`` per layer, blocks per example, ``1 <= k <= nb``.
    block_capacity: ``C`` per layer, examples per block (minibatch path).
    pair_capacity: ``C2`` per layer, triples per weight block (minibatch path, used by
      layers with a gated input; the first entry is ignored).
    buckets: optional static slot counts per layer for the batch-1 path, ascending and
      ending with ``k``; the first layer (and every layer's next-policy product) then
      runs with the smallest bucket that holds its active count, and a layer with a
      gated input with the smallest product of its input and output buckets that holds
      its active pair count (``lax.switch``), so the work follows the real count.
    backend: kernel backend, one of :data:`ccjax.inference.kernels.BACKENDS`.
    exact_k: the ``top_k`` policy: every example runs exactly ``example_capacity``
      blocks, its most probable ones, with no ``p > 0.5`` threshold (fixed compute);
      ``False``: blocks above the threshold, at most ``example_capacity`` of them.
  """
  example_capacity: tuple[int, ...]
  block_capacity: tuple[int, ...]
  pair_capacity: tuple[int, ...]
  buckets: tuple[tuple[int, ...], ...] | None = None
  backend: str = "xla"
  exact_k: bool = False

  def wanted(self, top_values: jax.Array) -> jax.Array:
    """Which of an example's ``k`` most probable blocks ask to run (bool, same shape)."""
    if self.exact_k:
      return jnp.ones(top_values.shape, bool)
    return top_values > policy_lib.THRESHOLD

  def candidates(self, probs: jax.Array, k: int) -> jax.Array:
    """Scalar int32: (example, block) pairs that ask to run before capacities, for a layer
    with ``probs [batch, blocks]`` and per-example capacity ``k``."""
    if self.exact_k:
      return jnp.asarray(probs.shape[0] * k, jnp.int32)
    return jnp.sum((probs > policy_lib.THRESHOLD).astype(jnp.int32))

  def validate(self, model: BlockMajorMLP) -> "SparseConfig":
    num_layers = len(model.layers)
    for name in ("example_capacity", "block_capacity", "pair_capacity"):
      values = getattr(self, name)
      if len(values) != num_layers or any(int(v) < 1 for v in values):
        raise ValueError(f"{name} needs {num_layers} positive integers, got {values!r}")
    for value, nb in zip(self.example_capacity, model.num_blocks):
      if not 1 <= value <= nb:
        raise ValueError(f"example_capacity must be in [1, {nb}], got {value!r}")
    if self.buckets is not None:
      if len(self.buckets) != num_layers:
        raise ValueError(f"buckets needs one tuple per layer ({num_layers})")
      for sizes, capacity in zip(self.buckets, self.example_capacity):
        if (not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1
            or sizes[-1] != capacity):
          raise ValueError(f"buckets must ascend from >= 1 to the capacity {capacity}, "
                           f"got {sizes!r}")
    backend = kernels.get(self.backend)
    if backend.float32_only and not model.float32:
      raise ValueError(f"backend {backend.name} runs float32 models only; use backend='xla'")
    return self


def poisson_capacity(mean: float, limit: int) -> int:
  """A capacity for a Poisson-like load of ``mean``: mean + 3 sd + 1, in ``[1, limit]``."""
  return int(min(limit, max(1, math.ceil(mean + 3.0 * math.sqrt(mean) + 1.0))))


def make_sparse_config(model: BlockMajorMLP, batch_size: int,
                       active_fraction: float | Sequence[float] | None = None, *,
                       example_slack: float = 2.0, num_buckets: int = 1,
                       backend: str | None = "xla") -> SparseConfig:
  """Capacities for a batch size and an expected active fraction.

  Args:
    model: the block-major model.
    batch_size: examples per call.
    active_fraction: expected fraction of blocks a layer runs per example (one value or
      one per layer); ``None`` gives exact capacities (nothing can overflow).
    example_slack: ``k = ceil(example_slack * fraction * nb)``.
    num_buckets: batch-1 bucket count per layer (sizes ``k / n, 2k / n, ..., k``).
    backend: the kernel backend already chosen for the model (a registered name, not
      selected again); ``None``: :func:`ccjax.inference.kernels.select_backend`.

  Returns:
    a validated :class:`SparseConfig`. ``C`` and ``C2`` are Poisson-style margins
    (mean + 3 sd + 1) over the expected load of a block / weight block.
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  num_blocks = model.num_blocks
  if active_fraction is None:
    example = tuple(num_blocks)
    block = pair = (batch_size,) * len(num_blocks)
  else:
    fractions = ((float(active_fraction),) * len(num_blocks)
                 if isinstance(active_fraction, (int, float)) else tuple(active_fraction))
    if len(fractions) != len(num_blocks) or not all(0.0 < f <= 1.0 for f in fractions):
      raise ValueError(f"active_fraction must be in (0, 1], one value or one per layer, "
                       f"got {active_fraction!r}")
    example = tuple(min(nb, max(1, math.ceil(example_slack * f * nb)))
                    for f, nb in zip(fractions, num_blocks))
    block = tuple(poisson_capacity(batch_size * f, batch_size) for f in fractions)
    pair = (batch_size,) + tuple(
        poisson_capacity(batch_size * f_in * f_out, batch_size)
        for f_in, f_out in zip(fractions[:-1], fractions[1:]))
  buckets = None
  if num_buckets > 1:
    buckets = tuple(tuple(sorted({max(1, math.ceil(k * (b + 1) / num_buckets))
                                  for b in range(num_buckets)})) for k in example)
  if backend is None:
    backend = kernels.select_backend(float32=model.float32)
  return SparseConfig(example, block, pair, buckets, backend).validate(model)


def trace_masks(traces: Sequence[LayerTrace], num_blocks: Sequence[int]) -> tuple[jax.Array, ...]:
  """The effective ``[batch, blocks]`` 0/1 masks the sparse path used, one per layer."""
  masks = []
  for trace, nb in zip(traces, num_blocks):
    batch = trace.block_index.shape[0]
    mask = jnp.zeros((batch, nb), jnp.float32)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], trace.block_index.shape)
    masks.append(mask.at[rows, trace.block_index].max(trace.kept.astype(jnp.float32)))
  return tuple(masks)


def traces_info(traces: Sequence[LayerTrace], num_blocks: Sequence[int]) -> InferenceInfo:
  """The :class:`~ccjax.inference.info.InferenceInfo` of the MLP path's traces."""
  return InferenceInfo(
      masks=trace_masks(traces, num_blocks), probs=tuple(trace.probs for trace in traces),
      requested=jnp.stack([trace.num_candidates for trace in traces]),
      dropped=jnp.stack([trace.num_candidates - trace.num_kept for trace in traces]))
