"""``metrics.jsonl``: the append-only record of a run's train, eval and final metrics."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ccjax import atomic

METRICS_FILE = "metrics.jsonl"


def to_python(value):
  """A JSON-ready Python scalar or (nested) list of a numpy/JAX value."""
  array = np.asarray(value)
  if array.ndim == 0:
    return array.item()
  return array.tolist()


class MetricsLog:
  """Append-only ``metrics.jsonl`` that stays consistent across resumes."""

  def __init__(self, path: str, enabled: bool = True):
    self.path = path
    self.enabled = enabled

  def truncate_after(self, step: int) -> None:
    """Drops records past ``step``, torn lines and old ``final`` records (see below)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as stream:
      for line in stream:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        # "final" records are rewritten by every run that reaches the end.
        if record.get("step", 0) <= step and record.get("kind") != "final":
          kept.append(atomic.dumps(record, sort_keys=True))
    with atomic.atomic_open(self.path) as stream:
      stream.write("".join(line + "\n" for line in kept))

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as stream:
      stream.write(atomic.dumps(record, sort_keys=True) + "\n")
      stream.flush()

  def read(self) -> list[dict[str, Any]]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as stream:
      return [json.loads(line) for line in stream if line.strip()]
