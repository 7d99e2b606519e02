"""Jitted sparse inference for a trained :class:`ccjax.GatedMLP` that skips inactive blocks.

Axis letters: ``batch`` examples; ``in`` input features; ``bs`` units per block;
``blocks`` (``nb``) blocks of a layer; ``k`` per-example capacity (slots of a compact
activation); ``C`` per-block capacity (examples per block); ``P = out_blocks *
in_blocks`` weight blocks of a hidden->hidden layer; ``C2`` per-weight-block capacity.

Layout: :func:`~ccjax.inference.layout.to_block_major` (contiguous weight blocks; a
hidden layer with a gated input and its policy read only the active input blocks).

Activations travel compactly: ``h [batch, k, bs]`` with block ids ``[batch, k]`` and a
``kept [batch, k]`` flag (inactive slots hold zeros).

Which blocks run (deterministic, static shapes). For every gated layer:

1. *threshold*: block ``j`` is a candidate when ``p_j > 0.5`` (``p`` from the policy on
   the layer's actual, sparse input, as in ``mode='threshold'``);
2. *per-example capacity* ``k``: at most ``k`` candidates per example run, the most
   probable ones (ties: lower block id) -- exactly ``mode='top_k'`` with capacity ``k``;
3. (minibatch only) *per-block capacity* ``C``: at most ``C`` examples run block ``j``,
   those with the highest ``p_j`` (ties: lower example index);
4. (minibatch, gated input only) *per-weight-block capacity* ``C2``: the (example,
   input block ``i``, output block ``j``) triples that need weight block ``(i, j)``
   are served in order of decreasing ``p_j`` (ties: lower example index, then slot);
   an (example, output block) with any unserved triple is dropped whole.

A candidate dropped by 2-4 is *treated as inactive*: its units are exactly zero, as if
its mask were 0, so the output equals :class:`ccjax.GatedMLP` applied with ``block_masks=`` the
effective masks (:func:`~ccjax.inference.capacity.trace_masks`). The overflow rate
(:func:`ccjax.overflow_rate`) = dropped candidates /
candidates (over examples, blocks and layers). With the exact capacities
(``k = nb``, ``C = C2 = batch``, the :func:`make_sparse_config` default) nothing can
overflow and the result is the ``threshold``-mode network.

Work: the batch-1 path gathers only the active weight blocks and the policy rows of
the active input blocks. With slot buckets (``SparseConfig.buckets``) the first layer
runs the smallest bucket ``s >= c_out`` of kernel blocks, and a hidden layer with a gated
input runs the smallest *pair bucket* (a product of its input and output layers' slot
buckets, :func:`pair_buckets`) that holds its ``c_in * c_out`` active weight blocks,
enumerated flat (pair ``q`` = input slot ``q % c_in``, output slot ``q // c_in``), so the
gathered weights follow the real two-sided count. Buckets only change the work, never
the result. The minibatch path
groups (example, block) pairs by block (examples per output block for the first layer
and for policies / the output layer; triples per weight block for hidden->hidden
layers) into static ``[groups, capacity, ...]`` arrays and runs one grouped matmul
(:func:`ccjax.inference.kernels.grouped_matmul`, Pallas on GPU).

Backends (:mod:`ccjax.inference.kernels`, chosen once: ``SparseConfig.backend``) plug
in where they have a kernel: ``ffi-cpu`` runs the whole network as one FFI call
(``Backend.network_forward``); ``pallas-gpu`` runs batch 1 as Pallas kernels that fuse
policy, selection and block products
(:func:`~ccjax.inference.kernels.pallas_gpu_gemv.fused_forward_single`, its
``Backend.batch1_forward``: three launches per hidden layer, loops that follow the real
active counts, no buckets) and minibatches through its grouped-matmul kernel
(``Backend.grouped_matmul``); ``xla`` runs the paths above with stock XLA ops. Every
backend runs the same blocks and returns the same traces.
"""

from __future__ import annotations

import jax

from ccjax.inference import kernels
from ccjax.inference.batch1 import sparse_forward_single
from ccjax.inference.capacity import SparseConfig
from ccjax.inference.layout import BlockMajorMLP
from ccjax.inference.layout import LayerTrace
from ccjax.inference.minibatch import sparse_forward_batch


def sparse_forward(model: BlockMajorMLP, x: jax.Array, config: SparseConfig
                   ) -> tuple[jax.Array, tuple[LayerTrace, ...]]:
  """Sparse inference that computes only the blocks that run.

  Jit it with ``config`` static: ``jax.jit(sparse_forward, static_argnums=2)``. The
  backend ``config.backend`` runs the whole network when it has a kernel for it
  (``ffi-cpu``: one XLA FFI call, same blocks and traces). Otherwise a batch of one
  example takes the batch-1 path (the backend's own, e.g. the fused Pallas kernels of
  ``pallas-gpu``, else gathers of the active weight blocks, optionally bucketed), larger
  batches the grouped minibatch path (on the backend's grouped matmul). See the module
  docstring for which blocks run and what happens on overflow.

  Args:
    model: block-major parameters from :func:`to_block_major`.
    x: ``[batch, ...]`` inputs, flattened to ``[batch, in]``.
    config: static capacities (:func:`make_sparse_config`).

  Returns:
    ``(logits [batch, classes], traces)`` with one :class:`LayerTrace` per hidden layer.
  """
  x = x.reshape(x.shape[0], -1)
  if x.shape[1] != model.input_dim:
    raise ValueError(f"x has {x.shape[1]} features, the model expects {model.input_dim}")
  backend = kernels.get(config.backend)
  if backend.network_forward is not None:
    return backend.network_forward(model, x, config)
  if x.shape[0] == 1:
    logits, traces = (backend.batch1_forward or sparse_forward_single)(model, x[0], config)
    return logits[None], traces
  return sparse_forward_batch(model, x, config)
