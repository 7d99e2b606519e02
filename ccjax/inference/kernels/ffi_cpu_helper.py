"""Counters and test hooks of the ffi-cpu extension's batch-1 helper thread.

At batch 1 the handler splits each layer's products into small matrix-vector tasks that
the calling thread and one persistent helper thread take from the two ends of a list
(``Batch1Helper`` in ``csrc/gated_mlp.cc``). A job is offered to the helper only when the
call may use two threads (``CCJAX_FFI_THREADS``), the job reads at least 512 KB, a core is
idle (``/proc/loadavg``) and the caller did not just wait long for the helper (a stall);
the caller never waits for the helper to start. :class:`HelperHooks` reads the counters
and sets the test mode through ``ctypes``.
"""

from __future__ import annotations

import ctypes
import dataclasses

from ccjax.inference.kernels import ffi_cpu


@dataclasses.dataclass(frozen=True)
class HelperStats:
  """Counters since the process started (subtract two readings for an interval).

  Attributes:
    shared: jobs the helper joined.
    run_alone: jobs offered to the helper that the caller ran alone (it did not join).
    helper_tasks: tasks the helper ran.
    stalls: joined jobs whose end the caller waited for longer than 30 us (each pauses
      the offers for a while).
  """
  shared: int
  run_alone: int
  helper_tasks: int
  stalls: int

  def __sub__(self, other: "HelperStats") -> "HelperStats":
    return HelperStats(*(a - b for a, b in zip(dataclasses.astuple(self),
                                               dataclasses.astuple(other))))


class HelperHooks:
  """The extension's helper hooks (starts the helper thread if it is not running yet).

  Raises:
    RuntimeError: the extension is not available.
  """

  def __init__(self):
    reason = ffi_cpu.unavailable_reason()
    if reason is not None:
      raise RuntimeError(f"ffi-cpu backend unavailable: {reason}")
    self._library = ctypes.CDLL(str(ffi_cpu.library_path()))
    self._library.CcjaxBatch1HelperTestMode.argtypes = [ctypes.c_int64, ctypes.c_int64]
    self._library.CcjaxBatch1HelperStats.argtypes = [ctypes.POINTER(ctypes.c_int64)]

  def stats(self) -> HelperStats:
    counters = (ctypes.c_int64 * 4)()
    if self._library.CcjaxBatch1HelperStats(counters) != 1:
      raise RuntimeError("the batch-1 helper thread could not be started")
    return HelperStats(*counters)

  def test_mode(self, pause: bool = False, join_wait_us: int = 0) -> None:
    """``join_wait_us`` > 0 offers every job to the helper (whatever the load) and makes
    the caller wait up to that long for it to join before taking tasks; ``pause`` keeps
    the helper from joining (the caller runs every task: the fallback). Both off (the
    default) is the shipped behaviour."""
    if join_wait_us < 0:
      raise ValueError(f"join_wait_us must be >= 0, got {join_wait_us}")
    if self._library.CcjaxBatch1HelperTestMode(int(pause), join_wait_us) != 1:
      raise RuntimeError("the batch-1 helper thread could not be started")
