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
