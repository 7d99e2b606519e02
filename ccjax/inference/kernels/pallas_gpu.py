"""Pallas GPU backend of the grouped matmul (see :mod:`ccjax.inference.kernels.xla`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ccjax.inference.kernels import xla

# Triton's tl.dot needs every tile side to be at least this and a power of two.
_MIN_TILE = 16


def _grouped_matmul_kernel(index_ref, x_ref, w_ref, out_ref):
  group = pl.program_id(0)
  block = index_ref[group]
  weight = w_ref[block]
  out_ref[...] = jnp.dot(x_ref[...], weight,
                         preferred_element_type=jnp.float32).astype(out_ref.dtype)


def _next_pow2(value: int) -> int:
  return max(_MIN_TILE, 1 << (value - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("interpret",))
def grouped_matmul_pallas(x: jax.Array, weights: jax.Array, weight_index: jax.Array, *,
                          interpret: bool = False) -> jax.Array:
  """Pallas path of :func:`grouped_matmul`: one program per group.

  Program ``g`` loads the ``[rows, k]`` tile of group ``g`` and weight block
  ``weights[weight_index[g]]`` directly from the block-major array (the index is read
  inside the kernel), multiplies them with ``tl.dot`` and writes ``[rows, n]``. Tile
  sides are padded to powers of two >= 16 for Triton.

  Args:
    x: ``[groups, rows, k]``.
    weights: ``[weights, k, n]``.
    weight_index: ``[groups]`` int block ids.
    interpret: run the kernel in the Pallas interpreter (any backend; used by tests).

  Returns:
    ``[groups, rows, n]`` in ``x.dtype``.
  """
  xla.check_shapes(x, weights, weight_index)
  groups, rows, depth = x.shape
  width = weights.shape[2]
  rows_p, depth_p, width_p = _next_pow2(rows), _next_pow2(depth), _next_pow2(width)
  x_p = jnp.pad(x, ((0, 0), (0, rows_p - rows), (0, depth_p - depth)))
  w_p = jnp.pad(weights, ((0, 0), (0, depth_p - depth), (0, width_p - width)))
  out = pl.pallas_call(
      _grouped_matmul_kernel,
      grid=(groups,),
      in_specs=[
          pl.BlockSpec((groups,), lambda g: (0,)),
          pl.BlockSpec((None, rows_p, depth_p), lambda g: (g, 0, 0)),
          pl.BlockSpec(w_p.shape, lambda g: (0, 0, 0)),
      ],
      out_specs=pl.BlockSpec((None, rows_p, width_p), lambda g: (g, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((groups, rows_p, width_p), x.dtype),
      interpret=interpret,
  )(weight_index.astype(jnp.int32), x_p, w_p)
  return out[:, :rows, :width]


def grouped_matmul(x: jax.Array, weights: jax.Array, weight_index: jax.Array | None = None,
                   *, transpose_rhs: bool = False) -> jax.Array:
  """As :func:`ccjax.inference.kernels.xla.grouped_matmul_xla`, through the Pallas kernel
  (in the Pallas interpreter when the default backend is not a GPU)."""
  if transpose_rhs:
    weights = jnp.swapaxes(weights, 1, 2)
  if weight_index is None:
    weight_index = jnp.arange(x.shape[0], dtype=jnp.int32)
  return grouped_matmul_pallas(x, weights, weight_index,
                               interpret=jax.default_backend() != "gpu")
