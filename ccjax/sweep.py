"""One sweep for any task: seeds x taus x variants, two dense baselines, honest statistics.

Every configuration is run for every seed through the task's one driver
(:func:`ccjax.tasks.train`) and reported as mean ± sample std over seeds (``ddof = 1``,
never best-of-seeds). What differs between tasks (the metric, the gated variants, the
numbers beside the metric, what "the same MACs" means) is the task's
:class:`ccjax.tasks.base.SweepSpec` (``ccjax.tasks.TASKS[name].sweep``); this module holds
everything else, once.

Each gated configuration (a task variant, e.g. the LM's ``gated`` / ``gated_top_k`` /
``router``, optionally with a recipe of :mod:`ccjax.recipes`, at a tau) has two dense
baselines: the same width (``dense_same_width``) and the width of the same MACs
(``dense_width<w>``, from the task's ``same_macs_width``: the classifier matches the
gated runs' measured MACs per example, the LM its ``k`` active MLP blocks). Each gated
row carries the per-seed paired differences of its test metric to both baselines
(gated − dense, mean and 95 % t interval; :mod:`ccjax.stats`). Rows measured on the dense
runs (the LM's TEAL thresholding) follow their dense row.

With an lr grid (``Grid.lrs``) every configuration, dense baselines included, is trained
at every lr for every seed, and each configuration's lr is chosen on its mean validation
metric; the rows report that lr's runs.

The capacity regime (``Grid.capacity_widths``, the MoE shape) holds the active budget
fixed at that of dense width ``w`` (the task's ``active_width``: the classifier's one
``--hidden`` width, the LM's ``k * block_size``) and grows the gated net: width ``W`` runs
at ``tau = w / W``, against dense ``W`` (the same width) and dense ``w`` (the same active
MACs).

Run directories: ``workdir/dense_same_width``, ``workdir/[<recipe>/]<variant>_tau<tau>``,
``workdir/dense_width<w>``; capacity regime ``workdir/[<recipe>/]<variant>_width<W>_tau<tau>``,
``workdir/dense_width<W>``; then ``[lr<lr>/]seed<k>``. Finished runs are reused.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Callable, NamedTuple, Sequence

from absl import logging
import jax

from ccjax import atomic
from ccjax import recipes as recipes_lib
from ccjax import stats
from ccjax import tasks
from ccjax import validation
from ccjax.tasks import base as tasks_base

# The baselines a gated row is paired with: the same width (capacity regime: dense W)
# and the same MACs (capacity regime: dense w).
BASELINES = ("dense_width", "dense_macs")
# Capacity regime only: the same recipe and variant at the next narrower gated width (the
# MoE property is that this difference is negative: more blocks, same active MACs, lower
# error).
NARROWER = "narrower"


def spec_of(config) -> tasks_base.SweepSpec:
  """The sweep spec of ``config``'s task."""
  return tasks.task_for(config).sweep


def _classifier_spec() -> tasks_base.SweepSpec:
  return tasks.TASKS["classify"].sweep


def difference_fields(spec: tasks_base.SweepSpec) -> tuple[str, ...]:
  """The row keys of the paired differences: ``<metric>_minus_<baseline>_<stat>``."""
  return tuple(f"{spec.metric}_minus_{baseline}_{stat}" for baseline in (*BASELINES, NARROWER)
               for stat in ("mean", "std", "ci95"))


def csv_fields(spec: tasks_base.SweepSpec) -> tuple[str, ...]:
  """The columns of ``sweep.csv`` for a task."""
  numbers = (spec.valid_metric, spec.metric, *(column.name for column in spec.columns))
  return ("label", "recipe", "variant", "model", "tau", "hidden", "seeds",
          *(f"{name}_{stat}" for name in numbers for stat in ("mean", "std")),
          "lr", "lr_chosen_on", "backend", *difference_fields(spec))


