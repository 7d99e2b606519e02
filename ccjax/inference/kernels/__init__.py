"""Inference backends: one module per backend, chosen once and reported everywhere.

* ``xla`` (:mod:`~ccjax.inference.kernels.xla`): stock XLA ops; always available; the
  reference every other backend is tested against.
* ``ffi-cpu`` (:mod:`~ccjax.inference.kernels.ffi_cpu`): the whole MLP forward pass as
  one XLA FFI call into fused C++ kernels (built by ``pip install`` when a compiler is
  available; float32 models).
* ``pallas-gpu`` (:mod:`~ccjax.inference.kernels.pallas_gpu`,
  :mod:`~ccjax.inference.kernels.pallas_gpu_gemv`): Pallas (Triton) kernels on GPU -- the
  grouped matmul of the minibatch path and the fused batch-1 path. Off a GPU it is
  available only with ``CCJAX_PALLAS_INTERPRET=1`` and then runs in the Pallas
  interpreter (slow; for tests and for checking GPU scripts on a CPU machine).

:func:`select_backend` picks the fastest available backend for the default JAX device;
the environment variable ``CCJAX_BACKEND`` forces one.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax

from ccjax.inference.kernels import ffi_cpu
from ccjax.inference.kernels import pallas_gpu
from ccjax.inference.kernels import xla

BACKENDS = ("xla", "ffi-cpu", "pallas-gpu")
BACKEND_ENV = "CCJAX_BACKEND"
PALLAS_INTERPRET_ENV = "CCJAX_PALLAS_INTERPRET"
# Backends that run float32 models only (others go to the XLA path).
FLOAT32_ONLY = ("ffi-cpu",)


@functools.cache
def _warn_ffi_cpu_unavailable(reason: str) -> None:
  warnings.warn(f"ccjax: ffi-cpu backend unavailable ({reason}); using the XLA path",
                RuntimeWarning, stacklevel=3)


take_blocks = xla.take_blocks


def available_backends(*, float32: bool = True) -> tuple[str, ...]:
  """The backends that can run on this machine's default JAX device, best last.

  Args:
    float32: the model is float32 (``False`` drops :data:`FLOAT32_ONLY` backends).
  """
  available = ["xla"]
  platform = jax.default_backend()
  if platform != "gpu" and os.environ.get(PALLAS_INTERPRET_ENV) == "1":
    available.append("pallas-gpu")          # interpreted: slower than every other backend
  if platform == "cpu":
    reason = ffi_cpu.unavailable_reason()
    if reason is None:
      available.append("ffi-cpu")
    else:
      _warn_ffi_cpu_unavailable(reason)
  if platform == "gpu":
    available.append("pallas-gpu")
  return tuple(name for name in available if float32 or name not in FLOAT32_ONLY)


def select_backend(requested: str | None = None, *, float32: bool = True) -> str:
  """The backend to use: ``requested``, else ``$CCJAX_BACKEND``, else the best available.

  ``float32=False`` (a model in another dtype) leaves out :data:`FLOAT32_ONLY` backends.

  Raises:
    ValueError: an unknown or unavailable backend was asked for (one line naming where
      it came from and the allowed values).
  """
  source = "backend"
  if requested is None and os.environ.get(BACKEND_ENV):
    requested, source = os.environ[BACKEND_ENV], BACKEND_ENV
  available = available_backends(float32=float32)
  if requested is None:
    return available[-1]
  if requested not in BACKENDS:
    raise ValueError(f"{source} must be one of {'|'.join(BACKENDS)}, got {requested!r}")
  if requested not in available:
    why = " for this model's dtype" if requested in FLOAT32_ONLY and not float32 else " here"
    hint = (f"; it needs a GPU, or {PALLAS_INTERPRET_ENV}=1 for the interpreter"
            if requested == "pallas-gpu" else "")
    raise ValueError(f"{source}={requested} is not available{why} (available: "
                     f"{'|'.join(available)}{hint})")
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
      (required by ``pallas-gpu``; made once, at layout time).
    backend: one of :data:`BACKENDS`; backends without a grouped-matmul kernel of their
      own use the XLA one. Off a GPU, ``pallas-gpu`` runs in the Pallas interpreter.
    transpose_rhs: the blocks are stored transposed.

  Returns:
    ``[groups, rows, n]`` in ``x.dtype``.
  """
  if backend != "pallas-gpu":
    return xla.grouped_matmul_xla(x, weights, weight_index, transpose_rhs)
  if transpose_rhs:
    raise ValueError("the Pallas grouped matmul takes untransposed [weights, k, n] blocks")
  if tiles is None:
    raise ValueError("the Pallas grouped matmul needs tiles=pad_weight_tiles(weights), made "
                     "once at layout time")
  return pallas_gpu.grouped_matmul(x, tiles, weight_index, group_sizes, width=weights.shape[2],
                                   interpret=pallas_gpu.interpret_default())
