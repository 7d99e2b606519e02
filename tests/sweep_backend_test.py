"""The sweep tables name the kernel backend that ran each row's sparse latency."""

from __future__ import annotations

import csv
import os

from ccjax import sweep


def _runs(backend):
  extra = {"backend": backend} if backend else {}
  return [{"test_error": 0.1 * seed, "active_fraction": [0.25], "macs_per_example": 100.0,
           "latency_ms": {"dense": 2.0, "sparse": 1.0}, **extra} for seed in (1, 2)]


def test_tables_have_a_kernel_backend_column(tmp_path):
  rows = [sweep.aggregate("dense (same width)", "dense", None, (32,), _runs(None)),
          sweep.aggregate("condnet tau=0.25", "condnet", 0.25, (32,), _runs("ffi-cpu"))]
  assert rows[0]["backend"] is None and rows[1]["backend"] == "ffi-cpu"
  paths = sweep.write_tables(rows, str(tmp_path))
  with open(paths.markdown) as stream:
    lines = stream.read().splitlines()
  header = [cell.strip() for cell in lines[0].strip("|").split("|")]
  column = header.index("kernel backend")
  cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:4]]
  assert all(len(row) == len(header) for row in cells)
  assert [row[column] for row in cells] == ["n/a", "ffi-cpu"]
  with open(os.path.join(str(tmp_path), "sweep.csv")) as stream:
    assert [row["backend"] for row in csv.DictReader(stream)] == ["", "ffi-cpu"]


def test_mixed_backends_over_seeds_are_all_named():
  runs = _runs("ffi-cpu")
  runs[1]["backend"] = "xla"
  assert sweep.aggregate("x", "condnet", 0.25, (32,), runs)["backend"] == "ffi-cpu/xla"
