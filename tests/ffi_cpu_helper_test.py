"""Tests of ccjax.inference.kernels.ffi_cpu_helper (the helper's counters and hooks; the
helper's work itself is tested in ffi_cpu_test.py)."""

import pytest

from ccjax.inference.kernels import ffi_cpu
from ccjax.inference.kernels import ffi_cpu_helper


def test_stats_subtract_field_by_field():
  later = ffi_cpu_helper.HelperStats(shared=5, run_alone=7, helper_tasks=100, stalls=1)
  earlier = ffi_cpu_helper.HelperStats(shared=2, run_alone=7, helper_tasks=40, stalls=0)
  assert later - earlier == ffi_cpu_helper.HelperStats(3, 0, 60, 1)


def test_unavailable_extension_is_one_clear_error(monkeypatch):
  monkeypatch.setattr(ffi_cpu, "unavailable_reason", lambda: "not built (test)")
  with pytest.raises(RuntimeError, match="ffi-cpu backend unavailable: not built"):
    ffi_cpu_helper.HelperHooks()


@pytest.mark.skipif(not ffi_cpu.available(), reason="ffi-cpu extension not built")
def test_hooks_read_counters_and_validate_the_test_mode():
  hooks = ffi_cpu_helper.HelperHooks()
  stats = hooks.stats()
  assert min(stats.shared, stats.run_alone, stats.helper_tasks, stats.stalls) >= 0
  with pytest.raises(ValueError, match="join_wait_us"):
    hooks.test_mode(join_wait_us=-1)
  hooks.test_mode()  # the shipped behaviour
