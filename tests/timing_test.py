"""Tests of ccjax.timing (what is measured and returned, not how fast)."""

from __future__ import annotations

import os

import jax.numpy as jnp
import pytest

from ccjax import timing


def test_interleaved_median_runs_every_input_and_returns_one_median_per_function():
  seen = []

  def first(x):
    seen.append(("first", float(x)))
    return jnp.asarray(x)

  def second(x):
    seen.append(("second", float(x)))
    return jnp.asarray(x)

  inputs = [(1.0,), (2.0,)]
  medians = timing.interleaved_median_ms([(first, inputs), (second, inputs)], repeats=4,
                                         warmup=1, rounds=2)
  assert len(medians) == 2 and all(m >= 0.0 for m in medians)
  timed = seen[4:]  # After one warm-up call per input and function.
  assert [name for name, _ in timed] == ["first"] * 2 + ["second"] * 2 + ["first"] * 2 + [
      "second"] * 2
  assert {value for _, value in timed} == {1.0, 2.0}


def test_median_ms_validates_repeats():
  with pytest.raises(ValueError, match="repeats must be >= 1"):
    timing.median_ms(lambda: jnp.zeros(()), repeats=0)


def test_machine_info_counts_the_usable_cores():
  info = timing.machine_info()
  assert info["cpu_count"] == timing.usable_cores() >= 1
  if hasattr(os, "sched_getaffinity"):
    assert timing.usable_cores() == len(os.sched_getaffinity(0))
