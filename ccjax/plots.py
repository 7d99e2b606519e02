"""Figures of a run (matplotlib, Agg): block probabilities, class x block map, curves, Pareto.

Axis letters: ``examples`` test examples, ``blocks`` blocks of a gated layer, ``classes``
labels.

Every function draws on a standalone :class:`matplotlib.figure.Figure` rendered by the
Agg canvas, so no pyplot state is created or changed (no global backend switch in the
caller's process, no figures left open), and writes the PNG atomically: to a temporary
file in the destination directory, then ``os.replace``. A reader never sees a
half-written image and no temporary file survives an error. Each returns the path.

Import it as ``from ccjax import plots``; ``import ccjax`` does not import matplotlib.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ccjax import atomic

_DPI = 110


def _save_atomic(figure: Figure, path: str | os.PathLike) -> str:
  """Renders ``figure`` as PNG to ``path`` atomically (:func:`ccjax.atomic.atomic_open`)."""
  path = os.fspath(path)
  FigureCanvasAgg(figure)
  with atomic.atomic_open(path, "wb") as stream:
    figure.savefig(stream, format="png", dpi=_DPI)
  return path


def _layer_arrays(arrays_per_layer: Sequence[Any], name: str
                  ) -> list[tuple[int, np.ndarray | None]]:
  """``(layer index, [examples, blocks] float array or None)`` pairs, validated."""
  if arrays_per_layer is None or len(arrays_per_layer) == 0:
    raise ValueError(f"{name} must be a non-empty list of [examples, blocks] arrays "
                     f"(None for ungated layers)")
  layers = []
  for index, array in enumerate(arrays_per_layer):
    if array is None:
      layers.append((index, None))
      continue
    array = np.asarray(array, np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
      raise ValueError(f"{name}[{index}] must be a non-empty [examples, blocks] array; "
                       f"got shape {array.shape}")
    layers.append((index, array))
  if all(array is None for _, array in layers):
    raise ValueError(f"{name} has no gated layer (every entry is None)")
  return layers


def _check_labels(labels, num_examples: int, num_classes: int | None = None) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (num_examples,):
    raise ValueError(f"labels must have shape [examples] = ({num_examples},); "
                     f"got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers; got dtype {labels.dtype}")
  if num_classes is not None and labels.size and (labels.min() < 0
                                                  or labels.max() >= num_classes):
    raise ValueError(f"labels must be in [0, num_classes={num_classes}); got range "
                     f"[{labels.min()}, {labels.max()}]")
  return labels


def plot_block_probabilities(probs_per_layer: Sequence[np.ndarray | None],
                             path: str | os.PathLike, *, max_examples: int = 200,
                             labels: np.ndarray | None = None, title: str | None = None
                             ) -> str:
  """Per-block activation probabilities over test examples, one column per layer.

  Top row: heatmap of ``probs [examples, blocks]`` for the first ``max_examples`` examples
  (sorted by label when ``labels`` is given, so class structure shows), colour scale
  [0, 1]. Bottom row: mean probability of each block over all examples as bars with +-1
  std whiskers, and the layer's mean as a dashed line (the seed paper's per-block view).

  Args:
    probs_per_layer: one ``[examples, blocks]`` array per hidden layer (``None`` for an
      ungated layer, which is skipped).
    path: PNG to write.
    max_examples: rows shown in the heatmaps, >= 1.
    labels: optional ``[examples]`` integer labels.
    title: optional figure title.

  Returns:
    ``path``.
  """
  layers = [(i, p) for i, p in _layer_arrays(probs_per_layer, "probs_per_layer")
            if p is not None]
  if isinstance(max_examples, bool) or not isinstance(max_examples, (int, np.integer)) or (
      max_examples < 1):
    raise ValueError(f"max_examples must be an integer >= 1; got {max_examples!r}")
  num_examples = layers[0][1].shape[0]
  for index, probs in layers:
    if probs.shape[0] != num_examples:
      raise ValueError(f"probs_per_layer[{index}] has {probs.shape[0]} examples but layer "
                       f"{layers[0][0]} has {num_examples}; all layers must match")
  shown = np.arange(min(num_examples, max_examples))
  if labels is not None:
    labels = _check_labels(labels, num_examples)
    shown = shown[np.argsort(labels[shown], kind="stable")]

  figure = Figure(figsize=(4.2 * len(layers), 6.5))
  axes = figure.subplots(2, len(layers), squeeze=False,
                         gridspec_kw={"height_ratios": [2.2, 1.0]})
  for column, (index, probs) in enumerate(layers):
    heat_axis, mean_axis = axes[0, column], axes[1, column]
    image = heat_axis.imshow(probs[shown], aspect="auto", vmin=0.0, vmax=1.0,
                             cmap="viridis", interpolation="nearest")
    heat_axis.set_title(f"layer {index}: P(block active)")
    heat_axis.set_xlabel("block")
    heat_axis.set_ylabel("test example" + (" (sorted by label)" if labels is not None else ""))
    figure.colorbar(image, ax=heat_axis, fraction=0.046, pad=0.04)

    blocks = np.arange(probs.shape[1])
    mean, std = probs.mean(axis=0), probs.std(axis=0)
    lower, upper = mean - np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1) - mean
    mean_axis.bar(blocks, mean, color="tab:blue", alpha=0.8, width=0.8, label="mean",
                  yerr=np.stack([lower, upper]), ecolor="black", capsize=2,
                  error_kw={"linewidth": 0.8})
    mean_axis.axhline(float(probs.mean()), color="tab:red", linestyle="--", linewidth=1,
                      label=f"layer mean {probs.mean():.2f}")
    mean_axis.set_ylim(0.0, 1.0)
    mean_axis.set_xlim(-0.5, probs.shape[1] - 0.5)
    mean_axis.set_xlabel("block")
    mean_axis.set_ylabel("mean P (+-1 std) over examples")
    mean_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    heat_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    mean_axis.legend(fontsize=7, loc="upper right")
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  return _save_atomic(figure, path)


def plot_class_block_map(masks_or_probs_per_layer: Sequence[np.ndarray | None],
                         labels: np.ndarray, num_classes: int, path: str | os.PathLike, *,
                         title: str | None = None) -> str:
  """Class x block mean activation, one panel per layer.

  Args:
    masks_or_probs_per_layer: one ``[examples, blocks]`` 0/1 mask or probability array
      per hidden layer (``None`` for an ungated layer, which is skipped).
    labels: ``[examples]`` integer labels in ``[0, num_classes)``.
    num_classes: rows of each map, >= 1. A class without examples shows as blank.
    path: PNG to write.
    title: optional figure title.

  Returns:
    ``path``.
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or (
      num_classes < 1):
    raise ValueError(f"num_classes must be an integer >= 1; got {num_classes!r}")
  layers = [(i, a) for i, a in _layer_arrays(masks_or_probs_per_layer,
                                            "masks_or_probs_per_layer") if a is not None]
  labels = _check_labels(labels, layers[0][1].shape[0], int(num_classes))
  one_hot = (labels[:, None] == np.arange(num_classes)[None, :]).astype(np.float64)
  counts = one_hot.sum(axis=0)  # [classes]

  figure = Figure(figsize=(4.2 * len(layers), 0.25 * num_classes + 2.2))
  axes = figure.subplots(1, len(layers), squeeze=False)[0]
  for axis, (index, values) in zip(axes, layers):
    if values.shape[0] != len(labels):
      raise ValueError(f"masks_or_probs_per_layer[{index}] has {values.shape[0]} examples "
                       f"but labels has {len(labels)}")
    with np.errstate(invalid="ignore", divide="ignore"):
      class_mean = (one_hot.T @ values) / counts[:, None]  # [classes, blocks]
    class_mean[counts == 0] = np.nan
    image = axis.imshow(class_mean, aspect="auto", vmin=0.0, vmax=1.0, cmap="magma",
                        interpolation="nearest")
    axis.set_title(f"layer {index}: mean activation per class")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("block")
    axis.set_ylabel("class")
    if num_classes <= 20:
      axis.set_yticks(np.arange(num_classes))
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  return _save_atomic(figure, path)


