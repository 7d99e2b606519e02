"""Tests of the ffi-cpu build stamp: when setup.py rebuilds, and which extensions the loader
refuses (no reinstall here: the stamp logic is pure, and the installed extension is
checked against the stamp the build wrote)."""

import json
import pathlib
import shutil

import pytest

from ccjax.inference.kernels import build_stamp
from ccjax.inference.kernels import ffi_cpu

KERNELS = pathlib.Path(ffi_cpu.__file__).resolve().parent
FLAGS = ["-O3", "-march=native"]


@pytest.fixture(name="sources")
def _sources(tmp_path):
  """A copy of the extension's sources (the C++ and the vendored headers)."""
  for name in build_stamp.SOURCES:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(KERNELS / name, tmp_path / name)
  return tmp_path


def _stamp(directory, **overrides):
  stamp = build_stamp.make_stamp(directory, FLAGS, "CC= CXX=", "0.10.2", built=True)
  return dict(stamp, **overrides)


def _refusal(stamp, **overrides):
  """The loader's verdict on a library built exactly as ``stamp`` says, unless overridden."""
  facts = {"library_key": stamp["key"], "library_api": stamp["ffi_api"],
           "runtime_api": stamp["ffi_api"], "sources": stamp["source_sha256"],
           "runtime_jaxlib": stamp["jaxlib"]}
  return build_stamp.refusal(stamp, **dict(facts, **overrides))


def test_key_changes_with_source_flags_compiler_and_jaxlib(sources):
  base = _stamp(sources)
  assert base["ffi_api"] == "0.1"   # the vendored headers' version
  assert _stamp(sources)["key"] == base["key"]
  (sources / "csrc/gated_mlp.cc").write_text("// edited\n", "utf-8")
  assert _stamp(sources)["key"] != base["key"]
  (sources / "csrc/gated_mlp.cc").unlink()
  assert build_stamp.source_digest(sources) is None
  keys = {build_stamp.build_key("s", FLAGS, "CC= CXX=", "0.10.2"),
          build_stamp.build_key("s", ["-O3"], "CC= CXX=", "0.10.2"),
          build_stamp.build_key("s", FLAGS, "CC=clang CXX=clang++", "0.10.2"),
          build_stamp.build_key("s", FLAGS, "CC= CXX=", "0.11.0")}
  assert len(keys) == 4


def test_needs_build(sources):
  stamp = _stamp(sources)
  assert not build_stamp.needs_build(stamp, stamp["key"], library_exists=True)
  assert build_stamp.needs_build(stamp, stamp["key"], library_exists=False)
  assert build_stamp.needs_build(None, stamp["key"], library_exists=True)       # older setup.py
  assert build_stamp.needs_build(stamp, "other", library_exists=True)           # changed key
  failed = dict(stamp, built=False, reason="no compiler")
  assert build_stamp.needs_build(failed, stamp["key"], library_exists=True)     # stale .so


def test_write_and_read_round_trip(sources, tmp_path):
  stamp = _stamp(sources)
  path = build_stamp.write_stamp(tmp_path, stamp)
  assert path.name == build_stamp.STAMP_NAME
  assert build_stamp.read_stamp(tmp_path) == json.loads(path.read_text())
  path.write_text("{not json")
  assert build_stamp.read_stamp(tmp_path) is None
  path.unlink()
  assert build_stamp.read_stamp(tmp_path) is None


def test_refusals(sources):
  stamp = _stamp(sources)
  assert _refusal(stamp) is None
  assert _refusal(stamp, runtime_api="0.3") is None                 # newer minor: runs
  assert "no build stamp" in build_stamp.refusal(
      None, library_key=None, library_api="0.1", runtime_api="0.1", sources=None,
      runtime_jaxlib="0.10.2")
  failed = dict(stamp, built=False, reason="DistutilsExecError: command 'false' failed")
  assert "not compiled at install time (DistutilsExecError" in _refusal(failed)
  assert "not the build its stamp describes" in _refusal(stamp, library_key="none")
  assert "not the build its stamp describes" in _refusal(stamp, library_key=None)
  assert "speaks XLA FFI API 0.2, its stamp says 0.1" in _refusal(stamp, library_api="0.2")
  assert "this jaxlib (API 1.0) cannot run" in _refusal(stamp, runtime_api="1.0")
  newer = dict(stamp, ffi_api="0.4")
  assert "this jaxlib (API 0.3) cannot run" in _refusal(newer, library_api="0.4",
                                                        runtime_api="0.3")
  assert "sources changed" in _refusal(stamp, sources="0" * 64)
  assert _refusal(stamp, sources=None) is None                      # a wheel ships no C++
  assert "built against jaxlib 0.10.2, running jaxlib 0.11.0" in _refusal(
      stamp, runtime_jaxlib="0.11.0")
  assert _refusal(dict(stamp, jaxlib="unknown"), runtime_jaxlib="0.11.0") is None
  assert "pip install -e ." in _refusal(stamp, sources="0" * 64)


def test_installed_extension_matches_its_stamp():
  """Whatever this checkout holds, the loader's verdict is the stamp logic's verdict: an
  extension loads exactly when its stamp accepts it, and otherwise says why."""
  stamp = build_stamp.read_stamp(KERNELS)
  if ffi_cpu.available():
    assert stamp is not None and stamp["built"]
    assert stamp["source_sha256"] == build_stamp.source_digest(KERNELS)
    assert stamp["ffi_api"] == build_stamp.ffi_api_version(KERNELS / build_stamp.API_HEADER)
  else:
    assert ffi_cpu.unavailable_reason()
