"""Tests of ccjax.lock: one holder per workdir, released on exit and on process death."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ccjax import lock


def test_second_holder_is_refused_with_the_pid(tmp_path):
  with lock.WorkdirLock(str(tmp_path)):
    with pytest.raises(lock.WorkdirBusyError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
      lock.WorkdirLock(str(tmp_path)).acquire()
  with lock.WorkdirLock(str(tmp_path)):  # released on exit
    pass


def test_lock_of_a_killed_process_is_released(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]); "
       "from ccjax import lock; lock.WorkdirLock(sys.argv[1]).acquire(); print('held', "
       "flush=True); time.sleep(60)", str(tmp_path),
       os.path.dirname(os.path.dirname(os.path.abspath(__file__)))],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(lock.WorkdirBusyError, match=f"pid {holder.pid}"):
      lock.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()
    holder.wait()
  with lock.WorkdirLock(str(tmp_path)):  # a stale lock file does not block
    pass
