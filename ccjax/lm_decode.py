"""Token-by-token decoding of a :class:`ccjax.GatedTransformer`, dense or sparse.

Axis letters: ``d`` model width, ``blocks`` MLP blocks.

The sparse decode step runs every gated MLP through the batch-1 sparse path of
:mod:`ccjax.inference` (block-major layout, only the active weight blocks are read; the
threshold rule ``p > 0.5`` capped at ``k`` blocks); attention, LayerNorms and the head
run densely, with the KV cache. The dense step is the same model with ``gated=False``
(policies stripped): the dense network of the same width.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ccjax import layers
from ccjax import timing
from ccjax import transformer
from ccjax.inference import capacity as capacity_lib
from ccjax.inference import layout as layout_lib
from ccjax.inference import mlp as mlp_lib


class DecodeFns(NamedTuple):
  """A jitted decode step and what it needs.

  Attributes:
    step: ``(weights, cache, token [1, 1]) -> (logits [1, vocab], cache)``.
    weights: its first argument (parameters, plus block-major MLPs when sparse).
    mlp: ``(weights, hidden) -> out``, every layer's MLP on ``hidden [layers, 1, d]``
      (MLP-only timing), jitted.
    model: the module the step applies.
  """
  step: Callable
  weights: Any
  mlp: Callable
  model: transformer.GatedTransformer


def _sparse_mlp(block_major, config, hidden: jax.Array) -> jax.Array:
  """``hidden [batch, seq, d]`` (batch * seq == 1 at decode) through the sparse path."""
  out, _ = mlp_lib.sparse_forward(block_major, hidden.reshape(-1, hidden.shape[-1]), config)
  return out.reshape(hidden.shape[:-1] + out.shape[-1:])


def make_decode(model: transformer.GatedTransformer, params, *, sparse: bool,
                active_fraction: Sequence[float] | None = None, num_buckets: int = 4
                ) -> DecodeFns:
  """Builds the batch-1 decode step.

  Args:
    model: the trained transformer.
    params: its parameters.
    sparse: gated MLPs through the batch-1 sparse path (needs ``model.gated``);
      ``False``: the dense model of the same width (policies stripped).
    active_fraction: expected active fraction per layer (sets the static capacity
      ``k = ceil(2 * fraction * blocks)`` and its buckets); ``None``: every block may run.
    num_buckets: batch-1 slot-count buckets (the gathered work follows the real count).

  Returns:
    :class:`DecodeFns`.
  """
  if not sparse:
    dense = model.clone(gated=False, parent=None)
    dense_params = layers.strip_policy_params(params)
    mlps = [dense.mlp_module(i) for i in range(model.num_layers)]

    def dense_mlp(weights, hidden):
      return jnp.stack([m.apply({"params": p}, h, mode="all")[0]
                        for m, p, h in zip(mlps, dense.mlp_params(weights), hidden)])

    def dense_step(weights, cache, token):
      (logits, _), mutated = dense.apply({"params": weights, "cache": cache}, token,
                                         mode="all", decode=True, mutable=["cache"])
      return logits[:, -1], mutated["cache"]

    return DecodeFns(jax.jit(dense_step), dense_params, jax.jit(dense_mlp), dense)
  if not model.gated:
    raise ValueError("a sparse decode step needs a gated model")
  block_majors = tuple(layout_lib.to_block_major(model.mlp_module(i), p)
                       for i, p in enumerate(model.mlp_params(params)))
  configs = tuple(capacity_lib.make_sparse_config(
      bm, 1, None if active_fraction is None else [active_fraction[i]],
      num_buckets=num_buckets) for i, bm in enumerate(block_majors))

  def mlp_fns(majors):
    return tuple(functools.partial(_sparse_mlp, bm, config)
                 for bm, config in zip(majors, configs))

  def sparse_step(weights, cache, token):
    net_params, majors = weights
    (logits, _), mutated = model.apply({"params": net_params, "cache": cache}, token,
                                       mode="threshold", decode=True, mlp_fns=mlp_fns(majors),
                                       mutable=["cache"])
    return logits[:, -1], mutated["cache"]

  def sparse_mlp(weights, hidden):
    return jnp.stack([fn(h) for fn, h in zip(mlp_fns(weights[1]), hidden)])

  return DecodeFns(jax.jit(sparse_step), (params, block_majors), jax.jit(sparse_mlp), model)


def _advance(fns: DecodeFns, cache, tokens: Sequence[int]):
  logits = None
  for token in tokens:
    logits, cache = fns.step(fns.weights, cache, jnp.asarray([[token]], jnp.int32))
  return logits, cache


def generate(fns: DecodeFns, prompt: bytes, num_bytes: int, key: jax.Array,
             temperature: float = 1.0) -> bytes:
  """Samples ``num_bytes`` bytes after ``prompt`` (non-empty) with the KV cache.

  When the cache is full, it is rebuilt from the last ``max_len // 2`` bytes.
  """
  if not prompt:
    raise ValueError("generate needs a non-empty prompt")
  max_len = fns.model.max_len
  history = list(prompt[-max_len:])
  logits, cache = _advance(fns, transformer.init_cache(fns.model, 1), history)
  position, out = len(history), []
  for index in range(num_bytes):
    sample_key = jax.random.fold_in(key, index)
    token = int(jax.random.categorical(sample_key, logits[0] / temperature))
    out.append(token)
    history.append(token)
    if position == max_len:
      history = history[-(max_len // 2):]
      logits, cache = _advance(fns, transformer.init_cache(fns.model, 1), history)
      position = len(history)
    else:
      logits, cache = fns.step(fns.weights, cache, jnp.asarray([[token]], jnp.int32))
      position += 1
  return bytes(out)


def mlp_inputs(model: transformer.GatedTransformer, params, tokens: np.ndarray) -> jax.Array:
  """The MLP inputs of every layer on ``tokens [1, seq]``: ``[layers, seq, 1, d]``."""
  recorded = []

  def recording(index, hidden):
    recorded.append(hidden)
    mlp = model.mlp_module(index)
    return mlp.apply({"params": model.mlp_params(params)[index]}, hidden, mode="threshold")[0]

  model.apply({"params": params}, jnp.asarray(tokens), mode="threshold",
              mlp_fns=[functools.partial(recording, i) for i in range(model.num_layers)])
  return jnp.stack([h[0] for h in recorded])[:, :, None, :]


def benchmark(model: transformer.GatedTransformer, params, tokens: np.ndarray,
              active_fraction: Sequence[float] | None, *, repeats: int = 200,
              num_inputs: int = 16) -> dict[str, Any]:
  """Batch-1 time per token: whole decode step and MLPs only, dense vs sparse.

  Args:
    model: a trained transformer (``gated``: dense and sparse are timed; else dense only).
    params: its parameters.
    tokens: ``[1, seq]`` a real context (e.g. a test window); the step is timed at its
      middle (half the cache filled), the MLPs on the hidden states of ``num_inputs``
      of its positions (the work of the sparse path follows each one's real count).
    active_fraction: measured active fraction per layer (sets the sparse capacities).
    repeats: timed calls per variant, interleaved (:func:`ccjax.timing.interleaved_median_ms`).
    num_inputs: positions whose MLP inputs are cycled over.

  Returns:
    ``decode_ms_per_token`` and ``mlp_ms_per_token`` dicts ``{dense, sparse}``
    (``sparse`` ``None`` for a dense model), medians in milliseconds.
  """
  variants = {"dense": make_decode(model, params, sparse=False)}
  if model.gated:
    variants["sparse"] = make_decode(model, params, sparse=True,
                                     active_fraction=active_fraction)
  half = max(1, tokens.shape[1] // 2)
  hidden = mlp_inputs(model, params, tokens[:, :num_inputs])           # [layers, n, 1, d]
  step_calls, mlp_calls = [], []
  for fns in variants.values():
    _, cache = _advance(fns, transformer.init_cache(model, 1), tokens[0, :half].tolist())
    token = jnp.asarray(tokens[:, half:half + 1], jnp.int32)
    step_calls.append((fns.step, [(fns.weights, cache, token)]))
    mlp_calls.append((fns.mlp, [(fns.weights, hidden[:, i]) for i in range(hidden.shape[1])]))
  step_ms = timing.interleaved_median_ms(step_calls, repeats=repeats)
  mlp_ms = timing.interleaved_median_ms(mlp_calls, repeats=repeats)
  names = list(variants)
  result = {"decode_ms_per_token": {"dense": step_ms[0], "sparse": None},
            "mlp_ms_per_token": {"dense": mlp_ms[0], "sparse": None}}
  for name, step_time, mlp_time in zip(names, step_ms, mlp_ms):
    result["decode_ms_per_token"][name] = step_time
    result["mlp_ms_per_token"][name] = mlp_time
  return result
