"""Test helpers: model parameters drawn with numpy (no XLA compile of the initialisers), and
a module's ``init``/``apply`` jitted (one compile instead of one per operation: op by op, a
small model's first call costs seconds of CPU compiling each operation on its own)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def numpy_params(model, x, seed: int = 0, *, policy_kernel_scale: float = 1.0,
                 bias_scale: float = 0.0, policy_bias: float | None = None):
  """Parameters of ``model`` for input ``x``, shapes from ``jax.eval_shape``.

  Kernels are fan-in scaled normals (policy kernels times ``policy_kernel_scale``);
  policy biases are ``policy_bias`` when given, other biases normals times ``bias_scale``
  (zeros when 0).
  """
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0), "gate": jax.random.PRNGKey(1)}, x))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    names = [getattr(entry, "key", None) for entry in path]
    is_policy = "policy" in names
    if names[-1] == "kernel":
      scale = (policy_kernel_scale if is_policy else 1.0) / np.sqrt(np.prod(shape.shape[:-1]))
      return jnp.asarray(rng.normal(size=shape.shape) * scale, jnp.float32)
    if is_policy and policy_bias is not None:
      return jnp.full(shape.shape, policy_bias, jnp.float32)
    if bias_scale == 0.0:
      return jnp.zeros(shape.shape, jnp.float32)
    return jnp.asarray(rng.normal(size=shape.shape) * bias_scale, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def jitted_init(module):
  """``module.init`` jitted, ``mode`` static; cached per module (modules hash by fields)."""
  return jax.jit(module.init, static_argnames=("mode",))


@functools.lru_cache(maxsize=None)
def jitted_apply(module):
  """``module.apply`` jitted, ``mode`` and ``capacity`` static; cached per module."""
  return jax.jit(module.apply, static_argnames=("mode", "capacity"))
