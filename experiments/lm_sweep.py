r"""Gated LM against its baselines over seeds, in one table (mean +- std).

  python -m experiments.lm_sweep --workdir=runs/lm_sweep --seeds=0,1,2

Variants per seed (each a run of :func:`ccjax.lm_train.train_and_evaluate_lm`; an
existing run is resumed, a finished one re-evaluated at its end, and one trained with
other settings or on another corpus is refused, as in ``experiments.sweep``):

* ``gated``: per-token gated MLPs at ``--tau``;
* ``dense``: the dense model of the same width; its run also evaluates TEAL-style
  training-free thresholding at the fraction ``--tau`` (``teal`` row);
* ``dense_same_macs``: a dense model whose MLP width is ``tau * --mlp_width`` (the gated
  model's active MLP MACs);
* ``router``: the same gated MLPs with an MoE-style top-k router (``round(tau * blocks)``
  blocks per token, straight-through; :data:`ccjax.lm_train.LM_MODELS`).

``--variants`` picks a subset. Every variant gets the same flags (recipe flags act on the
gated and router models only).

Writes ``summary.json`` and ``summary.md`` into ``--workdir`` (locked for the sweep). Bad
flags (a bad or repeated seed or variant included) exit with status 2 and a one-line
message before anything is written.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app
from absl import flags
import numpy as np

from ccjax import atomic
from ccjax import lm_train
from ccjax import lock
from ccjax import loop
from ccjax import sweep
from ccjax import validation
from experiments import cli
from experiments import flags as shared
from experiments import lm

_SEEDS = shared.define_number_list("seeds", (0, 1, 2), "Seeds of every variant.", int)
VARIANTS = ("gated", "dense", "dense_same_macs", "router")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS),
                              f"Variants to run, a subset of {','.join(VARIANTS)}.")


def variant_config(base: lm_train.LMConfig, variant: str, seed: int) -> lm_train.LMConfig:
  """The run configuration of one (variant, seed)."""
  if variant == "gated":
    return dataclasses.replace(base, model="gated", seed=seed)
  if variant in ("dense", "router"):
    return dataclasses.replace(base, model=variant, seed=seed)
  tau = base.train.taus(base.num_layers)[0]
  width = max(base.block_size, round(tau * base.mlp_width / base.block_size) * base.block_size)
  return dataclasses.replace(base, model="dense", mlp_width=width, seed=seed)


def _mean_std(values) -> dict[str, float] | None:
  values = [v for v in values if v is not None]
  if not values:
    return None
  return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
  """Per row (variant, plus ``teal``): mean/std over seeds of the reported numbers."""
  rows = {}
  for variant, runs_of_variant in results.items():
    rows[variant] = {
        "bits_per_byte": _mean_std([r["bits_per_byte"] for r in runs_of_variant]),
        "valid_bits_per_byte": _mean_std([r.get("valid_bits_per_byte")
                                          for r in runs_of_variant]),
        "active_fraction": _mean_std([float(np.mean(r["active_fraction"]))
                                      if r["active_fraction"] else None
                                      for r in runs_of_variant]),
        "macs_per_token": _mean_std([r["macs_per_token"]["total"] for r in runs_of_variant]),
        "mlp_ms_dense": _mean_std([r.get("mlp_ms_per_token", {}).get("dense")
                                   for r in runs_of_variant]),
        "mlp_ms_sparse": _mean_std([r.get("mlp_ms_per_token", {}).get("sparse")
                                    for r in runs_of_variant]),
        "decode_ms_dense": _mean_std([r.get("decode_ms_per_token", {}).get("dense")
                                      for r in runs_of_variant]),
        "decode_ms_sparse": _mean_std([r.get("decode_ms_per_token", {}).get("sparse")
                                       for r in runs_of_variant]),
    }
    if variant == "dense":
      rows["teal"] = {"bits_per_byte": _mean_std([r["teal_bits_per_byte"]
                                                  for r in runs_of_variant]),
                      "active_fraction": _mean_std([r["teal_active_fraction"]
                                                    for r in runs_of_variant])}
  return rows


def markdown(rows: dict[str, dict]) -> str:
  def cell(stat, digits):
    return "-" if not stat else f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
  lines = ["| variant | seeds | test bits/byte | valid bits/byte | active fraction | "
           "MACs/token | MLP ms/token dense | MLP ms/token sparse | step ms/token dense | "
           "step ms/token sparse |", "|---|---|---|---|---|---|---|---|---|---|"]
  for name, row in rows.items():
    seeds = row["bits_per_byte"]["n"] if row.get("bits_per_byte") else 0
    lines.append(f"| {name} | {seeds} | {cell(row.get('bits_per_byte'), 4)} | "
                 f"{cell(row.get('valid_bits_per_byte'), 4)} | "
                 f"{cell(row.get('active_fraction'), 3)} | {cell(row.get('macs_per_token'), 0)} | "
                 f"{cell(row.get('mlp_ms_dense'), 4)} | {cell(row.get('mlp_ms_sparse'), 4)} | "
                 f"{cell(row.get('decode_ms_dense'), 4)} | {cell(row.get('decode_ms_sparse'), 4)} |")
  return "\n".join(lines) + "\n"


def main(argv):
  cli.reject_extra_args(argv)
  loop.quiet_library_logs()
  with cli.one_line_errors():
    base = lm.config_from_flags()
    seeds = [validation.check_int("seeds", s, minimum=0) for s in _SEEDS.value]
    sweep.check_distinct("seeds", seeds)
    variants = [validation.check_choice("variants", v, VARIANTS) for v in _VARIANTS.value]
    sweep.check_distinct("variants", variants)
    configs = {(variant, seed): variant_config(base, variant, seed)
               for seed in seeds for variant in variants}   # every run validated first
    root = os.path.abspath(shared.WORKDIR.value)
    loop.check_workdir(root)
    os.makedirs(root, exist_ok=True)
    results = {variant: [] for variant in variants}
    with lock.WorkdirLock(root):
      for seed in seeds:
        for variant in variants:
          # A finished run resumes at its end (re-evaluated); other settings are refused.
          results[variant].append(lm_train.train_and_evaluate_lm(
              configs[variant, seed], os.path.join(root, f"{variant}_seed{seed}"),
              flag_values=shared.experiment_flag_values()))
    rows = summarize(results)
    atomic.write_json(os.path.join(root, "summary.json"), {"rows": rows, "seeds": seeds})
    with atomic.atomic_open(os.path.join(root, "summary.md")) as stream:
      stream.write(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