def aggregate(label: str, model: str, tau: float | None, hidden: Sequence[int],
              results: list[dict[str, Any]], recipe: str = "", *, lr: float | None = None,
              lr_chosen_on: str = "given", variant: str = "",
              spec: tasks_base.SweepSpec | None = None) -> dict[str, Any]:
  """Mean and sample std (``ddof = 1``) over seeds of one configuration's results.

  Args:
    label: the row's name in the tables.
    model: ``dense`` for baselines; a gated row's variant and recipe (``condnet warm``).
    tau: the gated net's target (a dense row: the tau it is matched to, or ``None``).
    hidden: the per-layer widths of the configuration.
    results: ``[seeds]`` ``results.json`` payloads, in seed order.
    recipe: the recipe of the row (``""``: the flags as given).
    lr: the learning rate of ``results``.
    lr_chosen_on: ``given`` (one lr) or ``validation`` (chosen from an lr grid).
    variant: the task variant of a gated row (``""`` for dense rows).
    spec: the task's sweep spec (default: the classifier's).

  Returns:
    the row: ``<name>_mean`` / ``<name>_std`` of the metric, the validation metric and
    every column of the spec (std ``None`` for one seed), the kernel ``backend``, and
    ``per_seed``: the test and validation metric in seed order.
  """
  spec = spec or _classifier_spec()
  row = {"label": label, "recipe": recipe, "variant": variant, "model": model, "tau": tau,
         "hidden": list(hidden), "seeds": len(results), "lr": lr,
         "lr_chosen_on": lr_chosen_on}
  numbers = [(spec.valid_metric, lambda r: r.get(spec.valid_metric)),
             (spec.metric, lambda r: r[spec.metric])]
  for name, value in numbers + [(column.name, column.value) for column in spec.columns]:
    summary = stats.mean_std([value(r) for r in results])
    row[f"{name}_mean"], row[f"{name}_std"] = summary.mean, summary.std
  # The kernel backend of the sparse latency (absent for dense runs and unmeasured latency).
  row["backend"] = "/".join(sorted({r["backend"] for r in results if r.get("backend")})) or None
  row["per_seed"] = {spec.metric: [r[spec.metric] for r in results],
                     spec.valid_metric: [r.get(spec.valid_metric) for r in results]}
  return row


def add_differences(row: dict[str, Any], results: list[dict[str, Any]],
                    baselines: dict[str, list[dict[str, Any]]],
                    spec: tasks_base.SweepSpec | None = None) -> dict[str, Any]:
  """Adds the per-seed paired differences of the test metric, ``row`` − each baseline.

  Args:
    row: a gated row (:func:`aggregate`); changed in place.
    results: the row's ``[seeds]`` results, in seed order.
    baselines: ``{name: [seeds] results}`` for names in :data:`BASELINES` (and
      :data:`NARROWER`), same seeds.
    spec: the task's sweep spec (default: the classifier's).

  Returns:
    ``row`` with ``<metric>_minus_<name>_{mean,std,ci95}`` (in the metric's own units).
  """
  spec = spec or _classifier_spec()
  values = [r[spec.metric] for r in results]
  for name, baseline in baselines.items():
    difference = stats.paired_difference(values, [r[spec.metric] for r in baseline])
    row[f"{spec.metric}_minus_{name}_mean"] = difference.mean
    row[f"{spec.metric}_minus_{name}_std"] = difference.std
    row[f"{spec.metric}_minus_{name}_ci95"] = difference.ci95
  return row


class Grid(NamedTuple):
  """The validated runs of a sweep.

  Attributes:
    seeds: the seeds of every configuration.
    taus: the gated nets' targets (capacity regime: ``w / W`` per width, in order).
    recipes: recipe study (empty: the base config only).
    lrs: lr grid, chosen per configuration on validation (empty: the base config's lr,
      and run directories without an lr level).
    capacity_widths: capacity regime, the gated widths ``W`` (empty: the tau regime).
    variants: the task's gated variants (empty: its ``default_variants``).
  """
  seeds: tuple[int, ...]
  taus: tuple[float, ...]
  recipes: tuple[str, ...] = ()
  lrs: tuple[float, ...] = ()
  capacity_widths: tuple[int, ...] = ()
  variants: tuple[str, ...] = ()


