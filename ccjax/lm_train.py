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

import contextlib
import dataclasses
import functools
import json
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
from ccjax import lock as lock_lib
from ccjax import lm_decode
from ccjax import loop
from ccjax import memory
from ccjax import parallel
from ccjax import policy as policy_lib
from ccjax import runs
from ccjax import step as step_lib
from ccjax import text
from ccjax import transformer
from ccjax import validation

# gated: per-token policies trained by REINFORCE (or --estimator); dense: no gates;
# router: MoE-style top-k router over the same blocks (estimator 'router').
LM_MODELS = ("gated", "dense", "router")
# Test-time policies of gated LMs (default: threshold for gated, top_k for router).
LM_EVAL_POLICIES = ("threshold", "top_k", "capped")
EVAL_BATCH = 64
_ARCH_FIELDS = ("model", "num_layers", "d_model", "num_heads", "mlp_width", "block_size",
                "context")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """One language-modelling run, validated at construction.

  Attributes:
    dataset: ``grammar`` (generated, fixed) or ``text:PATH``.
    model: ``gated`` (per-token gated MLPs, policies trained with ``train.estimator``),
      ``dense`` (``gated=False``) or ``router`` (the same gated MLPs with an MoE-style
      top-k router: ``train.estimator`` is set to ``router``).
    num_layers, d_model, num_heads, mlp_width, block_size, context: the transformer.
    batch_size: windows per step.
    steps: training steps.
    eval_every, log_every, checkpoint_every: intervals in steps.
    seed: parameters, batches and masks.
    policy_init_prob: initial block probability.
    plots: write ``plots/*.png``.
    decode_benchmark: time batch-1 decoding at the end.
    eval_policy: test-time masks ``threshold`` | ``top_k`` (exactly ``round(tau *
      blocks)`` per token) | ``capped``; ``None``: ``top_k`` for ``router``, else
      ``threshold``.
    num_devices: devices the batch is split over (``None``: all).
    allow_data_change: resume even if the corpus differs from the one the checkpoint was
      trained on.
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
  steps: int = 1000
  eval_every: int = 250
  log_every: int = 100
  checkpoint_every: int = 250
  seed: int = 0
  policy_init_prob: float = 0.5
  plots: bool = True
  decode_benchmark: bool = True
  eval_policy: str | None = None
  num_devices: int | None = None
  allow_data_change: bool = False
  # lambda_s = 4 (not the classifiers' 2): chosen on validation, the smallest weight that
  # keeps every layer of every seed within 0.03 of tau (docs/lm.md).
  train: step_lib.TrainConfig = dataclasses.field(
      default_factory=lambda: step_lib.TrainConfig(reinforce_cost="position", lambda_s=4.0))

  def __post_init__(self):
    validation.check_choice("model", self.model, LM_MODELS)
    if self.model == "router" and self.train.estimator != "router":
      object.__setattr__(self, "train", dataclasses.replace(self.train, estimator="router"))
    if self.model == "gated" and self.train.estimator == "router":
      raise validation.ConfigError("estimator", "=router is --model=router; --model=gated "
                                   "takes reinforce|straight_through|gumbel")
    if self.eval_policy is not None:
      validation.check_choice("eval_policy", self.eval_policy, LM_EVAL_POLICIES)
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
        block_size=self.block_size, gated=self.model != "dense",
        estimator=self.train.estimator, policy_init_prob=self.policy_init_prob)

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def layer_capacities(self) -> tuple[int, ...]:
    """Blocks per token and layer of the ``top_k`` / ``capped`` policies (and of the router
    in training): ``round(tau * blocks)``, >= 1."""
    blocks = self.mlp_width // self.block_size
    return tuple(policy_lib.top_k_capacity(tau, blocks)
                 for tau in self.train.taus(self.num_layers))

  def top_k_capacity(self) -> int:
    """The first layer's :meth:`layer_capacities` (TEAL-style thresholding's budget)."""
    return self.layer_capacities()[0]

  def eval_mode(self) -> str:
    """The test-time policy: ``eval_policy``, or by default ``top_k`` for ``router`` and
    ``threshold`` otherwise."""
    if self.eval_policy is not None:
      return self.eval_policy
    return "top_k" if self.model == "router" else "threshold"

  def eval_capacity(self) -> tuple[int, ...] | None:
    """Per-layer capacity of the test-time policy (``None`` for ``threshold``)."""
    return None if self.eval_mode() == "threshold" else self.layer_capacities()

  def architecture(self) -> dict[str, Any]:
    """What a checkpoint must match to be resumed."""
    return {name: getattr(self, name) for name in _ARCH_FIELDS}


def train_step_bytes(config: LMConfig, model: transformer.GatedTransformer) -> int:
  """About how many bytes one training step of ``config`` needs (float32).

  The train state (parameters, gradients and two Adam moments: 16 bytes per parameter)
  plus the activations kept for the backward pass, per token of the batch
  (``batch_size * context`` tokens): per layer about 16 ``d_model``-wide and 6
  ``mlp_width``-wide rows and 3 attention rows of ``context`` scores per head, and the
  logits and their gradients (3 ``vocab``-wide rows).
  """
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0), "gate": jax.random.PRNGKey(0)},
      jnp.zeros((1, config.context), jnp.int32), mode="all"))
  num_params = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))
  per_token = (config.num_layers * (16 * config.d_model + 6 * config.mlp_width
                                    + 3 * config.num_heads * config.context)
               + 3 * model.vocab_size)
  return 16 * num_params + 4 * config.batch_size * config.context * per_token


def check_batch_fits(config: LMConfig, model: transformer.GatedTransformer,
                     train_bytes: int) -> None:
  """Raises ``ConfigError`` (``batch_size``) if the batch holds more windows than the
  training split of ``train_bytes`` bytes, or a step needs more memory than is free."""
  windows = train_bytes - config.context
  if config.batch_size > windows:
    raise validation.ConfigError(
        "batch_size", f"={config.batch_size} is more than the {windows} training windows of "
        f"--dataset={config.dataset} (--context={config.context}); use at most {windows}")
  needed = train_step_bytes(config, model)
  available, where = memory.available_bytes()
  if needed > available:
    raise validation.ConfigError(
        "batch_size", f"={config.batch_size} needs about {needed / 2**30:.1f} GiB per "
        f"training step (--context={config.context}, --d_model={config.d_model}, "
        f"--mlp_width={config.mlp_width}, --num_layers={config.num_layers}), more than the "
        f"{available / 2**30:.1f} GiB free on the {where}; use a smaller --batch_size")


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


# Settings a resumed run may change: length, cadence, outputs, devices, test policy.
_RESUMABLE_FIELDS = ("steps", "eval_every", "log_every", "checkpoint_every", "plots",
                     "decode_benchmark", "num_devices", "eval_policy", "allow_data_change")


def _training_settings(config_dict: dict[str, Any]) -> dict[str, Any]:
  """The fields of ``LMConfig.as_dict()`` a resume must keep, flat and JSON-normalised."""
  flat = {}
  for key, value in json.loads(json.dumps(config_dict)).items():
    if key == "train":
      flat.update({f"train.{name}": item for name, item in value.items()})
    elif key not in _RESUMABLE_FIELDS:
      flat[key] = value
  return flat


def _check_resume(meta: dict[str, Any], saved: dict[str, Any]) -> None:
  """Raises ``ValueError`` unless the checkpoint metadata ``saved`` belongs to this run
  (same architecture, corpus and training settings; steps and cadence may change)."""
  if saved.get("architecture") != meta["architecture"]:
    raise ValueError(f"the checkpoint was written for architecture="
                     f"{saved.get('architecture')!r}, this run has {meta['architecture']!r}; "
                     "use a fresh --workdir or the original flags")
  if saved.get("sha256") != meta["sha256"] and not meta["config"].get("allow_data_change"):
    raise ValueError(f"--dataset {meta['config']['dataset']} holds a different corpus than the "
                     f"checkpoint in --workdir was trained on (sha256 {saved.get('sha256')}, "
                     f"now {meta['sha256']}); pass --allow_data_change to resume on it "
                     "anyway, or use a fresh --workdir")
  before, now = _training_settings(saved.get("config", {})), _training_settings(meta["config"])
  changed = sorted(key for key in set(before) | set(now) if before.get(key) != now.get(key))
  if changed:
    described = ", ".join(f"{key.split('.')[-1]}={before.get(key)!r} -> {now.get(key)!r}"
                          for key in changed)
    raise ValueError(f"the checkpoint was trained with other settings ({described}); only "
                     f"{', '.join(_RESUMABLE_FIELDS)} may change on resume: use a fresh "
                     "--workdir or the original flags")


def train_and_evaluate_lm(config: LMConfig, workdir: str,
                          flag_values: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains (or resumes) one LM run and writes its outputs into ``workdir``.

  The loop is :func:`ccjax.loop.run_train_steps`, shared with the classifiers: workdir
  lock, checksummed checkpoints with fallback to the newest intact one, finite checks
  before every save, ``--skip_nonfinite``, Ctrl-C, and data parallelism over
  ``config.num_devices`` devices.

  Raises:
    ValueError: bad data, an incompatible, damaged or busy workdir (nothing written).
    loop.NonFiniteError: NaN/Inf loss or gradient without ``skip_nonfinite``.
    loop.Interrupted: Ctrl-C (the last checkpoint is intact).
  """
  start_time = time.time()
  loop.quiet_library_logs()
  loop.check_workdir(workdir)
  splits = text.load_text(config.dataset, config.context)
  model = config.build_model()
  check_batch_fits(config, model, len(splits.train))
  mesh = parallel.make_mesh(config.num_devices)
  if config.batch_size % mesh.size:
    raise validation.ConfigError("batch_size", f"={config.batch_size} must be a multiple of "
                                 f"the number of devices ({mesh.size}); see --num_devices")
  workdir = os.path.abspath(workdir)
  checkpoint_dir = os.path.join(workdir, runs.CHECKPOINT_DIR)
  loop.check_checkpoint_dir(checkpoint_dir)
  # Everything the flags and data decide is valid: from here on the run owns the workdir.
  os.makedirs(workdir, exist_ok=True)
  primary = parallel.is_primary_process()
  with (lock_lib.WorkdirLock(workdir) if primary else contextlib.nullcontext()):
    metrics_log = loop.MetricsLog(os.path.join(workdir, loop.METRICS_FILE), enabled=primary)
    # One compiled evaluation for validation during training and the final test.
    eval_fn = jax.jit(step_lib.make_eval_step(model, config.eval_mode(), config.eval_capacity()))
    state = _train_lm_locked(config, model, splits, mesh, workdir, primary, metrics_log,
                             eval_fn)
    results = finalize_lm(config, model, parallel.to_host(state.params), splits, workdir,
                          eval_fn, metrics_log, flag_values)
    results["wall_time_s"] = time.time() - start_time
    if primary:
      atomic.write_json(os.path.join(workdir, runs.RESULTS_FILE), results)
  return results


