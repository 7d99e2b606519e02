"""An exclusive lock on a run directory, held for the life of the run.

Two processes writing one workdir interleave ``metrics.jsonl`` lines and race on
checkpoint directories. :class:`WorkdirLock` takes an advisory ``fcntl.flock`` on
``<workdir>/.lock`` (the file holds the owner's pid, for the message); the operating
system releases it when the process ends in any way, SIGKILL included, so a stale lock
file never blocks a later run.
"""

from __future__ import annotations

import fcntl
import os

LOCK_FILE = ".lock"


class WorkdirBusyError(ValueError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """``with WorkdirLock(workdir):`` holds ``<workdir>/.lock`` exclusively.

  Args:
    workdir: an existing directory.

  Raises:
    WorkdirBusyError: on entry, when another process holds the lock (one line naming
      its pid).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._fd = None

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise WorkdirBusyError(
          f"--workdir {os.path.dirname(self.path)} is in use by another run (pid {holder}); "
          "wait for it to finish or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()
