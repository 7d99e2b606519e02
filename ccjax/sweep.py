"""Seeds x tau sweeps with honest statistics, a fair lr budget and two dense baselines.

Every configuration is run for every seed through :func:`ccjax.loop.train_and_evaluate`
and reported as mean ± sample std over seeds (``ddof = 1``, never best-of-seeds). Each
sweep has two dense baselines: the same width as the condnet, and, for every tau, the
width whose dense MACs per example match the condnet's measured active MACs (mean over
seeds). Each condnet row also carries the per-seed paired differences of its test error
to both baselines (gated − dense, mean and 95 % t interval; :mod:`ccjax.stats`).

With an lr grid (``Grid.lrs``) every configuration, dense baselines included, is trained
at every lr for every seed, and each configuration's lr is chosen on its mean validation
error; the rows report that lr's runs.

The capacity regime (``Grid.capacity_widths``) holds the active budget fixed at that of
dense width ``w`` (``--hidden``) and grows the condnet: width ``W`` runs at
``tau = w / W``, against dense ``w`` (the same active MACs) and dense of the widest ``W``.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Callable, NamedTuple, Sequence

from absl import logging
import jax

from ccjax import atomic
from ccjax import config as config_lib
from ccjax import validation
from ccjax import flops
from ccjax import recipes as recipes_lib
from ccjax import stats

# The baselines a condnet row is paired with: the same width (capacity regime: the widest
# condnet's width) and the same MACs (capacity regime: dense w).
BASELINES = ("dense_width", "dense_macs")
DIFFERENCE_FIELDS = tuple(f"test_error_minus_{baseline}_{stat}" for baseline in BASELINES
                          for stat in ("mean", "std", "ci95"))
CSV_FIELDS = ("label", "recipe", "model", "tau", "hidden", "seeds", "valid_error_mean",
              "valid_error_std", "test_error_mean", "test_error_std",
              "active_fraction_mean", "active_fraction_std", "macs_mean", "macs_std",
              "latency_ms_mean", "latency_ms_std", "train_time_s_mean", "train_time_s_std",
              "lr", "lr_chosen_on", "backend", *DIFFERENCE_FIELDS)


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
              results: list[dict[str, Any]], recipe: str = "", *, lr: float | None = None,
              lr_chosen_on: str = "given") -> dict[str, Any]:
  """Mean and sample std (``ddof = 1``) over seeds of one configuration's results.

  Args:
    label: the row's name in the tables.
    model: ``condnet ...`` or ``dense``.
    tau: the condnet's target (a dense row: the tau it is matched to, or ``None``).
    hidden: the widths of the configuration.
    results: ``[seeds]`` ``results.json`` payloads, in seed order.
    recipe: the recipe of the row (``""``: the flags as given).
    lr: the learning rate of ``results``.
    lr_chosen_on: ``given`` (one lr) or ``validation`` (chosen from an lr grid).

  Returns:
    the row: ``<name>_mean`` / ``<name>_std`` of every reported number (std ``None`` for
    one seed), and ``per_seed``: the test and validation errors in seed order.
  """
  row = {"label": label, "recipe": recipe, "model": model, "tau": tau, "hidden": list(hidden),
         "seeds": len(results), "lr": lr, "lr_chosen_on": lr_chosen_on}
  for name, values in (
      ("valid_error", [r.get("valid_error") for r in results]),
      ("test_error", [r["test_error"] for r in results]),
      ("train_time_s", [r.get("train_time_s") for r in results]),
      ("active_fraction", [sum(r["active_fraction"]) / len(r["active_fraction"])
                           if r["active_fraction"] else 1.0 for r in results]),
      ("macs", [r["macs_per_example"] for r in results]),
      ("latency_ms", [_latency(r) for r in results])):
    summary = stats.mean_std(values)
    row[f"{name}_mean"], row[f"{name}_std"] = summary.mean, summary.std
  # The kernel backend of the sparse latency (absent for dense runs and unmeasured latency).
  row["backend"] = "/".join(sorted({r["backend"] for r in results if r.get("backend")})) or None
  row["per_seed"] = {"test_error": [r["test_error"] for r in results],
                     "valid_error": [r.get("valid_error") for r in results]}
  return row


def add_differences(row: dict[str, Any], results: list[dict[str, Any]],
                    baselines: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
  """Adds the per-seed paired differences of the test error, ``row`` − each baseline.

  Args:
    row: a condnet row (:func:`aggregate`); changed in place.
    results: the row's ``[seeds]`` results, in seed order.
    baselines: ``{name: [seeds] results}`` for the names in :data:`BASELINES`, same seeds.

  Returns:
    ``row`` with ``test_error_minus_<name>_{mean,std,ci95}`` (fractions, not points).
  """
  errors = [r["test_error"] for r in results]
  for name, baseline in baselines.items():
    difference = stats.paired_difference(errors, [r["test_error"] for r in baseline])
    row[f"test_error_minus_{name}_mean"] = difference.mean
    row[f"test_error_minus_{name}_std"] = difference.std
    row[f"test_error_minus_{name}_ci95"] = difference.ci95
  return row


class Grid(NamedTuple):
  """The validated runs of a sweep.

  Attributes:
    seeds: the seeds of every configuration.
    taus: the condnets' targets (capacity regime: ``w / W`` per width, in order).
    recipes: recipe study (empty: the base config only).
    lrs: lr grid, chosen per configuration on validation (empty: the base config's lr,
      and run directories without an lr level).
    capacity_widths: capacity regime, the condnet widths ``W`` (empty: the tau regime).
  """
  seeds: tuple[int, ...]
  taus: tuple[float, ...]
  recipes: tuple[str, ...] = ()
  lrs: tuple[float, ...] = ()
  capacity_widths: tuple[int, ...] = ()


def check_distinct(field: str, values: Sequence[Any]) -> None:
  """Raises ``ConfigError(field)`` unless ``values`` has at least one value and none twice
  (a sweep's seeds: one run counted as two would fake the spread)."""
  if not values:
    raise validation.ConfigError(field, "needs at least one value")
  if len(set(values)) != len(values):
    raise validation.ConfigError(field, f"lists a value twice: {list(values)}")


def validate_grid(base: config_lib.ExperimentConfig, *, seeds: Sequence[int],
                  taus: Sequence[float], recipes: Sequence[str] = (), lrs: Sequence[float] = (),
                  capacity_widths: Sequence[int] = ()) -> Grid:
  """Checks every run of the grid before any starts.

  Args:
    base: the shared configuration.
    seeds: seeds (at least one, distinct).
    taus: targets of the tau regime; must be empty in the capacity regime.
    recipes: recipe names (:mod:`ccjax.recipes`); not with ``capacity_widths``.
    lrs: the lr grid (distinct, each a valid ``lr``); empty: ``base``'s lr.
    capacity_widths: condnet widths ``W`` of the capacity regime, each a multiple of the
      block size and at least ``w``, the (single) width of ``base.hidden``.

  Raises:
    validation.ConfigError: a bad or duplicate seed, tau, recipe, lr or width, two values
      whose run directories would collide, or more devices than JAX sees (field ``seed`` /
      ``tau`` / ``recipes`` / ``lrs`` / ``capacity_widths`` / ``num_devices``).
  """
  seeds, taus, recipes = tuple(seeds), tuple(taus), tuple(recipes)
  lrs, capacity_widths = tuple(lrs), tuple(capacity_widths)
  _check_devices(base)
  if capacity_widths:
    taus = _capacity_taus(base, taus, recipes, capacity_widths)
  for name, values in (("seed", seeds), ("tau", taus)):
    check_distinct(name, values)
  if len(set(recipes)) != len(recipes):
    raise validation.ConfigError("recipes", f"lists a recipe twice: {list(recipes)}")
  for lr in lrs:
    try:
      base.replace(lr=lr)
    except validation.ConfigError as error:
      raise validation.ConfigError("lrs", error.detail) from None
  for name, values, namer in (("lrs", lrs, _lr_name), ("tau", taus, _tau_name)):
    names = [namer(value) for value in values]
    if len(set(names)) != len(names):
      raise validation.ConfigError(name, f"values {list(values)} give the same run directory "
                                         f"names {names}; use values that differ in 6 digits")
  widths = capacity_widths or (None,) * len(taus)
  for recipe in recipes or ("",):
    fields = recipes_lib.recipe_fields(recipe) if recipe else {}
    for tau, width in zip(taus, widths):
      hidden = {"hidden": (width,) * len(base.hidden)} if width else {}
      for seed in seeds:
        base.replace(model="condnet", tau=(tau,), seed=seed, **hidden, **fields)
  return Grid(seeds, taus, recipes, lrs, capacity_widths)


def _check_devices(base: config_lib.ExperimentConfig) -> None:
  """The device count and the batch split every run of the sweep will ask for."""
  total = jax.device_count()
  if base.num_devices is not None and base.num_devices > total:
    raise validation.ConfigError(
        "num_devices", f"must be in [1, {total}] (the devices JAX sees), got {base.num_devices}")
  devices = base.num_devices or total
  if base.batch_size % devices:
    raise validation.ConfigError(
        "batch_size", f"={base.batch_size} must be a multiple of the number of devices "
        f"({devices}); see --num_devices")


def _capacity_taus(base: config_lib.ExperimentConfig, taus: tuple[float, ...],
                   recipes: tuple[str, ...], capacity_widths: tuple[int, ...]
                   ) -> tuple[float, ...]:
  """``w / W`` for every capacity width ``W``, after checking the capacity grid."""
  if taus:
    raise validation.ConfigError(
        "capacity_widths", f"sets each tau to w/W; do not also give --taus (got {list(taus)})")
  if recipes:
    raise validation.ConfigError(
        "capacity_widths", "runs the flags as given; set a recipe's flags instead of "
        f"--recipes={','.join(recipes)}")
  if base.arch != "mlp":
    raise validation.ConfigError("capacity_widths", f"needs --arch=mlp, got {base.arch}")
  if len(set(base.hidden)) != 1:
    raise validation.ConfigError(
        "capacity_widths", f"needs one --hidden width for every layer (the dense width w "
        f"whose MACs the condnets match), got {','.join(map(str, base.hidden))}")
  active_width = base.hidden[0]
  if len(set(capacity_widths)) != len(capacity_widths):
    raise validation.ConfigError("capacity_widths", f"lists a width twice: {list(capacity_widths)}")
  for width in capacity_widths:
    validation.check_int("capacity_widths", width)
    if width < active_width or width % base.block_size:
      raise validation.ConfigError(
          "capacity_widths", f"must be multiples of --block_size={base.block_size} and at least "
          f"w = --hidden = {active_width}, got {width}")
  return tuple(active_width / width for width in capacity_widths)


def _tau_name(tau: float) -> str:
  return f"{tau:g}"


def _lr_name(lr: float) -> str:
  return f"{lr:g}"


class _Variant(NamedTuple):
  """One configuration's runs at its chosen lr."""
  runs: list[dict[str, Any]]
  lr: float
  lr_chosen_on: str
  valid_error_by_lr: dict[str, float | None]


def _run_variant(base: config_lib.ExperimentConfig, directory: str, grid: Grid,
                 train_fn: Callable, **changes) -> _Variant:
  """Runs one configuration for every seed at every lr of the grid; picks the lr.

  Without an lr grid the runs go to ``directory/seed<k>`` at ``base``'s lr; with one, to
  ``directory/lr<lr>/seed<k>``, and the lr of the lowest mean validation error wins (the
  first listed on a tie).

  Raises:
    ValueError: an lr grid where a run has no validation error (an empty validation split).
  """
  lrs = grid.lrs or (base.train.lr,)
  runs_by_lr = {}
  for lr in lrs:
    lr_directory = os.path.join(directory, f"lr{_lr_name(lr)}") if grid.lrs else directory
    runs_by_lr[lr] = [_run(base, os.path.join(lr_directory, f"seed{seed}"), train_fn,
                           seed=seed, lr=lr, **changes) for seed in grid.seeds]
  valid = {lr: stats.mean_std([r.get("valid_error") for r in runs])
           for lr, runs in runs_by_lr.items()}
  valid_by_lr = {_lr_name(lr): summary.mean for lr, summary in valid.items()}
  if len(lrs) == 1:
    return _Variant(runs_by_lr[lrs[0]], lrs[0], "given", valid_by_lr)
  if any(summary.n < len(grid.seeds) for summary in valid.values()):
    raise ValueError(f"choosing the lr of {directory} needs a validation error for every run; "
                     "the validation split is empty (give --valid_fraction > 0)")
  chosen = min(lrs, key=lambda lr: valid[lr].mean)
  return _Variant(runs_by_lr[chosen], chosen, "validation", valid_by_lr)


def _row(label: str, model: str, tau: float | None, hidden: Sequence[int], variant: _Variant,
         recipe: str = "") -> dict[str, Any]:
  row = aggregate(label, model, tau, hidden, variant.runs, recipe, lr=variant.lr,
                  lr_chosen_on=variant.lr_chosen_on)
  row["valid_error_by_lr"] = variant.valid_error_by_lr
  return row


def run_sweep(base: config_lib.ExperimentConfig, workdir: str, grid: Grid,
              train_fn: Callable, input_dim: int, num_classes: int) -> list[dict[str, Any]]:
  """Runs condnets for every (recipe,) tau and both dense baselines, for every seed and lr.

  Args:
    base: configuration shared by all runs (its ``model``, ``tau``, ``seed`` and, with an
      lr grid, ``lr`` are replaced, and a recipe's fields set on top).
    workdir: each run goes to ``workdir/[<recipe>/]<configuration>/[lr<lr>/]seed<k>``;
      finished runs are reused. Dense baselines are shared by all recipes.
    grid: seeds, taus, recipes, lrs, capacity widths (:func:`validate_grid`).
    train_fn: ``(config, workdir) -> results`` (``ccjax.loop.train_and_evaluate``).
    input_dim: flattened input size (for the MAC-matched width).
    num_classes: classes (for the MAC-matched width).

  Returns:
    one aggregated row per configuration. Tau regime: the dense same-width baseline, then
    per recipe and tau the condnet and its MAC-matched dense baseline. Capacity regime
    (:func:`run_capacity_sweep`). Condnet rows carry the paired differences
    (:func:`add_differences`).
  """
  if grid.capacity_widths:
    return run_capacity_sweep(base, workdir, grid, train_fn)
  rows = []
  same_width = _run_variant(base, os.path.join(workdir, "dense_same_width"), grid, train_fn,
                            model="dense")
  rows.append(_row("dense (same width)", "dense", None, base.hidden, same_width))
  for recipe in grid.recipes or ("",):
    fields = recipes_lib.recipe_fields(recipe) if recipe else {}
    prefix = os.path.join(workdir, recipe) if recipe else workdir
    for tau in grid.taus:
      label = f"{recipe} tau={_tau_name(tau)}" if recipe else f"condnet tau={_tau_name(tau)}"
      gated = _run_variant(base, os.path.join(prefix, f"condnet_tau{_tau_name(tau)}"), grid,
                           train_fn, model="condnet", tau=(tau,), **fields)
      gated_row = _row(label, f"condnet {recipe}".strip(), tau, base.hidden, gated,
                       recipe=recipe)
      rows.append(gated_row)
      width = matched_dense_width(input_dim, len(base.hidden), num_classes,
                                  gated_row["macs_mean"], base.block_size)
      hidden = (width,) * len(base.hidden)
      # Recipes whose MACs match the same width share that baseline's runs.
      matched_dir = (os.path.join(workdir, f"dense_width{width}") if recipe else
                     os.path.join(workdir, f"dense_matched_tau{_tau_name(tau)}_width{width}"))
      matched = _run_variant(base, matched_dir, grid, train_fn, model="dense", hidden=hidden)
      of = f"{recipe} tau={_tau_name(tau)}" if recipe else f"tau={_tau_name(tau)}"
      rows.append(_row(f"dense (MACs of {of}, width {width})", "dense", tau, hidden, matched,
                       recipe=recipe))
      add_differences(gated_row, gated.runs,
                      {"dense_width": same_width.runs, "dense_macs": matched.runs})
  return rows


def run_capacity_sweep(base: config_lib.ExperimentConfig, workdir: str, grid: Grid,
                       train_fn: Callable) -> list[dict[str, Any]]:
  """The capacity regime: condnets of growing width ``W`` at the active MACs of dense ``w``.

  ``w`` is ``base.hidden``'s width; the condnet of width ``W`` runs at ``tau = w / W``
  (``grid.taus``), so every condnet runs about ``w`` units per layer (plus its policy).
  Runs go to ``workdir/dense_width<w>``, ``workdir/condnet_width<W>_tau<tau>`` and
  ``workdir/dense_width<max W>`` (then ``[lr<lr>/]seed<k>``).

  Returns:
    rows: dense ``w``, the condnets by growing ``W``, dense of the widest ``W``; each
    condnet paired with dense ``w`` (``dense_macs``) and the widest dense (``dense_width``).
  """
  num_layers = len(base.hidden)
  active_width = base.hidden[0]
  widest = max(grid.capacity_widths)
  active = _run_variant(base, os.path.join(workdir, f"dense_width{active_width}"), grid,
                        train_fn, model="dense")
  wide_hidden = (widest,) * num_layers
  wide = _run_variant(base, os.path.join(workdir, f"dense_width{widest}"), grid, train_fn,
                      model="dense", hidden=wide_hidden)
  rows = [_row(f"dense (width {active_width}: the active MACs)", "dense", None, base.hidden,
               active)]
  for width, tau in sorted(zip(grid.capacity_widths, grid.taus)):
    hidden = (width,) * num_layers
    gated = _run_variant(base, os.path.join(workdir, f"condnet_width{width}_tau{_tau_name(tau)}"),
                         grid, train_fn, model="condnet", tau=(tau,), hidden=hidden)
    rows.append(add_differences(
        _row(f"condnet width={width} tau={_tau_name(tau)}", "condnet", tau, hidden, gated),
        gated.runs, {"dense_width": wide.runs, "dense_macs": active.runs}))
  rows.append(_row(f"dense (width {widest}: the widest condnet)", "dense", None, wide_hidden,
                   wide))
  return rows


def _format(mean, std, scale=1.0, digits=2, sign="") -> str:
  """``mean ± std`` scaled; the mean alone when the std is undefined (one seed)."""
  if mean is None:
    return "n/a"
  if std is None:
    return f"{mean * scale:{sign}.{digits}f}"
  return f"{mean * scale:{sign}.{digits}f} ± {std * scale:.{digits}f}"


def _notes(grid: Grid | None, rows: list[dict[str, Any]]) -> list[str]:
  """The lines under the table saying what the statistics are and what chose what."""
  notes = ["Mean ± sample std (ddof = 1) over seeds. gated − dense: per-seed paired "
           "differences of the test error in points, mean ± half-width of the 95 % t "
           "interval (no interval for one seed)."]
  if grid is not None and grid.capacity_widths:
    notes.append(f"Capacity regime: every condnet of width W runs at tau = w/W, the active "
                 f"units of dense width w = {rows[0]['hidden'][0]} (its MACs plus the "
                 f"policies', which grow with W / block size); 'widest dense' is dense W = "
                 f"{max(grid.capacity_widths)}, 'dense same MACs' is dense w.")
  if grid is not None and len(grid.lrs) > 1:
    notes.append(f"lr: chosen per configuration from {', '.join(map(_lr_name, grid.lrs))} on "
                 "the validation split (lowest mean validation error over seeds); the valid "
                 "and test errors are those of the chosen lr.")
  else:
    notes.append("lr: one value, as given (no lr grid).")
  return notes


class TablePaths(NamedTuple):
  """The files :func:`write_tables` writes."""
  csv: str
  markdown: str
  json: str


def write_tables(rows: list[dict[str, Any]], workdir: str, grid: Grid | None = None, *,
                 command: str | None = None) -> TablePaths:
  """Writes ``sweep.csv``, ``sweep.md`` and ``sweep.json`` (rows with per-seed errors and
  the lr each configuration ran at, plus the grid and ``command``, the command line that
  reproduces the sweep, also noted under the markdown table); returns their paths."""
  csv_path = os.path.join(workdir, "sweep.csv")
  with atomic.atomic_open(csv_path) as stream:
    writer = csv.DictWriter(stream, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({**row, "hidden": "x".join(map(str, row["hidden"]))})
  capacity = grid is not None and bool(grid.capacity_widths)
  same_width = "widest dense" if capacity else "dense same width"
  lines = [f"| configuration | seeds | lr | valid error (%) | test error (%) "
           f"| gated − {same_width} (points) | gated − dense same MACs (points) "
           "| active fraction | MACs / example (k) | batch-1 latency (ms) | kernel backend "
           "| train time (s) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    differences = [
        _format(row[f"test_error_minus_{name}_mean"], row[f"test_error_minus_{name}_ci95"], 100,
                sign="+") if row.get(f"test_error_minus_{name}_mean") is not None else ""
        for name in BASELINES]
    lr = "n/a" if row.get("lr") is None else _lr_name(row["lr"])
    lines.append(
        f"| {row['label']} | {row['seeds']} | {lr} | "
        f"{_format(row.get('valid_error_mean'), row.get('valid_error_std'), 100)} | "
        f"{_format(row['test_error_mean'], row['test_error_std'], 100)} | "
        f"{differences[0]} | {differences[1]} | "
        f"{_format(row['active_fraction_mean'], row['active_fraction_std'], 1, 3)} | "
        f"{_format(row['macs_mean'], row['macs_std'], 1e-3, 1)} | "
        f"{_format(row['latency_ms_mean'], row['latency_ms_std'], 1, 3)} | "
        f"{row.get('backend') or 'n/a'} | "
        f"{_format(row.get('train_time_s_mean'), row.get('train_time_s_std'), 1, 1)} |")
  lines += [""] + _notes(grid, rows) + ([f"Command: `{command}`"] if command else [])
  md_path = os.path.join(workdir, "sweep.md")
  with atomic.atomic_open(md_path) as stream:
    stream.write("\n".join(lines) + "\n")
  json_path = os.path.join(workdir, "sweep.json")
  settings = ({"seeds": list(grid.seeds), "taus": list(grid.taus), "recipes": list(grid.recipes),
               "lrs": list(grid.lrs), "capacity_widths": list(grid.capacity_widths)}
              if grid is not None else {})
  with atomic.atomic_open(json_path) as stream:
    json.dump({"command": command, "grid": settings, "statistics": _notes(grid, rows),
               "rows": rows}, stream, indent=1)
  return TablePaths(csv_path, md_path, json_path)
