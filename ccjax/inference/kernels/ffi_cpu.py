"""``ffi-cpu`` backend: the whole gated-MLP forward pass as one XLA FFI custom call.

The C++ handler (``csrc/gated_mlp.cc``, compiled into ``_ffi_cpu*.so`` by ``pip install``)
runs every layer -- policy on the actual compact input, top-k / threshold selection,
per-block and per-weight-tile capacities, block products read in place from the
block-major tiles with bias, ReLU and masking fused, the output layer -- in a single
call, so a batch-1 forward pass costs one dispatch. It has the semantics of the XLA
minibatch path (at batch 1 the per-block and per-tile capacities cannot bind, so it is
also the batch-1 path): the same blocks run and the logits agree to float32 rounding.

Axis letters as in :mod:`ccjax.inference.mlp`: ``batch`` examples, ``in`` input
features, ``nb`` blocks of a layer, ``bs`` units per block, ``k`` per-example capacity.
Only float32 models run here (:func:`supports`); the backend selection gives other
dtypes to the XLA path.

The library is loaded with ``ctypes`` and registered with
:func:`jax.ffi.register_ffi_target` on first use, after checking it against the build
stamp ``setup.py`` wrote beside it (:mod:`ccjax.inference.kernels.build_stamp`: a stale
build, one for another jaxlib or XLA FFI API version is refused); :func:`available` says
whether that worked and :func:`unavailable_reason` why not (e.g. no compiler was found at
install time). Shapes and dtypes are
checked here, before the call; the handler checks them again and only ever indexes with
block ids it computed itself.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import importlib.metadata
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from ccjax.inference import layout
from ccjax.inference.kernels import base
from ccjax.inference.kernels import build_stamp

TARGET_NAME = "ccjax_gated_mlp_forward"
_SYMBOL = "CcjaxGatedMlpForward"
_LIBRARY_STEM = "_ffi_cpu"
THREADS_ENV = "CCJAX_FFI_THREADS"


def library_path() -> pathlib.Path | None:
  """The compiled extension next to this file, or ``None`` when it was not built."""
  here = pathlib.Path(__file__).resolve().parent
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    candidate = here / f"{_LIBRARY_STEM}{suffix}"
    if candidate.is_file():
      return candidate
  return None


def _runtime_ffi_api() -> str | None:
  """The XLA FFI API version of the running jaxlib (from its bundled ``c_api.h``)."""
  try:
    include = pathlib.Path(jax.ffi.include_dir())
  except (AttributeError, OSError):
    return None
  return build_stamp.ffi_api_version(include / "xla" / "ffi" / "api" / "c_api.h")


def _compiled_string(library: ctypes.CDLL, symbol: str) -> str | None:
  """A ``const char* symbol()`` of the extension, or ``None`` when it has none."""
  function = getattr(library, symbol, None)
  if function is None:
    return None
  function.restype = ctypes.c_char_p
  return function().decode()


@functools.cache
def _register() -> str | None:
  """Loads, checks and registers the handler once; returns why it is unavailable, or
  ``None``. The extension must match its build stamp (:mod:`build_stamp`): the same
  build, the current C++ sources, the running jaxlib and a compatible XLA FFI API."""
  path = library_path()
  here = pathlib.Path(__file__).resolve().parent
  stamp = build_stamp.read_stamp(here)
  if path is None:
    if stamp is not None and not stamp.get("built"):
      return (f"the {_LIBRARY_STEM} extension was not compiled at install time "
              f"({stamp.get('reason')})")
    return (f"the {_LIBRARY_STEM} extension is not next to {here} "
            "(no C++ compiler at install time, or ccjax imported from a source tree that "
            "`pip install .` built elsewhere: use `pip install -e .` there)")
  try:
    library = ctypes.CDLL(str(path))
    refused = build_stamp.refusal(
        stamp, library_key=_compiled_string(library, "CcjaxFfiBuildKey"),
        library_api=_compiled_string(library, "CcjaxFfiApiVersion"),
        runtime_api=_runtime_ffi_api(), sources=build_stamp.source_digest(here),
        runtime_jaxlib=importlib.metadata.version("jaxlib"))
    if refused is not None:
      return f"{path.name} not loaded: {refused}"
    handler = getattr(library, _SYMBOL)
    jax.ffi.register_ffi_target(TARGET_NAME, jax.ffi.pycapsule(handler), platform="cpu")
  except (OSError, AttributeError, ImportError, RuntimeError, ValueError) as error:
    return f"loading {path.name} failed: {error}"
  return None


def unavailable_reason() -> str | None:
  """Why the backend cannot run (``None`` when it can)."""
  return _register()


def available() -> bool:
  """Whether the extension is built and its FFI target is registered."""
  return _register() is None


def num_threads() -> int:
  """Most threads a call may use: ``$CCJAX_FFI_THREADS``, else the cores this process may
  use. The handler runs its loops on XLA's intra-op thread pool and uses fewer threads
  where a loop is too small to pay for a second one."""
  value = os.environ.get(THREADS_ENV)
  if value:
    if not value.isdigit() or int(value) < 1:
      raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
    return int(value)
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def supports(model: layout.BlockMajorMLP) -> bool:
  """Whether the handler covers this model (every weight float32; other dtypes run on
  the XLA path)."""
  arrays = [model.output_kernel, model.output_bias]
  for layer in model.layers:
    arrays += [layer.bias, layer.policy_kernel, layer.policy_bias,
               layer.grouped_kernel if not layer.input_gated else layer.kernel]
  return all(a is not None and a.dtype == jnp.float32 for a in arrays)


def _expect(name: str, array: jax.Array | None, shape: tuple[int, ...]) -> None:
  if array is None or tuple(array.shape) != shape or array.dtype != jnp.float32:
    got = "None" if array is None else f"{tuple(array.shape)} {array.dtype}"
    raise ValueError(f"ffi-cpu: {name} must be float32 {shape}, got {got}")


def _layer_operands(model: layout.BlockMajorMLP) -> list[jax.Array]:
  """The handler's weight operands, checked: 4 per layer, then the output layer."""
  bs, fan_in = model.block_size, model.input_dim
  operands = []
  in_blocks = None
  for position, layer in enumerate(model.layers):
    nb = layer.num_blocks
    name = f"layer {position}"
    if position == 0:
      if layer.input_gated:
        raise ValueError("ffi-cpu: the first layer must have a dense input")
      kernel = layer.grouped_kernel
      _expect(f"{name} grouped_kernel", kernel, (nb, fan_in, bs))
      _expect(f"{name} policy_kernel", layer.policy_kernel, (fan_in, nb))
    else:
      if not layer.input_gated:
        raise ValueError(f"ffi-cpu: {name} must have a gated input")
      kernel = layer.kernel
      _expect(f"{name} kernel", kernel, (nb * in_blocks, bs, bs))
      _expect(f"{name} policy_kernel", layer.policy_kernel, (in_blocks, bs, nb))
    _expect(f"{name} bias", layer.bias, (nb, bs))
    _expect(f"{name} policy_bias", layer.policy_bias, (nb,))
    operands += [kernel, layer.bias, layer.policy_kernel, layer.policy_bias]
    in_blocks = nb
  classes = model.output_bias.shape[0] if model.output_bias.ndim == 1 else -1
  _expect("output_kernel", model.output_kernel, (in_blocks, bs, classes))
  _expect("output_bias", model.output_bias, (classes,))
  return operands + [model.output_kernel, model.output_bias]


