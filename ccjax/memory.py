"""Free memory where a computation will run, to refuse work that cannot fit up front."""

from __future__ import annotations

import os

import jax


def available_bytes() -> tuple[int, str]:
  """Free memory of the first device (an accelerator's free memory, else the host's
  ``MemAvailable``), and where it is (``"host"`` or ``"<platform> device"``)."""
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{device.platform} device"
  try:
    with open("/proc/meminfo") as stream:
      for line in stream:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024, "host"
  except OSError:
    pass
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host"