def _train_lm_locked(config: LMConfig, model: transformer.GatedTransformer, splits, mesh,
                     workdir: str, primary: bool, metrics_log: loop.MetricsLog,
                     eval_fn) -> step_lib.TrainState:
  """Resumes or starts the run in the locked ``workdir``; returns the final train state."""
  meta = {"architecture": config.architecture(), "sha256": splits.sha256,
          "config": config.as_dict(), "kind": "lm"}
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, runs.CHECKPOINT_DIR))
  try:
    resume = loop.find_resume_point(checkpointer, functools.partial(_check_resume, meta))
    sample = text.train_batch(splits.train, 1, config.context, config.seed, 0)
    state = step_lib.init_train_state(model, config.train, loop.seed_key(config.seed),
                                      jnp.asarray(sample["x"]))
    state = parallel.place_state(state, mesh)
    state, start_step = loop.restore_resume_point(checkpointer, resume, state, primary)
    metrics_log.truncate_after(start_step)
    train_step = parallel.make_parallel_train_step(
        step_lib.make_train_step(model, config.train), mesh,
        parallel.state_sharding(state, mesh))

    def batch(step):
      return text.train_batch(splits.train, config.batch_size, config.context, config.seed,
                              step - 1)

    def validate(params, step):
      valid = evaluate_lm(eval_fn, parallel.to_host(params), splits.valid, config.context)
      metrics_log.write({"step": step, "kind": "eval",
                         "valid_bits_per_byte": valid["bits_per_byte"],
                         "valid_active_fraction": valid["active_fraction"]})
      logging.info("step %d  valid bits/byte %.4f", step, valid["bits_per_byte"])

    def describe(record):
      record["bits_per_byte"] = record["loss"] / math.log(2)
      return f"bits/byte {record['bits_per_byte']:.4f}"

    intervals = loop.Intervals(config.log_every, config.eval_every, config.checkpoint_every,
                               config.train.skip_nonfinite)
    state = loop.run_train_steps(
        train_step, state, loop.StepHooks(batch, validate, describe), intervals, mesh=mesh,
        checkpointer=checkpointer, metrics_log=metrics_log, meta=meta, start_step=start_step,
        total_steps=config.steps, skipped=int(resume.meta.get("skipped_nonfinite", 0)))
  finally:
    checkpointer.close()
  if not loop.state_is_finite(state):
    raise loop.NonFiniteError("non-finite parameters or optimizer state at the end of "
                              "training; no results written")
  return state


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
      "seed": config.seed, "steps": config.steps, "eval_policy": config.eval_mode(),
      "estimator": config.train.estimator if model.gated else None,
      "bits_per_byte": test["bits_per_byte"],
      "valid_bits_per_byte": valid["bits_per_byte"],
      "active_fraction": test["active_fraction"],
      "macs_per_token": transformer.macs_per_token(model, active),
      "dense_macs_per_token": transformer.macs_per_token(model.clone(gated=False)),
      "flags": dict(flag_values) if flag_values is not None else config.as_dict(),
  }
  if not model.gated:
    capacity = config.top_k_capacity()
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
    results.update(lm_decode.benchmark(model, params, window, active,
                                       **decode_policy(config)))
  if config.plots:
    write_lm_plots(os.path.join(workdir, "plots"), test, metrics_log.read())
  return results


