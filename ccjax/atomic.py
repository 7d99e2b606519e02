"""Atomic file writes: write to a temporary file in the same directory, then rename."""

from __future__ import annotations

import contextlib
import json
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


def write_json(path: str, payload: Any) -> None:
  """Writes ``payload`` as indented JSON to ``path`` atomically."""
  with atomic_open(path) as stream:
    json.dump(payload, stream, indent=2, sort_keys=True)
