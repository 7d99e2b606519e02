"""Token-by-token decoding of a :class:`ccjax.GatedTransformer`, dense or sparse.

Axis letters: ``d`` model width, ``blocks`` MLP blocks, ``layers`` transformer layers,
``n`` tokens of an MLP-only timing scan.

The sparse decode step runs every gated MLP through the same per-layer sparse function
as :func:`ccjax.make_inference` on a transformer
(:func:`ccjax.inference.transformer.sparse_mlp`: block-major layout, only the active
weight blocks are read) on the backend :func:`ccjax.select_backend` picks (``ffi-cpu``
where it is built, ``$CCJAX_BACKEND`` honoured), with the test-time ``mode``
``threshold``, ``top_k`` (exactly ``top_k`` blocks per token: a top-k router decodes
with its fixed compute) or ``capped``; attention, LayerNorms and the head run densely
with XLA and the KV cache. The dense step is the same model with ``gated=False``
(policies stripped): the dense network of the same width.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ccjax import layers
from ccjax import timing
from ccjax import transformer
from ccjax.inference import api
from ccjax.inference import kernels
from ccjax.inference import transformer as inference_transformer

# A layer's MLP for decoding: ``(weights, layer, hidden [1, d]) -> out [1, d]``.
LayerMLP = Callable[[Any, int, jax.Array], jax.Array]


class DecodeFns(NamedTuple):
  """A jitted decode step and what it needs.

  Attributes:
    step: ``(weights, cache, token [1, 1]) -> (logits [1, vocab], cache)``.
    weights: its first argument (parameters, plus block-major MLPs when sparse).
    mlp: ``(weights, hidden [layers, 1, d]) -> out [layers, 1, d]``, every layer's MLP on
      its own input, one jitted call (MLP time per call, dispatch included).
    mlp_scan: ``(weights, hidden [n, layers, 1, d]) -> out [n, layers, 1, d]``: the ``n``
      tokens one after another inside one jitted call (``lax.scan``, a ``[1, d]`` row
      per layer and token, nothing batched across tokens): MLP compute per token.
    model: the module the step applies.
    backend: the kernel backend of the MLPs (``xla`` for the dense step).
  """
  step: Callable
  weights: Any
  mlp: Callable
  mlp_scan: Callable
  model: transformer.GatedTransformer
  backend: str


def _layers_mlp(layer_mlp: LayerMLP, weights, hidden: jax.Array) -> jax.Array:
  """``hidden [layers, 1, d]`` -> ``[layers, 1, d]``, layer ``l``'s MLP on ``hidden[l]``."""
  return jnp.stack([layer_mlp(weights, index, row) for index, row in enumerate(hidden)])


def _scanned_mlp(layer_mlp: LayerMLP, weights, hidden: jax.Array) -> jax.Array:
  """``hidden [n, layers, 1, d]`` -> ``[n, layers, 1, d]``, token after token (lax.scan)."""
  def one_token(carry, token_hidden):
    return carry, _layers_mlp(layer_mlp, weights, token_hidden)

  return jax.lax.scan(one_token, None, hidden)[1]


def _decode_fns(model: transformer.GatedTransformer, weights, step: Callable,
                layer_mlp: LayerMLP, backend: str) -> DecodeFns:
  return DecodeFns(
      step=jax.jit(step), weights=weights,
      mlp=jax.jit(lambda w, hidden: _layers_mlp(layer_mlp, w, hidden)),
      mlp_scan=jax.jit(lambda w, hidden: _scanned_mlp(layer_mlp, w, hidden)),
      model=model, backend=backend)


def _make_dense_decode(model: transformer.GatedTransformer, params) -> DecodeFns:
  dense = model.clone(gated=False, parent=None)
  mlps = [dense.mlp_module(i) for i in range(model.num_layers)]

  def dense_mlp(weights, index, hidden):
    return mlps[index].apply({"params": dense.mlp_params(weights)[index]}, hidden,
                             mode="all")[0]

  def dense_step(weights, cache, token):
    (logits, _), mutated = dense.apply({"params": weights, "cache": cache}, token,
                                       mode="all", decode=True, mutable=["cache"])
    return logits[:, -1], mutated["cache"]

  return _decode_fns(dense, layers.strip_policy_params(params), dense_step, dense_mlp,
                     kernels.xla.BACKEND.name)