def check_distinct(field: str, values: Sequence[Any]) -> None:
  """Raises ``ConfigError(field)`` unless ``values`` has at least one value and none twice
  (a sweep's seeds: one run counted as two would fake the spread)."""
  if not values:
    raise validation.ConfigError(field, "needs at least one value")
  if len(set(values)) != len(values):
    raise validation.ConfigError(field, f"lists a value twice: {list(values)}")


def _replace(config, field: str, **changes):
  """``config.replace(**changes)``; a field the task's config lacks is a ``ConfigError``
  of ``field`` (the flag that asked for it)."""
  try:
    return config.replace(**changes)
  except TypeError as error:
    raise validation.ConfigError(
        field, f"sets a field a {config.TASK} run does not have ({error})") from None


def _gated_config(base, spec: tasks_base.SweepSpec, variant: str, recipe: str, tau: float,
                  width: int | None = None):
  """The config of one gated configuration (seed and lr are the base's)."""
  config = spec.at_width(base, width) if width else base
  config = _replace(config, "recipes", model=spec.gated_model, tau=(tau,),
                    **(recipes_lib.recipe_fields(recipe) if recipe else {}))
  return _replace(config, "variants", **spec.variants[variant])


def _dense_config(base, spec: tasks_base.SweepSpec, width: int | None = None):
  """The dense baseline of ``base`` (at ``width``, if given)."""
  dense = base.replace(model="dense")
  return spec.at_width(dense, width) if width else dense


def validate_grid(base, *, seeds: Sequence[int], taus: Sequence[float],
                  recipes: Sequence[str] = (), lrs: Sequence[float] = (),
                  capacity_widths: Sequence[int] = (), variants: Sequence[str] = ()) -> Grid:
  """Checks every run of the grid before any starts.

  Args:
    base: the shared configuration (any task's :class:`ccjax.run_config.RunConfig`).
    seeds: seeds (at least one, distinct).
    taus: targets of the tau regime; must be empty in the capacity regime.
    recipes: recipe names (:mod:`ccjax.recipes`), in either regime.
    lrs: the lr grid (distinct, each a valid ``lr``); empty: ``base``'s lr.
    capacity_widths: gated widths ``W`` of the capacity regime, each a multiple of the
      block size and at least the task's active width ``w``.
    variants: the task's gated variants (distinct); empty: its defaults.

  Raises:
    validation.ConfigError: a bad or duplicate seed, tau, recipe, lr, width or variant,
      two values whose run directories would collide, or more devices than JAX sees
      (field ``seed`` / ``tau`` / ``recipes`` / ``lrs`` / ``capacity_widths`` /
      ``variants`` / ``num_devices``).
  """
  spec = spec_of(base)
  seeds, taus, recipes = tuple(seeds), tuple(taus), tuple(recipes)
  lrs, capacity_widths = tuple(lrs), tuple(capacity_widths)
  variants = tuple(variants) or spec.default_variants
  _check_devices(base)
  check_distinct("variants", variants)
  for variant in variants:
    validation.check_choice("variants", variant, tuple(spec.variants))
  if capacity_widths:
    taus = _capacity_taus(base, spec, taus, recipes, capacity_widths)
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
    for variant in variants:
      for tau, width in zip(taus, widths):
        gated = _gated_config(base, spec, variant, recipe, tau, width)
        for seed in seeds:
          gated.replace(seed=seed)
  for width in capacity_widths:
    _dense_config(base, spec, width)
  return Grid(seeds, taus, recipes, lrs, capacity_widths, variants)


def _check_devices(base) -> None:
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


