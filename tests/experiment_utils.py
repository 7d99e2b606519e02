"""Helpers shared by the entrypoint tests: run a CLI in a subprocess, tiny flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ("--hidden=32,32", "--block_size=8", "--batch_size=32", "--steps=12",
              "--log_every=4", "--eval_every=8", "--checkpoint_every=4",
              "--measure_latency=false")

# Every test process compiles with XLA's backend optimizations off (tests/conftest.py sets
# it for the pytest process and the subprocesses it starts): tiny programs, so compiling
# dominates their time, and level 0 cuts the suite's CPU time by about a third. Numbers
# are compared within one test, under one setting; ``CCJAX_TEST_XLA_OPT=1`` turns it off.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def xla_flags_env(num_devices: int | None = None,
                  env: dict[str, str] | None = None) -> dict[str, str]:
  """A copy of ``env`` (default ``os.environ``) on CPU whose ``XLA_FLAGS`` keep the
  suite's flags and ask for ``num_devices`` host devices (``None``: XLA's default, one)."""
  env = dict(os.environ if env is None else env)
  env["JAX_PLATFORMS"] = "cpu"
  flags = [flag for flag in env.get("XLA_FLAGS", "").split()
           if not flag.startswith("--xla_force_host_platform_device_count")]
  if num_devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={num_devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def _module_env() -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, env.get("PYTHONPATH", "")])
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs ``python -m module args`` from the repo root; returns the completed process."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT,
                        env=_module_env(), capture_output=True, text=True, timeout=timeout)


def run_module_cases(module: str, cases: Sequence[Sequence[str]],
                     timeout: float = 300) -> list[subprocess.CompletedProcess]:
  """:func:`run_module` for each argument list of ``cases``, in one subprocess that
  imports the module's dependencies once and forks a child per case (``tests/cli_batch``).

  Each child runs the module as ``__main__`` with a fresh ``sys.argv``, as ``python -m``
  does: same flags parsing, exit status and output as a process of its own, without the
  2-3 s of interpreter start and imports per case. Tests of the CLI's wiring itself keep
  :func:`run_module`.

  Returns:
    One completed process per case, in order (``args`` holds the case's arguments).
  """
  with tempfile.TemporaryDirectory(prefix="cli-cases-") as scratch:
    cases_path = os.path.join(scratch, "cases.json")
    results_path = os.path.join(scratch, "results.json")
    with open(cases_path, "w", encoding="utf-8") as stream:
      json.dump([list(case) for case in cases], stream)
    driver = subprocess.run(
        [sys.executable, "-m", "tests.cli_batch", module, cases_path, results_path],
        cwd=REPO_ROOT, env=_module_env(), capture_output=True, text=True, timeout=timeout)
    assert driver.returncode == 0, driver.stderr[-2000:]
    with open(results_path, encoding="utf-8") as stream:
      results = json.load(stream)
  return [subprocess.CompletedProcess([module, *case], **result)
          for case, result in zip(cases, results)]


def listing(path: str) -> set[str]:
  """Every file and directory below ``path`` (relative), empty if it does not exist."""
  found = set()
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      found.add(os.path.relpath(os.path.join(root, name), path))
  return found


def assert_trees_equal(first, second) -> None:
  """Same pytree structure and bit-identical leaves."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves_a, tree_a = jax.tree_util.tree_flatten(first)
  leaves_b, tree_b = jax.tree_util.tree_flatten(second)
  assert tree_a == tree_b
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