def gated_mlp_forward(model: layout.BlockMajorMLP, x: jax.Array, config
                      ) -> tuple[jax.Array, tuple[layout.LayerTrace, ...]]:
  """Sparse forward pass of a gated MLP in one FFI call (traceable under ``jax.jit``).

  Args:
    model: block-major float32 parameters (:func:`ccjax.inference.layout.to_block_major`).
    x: ``[batch, in]`` inputs, cast to float32 (what the XLA path's promotion against
      float32 weights gives).
    config: a :class:`ccjax.inference.capacity.SparseConfig` (validated for ``model``);
      ``block_capacity`` is clipped to the batch as on the XLA path.

  Returns:
    ``(logits [batch, classes], traces)``, one :class:`ccjax.inference.layout.LayerTrace`
    per hidden layer, equal to the XLA path's (see the module docstring).

  Raises:
    RuntimeError: the extension is not available.
    ValueError: shapes or dtypes do not match the model.
  """
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"ffi-cpu backend unavailable: {reason}")
  config.validate(model)
  if x.ndim != 2 or x.shape[1] != model.input_dim or x.shape[0] < 1:
    raise ValueError(f"ffi-cpu: x must be [batch >= 1, {model.input_dim}], got {x.shape}")
  x = x.astype(jnp.float32)
  operands = _layer_operands(model)
  batch = int(x.shape[0])
  classes = int(model.output_bias.shape[0])
  result_shapes = [jax.ShapeDtypeStruct((batch, classes), jnp.float32)]
  for k, nb in zip(config.example_capacity, model.num_blocks):
    result_shapes += [jax.ShapeDtypeStruct((batch, k), jnp.int32),     # block_index
                      jax.ShapeDtypeStruct((batch, k), jnp.bool_),     # kept
                      jax.ShapeDtypeStruct((2,), jnp.int32),           # candidates, kept
                      jax.ShapeDtypeStruct((batch, nb), jnp.float32)]  # probs
  eps = float(model.policy_eps)
  outputs = jax.ffi.ffi_call(TARGET_NAME, result_shapes)(
      x, *operands,
      example_capacity=np.asarray(config.example_capacity, np.int64),
      block_capacity=np.asarray([min(c, batch) for c in config.block_capacity], np.int64),
      pair_capacity=np.asarray(config.pair_capacity, np.int64),
      policy_eps=np.float32(eps), policy_scale=np.float32(1.0 - 2.0 * eps),
      exact_k=np.int64(config.exact_k), num_threads=np.int64(num_threads()))
  traces = tuple(
      layout.LayerTrace(block_index, kept, counts[0], counts[1], probs)
      for block_index, kept, counts, probs in zip(*(outputs[1 + i::4] for i in range(4))))
  return outputs[0], traces


def _backend_unavailable_reason(platform: str) -> str | None:
  if platform != "cpu":
    return f"runs on CPU only; the default JAX backend is {platform}"
  return unavailable_reason()


# The whole float32 MLP forward pass as one XLA FFI call on CPU.
BACKEND = base.Backend(
    name="ffi-cpu", unavailable_reason=_backend_unavailable_reason, platform="cpu",
    families=(base.MLP, base.TRANSFORMER), float32_only=True,
    network_forward=gated_mlp_forward)