def _capacity_taus(base, spec: tasks_base.SweepSpec, taus: tuple[float, ...],
                   recipes: tuple[str, ...], capacity_widths: tuple[int, ...]
                   ) -> tuple[float, ...]:
  """``w / W`` for every capacity width ``W``, after checking the capacity grid."""
  if taus:
    raise validation.ConfigError(
        "capacity_widths", f"sets each tau to w/W; do not also give --taus (got {list(taus)})")
  active_width = spec.active_width(base)
  check_distinct("capacity_widths", capacity_widths)
  # Dense W keeps the base's block size; a recipe may set its own (``regroup``: 8).
  block_sizes = sorted({base.block_size} | {
      recipes_lib.recipe_fields(recipe).get("block_size", base.block_size)
      for recipe in recipes})
  for width in capacity_widths:
    validation.check_int("capacity_widths", width)
    for block_size in block_sizes:
      if width < active_width or width % block_size:
        raise validation.ConfigError(
            "capacity_widths", f"must be multiples of --block_size={block_size} and at least "
            f"the active width w = {active_width}, got {width}")
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
  valid_by_lr: dict[str, float | None]


def _run_configuration(config, directory: str, grid: Grid, train_fn: Callable,
                       spec: tasks_base.SweepSpec) -> _Variant:
  """Runs one configuration for every seed at every lr of the grid; picks the lr.

  Without an lr grid the runs go to ``directory/seed<k>`` at ``config``'s lr; with one, to
  ``directory/lr<lr>/seed<k>``, and the lr of the lowest mean validation metric wins (the
  first listed on a tie). A finished run in its directory is resumed at its end.

  Raises:
    ValueError: an lr grid where a run has no validation metric (an empty validation split).
  """
  lrs = grid.lrs or (config.train.lr,)
  runs_by_lr = {}
  for lr in lrs:
    lr_directory = os.path.join(directory, f"lr{_lr_name(lr)}") if grid.lrs else directory
    runs = []
    for seed in grid.seeds:
      workdir = os.path.join(lr_directory, f"seed{seed}")
      logging.info("sweep: %s", workdir)
      runs.append(train_fn(config.replace(seed=seed, lr=lr), workdir))
    runs_by_lr[lr] = runs
  valid = {lr: stats.mean_std([r.get(spec.valid_metric) for r in runs])
           for lr, runs in runs_by_lr.items()}
  valid_by_lr = {_lr_name(lr): summary.mean for lr, summary in valid.items()}
  if len(lrs) == 1:
    return _Variant(runs_by_lr[lrs[0]], lrs[0], "given", valid_by_lr)
  if any(summary.n < len(grid.seeds) for summary in valid.values()):
    raise ValueError(f"choosing the lr of {directory} needs a validation metric for every "
                     "run; the validation split is empty (give --valid_fraction > 0)")
  chosen = min(lrs, key=lambda lr: valid[lr].mean)
  return _Variant(runs_by_lr[chosen], chosen, "validation", valid_by_lr)


def _row(spec: tasks_base.SweepSpec, label: str, config, tau: float | None,
         configuration: _Variant, recipe: str = "", variant: str = "") -> dict[str, Any]:
  """A row; a gated row's ``model`` is its variant and recipe (one series per pair)."""
  model = _label(variant, recipe) if variant else config.model
  row = aggregate(label, model, tau, spec.hidden(config), configuration.runs, recipe,
                  lr=configuration.lr, lr_chosen_on=configuration.lr_chosen_on,
                  variant=variant, spec=spec)
  row[f"{spec.valid_metric}_by_lr"] = configuration.valid_by_lr
  return row


def _dense_rows(spec: tasks_base.SweepSpec, label: str, config, tau: float | None,
                configuration: _Variant, derived: bool = True) -> list[dict[str, Any]]:
  """A dense row and, with ``derived``, the rows measured on its runs
  (:attr:`SweepSpec.derived_rows`; for the same-width baselines only)."""
  rows = [_row(spec, label, config, tau, configuration)]
  if not derived:
    return rows
  for derived_label, model, results in spec.derived_rows(config, configuration.runs):
    rows.append(aggregate(derived_label, model, tau, spec.hidden(config), results,
                          lr=configuration.lr, lr_chosen_on=configuration.lr_chosen_on,
                          spec=spec))
  return rows


