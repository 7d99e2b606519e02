r"""Dense vs sparse (block-skipping) inference latency of gated models.

One driver times every model family through the one inference contract
(:func:`ccjax.make_inference` vs :func:`ccjax.make_dense_inference`, same process, calls
interleaved, medians). Weights are random; each policy's bias is calibrated
(:func:`ccjax.calibrate_policies`) so that about ``--tau`` (MLP) / ``--cnn_tau`` (CNN) of
the blocks run; the count varies per example.

  python -m experiments.bench_inference --json

prints ``{"config": {...}, "machine": {...}, "backend": "...", "results": [{"model",
"batch_size", "dense_ms", "sparse_ms", "ratio", "dense_macs", "sparse_macs", "mac_ratio",
"overflow_rate", "roofline"}, ...], "rates": {...}}`` with ``ratio = dense_ms / sparse_ms``
and ``mac_ratio = dense_macs / sparse_macs`` (MACs per example, policies included).

With the ``ffi-cpu`` backend, batch-1 entries hold ``batch1_helper``: what the kernel's
batch-1 helper thread did while the case was timed (jobs shared with it, jobs offered
but run alone, tasks it ran, stalls; :mod:`ccjax.inference.kernels.ffi_cpu_helper`).

Roofline (float32 MLP cases, unless ``--noroofline``): ``rates`` holds the measured read
bandwidth (:func:`ccjax.inference.roofline.stream_read_gbs`) and matmul rate
(:func:`~ccjax.inference.roofline.matmul_gmacs`); each case's ``roofline`` holds, for the
``dense`` and the ``sparse`` call, the MACs and weight bytes of one call (the sparse one
averaged over the timed batches: the blocks, tiles and policy rows some example used), the
bound ``max(bytes / bandwidth, MACs / rate)``, what binds it, and the fraction of the
bound the measured median reaches (:meth:`~ccjax.inference.roofline.CallCost.report`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import ccjax
from ccjax import atomic
from ccjax import config as config_lib
from ccjax import loop
from ccjax import memory
from ccjax import timing
from ccjax.inference import roofline
from ccjax.inference.kernels import ffi_cpu_helper
from experiments import cli

MODELS = ("mlp", "cnn")
CNN_IMAGE_SHAPE = (32, 32, 3)
CALIBRATION_SIZE = 512
# Live activation buffers per example and widest layer (dense and sparse paths, gathered
# copies, policies), used by the memory estimate; deliberately generous.
ACTIVATION_COPIES = 8

_INPUT_DIM = flags.DEFINE_integer("input_dim", 784, "MLP input features.", lower_bound=1)
_HIDDEN = flags.DEFINE_list("hidden", ["4096", "4096", "4096"], "MLP hidden widths.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 64, "MLP units per gated block.", lower_bound=1)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Output logits.", lower_bound=2)
_TAU = flags.DEFINE_float("tau", 0.125, "MLP target fraction of active blocks, in (0, 1).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "128"], "Batch sizes to time.")
_REPEATS = flags.DEFINE_integer("repeats", 30, "Timed calls per measurement (median).",
                                lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights/activations.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights and inputs.")
_EXAMPLE_SLACK = flags.DEFINE_float(
    "example_slack", 2.0, "Per-example capacity k = ceil(slack * tau * blocks), >= 1.")
_NUM_BUCKETS = flags.DEFINE_integer("num_buckets", 4, "Batch-1 bucketed slot counts per layer.",
                                    lower_bound=1)
_MODELS = flags.DEFINE_list("models", list(MODELS), "Which benchmarks: mlp, cnn.")
_CNN_STAGES = flags.DEFINE_list("cnn_stages", ["64", "128"], "CNN stage channel widths.")
_CNN_BLOCK_SIZE = flags.DEFINE_integer("cnn_block_size", 16, "CNN channels per gated block.",
                                       lower_bound=1)
_CNN_TAU = flags.DEFINE_float(
    "cnn_tau", 0.5, "CNN (32x32x3 input): fraction of channel blocks and residual blocks that "
    "run, in (0, 1).")
_BACKEND = flags.DEFINE_enum("backend", None, list(ccjax.BACKENDS),
                             "Force a kernel backend (default: the best available).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
_ROOFLINE = flags.DEFINE_bool(
    "roofline", True, "Measure the read bandwidth and matmul rate and hold every float32 MLP "
    "call against its roofline bound (bytes / bandwidth, MACs / rate).")
_BANDWIDTH_MB = flags.DEFINE_integer("bandwidth_mb", 256, "MB read per bandwidth probe.",
                                     lower_bound=1)
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 4096, "n of the [128, n] @ [n, n] "
                                    "matmul-rate probe.", lower_bound=1)


def _positive_ints(name: str, values) -> tuple[int, ...]:
  try:
    parsed = tuple(int(value) for value in values)
  except ValueError:
    parsed = ()
  if not parsed or any(value < 1 for value in parsed):
    raise ValueError(f"--{name} must be a comma-separated list of positive integers, "
                     f"got {','.join(values)!r}")
  return parsed


def read_config() -> dict[str, Any]:
  """Flags -> validated config dict (ValueError with a one-line message on bad input)."""
  hidden = _positive_ints("hidden", _HIDDEN.value)
  cnn_stages = _positive_ints("cnn_stages", _CNN_STAGES.value)
  batch_sizes = _positive_ints("batch_sizes", _BATCH_SIZES.value)
  for name, flag in (("tau", _TAU), ("cnn_tau", _CNN_TAU)):
    if not 0.0 < flag.value < 1.0:
      raise ValueError(f"--{name} must be in (0, 1), got {flag.value!r}")
  if not 1.0 <= _EXAMPLE_SLACK.value < float("inf"):
    raise ValueError(f"--example_slack must be a finite number >= 1, got {_EXAMPLE_SLACK.value!r}")
  for name, widths, block in (("hidden", hidden, _BLOCK_SIZE.value),
                              ("cnn_stages", cnn_stages, _CNN_BLOCK_SIZE.value)):
    for width in widths:
      if width % block:
        flag = "block_size" if name == "hidden" else "cnn_block_size"
        raise ValueError(f"--{flag}={block} must divide every --{name} width (got {width})")
  for model in _MODELS.value:
    if model not in MODELS:
      raise ValueError(f"--models must list entries of {'|'.join(MODELS)}, got {model!r}")
  float32 = _DTYPE.value == "float32"
  for model in _MODELS.value:   # a forced backend must run every family asked for
    try:
      ccjax.select_backend(_BACKEND.value, float32=float32, family=model)
    except ValueError as error:
      hint = " (or list only the --models it runs)" if _BACKEND.value else ""
      raise ValueError(f"--models={model}: {error}{hint}") from None
  config = {"models": list(_MODELS.value), "input_dim": _INPUT_DIM.value, "hidden": list(hidden),
          "block_size": _BLOCK_SIZE.value, "num_classes": _NUM_CLASSES.value,
          "tau": _TAU.value, "cnn_stages": list(cnn_stages),
          "cnn_block_size": _CNN_BLOCK_SIZE.value, "cnn_tau": _CNN_TAU.value,
          "batch_sizes": list(batch_sizes), "repeats": _REPEATS.value, "dtype": _DTYPE.value,
          "seed": _SEED.value, "example_slack": _EXAMPLE_SLACK.value,
          "num_buckets": _NUM_BUCKETS.value, "backend": _BACKEND.value,
          "roofline": _ROOFLINE.value, "bandwidth_mb": _BANDWIDTH_MB.value,
          "matmul_size": _MATMUL_SIZE.value}
  check_memory(config)
  return config


def run_config(config: dict[str, Any], family: str) -> config_lib.ExperimentConfig:
  """One family's benchmark model as a run config: the training entrypoints' config, so
  the model is built by the same :func:`ccjax.config.build_model`."""
  if family == "mlp":
    return config_lib.ExperimentConfig.create(
        arch="mlp", hidden=tuple(config["hidden"]), block_size=config["block_size"],
        tau=(config["tau"],))
  return config_lib.ExperimentConfig.create(
      arch="cnn", hidden=tuple(config["cnn_stages"]), block_size=config["cnn_block_size"],
      tau=(config["cnn_tau"],))


def _module(config: dict[str, Any], family: str):
  """``(module, example_shape, active_fraction, widest activation per example)``."""
  dtype = jnp.dtype(config["dtype"])
  model_config = run_config(config, family)
  if family == "mlp":
    module = config_lib.build_model(model_config, (config["input_dim"],), config["num_classes"],
                                    dtype=dtype)
    return module, (config["input_dim"],), config["tau"], max(config["hidden"])
  # Deeper than the trained CNN: two residual blocks per stage, the stem as wide as the
  # first stage (a benchmark of the skipping, not of a trained net).
  module = config_lib.build_model(model_config, CNN_IMAGE_SHAPE, config["num_classes"],
                                  dtype=dtype, residual_blocks=2,
                                  stem_features=config["cnn_stages"][0],
                                  policy_init_prob=min(config["cnn_tau"], config_lib.MAX_INIT_PROB))
  widest = CNN_IMAGE_SHAPE[0] * CNN_IMAGE_SHAPE[1] * max(config["cnn_stages"])
  return module, CNN_IMAGE_SHAPE, config["cnn_tau"], widest


def estimate_bytes(config: dict[str, Any], family: str) -> int:
  """Bytes one family's benchmark needs at its largest batch size (an upper estimate).

  Weights twice (dense and block-major copies, from ``jax.eval_shape``, nothing
  allocated), the timed inputs, :data:`ACTIVATION_COPIES` activations of the widest layer
  per example, and the calibration batch.
  """
  module, example_shape, _, widest = _module(config, family)
  shapes = jax.eval_shape(lambda: module.init(
      {"params": jax.random.PRNGKey(0), "gate": jax.random.PRNGKey(0)},
      jnp.zeros((1, *example_shape), jnp.float32), mode="threshold"))
  weight_bytes = sum(math.prod(leaf.shape) * jnp.dtype(config["dtype"]).itemsize
                     for leaf in jax.tree_util.tree_leaves(shapes))
  batch = max(config["batch_sizes"])
  num_batches = 16 if batch == 1 else 2
  example = math.prod(example_shape)
  per_example = 4 * (example + ACTIVATION_COPIES * widest)  # float32 at worst
  return 2 * weight_bytes + (num_batches * batch + CALIBRATION_SIZE) * per_example


def check_memory(config: dict[str, Any]) -> None:
  """Raises ``ValueError`` (one line) if a family would need more memory than is free."""
  available, where = memory.available_bytes()
  for family in config["models"]:
    needed = estimate_bytes(config, family)
    if needed > available:
      widths = "hidden" if family == "mlp" else "cnn_stages"
      raise ValueError(
          f"the {family} benchmark (--{widths}={','.join(map(str, config[widths]))}, "
          f"--batch_sizes={','.join(map(str, config['batch_sizes']))}) needs about "
          f"{needed / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB free on the "
          f"{where}; use smaller --batch_sizes or --{widths}")


def build_model(config: dict[str, Any], family: str):
  """``(module, params, example_shape, active_fraction)`` of one benchmark family, with
  policies calibrated to run the configured fraction of blocks."""
  dtype = jnp.dtype(config["dtype"])
  key = jax.random.PRNGKey(config["seed"])
  module, example_shape, fraction, _ = _module(config, family)
  init_key, calibration_key = jax.random.split(key)
  # One compiled init (random weights), not an op-by-op one: seconds less of setup.
  init = jax.jit(lambda key: module.init({"params": key, "gate": key},
                                         jnp.zeros((1, *example_shape), jnp.float32),
                                         mode="threshold")["params"])
  params = init(init_key)
  calibration = jax.random.normal(calibration_key, (CALIBRATION_SIZE, *example_shape))
  logging.info("%s: calibrating its policies to run %s of the blocks", family, fraction)
  params = ccjax.calibrate_policies(module, params, calibration, fraction)
  params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
  return module, params, example_shape, fraction


class Progress:
  """``case k of n`` lines on stderr, with the time per case so far and an ETA."""

  def __init__(self, total: int):
    self.total = total
    self.done = 0
    self.case_seconds = 0.0  # in cases, not in building models
    self.case_start = time.time()

  def starting(self, what: str) -> None:
    self.case_start = time.time()
    logging.info("case %d of %d: %s: compiling dense and sparse inference, then timing",
                 self.done + 1, self.total, what)

  def finished(self, entry: dict[str, Any]) -> None:
    self.done += 1
    took = time.time() - self.case_start
    self.case_seconds += took
    eta = self.case_seconds / self.done * (self.total - self.done)
    logging.info("case %d of %d done in %.0fs: dense %.3f ms, sparse %.3f ms (ratio %.1f)  "
                 "ETA %.0fs", self.done, self.total, took, entry["dense_ms"],
                 entry["sparse_ms"], entry["ratio"], eta)


def measure_rates(config: dict[str, Any]) -> dict[str, float] | None:
  """The read bandwidth and matmul rate the roofline bounds use, or ``None`` when no case
  gets a roofline (``--noroofline``, no MLP, or not float32)."""
  if not (config["roofline"] and "mlp" in config["models"] and config["dtype"] == "float32"):
    return None
  logging.info("measuring the read bandwidth (%d MB) and the matmul rate (n = %d) for the "
               "roofline", config["bandwidth_mb"], config["matmul_size"])
  return {"read_gbs": roofline.stream_read_gbs(config["bandwidth_mb"]),
          "matmul_gmacs": roofline.matmul_gmacs(size=config["matmul_size"])}


def roofline_entry(config: dict[str, Any], module, masks: list, batch_size: int,
                   latency: dict[str, float], rates: dict[str, float]) -> dict[str, Any]:
  """The dense and sparse calls of one MLP case against their bounds.

  Args:
    config: the benchmark config.
    module: the gated MLP.
    masks: per timed batch, its per-layer ``[batch, blocks]`` masks of the blocks that ran.
    batch_size: examples per call.
    latency: measured ``{"dense": ms, "sparse": ms}``.
    rates: :func:`measure_rates`' result.
  """
  calls = {"dense": roofline.dense_call(config["input_dim"], config["hidden"],
                                        config["num_classes"], batch_size),
           "sparse": roofline.mean_call([
               roofline.sparse_call(batch_masks, config["input_dim"], config["block_size"],
                                    config["num_classes"], module.policy_hidden)
               for batch_masks in masks])}
  return {name: call.report(latency[name], rates["read_gbs"], rates["matmul_gmacs"])
          for name, call in calls.items()}


def roofline_line(entry: dict[str, Any]) -> str:
  """One line: each call's bytes, MACs, bound and the fraction of it reached."""
  parts = []
  for name in ("dense", "sparse"):
    report = entry["roofline"][name]
    parts.append(f"{name} {report['weight_mb']:.1f} MB {report['macs'] / 1e6:.1f} MMAC, bound "
                 f"{report['roofline_ms']:.3f} ms ({report['bound_by']}), reached "
                 f"{100 * report['fraction_of_bound']:.0f} %")
  return "roofline: " + "; ".join(parts)


