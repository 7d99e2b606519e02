"""Atomic file writes: write to a temporary file in the same directory, then rename."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import IO, Any, Iterator


def _current_umask() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return umask


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary sibling of ``path``; on success it replaces ``path`` atomically.

  A reader sees either the old file or the complete new one; if the block raises (or the
  process dies), ``path`` is untouched and the temporary file is removed (or, after a
  kill, left as a dot-file that nothing reads).

  Args:
    path: the destination file; its directory is created if needed.
    mode: ``"w"`` (text) or ``"wb"`` (bytes).

  Yields:
    the open temporary file.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, temp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                       suffix=".tmp")
  try:
    with os.fdopen(handle, mode) as stream:
      yield stream
      stream.flush()
      os.fsync(stream.fileno())
    os.chmod(temp_path, 0o666 & ~_current_umask())  # mkstemp creates 0600 files.
    os.replace(temp_path, path)
  except BaseException:
    if os.path.exists(temp_path):
      os.remove(temp_path)
    raise


def strict_json_value(value: Any) -> Any:
  """``value`` with every non-finite float (NaN, +-inf) replaced by ``None``.

  Recurses into dicts, lists and tuples (tuples become lists); numpy scalars and arrays
  are converted to Python numbers and lists first, so the result always serialises as
  strict JSON (RFC 8259 has no NaN or Infinity tokens).
  """
  if isinstance(value, dict):
    return {key: strict_json_value(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict_json_value(item) for item in value]
  if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
    return strict_json_value(value.tolist())   # numpy scalars and arrays
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def dumps(payload: Any, **kwargs) -> str:
  """Strict JSON text of ``payload``: non-finite numbers become ``null``."""
  return json.dumps(strict_json_value(payload), allow_nan=False, **kwargs)


def write_json(path: str, payload: Any) -> None:
  """Writes ``payload`` as indented strict JSON (see :func:`dumps`) to ``path`` atomically."""
  with atomic_open(path) as stream:
    stream.write(dumps(payload, indent=2, sort_keys=True))