def _label(variant: str, recipe: str) -> str:
  return f"{variant} {recipe}" if recipe else variant


def run_sweep(base, workdir: str, grid: Grid, train_fn: Callable = tasks.train
              ) -> list[dict[str, Any]]:
  """Runs every gated configuration and both dense baselines, for every seed and lr.

  Args:
    base: configuration shared by all runs (its ``model``, ``tau``, ``seed`` and, with an
      lr grid, ``lr`` are replaced, and a recipe's and a variant's fields set on top).
    workdir: the sweep's directory (see the module docstring for the layout); finished
      runs are reused. Dense baselines are shared by all recipes and variants.
    grid: seeds, taus, recipes, lrs, capacity widths, variants (:func:`validate_grid`).
    train_fn: ``(config, workdir) -> results`` (default :func:`ccjax.tasks.train`).

  Returns:
    one aggregated row per configuration. Tau regime: the dense same-width baseline (and
    its derived rows), then per recipe, variant and tau the gated row and, the first time
    its width is needed, its same-MACs dense baseline. Capacity regime:
    :func:`run_capacity_sweep`. Gated rows carry the paired differences
    (:func:`add_differences`).
  """
  spec = spec_of(base)
  grid = grid._replace(variants=grid.variants or spec.default_variants)
  if grid.capacity_widths:
    return run_capacity_sweep(base, workdir, grid, train_fn)
  dense = _dense_config(base, spec)
  same_width = _run_configuration(dense, os.path.join(workdir, "dense_same_width"), grid,
                                  train_fn, spec)
  rows = _dense_rows(spec, "dense (same width)", dense, None, same_width)
  matched = {}   # width -> its runs
  for recipe in grid.recipes or ("",):
    prefix = os.path.join(workdir, recipe) if recipe else workdir
    for variant in grid.variants:
      for tau in grid.taus:
        label = f"{_label(variant, recipe)} tau={_tau_name(tau)}"
        config = _gated_config(base, spec, variant, recipe, tau)
        gated = _run_configuration(config, os.path.join(prefix, f"{variant}_tau{_tau_name(tau)}"),
                                   grid, train_fn, spec)
        gated_row = _row(spec, label, config, tau, gated, recipe=recipe, variant=variant)
        rows.append(gated_row)
        width = spec.same_macs_width(config, gated.runs)
        if width not in matched:
          matched_config = _dense_config(base, spec, width)
          matched[width] = _run_configuration(
              matched_config, os.path.join(workdir, f"dense_width{width}"), grid, train_fn, spec)
          rows += _dense_rows(spec, f"dense (MACs of {label}, width {width})", matched_config,
                              tau, matched[width], derived=False)
        add_differences(gated_row, gated.runs, {"dense_width": same_width.runs,
                                                "dense_macs": matched[width].runs}, spec)
  return rows


