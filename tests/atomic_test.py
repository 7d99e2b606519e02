"""Tests of ccjax.atomic.atomic_open."""

from __future__ import annotations

import os
import stat

import pytest

from ccjax import atomic


def test_replaces_file_with_normal_permissions(tmp_path):
  path = str(tmp_path / "sub" / "out.json")
  with atomic.atomic_open(path) as stream:
    stream.write("new")
  with open(path) as stream:
    assert stream.read() == "new"
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
  assert os.listdir(tmp_path / "sub") == ["out.json"]


def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
  path = str(tmp_path / "out.txt")
  with open(path, "w") as stream:
    stream.write("old")
  with pytest.raises(RuntimeError):
    with atomic.atomic_open(path) as stream:
      stream.write("half")
      raise RuntimeError("disk full")
  with open(path) as stream:
    assert stream.read() == "old"
  assert os.listdir(tmp_path) == ["out.txt"]


def test_strict_json_writes_null_for_non_finite_numbers(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  payload = {"loss": float("nan"), "up": float("inf"), "rates": [1.0, float("-inf")],
             "array": np.array([0.5, np.nan], np.float32), "scalar": np.float32(np.inf),
             "pair": (2, "x"), "ok": True}
  path = str(tmp_path / "out.json")
  atomic.write_json(path, payload)
  with open(path) as stream:
    text = stream.read()
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text) == {"loss": None, "up": None, "rates": [1.0, None],
                              "array": [0.5, None], "scalar": None, "pair": [2, "x"],
                              "ok": True}
  assert atomic.dumps({"x": float("nan")}) == '{"x": null}'
