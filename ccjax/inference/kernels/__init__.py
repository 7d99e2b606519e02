"""Inference backends: one module per backend, one registry, chosen once, reported everywhere.

Every backend is a :class:`~ccjax.inference.kernels.base.Backend` object in its own
module, listed once in :data:`REGISTRY`:

* ``xla`` (:mod:`~ccjax.inference.kernels.xla`): stock XLA ops; always available; every
  model family; the reference every other backend is tested against.
* ``ffi-cpu`` (:mod:`~ccjax.inference.kernels.ffi_cpu`): the whole MLP forward pass as
  one XLA FFI call into fused C++ kernels (built by ``pip install`` when a compiler is
  available; float32 MLP and transformer models).
* ``pallas-gpu`` (:mod:`~ccjax.inference.kernels.pallas_gpu`,
  :mod:`~ccjax.inference.kernels.pallas_gpu_gemv`): Pallas (Triton) kernels on GPU -- the
  grouped matmul of the minibatch path and the fused batch-1 path (MLP and transformer).
  Off a GPU it is available only with ``CCJAX_PALLAS_INTERPRET=1`` and then runs in the
  Pallas interpreter (slow; for tests and for checking GPU scripts on a CPU machine).

:func:`select_backend` picks, once per model, the best available backend for the default
JAX device and the model's family and dtype; an explicit name or the environment
variable ``CCJAX_BACKEND`` forces one (an error names the allowed values, or why the
forced one cannot run). Adding a backend: its module with a ``BACKEND`` object, and one
line in :data:`REGISTRY`.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax

from ccjax.inference.kernels import base
from ccjax.inference.kernels import ffi_cpu
from ccjax.inference.kernels import pallas_gpu
from ccjax.inference.kernels import xla

Backend = base.Backend

# Every backend, once. The order breaks ties only: a backend native to the default JAX
# platform (``Backend.platform``) is preferred to a portable or interpreted one.
REGISTRY: tuple[Backend, ...] = (
    xla.BACKEND,
    ffi_cpu.BACKEND,
    pallas_gpu.BACKEND,
)
BACKENDS = tuple(backend.name for backend in REGISTRY)
_BY_NAME = {backend.name: backend for backend in REGISTRY}
BACKEND_ENV = "CCJAX_BACKEND"
PALLAS_INTERPRET_ENV = pallas_gpu.INTERPRET_ENV
# Backends that run float32 models only (others get the best backend that does not).
FLOAT32_ONLY = tuple(backend.name for backend in REGISTRY if backend.float32_only)

take_blocks = xla.take_blocks


def get(name: str) -> Backend:
  """The registered backend called ``name``.

  Raises:
    ValueError: an unknown name (one line listing the registered ones).
  """
  if name not in _BY_NAME:
    raise ValueError(f"backend must be one of {'|'.join(BACKENDS)}, got {name!r}")
  return _BY_NAME[name]


@functools.cache
def _warn_unavailable(name: str, reason: str) -> None:
  warnings.warn(f"ccjax: {name} backend unavailable ({reason}); using the XLA path",
                RuntimeWarning, stacklevel=3)


def unavailable_reasons(platform: str | None = None) -> dict[str, str]:
  """``{name: why}`` of every registered backend that cannot run on ``platform`` (default:
  that of the default JAX device)."""
  platform = platform or jax.default_backend()
  reasons = {backend.name: backend.unavailable_reason(platform) for backend in REGISTRY}
  return {name: reason for name, reason in reasons.items() if reason is not None}


def available_backends(*, float32: bool = True, family: str = base.MLP) -> tuple[str, ...]:
  """The backends that can run on this machine's default JAX device, best last.

  Args:
    float32: the model is float32 (``False`` drops :data:`FLOAT32_ONLY` backends).
    family: the model family (:data:`~ccjax.inference.kernels.base.FAMILIES`); backends
      that do not run it are left out.

  A backend native to this platform that cannot run here (e.g. ``ffi-cpu`` on a CPU
  without the built extension) is reported once as a ``RuntimeWarning``.
  """
  platform = jax.default_backend()
  runnable = []
  for backend in REGISTRY:
    reason = backend.unavailable_reason(platform)
    if reason is None:
      runnable.append(backend)
    elif backend.platform == platform:
      _warn_unavailable(backend.name, reason)
  runnable.sort(key=lambda backend: backend.platform == platform)  # stable: natives last
  return tuple(backend.name for backend in runnable
               if backend.runs(float32=float32, family=family))


def select_backend(requested: str | None = None, *, float32: bool = True,
                   family: str = base.MLP) -> str:
  """The backend to use: ``requested``, else ``$CCJAX_BACKEND``, else the best available.

  Args:
    requested: a name of :data:`BACKENDS`, or ``None``.
    float32: the model is float32 (``False`` leaves out :data:`FLOAT32_ONLY` backends).
    family: the model family (``mlp``, ``transformer``, ``cnn``): the default is the best
      backend that runs it, and a forced backend that does not raises.

  Raises:
    ValueError: an unknown, unavailable or unsuitable backend was asked for (one line
      naming where it came from and the allowed values).
  """
  source = "backend"
  if requested is None and os.environ.get(BACKEND_ENV):
    requested, source = os.environ[BACKEND_ENV], BACKEND_ENV
  available = available_backends(float32=float32, family=family)
  if requested is None:
    return available[-1]
  if requested not in _BY_NAME:
    raise ValueError(f"{source} must be one of {'|'.join(BACKENDS)}, got {requested!r}")
  backend = _BY_NAME[requested]
  if family not in backend.families:
    raise ValueError(f"{source}={requested} does not run {family} models (backends that "
                     f"do: {'|'.join(available)})")
  if requested not in available:
    reason = backend.unavailable_reason(jax.default_backend())
    why = (f" for this model's dtype" if reason is None else f" here: {reason}")
    raise ValueError(f"{source}={requested} is not available{why} (available: "
                     f"{'|'.join(available)})")
  return requested


def grouped_matmul(x: jax.Array, weights: jax.Array, weight_index: jax.Array | None = None,
                   group_sizes: jax.Array | None = None, *, tiles: jax.Array | None = None,
                   backend: str = "xla", transpose_rhs: bool = False) -> jax.Array:
  """``out[g] = x[g] @ weights[weight_index[g]]`` on ``backend``.

  Args:
    x: ``[groups, rows, k]``; rows at or past ``group_sizes[g]`` must be zero.
    weights: ``[weights, k, n]`` block-major weight blocks (``[weights, n, k]`` with
      ``transpose_rhs``, XLA only).
    weight_index: ``[groups]`` int block ids; ``None`` means ``arange(groups)``.
    group_sizes: ``[groups]`` int rows in use per group (a prefix), ``None`` for all: the
      Pallas kernel skips the rest (a group of size 0 reads no weights); the XLA path
      multiplies the zero rows.
    tiles: ``weights`` padded by :func:`~ccjax.inference.kernels.pallas_gpu.pad_weight_tiles`
      (required by a backend with ``layout_tiles``; made once, at layout time).
    backend: one of :data:`BACKENDS`; backends without a grouped-matmul kernel of their
      own use the XLA one. Off a GPU, ``pallas-gpu`` runs in the Pallas interpreter.
    transpose_rhs: the blocks are stored transposed.

  Returns:
    ``[groups, rows, n]`` in ``x.dtype``.
  """
  kernel = get(backend).grouped_matmul
  if kernel is None:
    return xla.grouped_matmul_xla(x, weights, weight_index, transpose_rhs)
  return kernel(x, weights, weight_index, group_sizes, tiles=tiles, transpose_rhs=transpose_rhs)