def make_decode(model: transformer.GatedTransformer, params, *, sparse: bool,
                active_fraction: Sequence[float] | None = None, num_buckets: int = 4,
                mode: str = "threshold", top_k: int | Sequence[int] | None = None,
                backend: str | None = None) -> DecodeFns:
  """Builds the batch-1 decode step.

  Args:
    model: the trained transformer.
    params: its parameters.
    sparse: gated MLPs through the batch-1 sparse path (needs ``model.gated``);
      ``False``: the dense model of the same width (policies stripped).
    active_fraction: expected active fraction per layer (sets the static capacity
      ``k = ceil(2 * fraction * blocks)`` and its buckets); ``None``: every block may run.
    num_buckets: batch-1 slot-count buckets (the gathered work follows the real count).
    mode: ``threshold`` (``p > 0.5``), ``top_k`` (exactly ``top_k`` most probable blocks
      per token) or ``capped`` (at most ``top_k`` of the threshold's blocks per token).
    top_k: blocks per token for ``top_k`` / ``capped``, one value or one per layer.
    backend: kernel backend of the sparse MLPs (default:
      :func:`ccjax.inference.kernels.select_backend`).

  Returns:
    :class:`DecodeFns`.
  """
  if not sparse:
    return _make_dense_decode(model, params)
  if not model.gated:
    raise ValueError("a sparse decode step needs a gated model")
  capacities = api.Capacities(
      active_fraction=None if active_fraction is None else tuple(active_fraction),
      num_buckets=num_buckets, top_k=top_k)
  api.check_mode(mode, capacities)
  backend, block_majors = inference_transformer.backend_and_layout(model, params, backend)
  configs = api.layer_sparse_configs(block_majors, 1, mode=mode, capacities=capacities,
                                     backend=backend)

  def sparse_mlp(weights, index, hidden):
    return inference_transformer.sparse_mlp(weights[1][index], configs[index], hidden)[0]

  def sparse_step(weights, cache, token):
    net_params, majors = weights
    (logits, _), mutated = model.apply(
        {"params": net_params, "cache": cache}, token, mode="threshold", decode=True,
        mlp_fns=inference_transformer.sparse_mlp_fns(majors, configs), mutable=["cache"])
    return logits[:, -1], mutated["cache"]

  return _decode_fns(model, (params, block_majors), sparse_step, sparse_mlp, backend)


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


def mlp_inputs(model: transformer.GatedTransformer, params, tokens: np.ndarray, *,
               mode: str = "threshold", top_k: int | Sequence[int] | None = None
               ) -> jax.Array:
  """The MLP inputs of every layer on ``tokens [1, seq]``: ``[layers, seq, 1, d]``.

  The gated MLPs run in ``mode`` (``top_k``: blocks per token for ``top_k`` / ``capped``),
  so that later layers see what the sparse decode step feeds them.
  """
  capacities = api.Capacities(top_k=top_k).top_ks(model.num_layers) or (None,) * model.num_layers
  recorded = []

  def recording(index, hidden):
    recorded.append(hidden)
    mlp = model.mlp_module(index)
    return mlp.apply({"params": model.mlp_params(params)[index]}, hidden, mode=mode,
                     capacity=capacities[index])[0]

  model.apply({"params": params}, jnp.asarray(tokens), mode=mode,
              mlp_fns=[lambda hidden, i=i: recording(i, hidden) for i in range(model.num_layers)])
  return jnp.stack([h[0] for h in recorded])[:, :, None, :]


def scan_inputs(hidden: jax.Array, length: int) -> jax.Array:
  """``hidden [layers, seq, 1, d]`` as ``length`` tokens ``[length, layers, 1, d]`` for
  :attr:`DecodeFns.mlp_scan` (positions in order, cycled when ``seq < length``)."""
  if length < 1:
    raise ValueError(f"scan length must be a positive integer, got {length!r}")
  return jnp.swapaxes(hidden, 0, 1)[np.arange(length) % hidden.shape[1]]


def mlp_ms_per_token_in_scan(variants: Sequence[DecodeFns], hidden: jax.Array, *,
                             repeats: int) -> list[float]:
  """MLP compute time per token of each variant, interleaved in one process.

  Each timed call is one jitted :attr:`DecodeFns.mlp_scan` over the ``n`` tokens of
  ``hidden``, so the dispatch of the call is spread over ``n`` tokens of MLP work.

  Args:
    variants: the decode functions to compare (e.g. dense and sparse).
    hidden: ``[n, layers, 1, d]`` MLP inputs (:func:`scan_inputs`).
    repeats: timed calls per variant.

  Returns:
    median call time / ``n`` in milliseconds, one per variant.
  """
  calls = [(fns.mlp_scan, [(fns.weights, hidden)]) for fns in variants]
  return [ms / hidden.shape[0] for ms in timing.interleaved_median_ms(calls, repeats=repeats)]


