"""Builds the optional ``ffi-cpu`` extension; all other metadata is in pyproject.toml.

The extension (``ccjax/inference/kernels/csrc/gated_mlp.cc``) is compiled against the
vendored XLA FFI headers of the oldest supported jaxlib. It is optional: when no working
C++ compiler is found (e.g. ``CC=false CXX=false pip install .``), the build prints one
warning line (pip shows it with ``-v`` only) and installation goes on; sparse inference
then uses the XLA path, and the reason is kept in the build stamp, where
``ccjax.inference.kernels.ffi_cpu.unavailable_reason()`` (and the run-time warning) finds
it.

Every build attempt writes ``_ffi_cpu.build.json`` beside the extension
(``ccjax/inference/kernels/build_stamp.py``); when its key (sources, flags, compiler,
jaxlib) differs from the last build's, the extension is rebuilt even if setuptools finds
the ``.so`` newer than its sources (a reinstall after an edit, a flag change or a jaxlib
upgrade).
"""

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys

from setuptools import Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

_KERNELS = "ccjax/inference/kernels"
_CSRC = f"{_KERNELS}/csrc"
_FLAGS = ["-std=c++17", "-O3", "-Wall", "-Wextra", "-pthread", "-isystem",
          f"{_CSRC}/third_party"]
# Tried first; dropped when the compiler rejects it (the kernels are then still built).
_NATIVE_FLAGS = ["-march=native"]
_WARNING = ("WARNING: ccjax: the ffi-cpu extension was not compiled ({}); sparse inference "
            "will use the XLA path.")


def _load_build_stamp():
  """``ccjax/inference/kernels/build_stamp.py`` by path (jax is not importable here)."""
  spec = importlib.util.spec_from_file_location(
      "ccjax_build_stamp", os.path.join(os.path.dirname(os.path.abspath(__file__)), _KERNELS,
                                        "build_stamp.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


build_stamp = _load_build_stamp()


def _jaxlib_version() -> str:
  """The jaxlib of the environment being installed into, or ``"unknown"``.

  pip builds in an isolated environment that hides the target's site-packages; a plain
  interpreter started without pip's ``PYTHONPATH`` overlay sees them.
  """
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    pass
  env = {name: value for name, value in os.environ.items()
         if name not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
  try:
    found = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m; print(m.version('jaxlib'))"],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    return found.stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def _compiler() -> str:
  return f"CC={os.environ.get('CC', '')} CXX={os.environ.get('CXX', '')}"


class OptionalBuildExt(build_ext):
  """``build_ext`` that never fails the installation and stamps every attempt."""

  def run(self):
    try:
      super().run()
    except Exception as error:  # pylint: disable=broad-except  # e.g. no compiler at all
      for ext in self.extensions:
        self._record_failure(ext, error)

  def copy_extensions_to_source(self):
    """Copies each built extension and its stamp next to the sources (``--inplace``,
    ``pip install -e``), renaming over the old files: a process that has the old
    extension loaded keeps it intact."""
    for ext in self.extensions:
      built = os.path.join(self.build_lib, self.get_ext_filename(self.get_ext_fullname(ext.name)))
      target = self.get_ext_fullpath(ext.name)
      for source, destination in (
          (os.path.join(os.path.dirname(built), build_stamp.STAMP_NAME),
           os.path.join(os.path.dirname(target), build_stamp.STAMP_NAME)), (built, target)):
        if os.path.exists(source):
          shutil.copy2(source, destination + ".tmp")
          os.replace(destination + ".tmp", destination)

  def _stamp_dir(self, ext) -> str:
    return os.path.dirname(self.get_ext_fullpath(ext.name))

  def _record_failure(self, ext, error: Exception) -> None:
    reason = _reason(error)
    print(_WARNING.format(reason), file=sys.stderr)
    os.makedirs(self._stamp_dir(ext), exist_ok=True)
    build_stamp.write_stamp(self._stamp_dir(ext), build_stamp.make_stamp(
        _KERNELS, _FLAGS + _NATIVE_FLAGS, _compiler(), _jaxlib_version(), built=False,
        reason=reason))

  def build_extension(self, ext):
    jaxlib = _jaxlib_version()
    wanted = build_stamp.make_stamp(_KERNELS, _FLAGS + _NATIVE_FLAGS, _compiler(), jaxlib,
                                    built=True)
    # The key is compiled in, so that the loader can tell this build's .so from another.
    ext.define_macros = [("CCJAX_BUILD_KEY", f'"{wanted["key"]}"')]
    previous = build_stamp.read_stamp(self._stamp_dir(ext))
    self.force = self.force or build_stamp.needs_build(
        previous, wanted["key"], os.path.exists(self.get_ext_fullpath(ext.name)))
    failure = None
    for flags in (_FLAGS + _NATIVE_FLAGS, list(_FLAGS)):
      try:
        ext.extra_compile_args = flags
        super().build_extension(ext)
      except Exception as error:  # pylint: disable=broad-except
        failure = error
        continue
      build_stamp.write_stamp(self._stamp_dir(ext), dict(wanted, flags=flags))
      return
    self._record_failure(ext, failure)


def _reason(error: Exception) -> str:
  """A short reason: the error type and the start of its message."""
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:80]}{'...' if len(text) > 80 else ''}"


setup(
    ext_modules=[Extension(
        "ccjax.inference.kernels._ffi_cpu", sources=[f"{_CSRC}/gated_mlp.cc"],
        depends=[f"{_CSRC}/third_party/xla/ffi/api/{name}"
                 for name in ("api.h", "c_api.h", "ffi.h")],
        language="c++", extra_compile_args=_FLAGS, extra_link_args=["-pthread"])],
    cmdclass={"build_ext": OptionalBuildExt},
)
