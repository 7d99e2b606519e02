"""Classification: gated MLPs and CNNs on a dataset of :mod:`ccjax.data` (task ``classify``).

Batches are :func:`ccjax.data.train_batch_indices` rows of the training split; validation
and the final test report the error rate, the loss and the active fraction per gated
layer; ``results.json`` adds MACs per example, batch-1 latency (dense vs sparse) and the
plots (block probabilities, class x block map, learning curves).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ccjax import config as config_lib
from ccjax import costs
from ccjax import data as data_lib
from ccjax import flops
from ccjax import metrics_log as metrics_log_lib
from ccjax import progress
from ccjax import regroup
from ccjax import run_loop
from ccjax import stats
from ccjax import step as step_lib
from ccjax import validation
from ccjax.inference import api as inference_api
from ccjax.tasks import base
from ccjax.tasks import sources as sources_lib

EVAL_BATCH_SIZE = 512


def evaluate(eval_fn: Callable, params, x: np.ndarray, y: np.ndarray, *, mode: str,
             key: jax.Array, keep_gates: bool = False) -> dict[str, Any]:
  """Runs ``eval_fn`` over ``(x, y)`` in padded batches and aggregates.

  Returns:
    dict with ``error``, ``loss``, ``active_fraction`` (list per gated layer, mean over
    examples) and, with ``keep_gates``, ``probs``/``mask``: lists per layer of
    ``[examples, blocks]`` arrays, and ``prediction [examples]``.
  """
  if x.shape[0] == 0:  # e.g. --valid_fraction=0 on a dataset without a validation split.
    return {"error": None, "loss": None, "active_fraction": []}
  totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  active, probs, masks, predictions = [], [], [], []
  for index, batch in enumerate(data_lib.eval_batches(x, y, EVAL_BATCH_SIZE)):
    weight = batch.pop("weight")
    valid = weight > 0
    if mode == "sample":
      batch["rng"] = jax.random.fold_in(key, index)
    out = jax.device_get(eval_fn(params, batch))
    totals["loss"] += float(np.sum(out["loss"] * weight))
    totals["correct"] += float(np.sum(out["correct"] * weight))
    totals["count"] += float(np.sum(weight))
    predictions.append(out["prediction"][valid])
    if "active_fraction" in out:
      active.append(out["active_fraction"][:, valid])
      if keep_gates:
        probs.append([p[valid] for p in out["probs"]])
        masks.append([m[valid] for m in out["mask"]])
  result = {"error": 1.0 - totals["correct"] / totals["count"],
            "loss": totals["loss"] / totals["count"],
            "active_fraction": (np.concatenate(active, axis=1).mean(axis=1).tolist()
                                if active else [])}
  if keep_gates:
    result["prediction"] = np.concatenate(predictions)
    result["probs"] = [np.concatenate(layer) for layer in zip(*probs)] if probs else []
    result["mask"] = [np.concatenate(layer) for layer in zip(*masks)] if masks else []
  return result


def eval_key(config: config_lib.ExperimentConfig) -> jax.Array:
  """The key of ``sample``-policy evaluations (validation; the final test and valid)."""
  return jax.random.fold_in(run_loop.seed_key(config.seed), 2**31 - 1)


class ClassificationRun:
  """One classifier run (:class:`ccjax.tasks.base.TaskRun`)."""

  def __init__(self, config: config_lib.ExperimentConfig):
    self.config = config
    self.dataset = data_lib.load_dataset(config.dataset, data_dir=config.data_dir,
                                         valid_fraction=config.valid_fraction,
                                         seed=config.seed, num_classes=config.num_classes)
    dataset = self.dataset
    num_train = dataset.x_train.shape[0]
    base.check_batch_size(config, num_train, "examples")
    self.module = config_lib.build_model(config, dataset.input_shape, dataset.num_classes)
    self.sources = sources_lib.load_sources(config, self.module, dataset)
    self.description = (f"{config.model} {config.arch} on {config.dataset} ({num_train} "
                         f"train / {dataset.x_valid.shape[0]} valid / "
                         f"{dataset.x_test.shape[0]} test examples)")
    self.architecture = config.architecture_for(dataset.input_shape, dataset.num_classes)
    self.data_fingerprint = data_lib.fingerprint(dataset)
    self.total_steps = config.total_steps(num_train)
    self.eval_key = eval_key(config)
    self.family = config.arch   # the inference family: mlp | cnn

  def init_state(self, key) -> step_lib.TrainState:
    state = step_lib.init_train_state(self.module, self.config.train, key,
                                      jnp.asarray(self.dataset.x_train[:1]))
    if self.sources.init_run is not None:  # a resumed run restores over it
      state = sources_lib.init_from_run(state, self.sources.init_run, self.config.train)
    return state

  def make_train_step(self) -> Callable:
    return step_lib.make_train_step(self.module, self.config.train,
                                    teacher=sources_lib.teacher_fn(self.sources.teacher_run))

  def after_update(self, state: step_lib.TrainState, step: int) -> step_lib.TrainState:
    """At ``config.regroup_step``: the state with every hidden layer's units regrouped
    into blocks of co-active units (:func:`ccjax.regroup.regroup_mlp_state`, on the first
    :data:`ccjax.regroup.REGROUP_EXAMPLES` training examples); else ``state``."""
    if step != self.config.regroup_step:
      return state
    sample = self.dataset.x_train[:regroup.REGROUP_EXAMPLES]
    state, _ = regroup.regroup_mlp_state(self.module, state, sample, self.config.seed)
    logging.info("step %d: hidden units regrouped into blocks of %d co-active units "
                 "(%d training examples)", step, self.config.block_size, len(sample))
    return state

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """``{"x": [batch_size, *input_shape], "y": [batch_size]}`` training examples."""
    indices = data_lib.train_batch_indices(self.dataset.x_train.shape[0],
                                           self.config.batch_size, self.config.seed, step - 1)
    return {"x": self.dataset.x_train[indices], "y": self.dataset.y_train[indices]}

  def validate(self, eval_fn: Callable, params, step: int) -> tuple[dict[str, Any], str]:
    del step  # the validation split is the same at every step
    valid = evaluate(eval_fn, params, self.dataset.x_valid, self.dataset.y_valid,
                     mode=self.config.eval_policy, key=self.eval_key)
    fields = {"valid_error": valid["error"], "valid_loss": valid["loss"],
              "valid_active_fraction": valid["active_fraction"]}
    return fields, (f"valid error {progress.format_error(valid['error'])}  active "
                    f"{np.round(valid['active_fraction'], 3).tolist()}")

  def describe(self, record: dict[str, Any]) -> str:
    return f"loss {record['loss']:.4f}  error {record['error']:.4f}"

  def finalize(self, eval_fn: Callable, params, *, workdir: str,
               metrics_log: metrics_log_lib.MetricsLog, total_steps: int,
               primary: bool) -> dict[str, Any]:
    """Final evaluation, MAC counts, latency and plots; returns the results payload."""
    config, dataset = self.config, self.dataset
    logging.info("final evaluation on %d test and %d validation examples",
                 dataset.x_test.shape[0], dataset.x_valid.shape[0])
    test = evaluate(eval_fn, params, dataset.x_test, dataset.y_test, mode=config.eval_policy,
                    key=self.eval_key, keep_gates=True)
    valid = evaluate(eval_fn, params, dataset.x_valid, dataset.y_valid,
                     mode=config.eval_policy, key=jax.random.fold_in(self.eval_key, 1))
    metrics_log.write({"step": total_steps, "kind": "final", "valid_error": valid["error"],
                       "test_error": test["error"],
                       "test_active_fraction": test["active_fraction"]})
    logging.info("final: test error %s  valid error %s  active %s",
                 progress.format_error(test["error"]), progress.format_error(valid["error"]),
                 np.round(test["active_fraction"], 3).tolist())
    if config.measure_latency:
      logging.info("measuring batch-1 latency, dense vs sparse (kernel backend %s)",
                   progress.kernel_backend(config.arch))
    results = {
        "model": config.model, "arch": config.arch, "dataset": config.dataset,
        "seed": config.seed, "steps": total_steps, "test_error": test["error"],
        "valid_error": valid["error"], "active_fraction": test["active_fraction"],
        "eval_policy": config.eval_policy, "input_dim": dataset.input_dim,
        "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
    }
    results.update(costs.model_costs(self.module, params, dataset, test,
                                     measure_latency=config.measure_latency,
                                     mode=config.eval_policy, top_k=config.eval_capacity()))
    if primary and config.plots:
      logging.info("writing plots to %s", os.path.join(workdir, "plots"))
      write_plots(os.path.join(workdir, "plots"), test, dataset, metrics_log.read())
    return results


def write_plots(plot_dir: str, test: dict[str, Any], dataset, records) -> list[str]:
  """Activation-probability, class x block and learning-curve figures."""
  from ccjax import plots  # pylint: disable=g-import-not-at-top
  os.makedirs(plot_dir, exist_ok=True)
  paths = [plots.plot_learning_curves(records, os.path.join(plot_dir, "learning_curves.png"))]
  if test.get("probs"):
    paths.append(plots.plot_block_probabilities(
        test["probs"], os.path.join(plot_dir, "block_probabilities.png"),
        labels=dataset.y_test))
    paths.append(plots.plot_class_block_map(
        test["mask"], dataset.y_test, dataset.num_classes,
        os.path.join(plot_dir, "class_block_map.png")))
  return paths


def _same_macs_width(config: config_lib.ExperimentConfig, runs) -> int:
  """The dense width whose MACs per example are closest to the gated runs' mean measured
  MACs (policies included); a multiple of the block size. MLP: every hidden layer that
  wide; CNN: every stage that many channels (:func:`_at_width`)."""
  target = stats.mean_std([run["macs_per_example"] for run in runs]).mean
  if config.arch == "mlp":
    return flops.matched_dense_width(runs[0]["input_dim"], len(config.hidden),
                                     runs[0]["num_classes"], target, config.block_size)
  input_shape = tuple(runs[0]["input_shape"])
  dense = config.replace(model="dense")

  def dense_macs(width: int) -> int:
    module = config_lib.build_model(_at_width(dense, width), input_shape,
                                    runs[0]["num_classes"])
    return inference_api.dense_macs_per_example(module, input_shape)

  # Dense MACs grow with the width: stop at the first width past the target.
  width = config.block_size
  while dense_macs(width) < target:
    width += config.block_size
  if width > config.block_size and (target - dense_macs(width - config.block_size)
                                    <= dense_macs(width) - target):
    width -= config.block_size
  return width


def _at_width(config: config_lib.ExperimentConfig, width: int) -> config_lib.ExperimentConfig:
  """``config`` with every hidden layer ``width`` wide. A dense net has no blocks: its
  ``block_size`` becomes one that divides ``width`` (a same-MACs width is a multiple of
  the gated net's block size, which may be smaller than the base's)."""
  block_size = config.block_size
  if config.model == "dense" and width % block_size:
    block_size = math.gcd(width, block_size)
  return config.replace(hidden=(width,) * len(config.hidden), block_size=block_size)


def _active_width(config: config_lib.ExperimentConfig) -> int:
  """The capacity regime's ``w``: the one ``hidden`` width of an MLP."""
  if config.arch != "mlp":
    raise validation.ConfigError("capacity_widths", f"needs --arch=mlp, got {config.arch}")
  if len(set(config.hidden)) != 1:
    raise validation.ConfigError(
        "capacity_widths", f"needs one --hidden width for every layer (the dense width w "
        f"whose MACs the condnets match), got {','.join(map(str, config.hidden))}")
  return config.hidden[0]


def _latency(result: dict[str, Any]) -> float | None:
  """The batch-1 latency: sparse for a gated run, dense for a dense one."""
  latency = result.get("latency_ms")
  if not latency:
    return None
  return latency.get("sparse", latency.get("dense"))


SWEEP = base.SweepSpec(
    metric="test_error", valid_metric="valid_error", metric_title="error (%)",
    metric_scale=100.0, metric_digits=2, difference_unit="points", gated_model="condnet",
    variants={"condnet": {}}, default_variants=("condnet",),
    columns=(
        base.Column("active_fraction", "active fraction", base.mean_active_fraction, 1, 3),
        base.Column("macs", "MACs / example (k)", lambda r: r["macs_per_example"], 1e-3, 1),
        base.Column("latency_ms", "batch-1 latency (ms)", _latency, 1, 3),
        base.Column("train_time_s", "train time (s)", base.train_time, 1, 1)),
    hidden=lambda config: tuple(config.hidden),
    at_width=_at_width,
    active_width=_active_width, same_macs_width=_same_macs_width)

# Task ``classify``.
TASK = base.RunTask(config_lib.ExperimentConfig, ClassificationRun, SWEEP)