def _capacity_fractions(active_fraction: Sequence[float] | None, num_blocks: int
                        ) -> list[float] | None:
  """``active_fraction`` with every layer at least one block (``1 / num_blocks``).

  A layer that ran no block on the benchmark's context has no capacity to size, yet its
  sparse step must still run (its policy can open a block on another token); it is
  sized for one block, with a warning.
  """
  if active_fraction is None:
    return None
  floor = 1.0 / num_blocks
  fractions = [max(float(fraction), floor) for fraction in active_fraction]
  idle = [index for index, fraction in enumerate(active_fraction) if float(fraction) <= 0.0]
  if idle:
    logging.warning("decode benchmark: layer(s) %s ran no block on the benchmark context; "
                    "their sparse capacity is sized for one block (fraction %.4f)", idle, floor)
  return fractions


def benchmark(model: transformer.GatedTransformer, params, tokens: np.ndarray,
              active_fraction: Sequence[float] | None, *, repeats: int = 200,
              num_inputs: int = 16, scan_length: int = 64, scan_repeats: int | None = None,
              mode: str = "threshold", top_k: int | Sequence[int] | None = None,
              backend: str | None = None) -> dict[str, Any]:
  """Batch-1 time per token: whole decode step and MLPs only, dense vs sparse.

  Args:
    model: a trained transformer (``gated``: dense and sparse are timed; else dense only).
    params: its parameters.
    tokens: ``[1, seq]`` a real context (e.g. a test window); the step is timed at its
      middle (half the cache filled), the MLPs on the hidden states of its positions
      (the work of the sparse path follows each one's real count).
    active_fraction: measured active fraction per layer (sets the sparse capacities); a
      layer that ran no block (``0``) is benchmarked with the capacity of one block
      (``capacity_active_fraction`` in the result says so).
    repeats: timed calls per variant for the per-call times, interleaved
      (:func:`ccjax.timing.interleaved_median_ms`).
    num_inputs: positions whose MLP inputs the per-call MLP time cycles over.
    scan_length: tokens per in-scan MLP call (the first ``scan_length`` positions,
      cycled when ``seq`` is shorter).
    scan_repeats: timed in-scan calls per variant (default ``max(4, repeats // 4)``).
    mode, top_k, backend: the sparse decode's (see :func:`make_decode`).

  Returns:
    Medians in milliseconds per token, dicts ``{dense, sparse}`` (``sparse`` ``None`` for
    a dense model):

    * ``decode_ms_per_token``: one jitted decode step per token (dispatch included);
    * ``mlp_ms_per_token``: MLP compute per token, every layer's MLP on a ``[1, d]``
      row, ``scan_length`` tokens one after another inside one jitted call
      (:func:`mlp_ms_per_token_in_scan`), so that dispatch is amortised;
    * ``mlp_call_ms_per_token``: every layer's MLP as one jitted call per token
      (dispatch included);

    and ``backend`` (the sparse MLPs' kernel backend; ``xla`` for a dense model, whose
    dense path always runs XLA), ``mode``, ``mlp_scan_length`` and
    ``capacity_active_fraction`` (the per-layer fractions the sparse capacities were
    sized for: ``active_fraction`` with no layer below one block).
  """
  capacity_fraction = _capacity_fractions(active_fraction, model.num_blocks)
  variants = {"dense": make_decode(model, params, sparse=False)}
  if model.gated:
    variants["sparse"] = make_decode(model, params, sparse=True,
                                     active_fraction=capacity_fraction, mode=mode, top_k=top_k,
                                     backend=backend)
  half = max(1, tokens.shape[1] // 2)
  hidden = mlp_inputs(model, params, tokens, mode=mode, top_k=top_k)   # [layers, seq, 1, d]
  step_calls, mlp_calls = [], []
  for fns in variants.values():
    _, cache = _advance(fns, transformer.init_cache(model, 1), tokens[0, :half].tolist())
    token = jnp.asarray(tokens[:, half:half + 1], jnp.int32)
    step_calls.append((fns.step, [(fns.weights, cache, token)]))
    mlp_calls.append((fns.mlp, [(fns.weights, hidden[:, i])
                                for i in range(min(num_inputs, hidden.shape[1]))]))
  step_ms = timing.interleaved_median_ms(step_calls, repeats=repeats)
  mlp_call_ms = timing.interleaved_median_ms(mlp_calls, repeats=repeats)
  mlp_ms = mlp_ms_per_token_in_scan(
      list(variants.values()), scan_inputs(hidden, scan_length),
      repeats=max(4, repeats // 4) if scan_repeats is None else scan_repeats)
  result = {"backend": variants.get("sparse", variants["dense"]).backend, "mode": mode,
            "mlp_scan_length": scan_length, "capacity_active_fraction": capacity_fraction}
  for key, times in (("decode_ms_per_token", step_ms), ("mlp_ms_per_token", mlp_ms),
                     ("mlp_call_ms_per_token", mlp_call_ms)):
    result[key] = {"dense": None, "sparse": None, **dict(zip(variants, times))}
  return result
