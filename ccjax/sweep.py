"""Seeds x tau sweeps with honest aggregation and two dense baselines.

Every configuration is run for every seed through :func:`ccjax.loop.train_and_evaluate`
and reported as mean +- std over seeds (never best-of-seeds). Each sweep has two dense
baselines: the same width as the condnet, and, for every tau, the width whose dense
MACs per example match the condnet's measured active MACs (mean over seeds).
"""

from __future__ import annotations

import csv
import os
from typing import Any, Callable, NamedTuple, Sequence

from absl import logging
import numpy as np

from ccjax import atomic
from ccjax import config as config_lib
from ccjax import validation
from ccjax import flops

CSV_FIELDS = ("label", "model", "tau", "hidden", "seeds", "test_error_mean", "test_error_std",
              "active_fraction_mean", "active_fraction_std", "macs_mean", "macs_std",
              "latency_ms_mean", "latency_ms_std")


def matched_dense_width(input_dim: int, num_layers: int, num_classes: int, target_macs: float,
                        multiple: int) -> int:
  """The width (a multiple of ``multiple``) whose dense MLP MACs are closest to ``target_macs``."""
  candidates = range(multiple, 64 * 1024 + multiple, multiple)
  costs = [(abs(flops.dense_mlp_macs(input_dim, [w] * num_layers, num_classes) - target_macs), w)
           for w in candidates]
  return min(costs)[1]


def _run(base: config_lib.ExperimentConfig, workdir: str, train_fn: Callable, **changes
         ) -> dict[str, Any]:
  """One run; a finished run in ``workdir`` is resumed at its end (only re-evaluated)."""
  config = base.replace(**changes)
  logging.info("sweep: %s", workdir)
  return train_fn(config, workdir)


def _latency(result: dict[str, Any]) -> float | None:
  latency = result.get("latency_ms")
  if not latency:
    return None
  return latency.get("sparse", latency.get("dense"))


def aggregate(label: str, model: str, tau: float | None, hidden: Sequence[int],
              results: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean and std over seeds of one configuration's results."""
  def stats(values):
    values = [v for v in values if v is not None]
    if not values:
      return None, None
    return float(np.mean(values)), float(np.std(values))

  row = {"label": label, "model": model, "tau": tau, "hidden": list(hidden),
         "seeds": len(results)}
  for name, values in (
      ("test_error", [r["test_error"] for r in results]),
      ("active_fraction", [float(np.mean(r["active_fraction"])) if r["active_fraction"] else 1.0
                           for r in results]),
      ("macs", [r["macs_per_example"] for r in results]),
      ("latency_ms", [_latency(r) for r in results])):
    row[f"{name}_mean"], row[f"{name}_std"] = stats(values)
  return row


class Grid(NamedTuple):
  """The validated seeds and taus of a sweep."""
  seeds: tuple[int, ...]
  taus: tuple[float, ...]


def validate_grid(base: config_lib.ExperimentConfig, *, seeds: Sequence[int],
                  taus: Sequence[float]) -> Grid:
  """Checks every run of the grid before any starts.

  Raises:
    validation.ConfigError: a bad or duplicate seed or tau, or two taus whose run
      directories would collide (field ``seed`` / ``tau``).
  """
  seeds, taus = tuple(seeds), tuple(taus)
  for name, values in (("seed", seeds), ("tau", taus)):
    if not values:
      raise validation.ConfigError(name, "needs at least one value")
    if len(set(values)) != len(values):
      raise validation.ConfigError(name, f"lists a value twice: {list(values)}")
  for tau in taus:
    for seed in seeds:
      base.replace(model="condnet", tau=(tau,), seed=seed)
  names = [_tau_name(tau) for tau in taus]
  if len(set(names)) != len(names):
    raise validation.ConfigError("tau", f"values {list(taus)} give the same run directory "
                                        f"names {names}; use values that differ in 6 digits")
  return Grid(seeds, taus)


def _tau_name(tau: float) -> str:
  return f"{tau:g}"


def run_sweep(base: config_lib.ExperimentConfig, workdir: str, grid: Grid,
              train_fn: Callable, input_dim: int, num_classes: int) -> list[dict[str, Any]]:
  """Runs condnets for every tau and both dense baselines, for every seed.

  Args:
    base: configuration shared by all runs (its ``model``, ``tau``, ``seed`` are replaced).
    workdir: each run goes to ``workdir/<configuration>/seed<k>``; finished runs are reused.
    grid: seeds and taus (:func:`validate_grid`).
    train_fn: ``(config, workdir) -> results`` (``ccjax.loop.train_and_evaluate``).
    input_dim: flattened input size (for the MAC-matched width).
    num_classes: classes (for the MAC-matched width).

  Returns:
    one aggregated row per configuration.
  """
  seeds, taus = grid
  rows = []
  dense_runs = [_run(base, os.path.join(workdir, "dense_same_width", f"seed{seed}"), train_fn,
                     model="dense", seed=seed) for seed in seeds]
  rows.append(aggregate("dense (same width)", "dense", None, base.hidden, dense_runs))
  for tau in taus:
    label = f"condnet tau={_tau_name(tau)}"
    runs = [_run(base, os.path.join(workdir, f"condnet_tau{_tau_name(tau)}", f"seed{seed}"), train_fn,
                 model="condnet", tau=(tau,), seed=seed) for seed in seeds]
    rows.append(aggregate(label, "condnet", tau, base.hidden, runs))
    width = matched_dense_width(input_dim, len(base.hidden), num_classes,
                                rows[-1]["macs_mean"], base.block_size)
    hidden = (width,) * len(base.hidden)
    matched_dir = os.path.join(workdir, f"dense_matched_tau{_tau_name(tau)}_width{width}")
    matched = [_run(base, os.path.join(matched_dir, f"seed{seed}"),
                    train_fn, model="dense", hidden=hidden, seed=seed) for seed in seeds]
    rows.append(aggregate(f"dense (MACs of tau={_tau_name(tau)}, width {width})", "dense", tau, hidden,
                          matched))
  return rows


def _format(mean, std, scale=1.0, digits=2) -> str:
  if mean is None:
    return "n/a"
  return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def write_tables(rows: list[dict[str, Any]], workdir: str) -> tuple[str, str]:
  """Writes ``sweep.csv`` and ``sweep.md``; returns their paths."""
  csv_path = os.path.join(workdir, "sweep.csv")
  with atomic.atomic_open(csv_path) as stream:
    writer = csv.DictWriter(stream, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
      writer.writerow({**row, "hidden": "x".join(map(str, row["hidden"]))})
  lines = ["| configuration | seeds | test error (%) | active fraction | MACs / example (k) "
           "| batch-1 latency (ms) |", "|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(
        f"| {row['label']} | {row['seeds']} | "
        f"{_format(row['test_error_mean'], row['test_error_std'], 100)} | "
        f"{_format(row['active_fraction_mean'], row['active_fraction_std'], 1, 3)} | "
        f"{_format(row['macs_mean'], row['macs_std'], 1e-3, 1)} | "
        f"{_format(row['latency_ms_mean'], row['latency_ms_std'], 1, 3)} |")
  md_path = os.path.join(workdir, "sweep.md")
  with atomic.atomic_open(md_path) as stream:
    stream.write("\n".join(lines) + "\n")
  return csv_path, md_path
