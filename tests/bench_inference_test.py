"""Runs experiments/bench_inference.py in a tiny configuration, as a user would."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import experiment_utils

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--hidden=128,128", "--block_size=16", "--batch_sizes=1,8", "--repeats=2", "--models=mlp",
        "--bandwidth_mb=8", "--matmul_size=256"]
REPORT_KEYS = {"macs", "weight_mb", "roofline_ms", "bound_by", "measured_ms",
               "fraction_of_bound", "achieved_gbs", "achieved_gmacs"}
RESULT_KEYS = {"batch_size", "dense_ms", "sparse_ms", "ratio", "dense_macs", "sparse_macs",
               "mac_ratio", "overflow_rate"}


def _run(*flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.bench_inference", *flags],
                        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny_runs():
  """The tiny benchmark with and without the roofline: one batch (run_module_cases)."""
  return experiment_utils.run_module_cases(
      "experiments.bench_inference", [[*TINY, "--json"],
                                      [*TINY, "--batch_sizes=1", "--noroofline", "--json"]])


def test_tiny_benchmark_prints_json_with_schema(tiny_runs):
  result = tiny_runs[0]
  assert result.returncode == 0, result.stderr[-2000:]
  # Progress on stderr: what runs, then each case with an ETA; no jax backend probing.
  assert "benchmarking mlp at batch sizes [1, 8]: 2 cases" in result.stderr
  assert "case 1 of 2: mlp batch 1" in result.stderr and "case 2 of 2 done" in result.stderr
  assert "ETA" in result.stderr and "Unable to initialize backend" not in result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(report) >= {"config", "machine", "backend", "results"}
  assert report["machine"]["cpu"] and report["backend"] in ("xla", "ffi-cpu", "pallas-gpu")
  assert report["config"]["hidden"] == [128, 128]
  assert report["rates"]["read_gbs"] > 0 and report["rates"]["matmul_gmacs"] > 0
  assert len(report["load_average"]["start"]) == 3 and len(report["load_average"]["end"]) == 3
  assert [entry["batch_size"] for entry in report["results"]] == [1, 8]
  assert {entry["model"] for entry in report["results"]} == {"mlp"}
  for entry in report["results"]:
    assert RESULT_KEYS <= set(entry)
    assert entry["dense_ms"] > 0 and entry["sparse_ms"] > 0
    assert entry["ratio"] == pytest.approx(entry["dense_ms"] / entry["sparse_ms"])
    assert entry["dense_macs"] == 784 * 128 + 128 * 128 + 128 * 10
    assert entry["backend"] == report["backend"]
    assert 0 < entry["sparse_macs"] < entry["dense_macs"]
    assert 0.0 <= entry["overflow_rate"] <= 1.0
    # Roofline of both calls: the dense call reads every weight once and does batch x
    # its MACs; the sparse call reads less (policies included) and both reach a positive
    # fraction of their bound, computed from the measured medians and rates.
    dense, sparse = entry["roofline"]["dense"], entry["roofline"]["sparse"]
    assert REPORT_KEYS <= set(dense) and REPORT_KEYS <= set(sparse)
    assert dense["macs"] == entry["batch_size"] * entry["dense_macs"]
    assert dense["weight_mb"] == pytest.approx(4 * entry["dense_macs"] / 1e6)
    assert sparse["macs"] == pytest.approx(entry["batch_size"] * entry["sparse_macs"])
    assert 0 < sparse["weight_mb"] < dense["weight_mb"]
    assert (dense["measured_ms"], sparse["measured_ms"]) == (entry["dense_ms"], entry["sparse_ms"])
    for call in (dense, sparse):
      bound = max(call["weight_mb"] / report["rates"]["read_gbs"],
                  call["macs"] / 1e6 / report["rates"]["matmul_gmacs"])
      assert call["roofline_ms"] == pytest.approx(bound)
      assert call["fraction_of_bound"] == pytest.approx(bound / call["measured_ms"])
  assert "roofline: dense" in result.stderr
  if report["backend"] == "ffi-cpu":  # the batch-1 helper's counters during the timing
    helper = report["results"][0]["batch1_helper"]
    assert set(helper) == {"shared", "run_alone", "helper_tasks", "stalls"}
    assert min(helper.values()) >= 0 and "batch1_helper" not in report["results"][1]


def test_noroofline_measures_no_rates(tiny_runs):
  result = tiny_runs[1]
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["rates"] is None and "roofline" not in report["results"][0]


@pytest.mark.slow  # a CNN benchmark case, 12 s
def test_cnn_case_reports_dense_and_skipping_time():
  # One stage: the residual-block skipping and channel blocks of the batch-1 and minibatch
  # paths, at a third less compile time than two.
  result = _run("--models=cnn", "--cnn_stages=16", "--cnn_block_size=8", "--batch_sizes=1,4",
                "--repeats=2", "--json")
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert [entry["batch_size"] for entry in report["results"]] == [1, 4]
  for entry in report["results"]:
    assert entry["model"] == "cnn" and RESULT_KEYS <= set(entry)
    assert entry["dense_ms"] > 0 and entry["sparse_ms"] > 0
    assert 0 < entry["sparse_macs"] < entry["dense_macs"]
    assert entry["ratio"] == pytest.approx(entry["dense_ms"] / entry["sparse_ms"])
    assert entry["mac_ratio"] == pytest.approx(entry["dense_macs"] / entry["sparse_macs"])
    assert "roofline" not in entry  # MLP accounting only
  assert report["rates"] is None


BAD_FLAGS = [
    ("--models=mlp,rnn", "--models"),
    ("--tau=1.5", "--tau"),
    ("--example_slack=inf", "--example_slack"),
    ("--backend=cuda", "--backend"),
    ("--hidden=128,100", "--block_size"),
    ("--batch_sizes=0", "--batch_sizes"),
    ("--hidden=a,b", "--hidden"),
]


# A forced backend must run every model asked for (the last case of the batch below).
FORCED_BACKEND = ("--models=mlp,cnn", "--backend=ffi-cpu")


@pytest.fixture(scope="module")
def bad_flag_runs():
  """``{flag: process}``: every case of BAD_FLAGS and FORCED_BACKEND in one batch
  (run_module_cases)."""
  cases = [[*TINY, flag] for flag, _ in BAD_FLAGS] + [[*TINY, *FORCED_BACKEND]]
  processes = experiment_utils.run_module_cases("experiments.bench_inference", cases)
  return {flag: process for flag, process in zip([flag for flag, _ in BAD_FLAGS] +
                                                 [FORCED_BACKEND], processes)}


@pytest.mark.parametrize("flag,message", BAD_FLAGS)
def test_bad_flags_exit_2_with_one_line(bad_flag_runs, flag, message):
  result = bad_flag_runs[flag]
  assert result.returncode == 2
  lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error")]
  assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_forced_backend_must_run_every_model_asked_for(bad_flag_runs):
  """ffi-cpu runs MLPs only: asking it for the CNN too is one line naming --models, exit 2
  (without the compiled kernel, the MLP is refused first, with the same flag named)."""
  result = bad_flag_runs[FORCED_BACKEND]
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error")]
  assert len(lines) == 1 and lines[0].startswith("error: --models="), result.stderr