def _number(value) -> float:
  """``float(value)``, or NaN for ``None`` / non-numbers."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def _series(records: Sequence[Mapping[str, Any]], keys: Sequence[str]
            ) -> tuple[np.ndarray, np.ndarray]:
  """``(steps, values)`` of the first key in ``keys`` present in records with a step."""
  for key in keys:
    pairs = [(_number(r["step"]), _number(r[key])) for r in records
             if "step" in r and key in r and np.ndim(r[key]) == 0]
    pairs = [(s, v) for s, v in pairs if math.isfinite(s) and math.isfinite(v)]
    if pairs:
      steps, values = np.asarray(pairs).T
      return steps, values
  return np.zeros(0), np.zeros(0)


def _layer_series(records: Sequence[Mapping[str, Any]], key: str
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per-layer ``(steps, values)`` of a list-valued (or scalar) metric ``key``."""
  per_layer: dict[int, list[tuple[float, float]]] = {}
  for record in records:
    if "step" not in record or key not in record or record[key] is None:
      continue
    values = np.atleast_1d(np.asarray(record[key], dtype=np.float64)).ravel()
    for layer, value in enumerate(values):
      if math.isfinite(value):
        per_layer.setdefault(layer, []).append((_number(record["step"]), float(value)))
  return [tuple(np.asarray(per_layer[layer]).T) for layer in sorted(per_layer)]


