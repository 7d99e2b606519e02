"""Wall-clock timing of jitted functions for the inference benchmarks.

Speed is measured here, never asserted in tests: these helpers return medians that the
benchmarks print.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax


def interleaved_median_ms(calls: Sequence[tuple[Callable[..., Any], Sequence[tuple]]], *,
                          repeats: int = 20, warmup: int = 3, rounds: int = 4) -> list[float]:
  """Median wall time (ms) of each function, timed in alternating rounds.

  ``calls`` holds ``(fn, inputs)`` pairs, ``inputs`` a list of argument tuples cycled
  over (data-dependent work is timed over many examples). Each function runs
  ``repeats`` timed calls split into ``rounds`` consecutive runs that alternate between
  the functions, so that all see the same drifting background load on a shared machine
  while each run keeps its own caches warm. Every call is synchronised with
  ``jax.block_until_ready``; each input is first run ``warmup`` times (compilation
  included there).
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats!r}")
  for fn, inputs in calls:
    for _ in range(max(1, warmup)):
      for args in inputs:
        jax.block_until_ready(fn(*args))
  rounds = max(1, min(rounds, repeats))
  times = [[] for _ in calls]
  for round_index in range(rounds):
    count = repeats // rounds + (1 if round_index < repeats % rounds else 0)
    for slot, (fn, inputs) in enumerate(calls):
      for _ in range(count):
        args = inputs[len(times[slot]) % len(inputs)]
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[slot].append((time.perf_counter() - start) * 1e3)
  return [float(statistics.median(values)) for values in times]


def median_ms(fn: Callable[..., Any], *args, repeats: int = 20, warmup: int = 3) -> float:
  """Median wall time of ``fn(*args)`` in milliseconds, after ``warmup`` calls."""
  return interleaved_median_ms([(fn, [args])], repeats=repeats, warmup=warmup)[0]


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
  try:
    with open("/proc/cpuinfo") as stream:
      for line in stream:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def usable_cores() -> int:
  """The CPU cores this process may run on (its affinity mask where the OS has one)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
  """What every timing depends on: CPU model, cores this process may use, JAX device and
  version."""
  return {"cpu": cpu_model(), "cpu_count": usable_cores(),
          "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
