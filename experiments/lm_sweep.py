r"""Gated LMs against both dense baselines over seeds: mean ± std and paired differences.

  python -m experiments.lm_sweep --workdir=runs/lm_sweep --seeds=0,1,2
  python -m experiments.lm_sweep --workdir=runs/lm_text --dataset=bible --seeds=0,1,2,3,4
  python -m experiments.lm_sweep --workdir=runs/lm_capacity --capacity_widths=512,1024,2048

Variants per seed (each a run of :func:`ccjax.lm_train.train_and_evaluate_lm`; an
existing run is resumed, a finished one re-evaluated at its end, and one trained with
other settings or on another corpus is refused, as in ``experiments.sweep``):

* ``gated``: per-token gated MLPs at ``--tau``, policies trained by ``--estimator``
  (default ``reinforce``: the paper's REINFORCE), tested with ``--eval_policy``;
* ``gated_top_k``: the same model trained at the test-time budget: REINFORCE over exact
  ``k``-subsets (``--estimator=reinforce_top_k``), tested with ``top_k``;
* ``router``: the same gated MLPs with an MoE-style top-k router (``round(tau * blocks)``
  blocks per token, straight-through; :data:`ccjax.lm_train.LM_MODELS`);
* ``dense``: the dense model of the same width; its run also evaluates TEAL-style
  training-free thresholding at the fraction ``--tau`` (``teal`` row);
* ``dense_same_macs``: a dense model whose MLP width is that of the ``k`` blocks the
  gated model runs per token (``round(tau * blocks) * --block_size``: its active MLP MACs).

The gated rows (``gated``, ``gated_top_k``, ``router``) carry the per-seed paired
differences of their test bits/byte to both dense baselines (gated − dense on the same
seed, mean ± half-width of the 95 % t interval; :mod:`ccjax.stats`), when both baselines
are among ``--variants``.

**Capacity regime** (``--capacity_widths=W1,W2,...``, the MoE shape): the gated models
keep the base model's ``k`` active blocks per token (``k = round(tau * mlp_width /
block_size)``, 4 of 16 at the defaults) while their MLP width ``W`` grows: width ``W`` runs
at ``tau = k * block_size / W``. Each gated variant and ``dense`` run at every ``W``;
``dense_same_macs`` (MLP ``k * block_size``) is the same active MLP MACs for all. Each
gated row is paired with dense of its own width ``W`` and with ``dense_same_macs``. Runs
of width ``W`` go to ``<variant>_width<W>_seed<k>``, except where a run's settings are
those of the plain sweep (``W = --mlp_width`` at the same tau), which keeps the plain
sweep's ``<variant>_seed<k>`` and so reuses its runs.

``--variants`` picks a subset. Every variant gets the same flags (recipe flags act on the
gated and router models only).

Writes ``summary.json`` (rows with per-seed values, the statistics, the command line) and
``summary.md`` into ``--workdir`` (locked for the sweep). Bad flags (a bad or repeated
seed, variant or width included) exit with status 2 and a one-line message before
anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from typing import Any, NamedTuple, Sequence

from absl import app
from absl import flags
import numpy as np

from ccjax import atomic
from ccjax import lm_train
from ccjax import lock
from ccjax import loop
from ccjax import stats
from ccjax import sweep
from ccjax import validation
from experiments import cli
from experiments import shared_flags as shared
from experiments import lm

_SEEDS = shared.define_number_list("seeds", (0, 1, 2), "Seeds of every variant.", int)
VARIANTS = ("gated", "gated_top_k", "router", "dense", "dense_same_macs")
# The variants with gates, each paired with both dense baselines.
GATED_VARIANTS = ("gated", "gated_top_k", "router")
# Paired-difference keys of a gated row: its baseline variant and the column's title.
BASELINES = (("dense", "dense same width"), ("dense_same_macs", "dense same MLP MACs"))
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS),
                              f"Variants to run, a subset of {','.join(VARIANTS)}.")
_CAPACITY_WIDTHS = shared.define_number_list(
    "capacity_widths", None, "Capacity regime (the MoE shape): comma list of MLP widths W; "
    "every gated variant and dense run at each W, the gated ones at tau = k * block_size / W "
    "(k = round(tau * mlp_width / block_size), the base model's active blocks), against "
    "dense_same_macs and dense of width W. Default: the base width only.", int)


def active_width(base: lm_train.LMConfig) -> int:
  """MLP units the base gated model runs per token: ``k * block_size`` with ``k`` its
  first layer's ``round(tau * blocks)`` (the width of ``dense_same_macs``)."""
  return base.top_k_capacity() * base.block_size


