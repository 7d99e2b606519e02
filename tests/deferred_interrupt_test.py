"""Ctrl-C during a checkpoint save is held back until the save (and its checksums) ends."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from ccjax import run_loop


def test_sigint_inside_is_raised_after_the_block_and_the_handler_restored():
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers need the main thread")
  before = signal.getsignal(signal.SIGINT)
  finished = []
  with pytest.raises(KeyboardInterrupt):
    with run_loop.deferred_interrupt():
      os.kill(os.getpid(), signal.SIGINT)
      finished.append("the save went on")   # not cut short by the signal
  assert finished == ["the save went on"]
  assert signal.getsignal(signal.SIGINT) is before


def test_no_signal_no_interrupt():
  with run_loop.deferred_interrupt():
    pass
