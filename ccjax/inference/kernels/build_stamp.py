"""Build stamp of the ``ffi-cpu`` extension: what it was built from, kept beside it.

``setup.py`` writes ``_ffi_cpu.build.json`` next to the compiled ``_ffi_cpu*.so``: a key
(a hash of the C++ sources with the vendored XLA FFI headers, the compiler flags and
compiler, and the jaxlib installed at build time), the XLA FFI API version of those
headers, and whether the build worked (with the reason when it did not, e.g. no C++
compiler: pip hides build output, so the reason is kept here for
:func:`ccjax.inference.kernels.ffi_cpu.unavailable_reason`). A later ``pip install`` whose
key differs rebuilds the extension even when setuptools finds the ``.so`` newer than its
sources; at load time :mod:`ccjax.inference.kernels.ffi_cpu` refuses an extension that does
not match its stamp, the current sources, the running jaxlib or its XLA FFI API version
(:func:`refusal`).

Standard library only: ``setup.py`` loads this file by path (in pip's isolated build
environment neither jax nor ccjax can be imported).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from typing import Any

STAMP_NAME = "_ffi_cpu.build.json"
SOURCES = ("csrc/gated_mlp.cc", "csrc/third_party/xla/ffi/api/api.h",
           "csrc/third_party/xla/ffi/api/c_api.h", "csrc/third_party/xla/ffi/api/ffi.h")
API_HEADER = "csrc/third_party/xla/ffi/api/c_api.h"
REBUILD = "rebuild it with `pip install -e .` in the clone"


def source_digest(kernels_dir: str | os.PathLike) -> str | None:
  """sha256 of the extension's sources under ``kernels_dir`` (the kernels package), or
  ``None`` when they are not there (an installed wheel ships no C++)."""
  digest = hashlib.sha256()
  for name in SOURCES:
    path = pathlib.Path(kernels_dir) / name
    if not path.is_file():
      return None
    digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
  return digest.hexdigest()


def ffi_api_version(header: str | os.PathLike) -> str | None:
  """``"major.minor"`` of the XLA FFI API declared by a ``c_api.h``, or ``None``."""
  try:
    text = pathlib.Path(header).read_text(errors="replace")
  except OSError:
    return None
  found = dict(re.findall(r"#define\s+XLA_FFI_API_(MAJOR|MINOR)\s+(\d+)", text))
  return f"{found['MAJOR']}.{found['MINOR']}" if {"MAJOR", "MINOR"} <= found.keys() else None


def build_key(sources: str | None, flags: list[str], compiler: str, jaxlib: str) -> str:
  """The hash that decides a rebuild: sources, flags, compiler and jaxlib version."""
  text = json.dumps([sources, list(flags), compiler, jaxlib])
  return hashlib.sha256(text.encode()).hexdigest()[:32]


def make_stamp(kernels_dir: str | os.PathLike, flags: list[str], compiler: str, jaxlib: str,
               *, built: bool, reason: str | None = None) -> dict[str, Any]:
  """The stamp of one build attempt of the sources under ``kernels_dir``."""
  sources = source_digest(kernels_dir)
  return {"key": build_key(sources, flags, compiler, jaxlib), "source_sha256": sources,
          "flags": list(flags), "compiler": compiler, "jaxlib": jaxlib,
          "ffi_api": ffi_api_version(pathlib.Path(kernels_dir) / API_HEADER),
          "built": bool(built), "reason": reason}


def write_stamp(directory: str | os.PathLike, stamp: dict[str, Any]) -> pathlib.Path:
  """Writes ``stamp`` as ``directory/STAMP_NAME`` (atomically: temp file, then rename)."""
  path = pathlib.Path(directory) / STAMP_NAME
  temp = path.with_name(path.name + ".tmp")
  temp.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
  os.replace(temp, path)
  return path


def read_stamp(directory: str | os.PathLike) -> dict[str, Any] | None:
  """The stamp in ``directory``, or ``None`` when there is none or it is unreadable."""
  try:
    stamp = json.loads((pathlib.Path(directory) / STAMP_NAME).read_text())
  except (OSError, ValueError):
    return None
  return stamp if isinstance(stamp, dict) and "key" in stamp else None


def needs_build(stamp: dict[str, Any] | None, key: str, library_exists: bool) -> bool:
  """Whether ``setup.py`` must (re)build: no library, no stamp, a failed or different build."""
  return not (library_exists and stamp is not None and stamp.get("built")
              and stamp.get("key") == key)


def _api_compatible(built_for: str, runtime: str) -> bool:
  """An extension built for API ``a.b`` runs on ``a.c`` with ``c >= b`` (same major)."""
  major, minor = (int(part) for part in built_for.split("."))
  runtime_major, runtime_minor = (int(part) for part in runtime.split("."))
  return major == runtime_major and minor <= runtime_minor


def refusal(stamp: dict[str, Any] | None, *, library_key: str | None,
            library_api: str | None, runtime_api: str | None, sources: str | None,
            runtime_jaxlib: str | None) -> str | None:
  """Why an extension must not be loaded, or ``None`` when it may.

  Args:
    stamp: the stamp beside the extension (:func:`read_stamp`).
    library_key: the build key compiled into the extension (``None``: it has none, so an
      older ``setup.py`` built it).
    library_api: the XLA FFI API version compiled into the extension.
    runtime_api: the running jaxlib's XLA FFI API version (``None``: unknown).
    sources: :func:`source_digest` of the sources beside the package (``None``: none).
    runtime_jaxlib: the running jaxlib's version.
  """
  if stamp is None:
    return f"no build stamp ({STAMP_NAME}) beside it: an older setup.py built it; {REBUILD}"
  if not stamp.get("built"):
    return f"it was not compiled at install time ({stamp.get('reason')})"
  if library_key != stamp.get("key"):
    return (f"the extension (build key {library_key}) is not the build its stamp describes "
            f"({stamp.get('key')}); {REBUILD}")
  if library_api != stamp.get("ffi_api"):
    return (f"the extension speaks XLA FFI API {library_api}, its stamp says "
            f"{stamp.get('ffi_api')}; {REBUILD}")
  if runtime_api is not None and library_api is not None and not _api_compatible(
      library_api, runtime_api):
    return (f"built for XLA FFI API {library_api}, which this jaxlib (API {runtime_api}) "
            f"cannot run; {REBUILD}")
  if sources is not None and sources != stamp.get("source_sha256"):
    return f"the C++ sources changed since it was built (stale); {REBUILD}"
  built_jaxlib = stamp.get("jaxlib")
  if built_jaxlib not in (None, "unknown") and runtime_jaxlib != built_jaxlib:
    return f"built against jaxlib {built_jaxlib}, running jaxlib {runtime_jaxlib}; {REBUILD}"
  return None