def check_capacity_widths(base: lm_train.LMConfig, widths: Sequence[int]) -> tuple[int, ...]:
  """The capacity widths, checked: distinct multiples of the block size, each at least the
  active width; the base model needs one tau for every layer.

  Raises:
    validation.ConfigError: field ``capacity_widths``.
  """
  widths = tuple(widths)
  sweep.check_distinct("capacity_widths", widths)
  if len(set(base.layer_capacities())) != 1:
    raise validation.ConfigError(
        "capacity_widths", "needs the same active blocks in every layer (one --tau), got "
        f"{list(base.layer_capacities())} blocks per layer")
  for width in widths:
    validation.check_int("capacity_widths", width)
    if width % base.block_size or width < active_width(base):
      raise validation.ConfigError(
          "capacity_widths", f"must be multiples of --block_size={base.block_size} and at "
          f"least the active width {active_width(base)} (round(tau * blocks) blocks of "
          f"{base.block_size}), got {width}")
  return widths


def _at_width(base: lm_train.LMConfig, width: int | None) -> lm_train.LMConfig:
  """``base`` at MLP width ``width`` and ``tau = active_width / width`` (the same active
  blocks); ``base`` itself for ``None`` or when that changes nothing."""
  if width is None:
    return base
  tau = active_width(base) / width
  if width == base.mlp_width and all(t == tau for t in base.train.taus(base.num_layers)):
    return base
  return dataclasses.replace(base, mlp_width=width,
                             train=dataclasses.replace(base.train, tau=(tau,)))


def variant_config(base: lm_train.LMConfig, variant: str, seed: int,
                   width: int | None = None) -> lm_train.LMConfig:
  """The run configuration of one (variant, seed[, capacity width]).

  Args:
    base: the flags' configuration.
    variant: one of :data:`VARIANTS`.
    seed: the run's seed.
    width: capacity regime: the MLP width ``W`` (ignored by ``dense_same_macs``, which
      always has the active width); ``None``: the base width.
  """
  if variant == "dense_same_macs":
    return dataclasses.replace(base, model="dense", mlp_width=active_width(base), seed=seed)
  config = _at_width(base, width)
  if variant == "gated_top_k":
    return dataclasses.replace(
        config, model="gated", seed=seed, eval_policy="top_k",
        train=dataclasses.replace(config.train, estimator="reinforce_top_k"))
  return dataclasses.replace(config, model=validation.check_choice(
      "variants", variant, ("gated", "dense", "router")), seed=seed)


class Row(NamedTuple):
  """One configuration of the sweep (a row of the tables).

  Attributes:
    name: the row's key, ``<variant>`` or, in the capacity regime, ``<variant>_width<W>``.
    variant: one of :data:`VARIANTS`.
    width: the capacity width ``W`` (``None``: the base width).
    mlp_width: the MLP width the row's runs have.
    baselines: ``{baseline variant: its row's name}`` for gated rows, else empty.
  """
  name: str
  variant: str
  width: int | None
  mlp_width: int
  baselines: dict[str, str]


def plan_rows(base: lm_train.LMConfig, variants: Sequence[str],
              capacity_widths: Sequence[int] = ()) -> list[Row]:
  """The rows of the sweep, in table order.

  Plain sweep: one row per variant, in the order given. Capacity regime:
  ``dense_same_macs``, then per width ``W`` (ascending) the gated variants and ``dense``.
  Gated rows name the rows of their two baselines (where those are run).
  """
  if capacity_widths:
    keys = [("dense_same_macs", None)] if "dense_same_macs" in variants else []
    keys += [(v, w) for w in sorted(capacity_widths) for v in variants
             if v != "dense_same_macs"]
  else:
    keys = [(v, None) for v in variants]
  rows = []
  for variant, width in keys:
    baselines = {}
    if variant in GATED_VARIANTS:
      for baseline, _ in BASELINES:
        baseline_width = None if baseline == "dense_same_macs" else width
        if (baseline, baseline_width) in keys:
          baselines[baseline] = _row_name(baseline, baseline_width)
    rows.append(Row(_row_name(variant, width), variant, width,
                    variant_config(base, variant, 0, width).mlp_width, baselines))
  return rows


def _row_name(variant: str, width: int | None) -> str:
  return variant if width is None else f"{variant}_width{width}"


def run_directory(base: lm_train.LMConfig, row: Row, seed: int) -> str:
  """``<variant>_seed<k>``, or ``<variant>_width<W>_seed<k>`` for a capacity run whose
  settings differ from the plain sweep's run of that variant."""
  config = variant_config(base, row.variant, seed, row.width)
  if config == variant_config(base, row.variant, seed):
    return f"{row.variant}_seed{seed}"
  return f"{row.variant}_width{row.width}_seed{seed}"


