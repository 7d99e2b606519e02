"""Byte-level language modelling (task ``lm``): gated transformers on :mod:`ccjax.text`.

Batches are :func:`ccjax.text.train_batch` windows; validation and the final test report
bits per byte on overlapping windows (every byte once) and the active fraction per
layer; ``results.json`` adds MACs per token, batch-1 decode time per token (dense vs
sparse), the corpus sha256 and, for a dense run, TEAL-style training-free thresholding at
the fraction ``tau`` (``teal_bits_per_byte``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ccjax import layers
from ccjax import lm_config
from ccjax import lm_decode
from ccjax import metrics_log as metrics_log_lib
from ccjax import parallel
from ccjax import regroup
from ccjax import step as step_lib
from ccjax import text
from ccjax import transformer
from ccjax import validation
from ccjax.tasks import base

EVAL_BATCH = 64


def evaluate_lm(eval_fn, params, data: np.ndarray, context: int, *, keep_gates: bool = False,
                stride: int | None = None) -> dict[str, Any]:
  """Bits per byte over every byte of ``data`` after the first, on the overlapping windows
  of :func:`ccjax.text.eval_windows` (``stride`` ``None``: ``context // 2``).

  Returns:
    ``bits_per_byte``, ``active_fraction`` (per gated layer) and, with ``keep_gates``,
    ``mask`` (per layer ``[tokens, blocks]``) and ``tokens [tokens]`` (the input bytes),
    all over the scored positions only (each byte once).
  """
  windows = text.eval_windows(data, context, stride)
  total, count, active, masks = 0.0, 0, [], []
  for start in range(0, windows["x"].shape[0], EVAL_BATCH):
    batch = {key: jnp.asarray(windows[key][start:start + EVAL_BATCH]) for key in ("x", "y")}
    scored = windows["weight"][start:start + EVAL_BATCH].reshape(-1) > 0  # [batch * seq]
    out = jax.device_get(eval_fn(params, batch))
    total += float(np.sum(out["loss"].reshape(-1)[scored]))
    count += int(np.sum(scored))
    if "active_fraction" in out:
      active.append(out["active_fraction"].reshape(out["active_fraction"].shape[0], -1)[:, scored])
      if keep_gates:
        masks.append([m.reshape(-1, m.shape[-1])[scored] for m in out["mask"]])
  result = {"bits_per_byte": total / count / math.log(2),
            "active_fraction": np.concatenate(active, 1).mean(1).tolist() if active else []}
  if keep_gates:
    result["mask"] = [np.concatenate(layer) for layer in zip(*masks)] if masks else []
    result["tokens"] = windows["x"][windows["weight"] > 0]
  return result


class LanguageModelRun:
  """One language-model run (:class:`ccjax.tasks.base.TaskRun`)."""

  def __init__(self, config: lm_config.LMConfig):
    self.config = config
    self.splits = text.load_text(config.dataset, config.context)
    self.module = config.build_model()
    base.check_batch_size(config, len(self.splits.train) - config.context, "windows")
    lm_config.check_batch_fits_memory(config, self.module)
    self.description = (f"lm {config.model} on {config.dataset} ({len(self.splits.train)} "
                        f"train / {len(self.splits.valid)} valid / {len(self.splits.test)} "
                        "test bytes)")
    self.architecture = config.architecture()
    self.data_fingerprint = {"sha256": self.splits.sha256}
    self.total_steps = config.total_steps(len(self.splits.train))
    self.family = "transformer"   # the inference family (kernel backend per family)

  def init_state(self, key) -> step_lib.TrainState:
    sample = text.train_batch(self.splits.train, 1, self.config.context, self.config.seed, 0)
    return step_lib.init_train_state(self.module, self.config.train, key,
                                     jnp.asarray(sample["x"]))

  def make_train_step(self) -> Callable:
    return step_lib.make_train_step(self.module, self.config.train)

  def after_update(self, state: step_lib.TrainState, step: int) -> step_lib.TrainState:
    """At ``config.regroup_step``: the state with every MLP's units regrouped into blocks
    of co-active units (:func:`ccjax.regroup.regroup_transformer_state`, on the tokens of
    :data:`ccjax.regroup.REGROUP_EXAMPLES` // ``context`` training windows drawn for that
    step); else ``state``."""
    if step != self.config.regroup_step:
      return state
    windows = max(1, regroup.REGROUP_EXAMPLES // self.config.context)
    tokens = text.train_batch(self.splits.train, windows, self.config.context,
                              self.config.seed, step)["x"]
    state, _ = regroup.regroup_transformer_state(self.module, state, tokens, self.config.seed)
    logging.info("step %d: MLP units regrouped into blocks of %d co-active units (%d "
                 "training tokens)", step, self.config.block_size, tokens.size)
    return state

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """``{"x", "y": [batch_size, context]}`` byte windows and their next bytes."""
    return text.train_batch(self.splits.train, self.config.batch_size, self.config.context,
                            self.config.seed, step - 1)

  def validate(self, eval_fn: Callable, params, step: int) -> tuple[dict[str, Any], str]:
    del step  # the validation split is the same at every step
    valid = evaluate_lm(eval_fn, parallel.to_host(params), self.splits.valid,
                        self.config.context)
    fields = {"valid_bits_per_byte": valid["bits_per_byte"],
              "valid_active_fraction": valid["active_fraction"]}
    return fields, f"valid bits/byte {valid['bits_per_byte']:.4f}"

  def describe(self, record: dict[str, Any]) -> str:
    record["bits_per_byte"] = record["loss"] / math.log(2)
    return f"bits/byte {record['bits_per_byte']:.4f}"

  def finalize(self, eval_fn: Callable, params, *, workdir: str,
               metrics_log: metrics_log_lib.MetricsLog, total_steps: int,
               primary: bool) -> dict[str, Any]:
    """Test/valid evaluation, TEAL (dense runs), MACs, decode timing and plots."""
    config, model, splits = self.config, self.module, self.splits
    params = jax.device_get(params)
    logging.info("final evaluation on %d test and %d validation bytes", len(splits.test),
                 len(splits.valid))
    test = evaluate_lm(eval_fn, params, splits.test, config.context, keep_gates=True)
    valid = evaluate_lm(eval_fn, params, splits.valid, config.context)
    active = test["active_fraction"] or None
    results = {
        "model": config.model, "dataset": config.dataset, "corpus_sha256": splits.sha256,
        "seed": config.seed, "steps": total_steps, "eval_policy": config.eval_mode(),
        "estimator": config.train.estimator if model.gated else None,
        "bits_per_byte": test["bits_per_byte"],
        "valid_bits_per_byte": valid["bits_per_byte"],
        "active_fraction": test["active_fraction"],
        "macs_per_token": transformer.macs_per_token(model, active),
        "dense_macs_per_token": transformer.macs_per_token(model.clone(gated=False)),
    }
    if not model.gated:
      capacity = config.top_k_capacity()
      teal_fn = jax.jit(step_lib.make_eval_step(model, layers.ACTIVATION_TOP_K, capacity))
      results["teal_capacity"] = capacity
      results["teal_active_fraction"] = capacity / model.num_blocks
      results["teal_bits_per_byte"] = evaluate_lm(teal_fn, params, splits.test,
                                                  config.context)["bits_per_byte"]
    metrics_log.write({"step": total_steps, "kind": "final",
                       "test_bits_per_byte": test["bits_per_byte"],
                       "test_active_fraction": test["active_fraction"]})
    logging.info("final: test bits/byte %.4f  active %s", test["bits_per_byte"],
                 np.round(test["active_fraction"], 3).tolist())
    if config.decode_benchmark:
      logging.info("timing batch-1 decoding, dense vs sparse")
      window = text.eval_windows(splits.test, config.context)["x"][:1]
      results.update(lm_decode.benchmark(model, params, window, active,
                                         **lm_config.decode_policy(config)))
    if primary and config.plots:
      logging.info("writing plots to %s", os.path.join(workdir, "plots"))
      write_lm_plots(os.path.join(workdir, "plots"), test, metrics_log.read())
    return results


def write_lm_plots(plot_dir: str, test: dict[str, Any], records) -> list[str]:
  """Learning curves and, for gated runs, block use by character class of the token."""
  from ccjax import plots  # pylint: disable=g-import-not-at-top
  os.makedirs(plot_dir, exist_ok=True)
  paths = [plots.plot_learning_curves(records, os.path.join(plot_dir, "learning_curves.png"))]
  if test.get("mask"):
    paths.append(plots.plot_class_block_map(
        test["mask"], text.char_classes(test["tokens"]), len(text.CHAR_CLASSES),
        os.path.join(plot_dir, "char_class_block_map.png"),
        title="block use by character class (rows: " + ", ".join(text.CHAR_CLASSES) + ")"))
  return paths


def _active_width(config: lm_config.LMConfig) -> int:
  """MLP units a gated LM of ``config`` runs per token: ``k * block_size``, ``k =
  round(tau * blocks)`` (the same in every layer; the capacity regime's ``w``)."""
  if len(set(config.layer_capacities())) != 1:
    raise validation.ConfigError(
        "capacity_widths", "needs the same active blocks in every layer (one --tau), got "
        f"{list(config.layer_capacities())} blocks per layer")
  return _k_blocks_width(config)


def _k_blocks_width(config: lm_config.LMConfig) -> int:
  """MLP units of the first layer's ``k = round(tau * blocks)`` blocks."""
  return config.top_k_capacity() * config.block_size


def _same_macs_width(config: lm_config.LMConfig, runs) -> int:
  """The dense MLP width of the gated model's active MLP MACs per token: its ``k`` blocks
  (``round(tau * blocks)``, what ``top_k`` and the router run; the first layer's)."""
  del runs  # set by the config: the blocks every token may run
  return _k_blocks_width(config)


def _teal_rows(config: lm_config.LMConfig, runs) -> list:
  """TEAL-style training-free thresholding of the dense runs at the fraction ``tau``."""
  if not runs or "teal_bits_per_byte" not in runs[0]:
    return []
  return [(f"teal (dense, top-{config.top_k_capacity()} activations)", "teal",
           [{"bits_per_byte": run["teal_bits_per_byte"], "seed": run.get("seed"),
             "active_fraction": [run["teal_active_fraction"]]} for run in runs])]


def _per_token(key: str, kind: str) -> Callable[[dict[str, Any]], float | None]:
  return lambda result: result.get(key, {}).get(kind)


SWEEP = base.SweepSpec(
    metric="bits_per_byte", valid_metric="valid_bits_per_byte", metric_title="bits/byte",
    metric_scale=1.0, metric_digits=4, difference_unit="bits/byte", gated_model="gated",
    variants={"gated": {},
              # REINFORCE trained at the test-time budget: exact k-subsets, top_k at test.
              "gated_top_k": {"estimator": "reinforce_top_k", "eval_policy": "top_k"},
              # An MoE-style top-k router over the same blocks (straight-through).
              "router": {"model": "router"}},
    default_variants=("gated", "gated_top_k", "router"),
    columns=(
        base.Column("active_fraction", "active fraction", base.mean_active_fraction, 1, 3),
        base.Column("macs", "MACs / token", lambda r: r.get("macs_per_token", {}).get("total"),
                    1, 0),
        base.Column("mlp_ms_dense", "MLP ms/token dense", _per_token("mlp_ms_per_token", "dense"),
                    1, 4),
        base.Column("mlp_ms_sparse", "MLP ms/token sparse",
                    _per_token("mlp_ms_per_token", "sparse"), 1, 4),
        base.Column("decode_ms_dense", "step ms/token dense",
                    _per_token("decode_ms_per_token", "dense"), 1, 4),
        base.Column("decode_ms_sparse", "step ms/token sparse",
                    _per_token("decode_ms_per_token", "sparse"), 1, 4),
        base.Column("train_time_s", "train time (s)", base.train_time, 1, 1)),
    hidden=lambda config: (config.mlp_width,) * config.num_layers,
    at_width=lambda config, width: config.replace(mlp_width=width),
    active_width=_active_width, same_macs_width=_same_macs_width, derived_rows=_teal_rows)

# Task ``lm``.
TASK = base.RunTask(lm_config.LMConfig, LanguageModelRun, SWEEP)
