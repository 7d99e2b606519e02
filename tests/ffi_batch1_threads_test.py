"""Runs scripts/ffi_batch1_threads.py (1 vs 2 threads at batch 1) on a small net."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from ccjax.inference.kernels import ffi_cpu

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the timing script end to end
@pytest.mark.skipif(not ffi_cpu.available(), reason="ffi-cpu extension not built")
def test_script_times_both_paths_and_the_helper_shares_when_forced():
  # 784-2048-2048-10, blocks of 64, tau 1/8: 4 blocks per layer, 200 KB first-layer blocks
  # and 256 KB of tiles, enough for the batch-1 jobs to be offered to the helper.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "scripts/ffi_batch1_threads.py", "--hidden=2048,2048", "--rounds=2"],
      cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(report["times"]) == {"one_thread", "two_threads", "dense", "two_threads_forced",
                                  "one_thread_during_forced"}
  for times in report["times"].values():
    assert 0 < times["p10_ms"] <= times["median_ms"]
  forced = report["helper"]["forced"]
  assert forced["shared"] + forced["run_alone"] > 0  # every job offered while forced
  assert report["machine"]["cpu"] and len(report["load_average"]["start"]) == 3
