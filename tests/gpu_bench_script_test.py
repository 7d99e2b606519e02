"""scripts/gpu_bench.py runs end to end on a CPU (tiny net, Pallas interpreter) and
refuses to run the full benchmark without a GPU."""

import json
import os
import subprocess
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_bench.py")


def _run(args, out_dir, **env):
  return subprocess.run([sys.executable, SCRIPT, f"--out_dir={out_dir}", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", **env))


# Slow tier: three timed phases, each compiling Pallas kernels for the interpreter (about
# 45 s of CPU); the refusals below keep the script in the fast tier.
@pytest.mark.slow
def test_tiny_run_writes_named_json_with_roofline_and_train_step(tmp_path):
  result = _run(["--tiny", "--runs=pallas_float32"], tmp_path, CCJAX_PALLAS_INTERPRET="1")
  assert result.returncode == 0, result.stderr[-3000:]
  summary_path = result.stdout.strip().splitlines()[-1]
  assert summary_path == str(tmp_path / "gpu_bench_cpu.json")
  with open(summary_path) as stream:
    summary = json.load(stream)
  assert summary["device"] == "cpu" and summary["tiny"]
  entries = summary["bench_inference"]["pallas_float32"]
  assert [entry["batch_size"] for entry in entries] == [1, 2]
  assert all(entry["backend"] == "pallas-gpu" and entry["sparse_ms"] > 0 for entry in entries)
  with open(tmp_path / "cpu_bench_pallas_float32.json") as stream:
    assert json.load(stream)["backend"] == "pallas-gpu"          # the CLI's own JSON
  assert summary["device_rates"]["read_bandwidth_gbs"] > 0
  for entry in summary["roofline"]:
    assert entry["backend"] == "pallas-gpu"
    for call in ("dense", "sparse"):
      assert entry[call]["weight_mb"] > 0 and entry[call]["fraction_of_bound"] > 0
    assert entry["sparse"]["weight_mb"] < entry["dense"]["weight_mb"]
  train = summary["train_step"]
  assert train["gated_ms"] > 0 and train["dense_ms"] > 0
  parts = summary["kernel_parts"]
  assert {"noop", "fused_forward", "dense_forward", "gather_gemv_1x1_blocks",
          "select_blocks_1_of_4", "gemv_layer_1_of_4"} <= set(parts), parts
  assert all(part["synced_ms"] > 0 and part["pipelined_ms"] > 0 for part in parts.values())
  for entry in summary["device_time"]:
    assert entry["loop_ms"] > 0 and entry["steps"] == 4
    assert {"dense_ms", "pallas-gpu_ms", "xla_ms"} <= set(entry), entry
    assert ("pallas-gpu-1-launch_ms" in entry) == (entry["batch_size"] == 1)


@pytest.mark.slow  # a whole script run; the fast tier checks its flags and refusals
@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off a GPU")
def test_full_run_needs_a_gpu_and_writes_nothing(tmp_path):
  out_dir = tmp_path / "out"
  result = _run([], out_dir)
  assert result.returncode == 2
  assert "no GPU" in result.stderr and len(result.stderr.strip().splitlines()) == 1
  assert not out_dir.exists()
  result = _run(["--tiny", "--runs=pallas_float32,cuda"], out_dir)
  assert result.returncode == 2 and "--runs" in result.stderr
  result = _run(["--tiny", "--parts=bench,speed"], out_dir)
  assert result.returncode == 2 and "--parts" in result.stderr and "device_time" in result.stderr
  assert not out_dir.exists()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off a GPU")
def test_shell_wrapper_needs_a_gpu_and_writes_nothing(tmp_path):
  out_dir = tmp_path / "out"
  result = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_bench.sh")],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", OUT=str(out_dir)))
  assert result.returncode == 2 and "no GPU" in result.stderr
  assert not out_dir.exists()
