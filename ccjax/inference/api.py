"""One inference contract for every gated model family.

``make_inference(module, params, mode=..., capacities=...)`` returns ``fn(x) -> (logits,
InferenceInfo)`` for a :class:`ccjax.GatedMLP` and a :class:`ccjax.GatedCNN` alike: the
function really skips inactive blocks (block-major kernels for the MLP, skipped layers
and channel blocks for the CNN), and its logits equal the module applied with
``block_masks=info.masks`` (masked dense) to float tolerance. Everything model-specific
(layout, kernels, MAC accounting) sits behind one adapter per family, chosen here by the
module's type; callers never branch on architecture names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ccjax import conv
from ccjax import flops
from ccjax import layers
from ccjax import policy as policy_lib
from ccjax import timing
from ccjax import validation
from ccjax.inference import capacity as capacity_lib
from ccjax.inference import cnn
from ccjax.inference import kernels
from ccjax.inference import layout
from ccjax.inference import mlp

# The test-time policies the sparse paths implement ("all" is the dense network).
INFERENCE_MODES = tuple(mode for mode in policy_lib.DETERMINISTIC_MODES if mode != "all")


@dataclasses.dataclass(frozen=True)
class Capacities:
  """How much work a sparse call may do, as static sizes derived per batch size.

  Attributes:
    active_fraction: expected fraction of blocks a gated layer runs (one value or one per
      gated layer); ``None`` gives exact capacities (nothing can overflow).
    example_slack: per-example block capacity ``k = ceil(slack * fraction * blocks)``.
    num_buckets: batch-1 slot-count buckets per layer (the work follows the real count).
    top_k: blocks per example for ``mode='top_k'`` (one value or one per gated layer).
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


def _check_mode(mode: str, capacities: Capacities) -> None:
  if mode not in INFERENCE_MODES:
    raise ValueError(f"mode must be one of {'|'.join(INFERENCE_MODES)}, got {mode!r}")
  if mode == "top_k" and capacities.top_k is None:
    raise ValueError("mode 'top_k' needs Capacities(top_k=...)")


class _MLPFamily:
  """Adapter of :class:`ccjax.GatedMLP`: block-major layout and the MLP kernels."""

  @staticmethod
  def build(module: layers.GatedMLP, params, mode: str, capacities: Capacities,
            backend: str | None, with_info: bool) -> Callable:
    backend = kernels.select_backend(backend)
    block_major = layout.to_block_major(module, params, pallas_tiles=backend == "pallas-gpu")
    num_layers = len(module.hidden)
    top_k = (None if mode != "top_k" else
             validation.per_layer_values(capacities.top_k, num_layers, "top_k"))
    compiled = {}

    def sparse_config(batch_size: int) -> capacity_lib.SparseConfig:
      config = capacity_lib.make_sparse_config(
          block_major, batch_size, capacities.fractions(num_layers),
          example_slack=capacities.example_slack,
          num_buckets=capacities.num_buckets if batch_size == 1 else 1, backend=backend)
      if top_k is not None:
        example = tuple(min(k, cap) for k, cap in zip(top_k, config.example_capacity))
        buckets = None if config.buckets is None else tuple(
            tuple(sorted({min(size, k) for size in sizes})) for sizes, k in
            zip(config.buckets, example))
        config = dataclasses.replace(config, example_capacity=example,
                                     buckets=buckets).validate(block_major)
      return config

    def run(block_major_params, x, config):
      logits, traces = mlp.sparse_forward(block_major_params, x, config)
      if not with_info:
        return logits
      return logits, capacity_lib.traces_info(traces, block_major_params.num_blocks)

    def infer(x):
      batch_size = x.shape[0]
      if batch_size not in compiled:
        config = sparse_config(batch_size)
        compiled[batch_size] = jax.jit(lambda p, inputs: run(p, inputs, config))
      return compiled[batch_size](block_major, x)

    infer.backend = backend
    return infer

  @staticmethod
  def dense_macs(module: layers.GatedMLP, input_shape: Sequence[int]) -> int:
    return flops.dense_mlp_macs(math.prod(input_shape), module.hidden, module.num_classes)

  @staticmethod
  def gated_macs(module: layers.GatedMLP, input_shape: Sequence[int],
                 masks: Sequence[np.ndarray]) -> np.ndarray:
    return flops.gated_mlp_macs(math.prod(input_shape), masks, module.block_size,
                                module.num_classes)


