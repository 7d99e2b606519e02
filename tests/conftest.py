"""Shared pytest fixtures and one XLA compilation cache per test session.

Compilation cache: most of a tiny training run's time is XLA compiling the same train and
eval steps that the test before it compiled (in-process runs build fresh closures, and
every CLI test is a fresh process). The session therefore shares JAX's persistent
compilation cache: one directory per ``pytest`` invocation (shared by its xdist workers
and by the subprocesses they start, through the ``JAX_*`` environment variables), removed
at the end. A cached executable is the one XLA compiled for the same program, so every
number is bit-identical to a fresh compile (``tests/condnet_test.py`` compares runs
bit for bit, and a CLI run compiled fresh against one from the cache). Set
``JAX_COMPILATION_CACHE_DIR`` yourself to keep a cache across sessions, or
``CCJAX_TEST_COMPILATION_CACHE=0`` to run without one.

Compile speed: XLA's backend optimizations are off in every test process
(``experiment_utils.FAST_COMPILE_FLAG``; ``CCJAX_TEST_XLA_OPT=1`` keeps XLA's default).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import pytest

CACHE_SWITCH = "CCJAX_TEST_COMPILATION_CACHE"
FAST_COMPILE_SWITCH = "CCJAX_TEST_XLA_OPT"
_SESSION_CACHE = "CCJAX_TEST_SESSION_CACHE_DIR"  # set by the controller, read by workers
_CACHE_ENV = {
    # Every compilation is cached (JAX's defaults keep only those over 1 s).
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def _use_cache(directory: str) -> None:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", directory)
  for name, value in _CACHE_ENV.items():
    os.environ.setdefault(name, value)
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def _compile_fast() -> None:
  """XLA's backend optimizations off for this process and the ones it starts (read when
  the CPU backend is created, which no test has done yet); see experiment_utils."""
  from tests import experiment_utils  # pylint: disable=g-import-not-at-top
  flags = os.environ.get("XLA_FLAGS", "").split()
  if not any(flag.startswith("--xla_backend_optimization_level") for flag in flags):
    os.environ["XLA_FLAGS"] = " ".join(flags + [experiment_utils.FAST_COMPILE_FLAG])


def pytest_configure(config):
  if os.environ.get(FAST_COMPILE_SWITCH, "0") != "1":
    _compile_fast()
  if os.environ.get(CACHE_SWITCH, "1") == "0":
    return
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # the user's own, kept
    _use_cache(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return
  directory = os.environ.get(_SESSION_CACHE)
  if directory is None:  # the controller (or a run without xdist): make the session's cache
    directory = tempfile.mkdtemp(prefix="ccjax-test-xla-cache-")
    os.environ[_SESSION_CACHE] = directory
    config._ccjax_cache_owner = directory  # pylint: disable=protected-access
  _use_cache(directory)


def pytest_unconfigure(config):
  directory = getattr(config, "_ccjax_cache_owner", None)
  if directory:
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def full_float32_matmuls():
  """XLA dots at full float32 precision (XLA:GPU would use TF32 by default), so that
  references agree with float32 kernels to 1e-5 on a GPU host too."""
  with jax.default_matmul_precision("highest"):
    yield


# Test modules whose module-, class- or session-scoped fixtures train a run or build a
# calibrated model: each runs on one xdist worker (``--dist loadgroup``, setup.cfg), so
# its fixture is built once, not once per worker that picks up one of its tests.
TRAINED_FIXTURE_MODULES = (
    "bad_input_test", "bench_inference_test", "condnet_test", "lm_reliability_test",
    "parallel_test", "predict_test", "reliability_readers_test", "reliability_test",
    "sweep_lm_test", "sweep_test", "tasks_test", "lm_train_test", "inference_api_test",
    "inference_cnn_test", "inference_transformer_test", "policy_hidden_test")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    if module in TRAINED_FIXTURE_MODULES:
      item.add_marker(pytest.mark.xdist_group(name=module))