def bench_family(config: dict[str, Any], family: str, progress: Progress,
                 rates: dict[str, float] | None = None) -> list[dict[str, Any]]:
  """Result entries of one model family at every batch size (with a roofline for float32
  MLP cases when ``rates`` are given)."""
  logging.info("%s: building the model", family)
  module, params, example_shape, fraction = build_model(config, family)
  capacities = ccjax.Capacities(active_fraction=fraction, example_slack=config["example_slack"],
                                num_buckets=config["num_buckets"])
  dense_macs = ccjax.dense_macs_per_example(module, example_shape)
  traced = ccjax.make_inference(module, params, capacities=capacities, backend=config["backend"])
  timed = ccjax.make_inference(module, params, capacities=capacities, backend=config["backend"],
                               with_info=False)
  entries = []
  for batch_size in config["batch_sizes"]:
    # Batch 1 cycles over 16 different examples (the sparse work depends on the example).
    num_batches = 16 if batch_size == 1 else 2
    data_key = jax.random.fold_in(jax.random.PRNGKey(config["seed"] + 1), batch_size)
    inputs = [x.astype(jnp.dtype(config["dtype"])) for x in jax.random.normal(
        data_key, (num_batches, batch_size, *example_shape))]
    progress.starting(f"{family} batch {batch_size}")
    helper = ffi_cpu_helper.HelperHooks() if traced.backend == "ffi-cpu" else None
    before = helper.stats() if helper is not None else None
    latency = ccjax.measure_latency(module, params, inputs, repeats=config["repeats"],
                                    inference=timed)
    infos = [traced(x)[1] for x in inputs]
    sparse_macs = float(np.mean([ccjax.macs_per_example(module, example_shape, info.masks)
                                 for info in infos]))
    entries.append({
        "model": family, "batch_size": int(batch_size), "dense_ms": latency["dense"],
        "sparse_ms": latency["sparse"], "ratio": latency["dense"] / latency["sparse"],
        "dense_macs": float(dense_macs), "sparse_macs": sparse_macs,
        "mac_ratio": float(dense_macs) / max(sparse_macs, 1.0),
        "overflow_rate": ccjax.overflow_rate(infos), "backend": traced.backend})
    if helper is not None and batch_size == 1:  # did the batch-1 helper thread take part?
      entries[-1]["batch1_helper"] = dataclasses.asdict(helper.stats() - before)
    if rates is not None and family == "mlp":
      entries[-1]["roofline"] = roofline_entry(
          config, module, [[np.asarray(mask) for mask in info.masks] for info in infos],
          batch_size, latency, rates)
      logging.info("%s batch %d %s", family, batch_size, roofline_line(entries[-1]))
    progress.finished(entries[-1])
  return entries


