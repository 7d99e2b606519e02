"""Sparse inference of a :class:`ccjax.GatedTransformer`: every gated MLP on the MLP path.

Axis letters: ``batch`` sequences, ``seq`` positions, ``d`` model width, ``blocks``
gated blocks of one MLP.

Each transformer layer's MLP is a one-hidden-layer :class:`ccjax.GatedMLP` with one mask
per position; here it runs through :func:`ccjax.inference.mlp.sparse_forward` (block-major
layout built once per layer, the ``batch * seq`` positions as the rows, any backend).
Attention, LayerNorms, embeddings and the head run densely with XLA. The static
capacities (:class:`~ccjax.inference.capacity.SparseConfig`, one per layer) come from
:func:`ccjax.inference.api.layer_sparse_configs`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax

from ccjax import transformer as transformer_lib
from ccjax.inference import kernels
from ccjax.inference import layout
from ccjax.inference import mlp
from ccjax.inference.capacity import SparseConfig
from ccjax.inference.layout import LayerTrace


def layer_block_majors(model: transformer_lib.GatedTransformer, params, *,
                       pallas_tiles: bool | None = None) -> tuple[layout.BlockMajorMLP, ...]:
  """The block-major layout of every layer's MLP (one-layer :class:`BlockMajorMLP` each).

  Args:
    model: a gated transformer.
    params: its parameters.
    pallas_tiles: see :func:`ccjax.inference.layout.to_block_major`.
  """
  return tuple(layout.to_block_major(model.mlp_module(index), mlp_params,
                                     pallas_tiles=pallas_tiles)
               for index, mlp_params in enumerate(model.mlp_params(params)))


def backend_and_layout(model: transformer_lib.GatedTransformer, params, backend: str | None
                       ) -> tuple[str, tuple[layout.BlockMajorMLP, ...]]:
  """The kernel backend chosen once for this model, and the MLPs' layout made for it.

  Args:
    model: a gated transformer.
    params: its parameters.
    backend: a forced backend name, or ``None`` (see
      :func:`ccjax.inference.kernels.select_backend`).

  Returns:
    ``(backend name, layer_block_majors(...))``.
  """
  backend = kernels.select_backend(backend, float32=layout.all_float32(params),
                                   family=kernels.base.TRANSFORMER)
  return backend, layer_block_majors(model, params,
                                     pallas_tiles=kernels.get(backend).layout_tiles)


def sparse_mlp(block_major: layout.BlockMajorMLP, config: SparseConfig, hidden: jax.Array
               ) -> tuple[jax.Array, LayerTrace]:
  """One transformer layer's MLP on the sparse path, every position a row.

  Args:
    block_major: the layer's one-layer block-major MLP.
    config: its static capacities for ``rows = prod(hidden.shape[:-1])``.
    hidden: ``[..., d]`` the MLP input (after the LayerNorm).

  Returns:
    ``(out [..., d], trace)``, the trace over the ``rows`` flattened positions.
  """
  out, (trace,) = mlp.sparse_forward(block_major, hidden.reshape(-1, hidden.shape[-1]), config)
  return out.reshape(hidden.shape[:-1] + out.shape[-1:]), trace


def sparse_mlp_fns(block_majors: Sequence[layout.BlockMajorMLP],
                   configs: Sequence[SparseConfig], traces: list[LayerTrace] | None = None
                   ) -> tuple[Any, ...]:
  """Per-layer ``hidden [..., d] -> out [..., d]`` functions for ``GatedTransformer``'s
  ``mlp_fns=``; each appends its :class:`LayerTrace` to ``traces`` when given (create the
  list inside the traced function)."""

  def run(block_major, config, hidden):
    out, trace = sparse_mlp(block_major, config, hidden)
    if traces is not None:
      traces.append(trace)
    return out

  return tuple(functools.partial(run, block_major, config)
               for block_major, config in zip(block_majors, configs))


def sparse_apply(model: transformer_lib.GatedTransformer, params,
                 block_majors: Sequence[layout.BlockMajorMLP], configs: Sequence[SparseConfig],
                 tokens: jax.Array) -> tuple[jax.Array, tuple[LayerTrace, ...]]:
  """The transformer with every MLP on the sparse path (traceable under ``jax.jit``).

  Args:
    model: the gated transformer.
    params: its parameters (the MLPs' own are not read: ``block_majors`` replace them).
    block_majors: :func:`layer_block_majors` of ``params``.
    configs: one static :class:`SparseConfig` per layer for ``batch * seq`` rows.
    tokens: ``[batch, seq]`` int token ids.

  Returns:
    ``(logits [batch, seq, vocab], traces)``, one :class:`LayerTrace` per layer over the
    ``batch * seq`` rows.
  """
  traces = []
  logits, _ = model.apply({"params": params}, tokens, mode="threshold",
                          mlp_fns=sparse_mlp_fns(block_majors, configs, traces))
  return logits, tuple(traces)