def plot_learning_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                         title: str | None = None) -> str:
  """Loss, error and active fraction against step, from ``metrics.jsonl`` records.

  Recognised keys (a record without ``step`` is ignored; missing keys are skipped, so
  train-log and eval records can be mixed in one list):

  * loss panel: ``train_loss`` (or ``loss``), and ``valid_loss`` / ``test_loss``;
  * error panel: ``train_error`` (or ``error``), ``valid_error``, ``test_error``;
  * active-fraction panel: ``active_fraction`` (or ``train_active_fraction``; a list per
    layer or a scalar), and ``valid_active_fraction`` / ``test_active_fraction`` dashed.

  Args:
    records: the parsed lines of ``metrics.jsonl``.
    path: PNG to write.
    title: optional figure title.

  Returns:
    ``path``.
  """
  if isinstance(records, Mapping) or not all(isinstance(r, Mapping) for r in records):
    raise ValueError("records must be a list of dicts (the lines of metrics.jsonl)")
  figure = Figure(figsize=(13.0, 3.8))
  loss_axis, error_axis, active_axis = figure.subplots(1, 3)

  def draw(axis, label, keys, **style):
    steps, values = _series(records, keys)
    if len(steps):
      axis.plot(steps, values, label=label, **style)
    return len(steps)

  drawn = draw(loss_axis, "train", ("train_loss", "loss"), color="tab:blue", alpha=0.8)
  drawn += draw(loss_axis, "valid", ("valid_loss",), color="tab:orange", marker="o", ms=3)
  drawn += draw(loss_axis, "test", ("test_loss",), color="tab:green", marker="s", ms=3)
  loss_axis.set_ylabel("cross-entropy")
  loss_axis.set_title("loss")
  drawn_error = draw(error_axis, "train", ("train_error", "error"), color="tab:blue",
                     alpha=0.8)
  drawn_error += draw(error_axis, "valid", ("valid_error",), color="tab:orange", marker="o",
                      ms=3)
  drawn_error += draw(error_axis, "test", ("test_error",), color="tab:green", marker="s",
                      ms=3)
  error_axis.set_ylabel("error rate")
  error_axis.set_title("error")

  drawn_active = 0
  colors = [f"C{i}" for i in range(10)]
  for key, style, split in ((None, "-", "train"), ("valid_active_fraction", "--", "valid"),
                            ("test_active_fraction", ":", "test")):
    series = []
    if key is None:
      for train_key in ("active_fraction", "train_active_fraction"):
        series = _layer_series(records, train_key)
        if series:
          break
    else:
      series = _layer_series(records, key)
    for layer, (steps, values) in enumerate(series):
      active_axis.plot(steps, values, linestyle=style, color=colors[layer % 10],
                       label=f"layer {layer} ({split})")
      drawn_active += 1
  active_axis.set_ylim(0.0, 1.05)
  active_axis.set_ylabel("fraction of blocks active")
  active_axis.set_title("active fraction")

  for axis, count in ((loss_axis, drawn), (error_axis, drawn_error),
                      (active_axis, drawn_active)):
    axis.set_xlabel("step")
    if count:
      axis.legend(fontsize=7)
    else:
      axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  return _save_atomic(figure, path)