def main(argv):
  cli.reject_extra_args(argv)
  loop.quiet_library_logs()  # e.g. jax's INFO line about a missing TPU backend
  try:
    config = read_config()
  except ValueError as error:
    cli.fail(error)
  families = [family for family in MODELS if family in config["models"]]
  progress = Progress(len(families) * len(config["batch_sizes"]))
  logging.info("benchmarking %s at batch sizes %s: %d cases, %d timed calls each; kernel "
               "backend %s", "+".join(families), config["batch_sizes"], progress.total,
               config["repeats"], ccjax.select_backend(config["backend"]))
  load_at_start = list(os.getloadavg())
  rates = measure_rates(config)
  results = [entry for family in families
             for entry in bench_family(config, family, progress, rates)]
  report = {"config": config, "machine": timing.machine_info(),
            "backend": results[0]["backend"] if results else None, "rates": rates,
            "load_average": {"start": load_at_start, "end": list(os.getloadavg())},
            "results": results}
  if _JSON.value:
    print(atomic.dumps(report))
  else:
    print(atomic.dumps(report["machine"]))
    for entry in results:
      print(f"{entry['model']} batch {entry['batch_size']} ({entry['backend']}): dense "
            f"{entry['dense_ms']:.3f} ms, sparse {entry['sparse_ms']:.3f} ms, ratio "
            f"{entry['ratio']:.1f}, MAC ratio {entry['mac_ratio']:.1f}, overflow "
            f"{entry['overflow_rate']:.4f}")
      if "roofline" in entry:
        print(f"  {roofline_line(entry)}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
