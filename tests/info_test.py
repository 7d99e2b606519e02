"""Tests of ccjax.info (``python -m ccjax.info``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jaxlib
import pytest

import ccjax
from ccjax import info
from ccjax.inference import kernels
from tests import experiment_utils


def test_describe_matches_the_backend_every_run_uses(monkeypatch):
  monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
  described = info.describe()
  assert described["jax"] == jax.__version__ and described["jaxlib"] == jaxlib.__version__
  assert described["default_backend"] == ccjax.select_backend()
  assert described["available_backends"] == list(kernels.available_backends())
  assert sum(int(part.rsplit(" x", 1)[1]) for part in described["devices"]) == len(jax.devices())
  # Every backend is either available or has a reason.
  assert (set(described["available_backends"]) | set(described["unavailable"])
          == set(kernels.BACKENDS))
  assert not set(described["available_backends"]) & set(described["unavailable"])


def test_missing_kernel_is_named_with_its_reason(monkeypatch):
  if jax.default_backend() != "cpu":
    pytest.skip("the ffi-cpu kernel is a CPU backend")
  monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
  monkeypatch.setattr(kernels.ffi_cpu, "unavailable_reason", lambda: "no C++ compiler (test)")
  described = info.describe()
  assert described["default_backend"] == "xla"
  assert described["unavailable"]["ffi-cpu"] == "no C++ compiler (test)"
  report = info.format_report(described)
  assert report.splitlines()[0] == (
      "kernel backend: xla (fast kernel ffi-cpu NOT in use: no C++ compiler (test))")
  assert "ffi-cpu: unavailable (no C++ compiler (test))" in report


def test_forced_backend_and_bad_backend(monkeypatch):
  monkeypatch.setenv(kernels.BACKEND_ENV, "xla")
  described = info.describe()
  assert described["default_backend"] == "xla"
  if "ffi-cpu" in described["available_backends"]:
    assert "forced by $CCJAX_BACKEND" in info.headline(described)
  monkeypatch.setenv(kernels.BACKEND_ENV, "tpu-magic")
  described = info.describe()
  assert described["default_backend"] is None
  assert info.headline(described).startswith("kernel backend: none usable (CCJAX_BACKEND")
  assert info.main([]) == 2


def test_cli_prints_the_backend_first_and_json(capsys, monkeypatch):
  monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
  assert info.main(["--json"]) == 0
  parsed = json.loads(capsys.readouterr().out)
  assert parsed["default_backend"] == ccjax.select_backend()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop(kernels.BACKEND_ENV, None)
  process = subprocess.run([sys.executable, "-m", "ccjax.info"], cwd=experiment_utils.REPO_ROOT,
                           env=env, capture_output=True, text=True, timeout=120)
  assert process.returncode == 0, process.stderr
  first = process.stdout.splitlines()[0]
  assert first.startswith(f"kernel backend: {ccjax.select_backend()} ")
  assert f"jax {jax.__version__}, jaxlib {jaxlib.__version__}" in process.stdout
  assert "Unable to initialize backend" not in process.stderr
