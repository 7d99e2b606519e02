"""``train_and_evaluate_lm(config, workdir)``: byte-level language modelling runs.

The loop of :mod:`ccjax.loop` for token models: the same train step
(:func:`ccjax.make_train_step` with per-token losses), checkpoints
(:class:`ccjax.checkpoint.Checkpointer`, the whole train state), ``metrics.jsonl``
(:class:`ccjax.loop.MetricsLog`) and exact resume (batches and mask keys are pure
functions of seed and step). Writes ``metrics.jsonl``, ``checkpoints/``, ``plots/`` and
``results.json``: test bits per byte, active fraction per layer, MACs per token, batch-1
decode time per token (dense vs sparse), the corpus sha256, flags and seed. A dense run
also reports TEAL-style training-free thresholding at the fraction ``tau``
(``teal_bits_per_byte``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ccjax import atomic
from ccjax import checkpoint as checkpoint_lib
from ccjax import layers
from ccjax import lm_decode
from ccjax import loop
from ccjax import runs
from ccjax import step as step_lib
from ccjax import text
from ccjax import transformer
from ccjax import validation

LM_MODELS = ("gated", "dense")
EVAL_BATCH = 64
_ARCH_FIELDS = ("model", "num_layers", "d_model", "num_heads", "mlp_width", "block_size",
                "context")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """One language-modelling run, validated at construction.

  Attributes:
    dataset: ``grammar`` (generated, fixed) or ``text:PATH``.
    model: ``gated`` (per-token gated MLPs) or ``dense`` (``gated=False``).
    num_layers, d_model, num_heads, mlp_width, block_size, context: the transformer.
    batch_size: windows per step.
    steps: training steps.
    eval_every, log_every, checkpoint_every: intervals in steps.
    seed: parameters, batches and masks.
    policy_init_prob: initial block probability.
    plots: write ``plots/*.png``.
    decode_benchmark: time batch-1 decoding at the end.
    train: the train step's hyperparameters (``tau`` is also the TEAL fraction of a
      dense run).
  """
  dataset: str = text.DEFAULT_CORPUS
  model: str = "gated"
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  mlp_width: int = 512
  block_size: int = 32
  context: int = 64
  batch_size: int = 32
  steps: int = 400
  eval_every: int = 200
  log_every: int = 100
  checkpoint_every: int = 200
  seed: int = 0
  policy_init_prob: float = 0.5
  plots: bool = True
  decode_benchmark: bool = True
  train: step_lib.TrainConfig = dataclasses.field(
      default_factory=lambda: step_lib.TrainConfig(reinforce_cost="position"))

  def __post_init__(self):
    validation.check_choice("model", self.model, LM_MODELS)
    for name in ("num_layers", "d_model", "num_heads", "mlp_width", "block_size", "context",
                 "batch_size", "steps", "eval_every", "log_every", "checkpoint_every"):
      validation.check_int(name, getattr(self, name))
    validation.check_int("seed", self.seed, minimum=0)
    validation.check_float("policy_init_prob", self.policy_init_prob, low=0.0, high=1.0,
                           low_open=True, high_open=True)
    if self.d_model % self.num_heads:
      raise validation.ConfigError("num_heads", f"={self.num_heads} must divide "
                                   f"--d_model={self.d_model}")
    if self.mlp_width % self.block_size:
      raise validation.ConfigError("block_size", f"={self.block_size} must divide "
                                   f"--mlp_width={self.mlp_width}")
    self.train.taus(self.num_layers)

  def build_model(self) -> transformer.GatedTransformer:
    return transformer.GatedTransformer(
        vocab_size=256, max_len=self.context, num_layers=self.num_layers,
        d_model=self.d_model, num_heads=self.num_heads, mlp_width=self.mlp_width,
        block_size=self.block_size, gated=self.model == "gated",
        estimator=self.train.estimator, policy_init_prob=self.policy_init_prob)

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def architecture(self) -> dict[str, Any]:
    """What a checkpoint must match to be resumed."""
    return {name: getattr(self, name) for name in _ARCH_FIELDS}


def evaluate_lm(eval_fn, params, data: np.ndarray, context: int, *, keep_gates: bool = False
                ) -> dict[str, Any]:
  """Bits per byte over non-overlapping windows of ``data``.

  Returns:
    ``bits_per_byte``, ``active_fraction`` (per gated layer) and, with ``keep_gates``,
    ``mask`` (per layer ``[tokens, blocks]``) and ``tokens [tokens]`` (the input bytes).
  """
  windows = text.eval_windows(data, context)
  total, count, active, masks = 0.0, 0, [], []
  for start in range(0, windows["x"].shape[0], EVAL_BATCH):
    batch = {key: jnp.asarray(value[start:start + EVAL_BATCH]) for key, value in windows.items()}
    out = jax.device_get(eval_fn(params, batch))
    total += float(np.sum(out["loss"]))
    count += out["loss"].size
    if "active_fraction" in out:
      active.append(out["active_fraction"].reshape(out["active_fraction"].shape[0], -1))
      if keep_gates:
        masks.append([m.reshape(-1, m.shape[-1]) for m in out["mask"]])
  result = {"bits_per_byte": total / count / math.log(2),
            "active_fraction": np.concatenate(active, 1).mean(1).tolist() if active else []}
  if keep_gates:
    result["mask"] = [np.concatenate(layer) for layer in zip(*masks)] if masks else []
    result["tokens"] = windows["x"].reshape(-1)
  return result


def _check_resume(checkpointer: checkpoint_lib.Checkpointer, meta: dict[str, Any]) -> None:
  saved = checkpointer.read_meta()
  for key in ("architecture", "sha256"):
    if saved.get(key) != meta[key]:
      raise ValueError(f"the checkpoint in {checkpointer.directory} was written for "
                       f"{key}={saved.get(key)!r}, this run has {meta[key]!r}; use a fresh "
                       "--workdir or the original flags")


def train_and_evaluate_lm(config: LMConfig, workdir: str,
                          flag_values: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains (or resumes) one LM run and writes its outputs into ``workdir``.

  Raises:
    ValueError: bad data or an incompatible workdir (nothing written).
    loop.NonFiniteError: NaN/Inf loss or gradient without ``skip_nonfinite``.
  """
  start_time = time.time()
  loop.quiet_library_logs()
  loop.check_workdir(workdir)
  splits = text.load_text(config.dataset, config.context)
  model = config.build_model()
  workdir = os.path.abspath(workdir)
  checkpoint_dir = os.path.join(workdir, runs.CHECKPOINT_DIR)
  meta = {"architecture": config.architecture(), "sha256": splits.sha256,
          "config": config.as_dict(), "kind": "lm"}
  checkpointer = None
  if os.path.isdir(checkpoint_dir):
    checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir)
    if checkpointer.latest_step() is not None:
      _check_resume(checkpointer, meta)

  # Everything is validated: from here on the run writes to the workdir.
  os.makedirs(workdir, exist_ok=True)
  if checkpointer is None:
    checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir)
  metrics_log = loop.MetricsLog(os.path.join(workdir, loop.METRICS_FILE))
  sample = text.train_batch(splits.train, 1, config.context, config.seed, 0)
  state = step_lib.init_train_state(model, config.train, jax.random.PRNGKey(config.seed),
                                    jnp.asarray(sample["x"]))
  start_step = 0
  if checkpointer.latest_step() is not None:
    start_step = int(checkpointer.latest_step())
    state = checkpointer.restore(state)
    logging.info("Resumed from checkpoint step %d in %s", start_step, checkpoint_dir)
  metrics_log.truncate_after(start_step)

  train_step = jax.jit(step_lib.make_train_step(model, config.train), donate_argnums=0)
  eval_fn = jax.jit(step_lib.make_eval_step(model, "threshold"))
  window_start, window_steps = time.time(), 0
  for step in range(start_step + 1, config.steps + 1):
    batch = text.train_batch(splits.train, config.batch_size, config.context, config.seed,
                             step - 1)
    state, metrics = train_step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    window_steps += 1
    log_now = step % config.log_every == 0 or step in (1, config.steps)
    eval_now = step % config.eval_every == 0 and step != config.steps
    save_now = step % config.checkpoint_every == 0 or step == config.steps
    if (log_now or save_now) and not config.train.skip_nonfinite:
      if not bool(metrics["finite"]):
        raise loop.NonFiniteError(f"non-finite loss or gradient at step {step}; training "
                                  "stopped (the last checkpoint is left intact)")
    if log_now:
      steps_per_s = window_steps / max(time.time() - window_start, 1e-9)
      record = {"step": step, "kind": "train", "steps_per_s": steps_per_s}
      record.update({key: loop._to_python(value)  # pylint: disable=protected-access
                     for key, value in jax.device_get(metrics).items()})
      record["bits_per_byte"] = record["loss"] / math.log(2)
      metrics_log.write(record)
      logging.info("step %d/%d  bits/byte %.4f  active %s  %.1f steps/s", step, config.steps,
                   record["bits_per_byte"], np.round(record.get("active_fraction", []), 3).tolist(),
                   steps_per_s)
      window_start, window_steps = time.time(), 0
    if eval_now:
      valid = evaluate_lm(eval_fn, state.params, splits.valid, config.context)
      metrics_log.write({"step": step, "kind": "eval",
                         "valid_bits_per_byte": valid["bits_per_byte"],
                         "valid_active_fraction": valid["active_fraction"]})
    if save_now:
      checkpointer.save(step, state, meta)
  checkpointer.close()

  results = finalize_lm(config, model, state.params, splits, workdir, eval_fn, metrics_log,
                        flag_values)
  results["wall_time_s"] = time.time() - start_time
  atomic.write_json(os.path.join(workdir, runs.RESULTS_FILE), results)
  return results


def teal_capacity(config: LMConfig) -> int:
  """Blocks per token kept by TEAL-style thresholding: ``round(tau * blocks)``, >= 1."""
  blocks = config.mlp_width // config.block_size
  return max(1, round(config.train.taus(config.num_layers)[0] * blocks))


def finalize_lm(config: LMConfig, model: transformer.GatedTransformer, params, splits,
                workdir: str, eval_fn, metrics_log: loop.MetricsLog,
                flag_values: dict[str, Any] | None) -> dict[str, Any]:
  """Test/valid evaluation, TEAL (dense runs), MACs, decode timing and plots."""
  params = jax.device_get(params)
  test = evaluate_lm(eval_fn, params, splits.test, config.context, keep_gates=True)
  valid = evaluate_lm(eval_fn, params, splits.valid, config.context)
  active = test["active_fraction"] or None
  results = {
      "model": config.model, "dataset": config.dataset, "corpus_sha256": splits.sha256,
      "seed": config.seed, "steps": config.steps, "bits_per_byte": test["bits_per_byte"],
      "valid_bits_per_byte": valid["bits_per_byte"],
      "active_fraction": test["active_fraction"],
      "macs_per_token": transformer.macs_per_token(model, active),
      "dense_macs_per_token": transformer.macs_per_token(model.clone(gated=False)),
      "flags": dict(flag_values) if flag_values is not None else config.as_dict(),
  }
  if not model.gated:
    capacity = teal_capacity(config)
    teal_fn = jax.jit(step_lib.make_eval_step(model, layers.ACTIVATION_TOP_K, capacity))
    results["teal_capacity"] = capacity
    results["teal_active_fraction"] = capacity / model.num_blocks
    results["teal_bits_per_byte"] = evaluate_lm(teal_fn, params, splits.test,
                                                config.context)["bits_per_byte"]
  metrics_log.write({"step": config.steps, "kind": "final",
                     "test_bits_per_byte": test["bits_per_byte"],
                     "test_active_fraction": test["active_fraction"]})
  logging.info("final: test bits/byte %.4f  active %s", test["bits_per_byte"],
               np.round(test["active_fraction"], 3).tolist())
  if config.decode_benchmark:
    window = text.eval_windows(splits.test, config.context)["x"][:1]
    results.update(lm_decode.benchmark(model, params, window, active))
  if config.plots:
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


def load_params(config: LMConfig, workdir: str):
  """The parameters of the latest checkpoint of the LM run in ``workdir``.

  Raises:
    ValueError: no checkpoint there, or one written for another architecture.
  """
  checkpoint_dir = os.path.join(os.path.abspath(workdir), runs.CHECKPOINT_DIR)
  if not os.path.isdir(checkpoint_dir):
    raise ValueError(f"--workdir {workdir!r} holds no checkpoints/ (train a run there first)")
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir)
  if checkpointer.latest_step() is None:
    raise ValueError(f"--workdir {workdir!r} holds no complete checkpoint")
  saved = checkpointer.read_meta()
  if saved.get("architecture") != config.architecture():
    raise ValueError(f"the run in {workdir} has architecture {saved.get('architecture')}; "
                     "pass the flags it was trained with")
  state = checkpointer.restore_raw()
  checkpointer.close()
  return state["params"]