def _summary(values) -> dict[str, Any] | None:
  """:func:`ccjax.stats.mean_std` as a dict, ``None`` when nothing was measured."""
  summary = stats.mean_std(values)
  return summary._asdict() if summary.n else None


def _mean_active(result: dict[str, Any]) -> float | None:
  return float(np.mean(result["active_fraction"])) if result["active_fraction"] else None


def summarize(plan: Sequence[Row], results: dict[str, list[dict]]) -> dict[str, dict]:
  """Per row (plus ``teal`` rows after dense ones): mean ± sample std over seeds of the
  reported numbers, the per-seed values, and for gated rows the paired differences.

  Args:
    plan: the rows (:func:`plan_rows`).
    results: ``{row name: [seeds] results.json payloads}``, in seed order (the same seeds
      for every row).

  Returns:
    ``{row name: row}``; numbers as ``{mean, std, n}`` (std ``None`` for one seed); gated
    rows add ``minus_<baseline>`` (``{mean, std, n, ci95}`` of gated − baseline test
    bits/byte, or ``None`` without that baseline).
  """
  rows = {}
  for row in plan:
    runs = results[row.name]
    bits = [r["bits_per_byte"] for r in runs]
    first = runs[0]   # the estimator and test policy are those of every seed
    rows[row.name] = {
        "variant": row.variant, "mlp_width": row.mlp_width,
        "estimator": first.get("estimator"), "eval_policy": first.get("eval_policy"),
        "bits_per_byte": _summary(bits),
        "valid_bits_per_byte": _summary([r.get("valid_bits_per_byte") for r in runs]),
        "active_fraction": _summary([_mean_active(r) for r in runs]),
        "macs_per_token": _summary([r["macs_per_token"]["total"] for r in runs]),
        "mlp_macs_per_token": _summary([r["macs_per_token"].get("mlp") for r in runs]),
        "mlp_ms_dense": _summary([r.get("mlp_ms_per_token", {}).get("dense") for r in runs]),
        "mlp_ms_sparse": _summary([r.get("mlp_ms_per_token", {}).get("sparse") for r in runs]),
        "decode_ms_dense": _summary([r.get("decode_ms_per_token", {}).get("dense")
                                     for r in runs]),
        "decode_ms_sparse": _summary([r.get("decode_ms_per_token", {}).get("sparse")
                                      for r in runs]),
        "per_seed": {"seed": [r.get("seed") for r in runs], "bits_per_byte": bits,
                     "valid_bits_per_byte": [r.get("valid_bits_per_byte") for r in runs],
                     "active_fraction": [r["active_fraction"] for r in runs]},
    }
    if row.variant in GATED_VARIANTS:
      for baseline, _ in BASELINES:
        paired = row.baselines.get(baseline)
        rows[row.name][f"minus_{baseline}"] = stats.paired_difference(
            bits, [r["bits_per_byte"] for r in results[paired]])._asdict() if paired else None
    if row.variant == "dense":
      suffix = f"_width{row.width}" if row.width is not None else ""
      rows[f"teal{suffix}"] = {
          "variant": "teal", "mlp_width": row.mlp_width,
          "bits_per_byte": _summary([r["teal_bits_per_byte"] for r in runs]),
          "active_fraction": _summary([r["teal_active_fraction"] for r in runs]),
          "per_seed": {"seed": [r.get("seed") for r in runs],
                       "bits_per_byte": [r["teal_bits_per_byte"] for r in runs]}}
  return rows


def _cell(stat: dict[str, Any] | None, digits: int, sign: str = "") -> str:
  """``mean ± std`` (a difference: ``mean ± ci95``); the mean alone for one seed."""
  if not stat or stat.get("mean") is None:
    return "-"
  spread = stat["ci95"] if "ci95" in stat else stat.get("std")
  mean = f"{stat['mean']:{sign}.{digits}f}"
  return mean if spread is None else f"{mean} ± {spread:.{digits}f}"


def notes(capacity_widths: Sequence[int] = (), active: int | None = None,
          command: str | None = None) -> list[str]:
  """The lines under the table: what the statistics are, what chose what, the command."""
  lines = ["Mean ± sample std (ddof = 1) over seeds (the mean alone for one seed). gated − "
           "dense: per-seed paired differences of the test bits/byte (gated minus the "
           "baseline on the same seed), mean ± half-width of the 95 % Student t interval "
           "(ccjax.stats); negative: the gated model is better.",
           "Splits: bits/byte on test is reported; valid bits/byte is the split to choose "
           "settings on (this sweep chooses nothing itself: every row ran the flags as "
           "given)."]
  if capacity_widths:
    lines.append(f"Capacity regime: every gated model of MLP width W runs the same {active} "
                 f"active MLP units per token (tau = {active}/W); 'dense same width' is dense "
                 f"of that W, 'dense same MLP MACs' is dense MLP {active}.")
  if command:
    lines.append(f"Command: `{command}`")
  return lines