def run_capacity_sweep(base, workdir: str, grid: Grid, train_fn: Callable = tasks.train
                       ) -> list[dict[str, Any]]:
  """The capacity regime: gated nets of growing width ``W`` at the active MACs of dense ``w``.

  ``w`` is the task's active width of ``base``; the gated net of width ``W`` runs at
  ``tau = w / W`` (``grid.taus``), so every gated net runs about ``w`` units per layer
  (plus its policy). Runs go to ``workdir/dense_width<w>``, ``workdir/dense_width<W>`` and
  ``workdir/[<recipe>/]<variant>_width<W>_tau<tau>`` (then ``[lr<lr>/]seed<k>``).

  Returns:
    rows: dense ``w``, then per ``W`` (ascending) each recipe's and variant's gated row and
    dense ``W``; gated rows past the narrowest ``W`` are also paired with the same recipe
    and variant at the previous ``W`` (:data:`NARROWER`);
    each gated row paired with dense ``W`` (``dense_width``) and dense ``w``
    (``dense_macs``).
  """
  spec = spec_of(base)
  grid = grid._replace(variants=grid.variants or spec.default_variants)
  active_width = spec.active_width(base)
  active_config = _dense_config(base, spec, active_width)
  active = _run_configuration(active_config, os.path.join(workdir, f"dense_width{active_width}"),
                              grid, train_fn, spec)
  rows = _dense_rows(spec, f"dense (width {active_width}: the active MACs)", active_config,
                     None, active, derived=False)
  narrower = {}   # (recipe, variant) -> the runs at the previous (narrower) width
  for width, tau in sorted(zip(grid.capacity_widths, grid.taus)):
    wide_config = _dense_config(base, spec, width)
    wide = active if width == active_width else _run_configuration(
        wide_config, os.path.join(workdir, f"dense_width{width}"), grid, train_fn, spec)
    for recipe in grid.recipes or ("",):
      prefix = os.path.join(workdir, recipe) if recipe else workdir
      for variant in grid.variants:
        config = _gated_config(base, spec, variant, recipe, tau, width)
        gated = _run_configuration(
            config, os.path.join(prefix, f"{variant}_width{width}_tau{_tau_name(tau)}"), grid,
            train_fn, spec)
        baselines = {"dense_width": wide.runs, "dense_macs": active.runs}
        if (recipe, variant) in narrower:
          baselines[NARROWER] = narrower[recipe, variant]
        narrower[recipe, variant] = gated.runs
        rows.append(add_differences(
            _row(spec, f"{_label(variant, recipe)} width={width} tau={_tau_name(tau)}", config,
                 tau, gated, recipe=recipe, variant=variant),
            gated.runs, baselines, spec))
    if width != active_width:
      rows += _dense_rows(spec, f"dense (width {width})", wide_config, None, wide)
  return rows


def _format(mean, std, scale=1.0, digits=2, sign="") -> str:
  """``mean ± std`` scaled; the mean alone when the std is undefined (one seed)."""
  if mean is None:
    return "n/a"
  if std is None:
    return f"{mean * scale:{sign}.{digits}f}"
  return f"{mean * scale:{sign}.{digits}f} ± {std * scale:.{digits}f}"


def _notes(grid: Grid | None, rows: list[dict[str, Any]],
           spec: tasks_base.SweepSpec) -> list[str]:
  """The lines under the table saying what the statistics are and what chose what."""
  notes = [f"Mean ± sample std (ddof = 1) over seeds. gated − dense: per-seed paired "
           f"differences of the test {spec.metric_title} in {spec.difference_unit}, mean ± "
           "half-width of the 95 % t interval (no interval for one seed); negative: the "
           "gated net is better."]
  if grid is not None and grid.capacity_widths:
    notes.append(f"Capacity regime: every gated net of width W runs at tau = w/W, the active "
                 f"units of dense width w = {rows[0]['hidden'][0]} (its MACs plus the "
                 f"policies', which grow with W / block size); 'dense same width' is dense "
                 "W, 'dense same MACs' is dense w.")
  if grid is not None and len(grid.lrs) > 1:
    notes.append(f"lr: chosen per configuration from {', '.join(map(_lr_name, grid.lrs))} on "
                 f"the validation split (lowest mean validation {spec.metric_title} over "
                 "seeds); the valid and test numbers are those of the chosen lr.")
  else:
    notes.append("lr: one value, as given (no lr grid).")
  return notes


def _trend_lines(rows: list[dict[str, Any]], spec: tasks_base.SweepSpec) -> list[str]:
  """Capacity regime: each gated row against the same recipe at the next narrower W."""
  key = f"{spec.metric}_minus_{NARROWER}"
  trend = [row for row in rows if row.get(f"{key}_mean") is not None]
  if not trend:
    return []
  unit = f"({spec.difference_unit})"
  lines = ["", f"Capacity trend: gated − the same recipe at the next narrower W {unit}, "
           "per-seed paired, mean ± half-width of the 95 % t interval; negative: the wider "
           "net is better at the same active MACs.", "",
           f"| configuration | test {spec.metric_title} | − next narrower W {unit} |",
           "|---|---|---|"]
  scale, digits = spec.metric_scale, spec.metric_digits
  for row in trend:
    metric = _format(row[f"{spec.metric}_mean"], row[f"{spec.metric}_std"], scale, digits)
    change = _format(row[f"{key}_mean"], row[f"{key}_ci95"], scale, digits, sign="+")
    lines.append(f"| {row['label']} | {metric} | {change} |")
  return lines + [""]


