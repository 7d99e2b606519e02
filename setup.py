"""Builds the optional ``ffi-cpu`` extension; all other metadata is in pyproject.toml.

The extension (``ccjax/inference/kernels/csrc/gated_mlp.cc``) is compiled against the
vendored XLA FFI headers of the oldest supported jaxlib. It is optional: when no working
C++ compiler is found (e.g. ``CC=false CXX=false pip install .``), the build prints one
warning line and installation goes on; sparse inference then uses the XLA path.
"""

import sys

from setuptools import Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

_CSRC = "ccjax/inference/kernels/csrc"
_FLAGS = ["-std=c++17", "-O3", "-Wall", "-Wextra", "-pthread", "-isystem",
          f"{_CSRC}/third_party"]
# Tried first; dropped when the compiler rejects it (the kernels are then still built).
_NATIVE_FLAGS = ["-march=native"]
_WARNING = ("WARNING: ccjax: the ffi-cpu extension was not compiled ({}); sparse inference "
            "will use the XLA path.")


class OptionalBuildExt(build_ext):
  """``build_ext`` that never fails the installation."""

  def run(self):
    try:
      super().run()
    except Exception as error:  # pylint: disable=broad-except  # e.g. no compiler at all
      print(_WARNING.format(_reason(error)), file=sys.stderr)

  def build_extension(self, ext):
    base_flags = list(ext.extra_compile_args)
    try:
      ext.extra_compile_args = base_flags + _NATIVE_FLAGS
      super().build_extension(ext)
      return
    except Exception:  # pylint: disable=broad-except
      pass
    try:
      ext.extra_compile_args = base_flags
      super().build_extension(ext)
    except Exception as error:  # pylint: disable=broad-except
      print(_WARNING.format(_reason(error)), file=sys.stderr)


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