def markdown(rows: dict[str, dict], note_lines: Sequence[str] = ()) -> str:
  """The table of :func:`summarize`'s rows, then ``note_lines``."""
  titles = " | ".join(f"gated − {title}" for _, title in BASELINES)
  header = (f"| variant | estimator / test policy | MLP width | seeds | test bits/byte | "
            f"valid bits/byte | {titles} | active fraction | MACs/token | "
            "MLP ms/token dense | MLP ms/token sparse | step ms/token dense | "
            "step ms/token sparse |")
  lines = [header, "|---" * (header.count("|") - 1) + "|"]
  for name, row in rows.items():
    seeds = row["bits_per_byte"]["n"] if row.get("bits_per_byte") else 0
    method = (f"{row['estimator']} / {row['eval_policy']}" if row.get("estimator") else "-")
    differences = " | ".join(_cell(row.get(f"minus_{baseline}"), 4, "+")
                             for baseline, _ in BASELINES)
    lines.append(
        f"| {name} | {method} | {row.get('mlp_width') or '-'} | {seeds} | "
        f"{_cell(row.get('bits_per_byte'), 4)} | {_cell(row.get('valid_bits_per_byte'), 4)} | "
        f"{differences} | {_cell(row.get('active_fraction'), 3)} | "
        f"{_cell(row.get('macs_per_token'), 0)} | "
        f"{_cell(row.get('mlp_ms_dense'), 4)} | {_cell(row.get('mlp_ms_sparse'), 4)} | "
        f"{_cell(row.get('decode_ms_dense'), 4)} | {_cell(row.get('decode_ms_sparse'), 4)} |")
  return "\n".join(lines + [""] + list(note_lines)) + "\n"


def command_line() -> str:
  """The command that reproduces this sweep (this process's arguments, shell-quoted)."""
  return " ".join(["python -m experiments.lm_sweep", *map(shlex.quote, sys.argv[1:])])


def main(argv):
  cli.reject_extra_args(argv)
  loop.quiet_library_logs()
  with cli.one_line_errors():
    base = lm.config_from_flags()
    lm.reject_given((lm.SEED, "is one run's seed; the sweep takes --seeds"),
                    (lm.MODEL, "is one run's model; the sweep takes --variants"),
                    (lm.SAMPLE, "samples from one trained run (experiments.lm)"),
                    (lm.PROMPT, "is the prompt of experiments.lm --sample"))
    seeds = [validation.check_int("seeds", s, minimum=0) for s in _SEEDS.value]
    sweep.check_distinct("seeds", seeds)
    variants = [validation.check_choice("variants", v, VARIANTS) for v in _VARIANTS.value]
    sweep.check_distinct("variants", variants)
    capacity_widths = (check_capacity_widths(base, _CAPACITY_WIDTHS.value)
                       if _CAPACITY_WIDTHS.value else ())
    plan = plan_rows(base, variants, capacity_widths)
    configs = {(row.name, seed): variant_config(base, row.variant, seed, row.width)
               for seed in seeds for row in plan}   # every run validated first
    root = os.path.abspath(shared.WORKDIR.value)
    loop.check_workdir(root)
    os.makedirs(root, exist_ok=True)
    results = {row.name: [] for row in plan}
    with lock.WorkdirLock(root):
      for seed in seeds:
        for row in plan:
          # A finished run resumes at its end (re-evaluated); other settings are refused.
          results[row.name].append(lm_train.train_and_evaluate_lm(
              configs[row.name, seed], os.path.join(root, run_directory(base, row, seed)),
              flag_values=shared.experiment_flag_values()))
    rows = summarize(plan, results)
    note_lines = notes(capacity_widths, active_width(base), command_line())
    atomic.write_json(os.path.join(root, "summary.json"), {
        "command": command_line(), "seeds": seeds, "variants": variants,
        "capacity_widths": list(capacity_widths), "statistics": note_lines, "rows": rows,
        "row_order": list(rows)})   # the table's order (the JSON's keys are sorted)
    with atomic.atomic_open(os.path.join(root, "summary.md")) as stream:
      stream.write(markdown(rows, note_lines))
    print(markdown(rows, note_lines))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