class TablePaths(NamedTuple):
  """The files :func:`write_tables` writes."""
  csv: str
  markdown: str
  json: str


def write_tables(rows: list[dict[str, Any]], workdir: str, grid: Grid | None = None, *,
                 command: str | None = None, spec: tasks_base.SweepSpec | None = None
                 ) -> TablePaths:
  """Writes ``sweep.csv``, ``sweep.md`` and ``sweep.json`` (rows with per-seed values and
  the lr each configuration ran at, plus the grid and ``command``, the command line that
  reproduces the sweep, also noted under the markdown table); returns their paths.

  Args:
    rows: :func:`run_sweep`'s rows.
    workdir: where the tables go.
    grid: the sweep's grid (notes on the lr choice and the capacity regime).
    command: the command line that reproduces the sweep.
    spec: the task's sweep spec (default: the classifier's).
  """
  spec = spec or _classifier_spec()
  csv_path = os.path.join(workdir, "sweep.csv")
  with atomic.atomic_open(csv_path) as stream:
    writer = csv.DictWriter(stream, fieldnames=csv_fields(spec), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({**row, "hidden": "x".join(map(str, row["hidden"]))})
  unit = f"({spec.difference_unit})"
  columns = "".join(f" {column.title} |" for column in spec.columns)
  lines = [f"| configuration | seeds | lr | valid {spec.metric_title} | test {spec.metric_title} "
           f"| gated − dense same width {unit} | gated − dense same MACs {unit} |{columns} "
           "kernel backend |",
           "|---" * (7 + len(spec.columns) + 1) + "|"]
  for row in rows:
    differences = [
        _format(row[f"{spec.metric}_minus_{name}_mean"], row[f"{spec.metric}_minus_{name}_ci95"],
                spec.metric_scale, spec.metric_digits, sign="+")
        if row.get(f"{spec.metric}_minus_{name}_mean") is not None else ""
        for name in BASELINES]
    lr = "n/a" if row.get("lr") is None else _lr_name(row["lr"])
    numbers = "".join(
        f" {_format(row.get(f'{c.name}_mean'), row.get(f'{c.name}_std'), c.scale, c.digits)} |"
        for c in spec.columns)
    metric = [_format(row.get(f"{name}_mean"), row.get(f"{name}_std"), spec.metric_scale,
                      spec.metric_digits) for name in (spec.valid_metric, spec.metric)]
    lines.append(f"| {row['label']} | {row['seeds']} | {lr} | {metric[0]} | {metric[1]} | "
                 f"{differences[0]} | {differences[1]} |{numbers} {row.get('backend') or 'n/a'} |")
  notes = _notes(grid, rows, spec)
  lines += [""] + notes + _trend_lines(rows, spec) + (
      [f"Command: `{command}`"] if command else [])
  md_path = os.path.join(workdir, "sweep.md")
  with atomic.atomic_open(md_path) as stream:
    stream.write("\n".join(lines) + "\n")
  json_path = os.path.join(workdir, "sweep.json")
  settings = ({"seeds": list(grid.seeds), "taus": list(grid.taus), "recipes": list(grid.recipes),
               "lrs": list(grid.lrs), "capacity_widths": list(grid.capacity_widths),
               "variants": list(grid.variants)}
              if grid is not None else {})
  with atomic.atomic_open(json_path) as stream:
    json.dump({"metric": spec.metric, "command": command, "grid": settings,
               "statistics": notes, "rows": rows}, stream, indent=1)
  return TablePaths(csv_path, md_path, json_path)