_PARETO_KEYS = ("model", "tau", "test_error_mean", "test_error_std", "macs_mean")


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                title: str | None = None) -> str:
  """Test error against MACs per example (and against latency when measured).

  Each distinct ``model`` is its own series; models whose name starts with ``condnet``
  are drawn as circles joined in order of MACs, every other model (dense baselines) as
  unjoined squares/triangles/diamonds; points whose ``tau`` is set are annotated with it
  (for an equal-MACs baseline, the tau it was matched to). Error bars are +-1 std
  over seeds (a missing std draws no bar). A second panel against ``latency_ms_mean``
  appears when any row has a finite one (``latency_ms_std`` gives its bar).

  Args:
    rows: dicts with keys ``model, tau, test_error_mean, test_error_std, macs_mean`` and
      optional ``latency_ms_mean``, ``latency_ms_std``, ``macs_std``.
    path: PNG to write.
    title: optional figure title.

  Returns:
    ``path``.
  """
  if isinstance(rows, Mapping) or len(rows) == 0:
    raise ValueError("rows must be a non-empty list of dicts with keys "
                     + ", ".join(_PARETO_KEYS))
  for index, row in enumerate(rows):
    if not isinstance(row, Mapping):
      raise ValueError(f"rows[{index}] must be a dict; got {type(row).__name__}")
    missing = [key for key in _PARETO_KEYS if key not in row]
    if missing:
      raise ValueError(f"rows[{index}] lacks keys {', '.join(missing)}; required: "
                       f"{', '.join(_PARETO_KEYS)}")
  has_latency = any(math.isfinite(_number(row.get("latency_ms_mean"))) for row in rows)
  panels = [("macs_mean", "macs_std", "MACs per example")]
  if has_latency:
    panels.append(("latency_ms_mean", "latency_ms_std", "latency per example (ms)"))

  figure = Figure(figsize=(6.2 * len(panels), 4.6))
  axes = figure.subplots(1, len(panels), squeeze=False)[0]
  models = list(dict.fromkeys(str(row["model"]) for row in rows))
  for axis, (x_key, x_std_key, x_label) in zip(axes, panels):
    markers = itertools.cycle(["s", "^", "D", "v", "P", "X"])
    positive_x = []
    for color_index, model in enumerate(models):
      model_rows = [row for row in rows if str(row["model"]) == model]
      x = np.asarray([_number(row.get(x_key)) for row in model_rows])
      y = np.asarray([_number(row["test_error_mean"]) for row in model_rows])
      y_err = np.nan_to_num(np.asarray([_number(row["test_error_std"]) for row in model_rows]))
      x_err = np.nan_to_num(np.asarray([_number(row.get(x_std_key)) for row in model_rows]))
      keep = np.isfinite(x) & np.isfinite(y)
      if not keep.any():
        continue
      order = np.argsort(x[keep], kind="stable")
      x, y, y_err, x_err = (a[keep][order] for a in (x, y, y_err, x_err))
      taus = [model_rows[i]["tau"] for i in np.flatnonzero(keep)[order]]
      positive_x.extend(x[x > 0])
      is_condnet = model.startswith("condnet")
      axis.errorbar(x, y, yerr=y_err, xerr=x_err if x_err.any() else None,
                    color=f"C{color_index}", marker="o" if is_condnet else next(markers),
                    linestyle="-" if is_condnet else "none", capsize=3, markersize=6,
                    label=model)
      for x_value, y_value, tau in zip(x, y, taus):
        tau_text = tau if isinstance(tau, str) else f"{_number(tau):g}"
        if tau_text and tau_text != "nan":
          axis.annotate(f"tau={tau_text}", (x_value, y_value), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    if positive_x and max(positive_x) / min(positive_x) > 20:
      axis.set_xscale("log")
    axis.set_xlabel(x_label)
    axis.set_ylabel("test error (mean +- std over seeds)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  return _save_atomic(figure, path)
