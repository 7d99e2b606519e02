"""Shared pytest fixtures."""

import jax
import pytest


@pytest.fixture
def full_float32_matmuls():
  """XLA dots at full float32 precision (XLA:GPU would use TF32 by default), so that
  references agree with float32 kernels to 1e-5 on a GPU host too."""
  with jax.default_matmul_precision("highest"):
    yield