class _CNNFamily:
  """Adapter of :class:`ccjax.GatedCNN`: skipped residual blocks and channel blocks."""

  @staticmethod
  def build(module: conv.GatedCNN, params, mode: str, capacities: Capacities,
            backend: str | None, with_info: bool) -> Callable:
    backend = kernels.select_backend(backend)
    num_layers = len(module.gate_layers())
    fractions = capacities.fractions(num_layers)
    compiled = {}

    def example_capacity(batch_size: int) -> int | None:
      if fractions is None:
        return None
      skip_fractions = [f for f, layer in zip(fractions, module.gate_layers())
                        if layer.kind == conv.SKIP_GATE] or [1.0]
      return capacity_lib.poisson_capacity(batch_size * max(skip_fractions), batch_size)

    def infer(x):
      batch_size = x.shape[0]
      if batch_size not in compiled:
        fn = cnn.make_cnn_inference(module, mode=mode, capacity=capacities.top_k,
                                    example_capacity=example_capacity(batch_size))
        compiled[batch_size] = jax.jit(fn if with_info else (lambda p, inputs: fn(p, inputs)[0]))
      return compiled[batch_size](params, x)

    infer.backend = backend
    return infer

  @staticmethod
  def dense_macs(module: conv.GatedCNN, input_shape: Sequence[int]) -> int:
    return flops.dense_cnn_macs(module.layer_specs(_image_shape(module, input_shape)),
                                module.num_classes)

  @staticmethod
  def gated_macs(module: conv.GatedCNN, input_shape: Sequence[int],
                 masks: Sequence[np.ndarray]) -> np.ndarray:
    return flops.gated_cnn_macs(module.layer_specs(_image_shape(module, input_shape)), masks,
                                module.num_classes)


def _image_shape(module: conv.GatedCNN, input_shape: Sequence[int]) -> tuple[int, ...]:
  if len(input_shape) == 1 and module.image_shape is not None:
    return tuple(module.image_shape)
  return tuple(input_shape)


_FAMILIES = ((layers.GatedMLP, _MLPFamily), (conv.GatedCNN, _CNNFamily))


def _family(module) -> Any:
  for module_type, family in _FAMILIES:
    if isinstance(module, module_type):
      return family
  raise ValueError(f"sparse inference supports {' and '.join(t.__name__ for t, _ in _FAMILIES)}, "
                   f"got {type(module).__name__}")


def make_inference(module, params, *, mode: str = "threshold",
                   capacities: Capacities | None = None, backend: str | None = None,
                   with_info: bool = True) -> Callable[[jax.Array], Any]:
  """Jitted sparse inference of a trained gated model that really skips.

  Args:
    module: a :class:`ccjax.GatedMLP` or :class:`ccjax.GatedCNN` with ``gated=True``.
    params: its trained parameters.
    mode: test-time policy, ``threshold`` (blocks with ``p > 0.5``) or ``top_k`` (at most
      ``capacities.top_k`` of those per example).
    capacities: static work limits (default: exact, nothing overflows); what exceeds
      them is dropped, lowest probability first, and counted in ``info.dropped``.
    backend: kernel backend (default: :func:`ccjax.inference.kernels.select_backend`).
    with_info: return ``(logits, info)``; ``False`` returns only the logits (for timing).

  Returns:
    ``fn(x [batch, ...]) -> (logits [batch, classes], InferenceInfo)``; one compilation
    per batch size. ``fn.backend`` names the backend that runs.
  """
  capacities = Capacities() if capacities is None else capacities
  _check_mode(mode, capacities)
  if not module.gated:
    raise ValueError("make_inference needs a gated module (gated=True)")
  return _family(module).build(module, params, mode, capacities, backend, with_info)


def make_dense_inference(module, params) -> Callable[[jax.Array], jax.Array]:
  """The same network with every block on and no policies, jitted: ``fn(x) -> logits``."""
  dense_module = module.clone(gated=False)
  dense_params = layers.strip_policy_params(params)
  apply = jax.jit(lambda p, x: dense_module.apply({"params": p}, x, mode="all")[0])
  return lambda x: apply(dense_params, x)


def dense_macs_per_example(module, input_shape: Sequence[int]) -> int:
  """Multiply-accumulates of one example through the dense network (no policies)."""
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
