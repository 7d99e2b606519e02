"""One inference contract for every gated model family.

``make_inference(module, params, mode=..., capacities=...)`` returns ``fn(x) -> (logits,
InferenceInfo)`` for a :class:`ccjax.GatedMLP`, a :class:`ccjax.GatedCNN` and a
:class:`ccjax.GatedTransformer` alike: the function really skips inactive blocks
(block-major kernels for the MLP and for each transformer layer's MLP, skipped layers
and channel blocks for the CNN), and its logits equal the module applied with
``block_masks=info.masks`` (masked dense) to float tolerance. Everything model-specific
(layout, kernels, MAC accounting) sits behind one adapter per family, chosen here by the
module's type; callers never branch on architecture names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ccjax import conv
from ccjax import flops
from ccjax import layers
from ccjax import modes
from ccjax import timing
from ccjax import transformer as transformer_lib
from ccjax import validation
from ccjax.inference import capacity as capacity_lib
from ccjax.inference import cnn
from ccjax.inference import kernels
from ccjax.inference import layout
from ccjax.inference import mlp
from ccjax.inference import transformer as inference_transformer

# The test-time policies the sparse paths implement (:mod:`ccjax.modes`; "all" is the dense
# network): ``threshold`` (p > 0.5), ``top_k`` (exactly ``Capacities.top_k`` most probable
# blocks per example, no threshold: fixed compute), ``capped`` (threshold, at most
# ``Capacities.top_k``).
INFERENCE_MODES = modes.INFERENCE_MODES


@dataclasses.dataclass(frozen=True)
class Capacities:
  """How much work a sparse call may do, as static sizes derived per batch size.

  Attributes:
    active_fraction: expected fraction of blocks a gated layer runs (one value or one per
      gated layer); ``None`` gives exact capacities (nothing can overflow).
    example_slack: per-example block capacity ``k = ceil(slack * fraction * blocks)``.
    num_buckets: batch-1 slot-count buckets per layer (the work follows the real count).
    top_k: blocks per example for ``mode='top_k'`` (exactly) and ``mode='capped'`` (at
      most): one value or one per gated layer.
  """
  active_fraction: float | tuple[float, ...] | None = None
  example_slack: float = 2.0
  num_buckets: int = 4
  top_k: int | tuple[int, ...] | None = None

  def __post_init__(self):
    fractions = self.fractions(1) if isinstance(self.active_fraction, (int, float)) else (
        self.active_fraction or ())
    if any(not 0.0 < float(f) <= 1.0 for f in fractions):
      raise ValueError(f"active_fraction must be in (0, 1], got {self.active_fraction!r}")
    if not self.example_slack >= 1.0 or not math.isfinite(self.example_slack):
      raise ValueError(f"example_slack must be a finite number >= 1, got {self.example_slack!r}")
    if not isinstance(self.num_buckets, int) or self.num_buckets < 1:
      raise ValueError(f"num_buckets must be a positive integer, got {self.num_buckets!r}")

  def fractions(self, num_layers: int) -> tuple[float, ...] | None:
    """``active_fraction`` with one value per gated layer (``None``: exact)."""
    if self.active_fraction is None:
      return None
    return tuple(float(f) for f in validation.per_layer_values(self.active_fraction, num_layers,
                                                           "active_fraction"))

  def top_ks(self, num_layers: int) -> tuple[int, ...] | None:
    """``top_k`` with one value per gated layer (``None`` when unset)."""
    if self.top_k is None:
      return None
    return tuple(int(k) for k in validation.per_layer_values(self.top_k, num_layers, "top_k"))

  def check(self, num_layers: int) -> None:
    """Raises a ValueError unless the per-layer values fit ``num_layers`` gated layers."""
    self.fractions(num_layers)
    self.top_ks(num_layers)

  def layer(self, index: int, num_layers: int) -> "Capacities":
    """The capacities of gated layer ``index`` alone (of ``num_layers``): single values.

    For a model whose gated layers run as separate one-layer MLPs (the MLPs of a
    :class:`ccjax.GatedTransformer`).
    """
    fractions, top_ks = self.fractions(num_layers), self.top_ks(num_layers)
    return dataclasses.replace(self, active_fraction=None if fractions is None else fractions[index],
                               top_k=None if top_ks is None else top_ks[index])


def check_mode(mode: str, capacities: Capacities) -> None:
  """Raises a ValueError unless ``mode`` is an inference mode that ``capacities`` serves."""
  modes.check(mode, INFERENCE_MODES)
  if modes.get(mode).needs_capacity and capacities.top_k is None:
    raise ValueError(f"mode {mode!r} needs Capacities(top_k=...)")


def sparse_config(block_major: layout.BlockMajorMLP, batch_size: int, *, mode: str,
                  capacities: Capacities, backend: str) -> capacity_lib.SparseConfig:
  """The static capacities of one sparse MLP call of ``batch_size`` rows in ``mode``.

  The one place where :class:`Capacities` and a test-time ``mode`` become a
  :class:`~ccjax.inference.capacity.SparseConfig`: every family (and the decode step of
  :mod:`ccjax.lm_decode`) calls it.

  Args:
    block_major: the block-major MLP (its layers are the gated layers ``capacities``
      describes, one value or one per layer).
    batch_size: rows per call (examples; ``batch * seq`` positions of a transformer).
    mode: ``threshold``, ``top_k`` (exactly ``capacities.top_k`` most probable blocks per
      row) or ``capped`` (at most ``capacities.top_k`` of the threshold's blocks per row).
    capacities: the work limits; slot buckets apply at ``batch_size == 1`` only.
    backend: the kernel backend (already selected).

  Returns:
    a validated :class:`~ccjax.inference.capacity.SparseConfig`.
  """
  num_layers = len(block_major.layers)
  config = capacity_lib.make_sparse_config(
      block_major, batch_size, capacities.fractions(num_layers),
      example_slack=capacities.example_slack,
      num_buckets=capacities.num_buckets if batch_size == 1 else 1, backend=backend)
  if mode == "threshold":
    return config
  top_ks = capacities.top_ks(num_layers)
  # top_k runs exactly k blocks per row; capped at most k of the threshold's.
  example = (top_ks if mode == "top_k" else
             tuple(min(k, cap) for k, cap in zip(top_ks, config.example_capacity)))
  buckets = None if config.buckets is None else tuple(
      tuple(sorted({min(size, k) for size in sizes}))
      for sizes, k in zip(config.buckets, example))
  return dataclasses.replace(config, example_capacity=example, buckets=buckets,
                             exact_k=mode == "top_k").validate(block_major)


def layer_sparse_configs(block_majors: Sequence[layout.BlockMajorMLP], rows: int, *, mode: str,
                         capacities: Capacities, backend: str
                         ) -> tuple[capacity_lib.SparseConfig, ...]:
  """:func:`sparse_config` of each one-layer MLP of a transformer (``capacities`` holds one
  value or one per transformer layer)."""
  return tuple(sparse_config(block_major, rows, mode=mode,
                             capacities=capacities.layer(index, len(block_majors)),
                             backend=backend)
               for index, block_major in enumerate(block_majors))


@dataclasses.dataclass(frozen=True)
class _Built:
  """What a family adapter prepares once per :func:`make_inference` call.

  Attributes:
    backend: the kernel backend that runs.
    weights: the first argument of every forward function (laid out for the kernels).
    forward_for: ``input shape -> forward(weights, x) -> (logits, InferenceInfo)``, a pure
      function of one static input shape (jitted by :func:`make_inference`).
    example_input: ``params -> jax.ShapeDtypeStruct`` of one input, to initialise the
      module abstractly when checking parameters.
    check_input: raises ``ValueError`` for inputs the family cannot take (Python-side).
  """
  backend: str
  weights: Any
  forward_for: Callable[[tuple[int, ...]], Callable]
  check_input: Callable[[Any], None] = lambda x: None


class _MLPFamily:
  """Adapter of :class:`ccjax.GatedMLP`: block-major layout and the MLP kernels."""

  @staticmethod
  def example_input(module: layers.GatedMLP, params) -> jax.ShapeDtypeStruct:
    first = params.get(module.gate_names()[0], {}) if hasattr(params, "get") else {}
    kernel = layers.layer_weights(first["dense"]).kernel if "dense" in first else None
    return jax.ShapeDtypeStruct((1, np.shape(kernel)[0] if kernel is not None else 1),
                                jnp.float32)

  @staticmethod
  def build(module: layers.GatedMLP, params, mode: str, capacities: Capacities,
            backend: str | None) -> _Built:
    backend = kernels.select_backend(backend, float32=layout.all_float32(params),
                                     family=kernels.base.MLP)
    block_major = layout.to_block_major(module, params,
                                        pallas_tiles=kernels.get(backend).layout_tiles)
    capacities.check(len(module.hidden))

    def forward_for(shape):
      config = sparse_config(block_major, shape[0], mode=mode, capacities=capacities,
                             backend=backend)

      def forward(block_major_params, x):
        logits, traces = mlp.sparse_forward(block_major_params, x, config)
        return logits, capacity_lib.traces_info(traces, block_major_params.num_blocks)
      return forward

    return _Built(backend, block_major, forward_for)

  @staticmethod
  def dense_macs(module: layers.GatedMLP, input_shape: Sequence[int]) -> int:
    return flops.dense_mlp_macs(math.prod(input_shape), module.hidden, module.num_classes)

  @staticmethod
  def gated_macs(module: layers.GatedMLP, input_shape: Sequence[int],
                 masks: Sequence[np.ndarray]) -> np.ndarray:
    return flops.gated_mlp_macs(math.prod(input_shape), masks, module.block_size,
                                module.num_classes,
                                policy_hidden=module.policy_hidden or module.policy_rank)


class _CNNFamily:
  """Adapter of :class:`ccjax.GatedCNN`: skipped residual blocks and channel blocks."""

  @staticmethod
  def example_input(module: conv.GatedCNN, params) -> jax.ShapeDtypeStruct:
    if module.image_shape is not None:
      return jax.ShapeDtypeStruct((1, *module.image_shape), jnp.float32)
    try:
      channels = np.shape(module.stem_weights(params).kernel)[2]
    except (KeyError, TypeError, IndexError, AttributeError):
      channels = 1
    # The head follows a global pooling: parameter shapes do not depend on height, width.
    return jax.ShapeDtypeStruct((1, 32, 32, channels), jnp.float32)

  @staticmethod
  def build(module: conv.GatedCNN, params, mode: str, capacities: Capacities,
            backend: str | None) -> _Built:
    backend = kernels.select_backend(backend, float32=layout.all_float32(params),
                                     family=kernels.base.CNN)
    num_layers = len(module.gate_layers())
    fractions = capacities.fractions(num_layers)

    def example_capacity(batch_size: int) -> int | None:
      if fractions is None:
        return None
      skip_fractions = [f for f, layer in zip(fractions, module.gate_layers())
                        if layer.kind == conv.SKIP_GATE] or [1.0]
      return capacity_lib.poisson_capacity(batch_size * max(skip_fractions), batch_size)

    def forward_for(shape):
      return cnn.make_cnn_inference(module, mode=mode, capacity=capacities.top_k,
                                    example_capacity=example_capacity(shape[0]))

    # Only backends that run CNNs are selected (today: xla, stock XLA ops).
    return _Built(backend, params, forward_for)

  @staticmethod
  def dense_macs(module: conv.GatedCNN, input_shape: Sequence[int]) -> int:
    return flops.dense_cnn_macs(module.layer_specs(_image_shape(module, input_shape)),
                                module.num_classes)

  @staticmethod
  def gated_macs(module: conv.GatedCNN, input_shape: Sequence[int],
                 masks: Sequence[np.ndarray]) -> np.ndarray:
    return flops.gated_cnn_macs(module.layer_specs(_image_shape(module, input_shape)), masks,
                                module.num_classes,
                                policy_hidden=module.policy_hidden or module.policy_rank)


class _TransformerFamily:
  """Adapter of :class:`ccjax.GatedTransformer`: each layer's gated MLP on the MLP path.

  Inputs are ``tokens [batch, seq]``, logits ``[batch, seq, vocab]``; every position is a
  row of the MLPs' sparse path and ``info`` holds ``[batch, seq, blocks]`` per layer.
  ``Capacities`` values are one or one per transformer layer. MACs are per sequence of
  ``input_shape = (seq,)`` tokens: ``seq`` times :func:`ccjax.transformer.macs_per_token`
  at the mean causal context ``(seq + 1) / 2`` (exact for a causal forward pass, since
  it is linear in the MLP fractions; LayerNorms and embeddings not counted).
  """

  @staticmethod
  def example_input(module: transformer_lib.GatedTransformer, params) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, module.max_len), jnp.int32)

  @staticmethod
  def build(module: transformer_lib.GatedTransformer, params, mode: str,
            capacities: Capacities, backend: str | None) -> _Built:
    capacities.check(module.num_layers)
    backend, block_majors = inference_transformer.backend_and_layout(module, params, backend)

    def forward_for(shape):
      configs = layer_sparse_configs(block_majors, math.prod(shape), mode=mode,
                                     capacities=capacities, backend=backend)

      def forward(weights, tokens):
        logits, traces = inference_transformer.sparse_apply(module, weights[0], weights[1],
                                                            configs, tokens)
        info = capacity_lib.traces_info(traces, (module.num_blocks,) * module.num_layers)
        per_position = tokens.shape + (module.num_blocks,)
        return logits, info._replace(masks=tuple(m.reshape(per_position) for m in info.masks),
                                     probs=tuple(p.reshape(per_position) for p in info.probs))
      return forward

    return _Built(backend, (params, block_majors), forward_for,
                  check_input=functools.partial(check_tokens, vocab_size=module.vocab_size,
                                                max_len=module.max_len))

  @staticmethod
  def dense_macs(module: transformer_lib.GatedTransformer, input_shape: Sequence[int]) -> int:
    (seq,) = _sequence_shape(input_shape)
    macs = transformer_lib.macs_per_token(module.clone(gated=False, parent=None),
                                          context=(seq + 1) / 2)
    return int(round(seq * macs["total"]))

  @staticmethod
  def gated_macs(module: transformer_lib.GatedTransformer, input_shape: Sequence[int],
                 masks: Sequence[np.ndarray]) -> np.ndarray:
    (seq,) = _sequence_shape(input_shape)
    fractions = np.stack([np.mean(np.asarray(mask, np.float64), axis=(1, 2)) for mask in masks],
                         axis=1)
    return np.asarray([seq * transformer_lib.macs_per_token(
        module, active_fraction=row, context=(seq + 1) / 2)["total"] for row in fractions])


def _sequence_shape(input_shape: Sequence[int]) -> tuple[int]:
  if len(input_shape) != 1:
    raise ValueError(f"input_shape of a transformer must be (seq,), got {tuple(input_shape)!r}")
  return (int(input_shape[0]),)


def _image_shape(module: conv.GatedCNN, input_shape: Sequence[int]) -> tuple[int, ...]:
  if len(input_shape) == 1 and module.image_shape is not None:
    return tuple(module.image_shape)
  return tuple(input_shape)


_FAMILIES = ((layers.GatedMLP, _MLPFamily), (conv.GatedCNN, _CNNFamily),
             (transformer_lib.GatedTransformer, _TransformerFamily))


def _family(module) -> Any:
  for module_type, family in _FAMILIES:
    if isinstance(module, module_type):
      return family
  names = [module_type.__name__ for module_type, _ in _FAMILIES]
  raise ValueError(f"sparse inference supports {', '.join(names[:-1])} and {names[-1]}, "
                   f"got {type(module).__name__}")


def _param_shapes(tree) -> dict[str, tuple[int, ...]]:
  """``{"layer/sub/kernel": shape}`` of every leaf of a parameter tree."""
  def name(path) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)
  return {name(path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_params(module, params, argument: str = "params",
                 input_shape: Sequence[int] | None = None) -> None:
  """Raises one ``ValueError`` unless ``params`` are parameters of ``module``.

  ``module.init`` is traced abstractly (``jax.eval_shape``, no compute) and the parameter
  tree must have the same paths and shapes (as ``module.apply`` would require, but
  checked up front, with the path named).

  Args:
    module: a gated :class:`ccjax.GatedMLP`, :class:`ccjax.GatedCNN` or
      :class:`ccjax.GatedTransformer`.
    params: what the caller passed as the module's parameters.
    argument: the argument's name in messages.
    input_shape: one example's shape (default: read from ``params`` where the family
      needs it: an MLP's input width, a CNN's input channels).

  Raises:
    ValueError: one line naming ``argument``, the first mismatching path and both shapes,
      or what was expected instead (``{"params": ...}``-wrapped variables, dense
      parameters without policies, a scalar, a list).
  """
  family = _family(module)
  expected_form = (f"the parameter dict of a {type(module).__name__} (variables['params'] of "
                   "module.init, or of the trained state)")
  if not hasattr(params, "keys") or not hasattr(params, "__getitem__"):
    raise ValueError(f"{argument} must be {expected_form}, got {type(params).__name__}")
  if set(params.keys()) == {"params"}:
    raise ValueError(f"{argument} is wrapped in {{'params': ...}} (module variables); pass "
                     f"variables['params'], {expected_form}")
  key = jax.random.PRNGKey(0)
  if input_shape is not None:
    example = jax.ShapeDtypeStruct((1, *input_shape), family.example_input(module, {}).dtype)
  else:
    try:
      example = family.example_input(module, params)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError):
      example = family.example_input(module, {})
  abstract = jax.eval_shape(lambda x: module.init({"params": key, "gate": key}, x,
                                                  mode="all")["params"], example)
  expected, given = _param_shapes(abstract), _param_shapes(params)
  if expected == given:
    return
  missing = [path for path in expected if path not in given]
  if missing and all("policy" in path.split("/") for path in missing):
    raise ValueError(f"{argument} has no policy parameters (e.g. {missing[0]}): dense "
                     "parameters? make_inference needs the gated module's parameters "
                     "(policies included)")
  for path in expected:
    if path not in given:
      raise ValueError(f"{argument} lacks {path} (the module expects shape "
                       f"{list(expected[path])}): they are not parameters of this "
                       f"{type(module).__name__}")
    if expected[path] != given[path]:
      raise ValueError(f"{argument} do not fit the module: {path} has shape "
                       f"{list(given[path])}, the module expects {list(expected[path])}")
  extra = sorted(set(given) - set(expected))[0]
  raise ValueError(f"{argument} hold {extra} (shape {list(given[extra])}), which the "
                   f"{type(module).__name__} does not have")


def check_tokens(tokens, *, vocab_size: int, max_len: int) -> None:
  """Raises ``ValueError`` unless ``tokens`` are ``[batch, seq]`` integer ids in
  ``[0, vocab_size)`` with ``seq <= max_len`` (checked on the host for concrete arrays).

  Out-of-range ids would otherwise give NaN logits (ids >= vocab_size) or wrap around
  (negative ids index from the end).
  """
  shape = np.shape(tokens)
  if len(shape) != 2:
    raise ValueError(f"tokens must be [batch, seq] token ids, got shape {tuple(shape)}")
  if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
    raise ValueError(f"tokens must be integer token ids, got dtype {jnp.result_type(tokens)}")
  if shape[1] > max_len:
    raise ValueError(f"tokens have {shape[1]} positions, more than the model's max_len "
                     f"{max_len}")
  if isinstance(tokens, jax.core.Tracer) or 0 in shape:
    return
  values = np.asarray(tokens)
  low, high = int(values.min()), int(values.max())
  if low < 0 or high >= vocab_size:
    bad = low if low < 0 else high
    raise ValueError(f"tokens must be ids in [0, {vocab_size}), got {bad}")


def _nan_where_nonfinite(inputs: jax.Array, logits: jax.Array) -> jax.Array:
  """``logits [batch, ...]`` with NaN in every row whose input holds a NaN or +-inf.

  Dense and masked-dense application give NaN there (a non-finite input reaches every
  unit before the masks multiply); the sparse path could skip every block and return the
  bias alone, so this keeps "sparse equals masked dense" for every input. Integer inputs
  (token ids) are always finite.
  """
  if not jnp.issubdtype(inputs.dtype, jnp.inexact):
    return logits
  finite = jnp.all(jnp.isfinite(inputs.reshape(inputs.shape[0], -1)), axis=1)
  return jnp.where(finite.reshape((-1,) + (1,) * (logits.ndim - 1)), logits, jnp.nan)


def make_inference(module, params, *, mode: str = "threshold",
                   capacities: Capacities | None = None, backend: str | None = None,
                   with_info: bool = True) -> Callable[[jax.Array], Any]:
  """Jitted sparse inference of a trained gated model that really skips.

  Args:
    module: a :class:`ccjax.GatedMLP`, :class:`ccjax.GatedCNN` or
      :class:`ccjax.GatedTransformer` with ``gated=True``.
    params: its trained parameters (``variables['params']``), checked against the module
      (:func:`check_params`).
    mode: test-time policy, ``threshold`` (blocks with ``p > 0.5``), ``top_k`` (exactly
      ``capacities.top_k`` most probable blocks per example: fixed compute) or ``capped``
      (at most ``capacities.top_k`` of the threshold's blocks per example); for a
      transformer, per position.
    capacities: static work limits (default: exact, nothing overflows); what exceeds
      them is dropped, lowest probability first, and counted in ``info.dropped``.
    backend: kernel backend (default: :func:`ccjax.inference.kernels.select_backend`).
    with_info: return ``(logits, info)``; ``False`` returns only the logits (for timing).

  Returns:
    ``fn(x [batch, ...]) -> (logits [batch, classes], InferenceInfo)``; one compilation
    per input shape. An example with a NaN or +-inf input gets NaN logits, like the
    dense and masked-dense module. For a transformer ``fn(tokens [batch, seq]) ->
    (logits [batch, seq, vocab], info)`` with ``info.masks`` / ``info.probs`` ``[batch,
    seq, blocks]`` per layer; token ids outside ``[0, vocab_size)`` raise ``ValueError``.
    ``fn.backend`` names the backend that runs.

  Raises:
    ValueError: an unknown ``mode``, a dense module, or ``params`` that are not this
      module's parameters (one line naming the path and both shapes).
  """
  capacities = Capacities() if capacities is None else capacities
  check_mode(mode, capacities)
  family = _family(module)
  if not module.gated:
    raise ValueError("make_inference needs a gated module (gated=True)")
  layers.require_linear_policy(module)
  check_params(module, params)
  built = family.build(module, params, mode, capacities, backend)
  compiled = {}

  def infer(x):
    built.check_input(x)
    shape = tuple(np.shape(x))
    if shape not in compiled:
      forward = built.forward_for(shape)

      def guarded(weights, inputs):
        logits, info = forward(weights, inputs)
        logits = _nan_where_nonfinite(inputs, logits)
        return (logits, info) if with_info else logits
      compiled[shape] = jax.jit(guarded)
    return compiled[shape](built.weights, x)

  infer.backend = built.backend
  return infer


def make_dense_inference(module, params) -> Callable[[jax.Array], jax.Array]:
  """The same network with every block on and no policies, jitted: ``fn(x) -> logits``."""
  dense_module = module.clone(gated=False)
  dense_params = layers.strip_policy_params(params)
  apply = jax.jit(lambda p, x: dense_module.apply({"params": p}, x, mode="all")[0])
  return lambda x: apply(dense_params, x)


def dense_macs_per_example(module, input_shape: Sequence[int]) -> int:
  """Multiply-accumulates of one example through the dense network (no policies).

  For a transformer an example is a sequence, ``input_shape = (seq,)``: ``seq`` times
  :func:`ccjax.transformer.macs_per_token` at the mean causal context ``(seq + 1) / 2``."""
  return _family(module).dense_macs(module, input_shape)


def macs_per_example(module, input_shape: Sequence[int],
                     masks: Sequence[np.ndarray]) -> np.ndarray:
  """``[batch]`` MACs of the blocks that ran (policies included), from effective masks."""
  return _family(module).gated_macs(module, input_shape, [np.asarray(m) for m in masks])


def measure_latency(module, params, examples: Sequence[jax.Array], *, repeats: int = 20,
                    inference: Callable | None = None) -> dict[str, float]:
  """Median latency (ms) of dense and sparse inference on the same inputs, interleaved.

  Args:
    module: the trained module (gated or not).
    params: its parameters.
    examples: input batches, cycled while timing (sparse work depends on the example).
    repeats: timed calls per path.
    inference: the sparse function to time (default: ``make_inference(module, params,
      with_info=False)``); ignored for an ungated module.

  Returns:
    ``{"dense": ms}`` and, for a gated module, ``"sparse": ms``.
  """
  dense_fn = make_dense_inference(module, params)
  calls = [(dense_fn, [(x,) for x in examples])]
  if module.gated:
    sparse_fn = inference or make_inference(module, params, with_info=False)
    calls.append((sparse_fn, [(x,) for x in examples]))
  times = timing.interleaved_median_ms(calls, repeats=repeats)
  return dict(zip(("dense", "sparse"), times))


def calibrate_policies(module, params, inputs: jax.Array, active_fraction: float) -> Any:
  """Shifts each policy's bias so that ``threshold`` runs about ``active_fraction``.

  For benchmarking untrained models: gated layer by gated layer (in forward order, so
  later layers see the calibrated earlier ones), every block's bias moves so that a
  fraction ``active_fraction`` of ``inputs`` has ``p > 0.5`` for it.

  Args:
    module: a gated :class:`ccjax.GatedMLP` or :class:`ccjax.GatedCNN`.
    params: its parameters.
    inputs: ``[batch, ...]`` calibration inputs.
    active_fraction: target fraction in (0, 1).

  Returns:
    parameters with the policies' biases replaced.
  """
  if not 0.0 < active_fraction < 1.0:
    raise ValueError(f"active_fraction must be in (0, 1), got {active_fraction!r}")
  if isinstance(module, transformer_lib.GatedTransformer):
    raise ValueError("calibrate_policies takes a GatedMLP or GatedCNN; calibrate a "
                     "transformer's MLPs one by one (model.mlp_module(i), model.mlp_params)")
  _family(module)
  eps = module.policy_eps
  module = module.clone(dtype=jnp.float32)
  gate_probs = jax.jit(lambda p, x: [aux.probs for aux in module.apply(
      {"params": p}, x, mode="threshold")[1]])
  for index, name in enumerate(module.gate_names()):
    probs = np.asarray(gate_probs(params, inputs)[index], np.float64)
    squashed = np.clip((probs - eps) / (1.0 - 2.0 * eps), 1e-12, 1.0 - 1e-12)
    logits = np.log(squashed) - np.log1p(-squashed)
    shift = np.quantile(logits, 1.0 - active_fraction, axis=0)
    bias = layers.policy_weights(params[name]).bias
    params = layers.with_policy_bias(params, name, bias - jnp.asarray(shift + 1e-6, bias.dtype))
  return params
