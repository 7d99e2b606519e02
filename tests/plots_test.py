"""Tests for ccjax.plots: every figure is written atomically as a non-empty PNG."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from ccjax import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, directory):
  assert os.path.isfile(path)
  with open(path, "rb") as stream:
    content = stream.read()
  assert content.startswith(PNG_MAGIC) and len(content) > 1000
  leftovers = [name for name in os.listdir(directory) if name.endswith(".tmp")]
  assert leftovers == []


def _probs(seed=0, examples=30, blocks=(8, 4)):
  rng = np.random.default_rng(seed)
  return [rng.uniform(size=(examples, b)) for b in blocks]


def test_block_probabilities(tmp_path):
  path = tmp_path / "nested" / "probs.png"  # the directory is created.
  labels = np.arange(30) % 3
  out = plots.plot_block_probabilities(_probs(), path, max_examples=10, labels=labels,
                                       title="digits")
  assert out == str(path)
  _assert_png(out, path.parent)
  # An ungated layer (None) is skipped; overwrite works.
  out = plots.plot_block_probabilities([None, *_probs()], str(path))
  _assert_png(out, path.parent)


def test_block_probabilities_bad_input(tmp_path):
  path = tmp_path / "p.png"
  with pytest.raises(ValueError, match="non-empty list"):
    plots.plot_block_probabilities([], path)
  with pytest.raises(ValueError, match="no gated layer"):
    plots.plot_block_probabilities([None], path)
  with pytest.raises(ValueError, match=r"probs_per_layer\[0\] must be a non-empty"):
    plots.plot_block_probabilities([np.zeros(5)], path)
  with pytest.raises(ValueError, match="all layers must match"):
    plots.plot_block_probabilities([np.zeros((3, 2)), np.zeros((4, 2))], path)
  with pytest.raises(ValueError, match="max_examples must be an integer >= 1"):
    plots.plot_block_probabilities(_probs(), path, max_examples=0)
  with pytest.raises(ValueError, match="labels must have shape"):
    plots.plot_block_probabilities(_probs(), path, labels=np.zeros(3, int))
  assert os.listdir(tmp_path) == []


def test_class_block_map(tmp_path):
  rng = np.random.default_rng(1)
  masks = [(rng.uniform(size=(40, 6)) > 0.5).astype(np.float32), rng.uniform(size=(40, 3))]
  labels = np.arange(40) % 4  # class 4 of 5 has no examples: drawn blank.
  out = plots.plot_class_block_map(masks, labels, 5, tmp_path / "class_block.png")
  _assert_png(out, tmp_path)
  with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes=3\)"):
    plots.plot_class_block_map(masks, labels, 3, tmp_path / "x.png")
  with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
    plots.plot_class_block_map(masks, labels, 0, tmp_path / "x.png")
  with pytest.raises(ValueError, match=r"\[1\] has 20 examples but labels has 40"):
    plots.plot_class_block_map([masks[0], masks[1][:20]], labels, 5, tmp_path / "x.png")
  assert not os.path.exists(tmp_path / "x.png")


def test_learning_curves(tmp_path):
  records = []
  for step in range(0, 200, 10):
    records.append({"step": step, "train_loss": 2.0 / (1 + step), "train_error": 0.5,
                    "active_fraction": [0.8 - step / 1000, 0.5], "steps_per_s": 10.0})
    if step % 50 == 0:
      records.append({"step": step, "valid_error": 0.3, "test_error": 0.31,
                      "test_active_fraction": [0.7, 0.4]})
  records.append({"note": "no step"})
  records.append({"step": 200, "train_loss": None, "train_error": float("nan")})
  out = plots.plot_learning_curves(records, tmp_path / "curves.png")
  _assert_png(out, tmp_path)
  # Alternative key names from the raw train step, and no records at all.
  raw = [{"step": s, "loss": 1.0, "error": 0.1, "active_fraction": 0.5} for s in range(5)]
  _assert_png(plots.plot_learning_curves(raw, tmp_path / "raw.png"), tmp_path)
  _assert_png(plots.plot_learning_curves([], tmp_path / "empty.png"), tmp_path)
  with pytest.raises(ValueError, match="records must be a list of dicts"):
    plots.plot_learning_curves({"step": 1}, tmp_path / "bad.png")


def _pareto_rows(latency=True):
  rows = []
  for tau, error, macs in ((0.1, 0.08, 2e3), (0.25, 0.05, 5e3), (0.5, 0.04, 9e3)):
    rows.append({"model": "condnet", "tau": tau, "test_error_mean": error,
                 "test_error_std": 0.01, "macs_mean": macs,
                 "latency_ms_mean": macs / 1e4 if latency else None})
  rows.append({"model": "dense_same_width", "tau": None, "test_error_mean": 0.03,
               "test_error_std": None, "macs_mean": 4e4, "latency_ms_mean": 1.2})
  rows.append({"model": "dense_equal_macs", "tau": 0.25, "test_error_mean": 0.06,
               "test_error_std": 0.02, "macs_mean": 5e3, "latency_ms_mean": math.nan})
  return rows


def test_pareto(tmp_path):
  with_latency = plots.plot_pareto(_pareto_rows(), tmp_path / "pareto.png", title="sweep")
  _assert_png(with_latency, tmp_path)
  rows = _pareto_rows(latency=False)
  for row in rows:
    row.pop("latency_ms_mean")
  without = plots.plot_pareto(rows, tmp_path / "pareto_macs.png")
  _assert_png(without, tmp_path)
  # The latency panel makes the figure wider.
  assert os.path.getsize(with_latency) > os.path.getsize(without)


def test_pareto_bad_rows(tmp_path):
  with pytest.raises(ValueError, match="non-empty list"):
    plots.plot_pareto([], tmp_path / "p.png")
  rows = _pareto_rows()
  del rows[1]["macs_mean"]
  with pytest.raises(ValueError, match=r"rows\[1\] lacks keys macs_mean"):
    plots.plot_pareto(rows, tmp_path / "p.png")
  assert os.listdir(tmp_path) == []


def test_failed_render_leaves_no_temp_file(tmp_path, monkeypatch):
  def broken_savefig(self, *args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(plots.Figure, "savefig", broken_savefig)
  with pytest.raises(RuntimeError, match="disk full"):
    plots.plot_block_probabilities(_probs(), tmp_path / "p.png")
  assert os.listdir(tmp_path) == []


def test_plots_leave_pyplot_alone():
  code = ("import sys; from ccjax import plots; import numpy as np, tempfile, os; "
          "plots.plot_block_probabilities([np.ones((2, 2))], "
          "os.path.join(tempfile.mkdtemp(), 'p.png')); "
          "print('matplotlib.pyplot' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.split() == ["False"]