def decode_policy(config: LMConfig) -> dict[str, Any]:
  """The test-time policy as :func:`ccjax.lm_decode.make_decode` takes it (``mode``,
  ``top_k``): sparse decoding runs the blocks the evaluation ran."""
  return {"mode": config.eval_mode(), "top_k": config.eval_capacity()}


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
  """The parameters of the newest intact checkpoint of the LM run in ``workdir``.

  Reads only (the checkpoints are opened read-only: a run training in ``workdir`` is
  never harmed, and a step it is still writing is never read).

  Raises:
    ValueError: no checkpoint there, a classifier run, or one written for another
      architecture (one line).
  """
  checkpoint_dir = os.path.join(os.path.abspath(workdir), runs.CHECKPOINT_DIR)
  if not os.path.isdir(checkpoint_dir):
    raise ValueError(f"--workdir {workdir!r} holds no checkpoints/ (train a run there first)")
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, read_only=True)
  try:
    step = checkpointer.latest_intact_step().step
    if step is None:
      raise ValueError(f"--workdir {workdir!r} holds no complete checkpoint")
    saved = checkpointer.read_meta(step)
    if not runs.is_language_model(saved):
      raise ValueError(f"--workdir {workdir!r} holds a classifier run (experiments.condnet), "
                       "not a language model of experiments.lm; use experiments.predict on it")
    if saved.get("architecture") != config.architecture():
      raise ValueError(f"the run in {workdir} has architecture {saved.get('architecture')}; "
                       "pass the flags it was trained with")
    return checkpointer.restore_raw(step)["params"]
  finally:
    checkpointer.close()
