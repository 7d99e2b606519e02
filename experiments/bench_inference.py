r"""Dense vs sparse (block-skipping) inference latency of a gated MLP.

Random weights; each layer's policy bias is calibrated so that about ``tau`` of the
blocks run per example (the count varies per example). Dense is the same MLP as plain
``x @ W`` under ``jax.jit``; sparse is :func:`ccjax.sparse.sparse_forward` (policies
included). Both are warmed up; the median over ``--repeats`` calls is reported.

  python -m experiments.bench_inference --json

prints ``{"config": {...}, "device": "...", "results": [{"batch_size", "dense_ms",
"sparse_ms", "ratio", "dense_macs", "sparse_macs", "mac_ratio", "overflow_rate"}, ...]}``
with ``ratio = dense_ms / sparse_ms``. Other model families add entries to ``results``
through :data:`RESULT_BUILDERS` (functions ``(config) -> list[dict]``).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from ccjax import sparse
from experiments import cli

_INPUT_DIM = flags.DEFINE_integer("input_dim", 784, "Input features.")
_HIDDEN = flags.DEFINE_list("hidden", ["4096", "4096", "4096"], "Hidden widths.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 64, "Units per gated block.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Output logits.")
_TAU = flags.DEFINE_float("tau", 0.125, "Target fraction of active blocks, in (0, 1].")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "128"], "Batch sizes to time.")
_REPEATS = flags.DEFINE_integer("repeats", 30, "Timed calls per measurement (median).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights/activations.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights and inputs.")
_EXAMPLE_SLACK = flags.DEFINE_float(
    "example_slack", 2.0, "Per-example capacity k = ceil(slack * tau * blocks).")
_NUM_BUCKETS = flags.DEFINE_integer("num_buckets", 4, "Batch-1 bucketed slot counts per layer.")
_MODELS = flags.DEFINE_list("models", ["mlp", "cnn"], "Which benchmarks: mlp, cnn.")
_CNN_TAU = flags.DEFINE_float(
    "cnn_tau", 0.5, "CNN case (32x32x3 input, ccjax.GatedCNN defaults): fraction of channel "
    "blocks and residual layers that run.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
MODELS = ("mlp", "cnn")

# Functions (config dict) -> list of result entries; a CNN benchmark can append its own.
RESULT_BUILDERS: list[Callable[[dict[str, Any]], list[dict[str, Any]]]] = []


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
  batch_sizes = _positive_ints("batch_sizes", _BATCH_SIZES.value)
  for name, flag in (("input_dim", _INPUT_DIM), ("block_size", _BLOCK_SIZE),
                     ("repeats", _REPEATS), ("num_buckets", _NUM_BUCKETS)):
    if flag.value < 1:
      raise ValueError(f"--{name} must be a positive integer, got {flag.value!r}")
  if _NUM_CLASSES.value < 2:
    raise ValueError(f"--num_classes must be an integer >= 2, got {_NUM_CLASSES.value!r}")
  if not 0.0 < _TAU.value <= 1.0:
    raise ValueError(f"--tau must be in (0, 1], got {_TAU.value!r}")
  if not _EXAMPLE_SLACK.value >= 1.0:
    raise ValueError(f"--example_slack must be >= 1, got {_EXAMPLE_SLACK.value!r}")
  for width in hidden:
    if width % _BLOCK_SIZE.value:
      raise ValueError(f"--block_size={_BLOCK_SIZE.value} must divide every --hidden width "
                       f"(got {width})")
  for model in _MODELS.value:
    if model not in MODELS:
      raise ValueError(f"--models must list entries of {'|'.join(MODELS)}, got {model!r}")
  if not 0.0 < _CNN_TAU.value <= 1.0:
    raise ValueError(f"--cnn_tau must be in (0, 1], got {_CNN_TAU.value!r}")
  return {"models": list(_MODELS.value), "cnn_tau": _CNN_TAU.value,
          "input_dim": _INPUT_DIM.value, "hidden": list(hidden),
          "block_size": _BLOCK_SIZE.value, "num_classes": _NUM_CLASSES.value,
          "tau": _TAU.value, "batch_sizes": list(batch_sizes), "repeats": _REPEATS.value,
          "dtype": _DTYPE.value, "seed": _SEED.value, "example_slack": _EXAMPLE_SLACK.value,
          "num_buckets": _NUM_BUCKETS.value}


def mlp_results(config: dict[str, Any]) -> list[dict[str, Any]]:
  """Result entries of the gated MLP at every batch size."""
  entries = sparse.benchmark_mlp(
      input_dim=config["input_dim"], hidden=config["hidden"], block_size=config["block_size"],
      num_classes=config["num_classes"], tau=config["tau"], batch_sizes=config["batch_sizes"],
      repeats=config["repeats"], seed=config["seed"], dtype=jnp.dtype(config["dtype"]),
      example_slack=config["example_slack"], num_buckets=config["num_buckets"])
  return [{"model": "mlp", **entry} for entry in entries]


def cnn_results(config: dict[str, Any]) -> list[dict[str, Any]]:
  """Result entries of the gated CNN (skipped layers / channel blocks) at every batch size."""
  from ccjax import conv_sparse  # pylint: disable=g-import-not-at-top
  entries = conv_sparse.bench_cnn(
      batch_sizes=config["batch_sizes"], repeats=config["repeats"], seed=config["seed"],
      dtype=config["dtype"], active_fraction=config["cnn_tau"])
  return [{**entry, "model": "cnn"} for entry in entries]


RESULT_BUILDERS.append(mlp_results)
RESULT_BUILDERS.append(cnn_results)


def main(argv):
  cli.reject_extra_args(argv)
  try:
    config = read_config()
  except ValueError as error:
    cli.fail(error)
  results = [entry for builder in RESULT_BUILDERS
             if builder.__name__.split("_")[0] in config["models"] for entry in builder(config)]
  report = {"config": config, "device": str(jax.devices()[0].device_kind), "results": results}
  if _JSON.value:
    print(json.dumps(report))
  else:
    for entry in results:
      print(f"{entry['model']} batch {entry['batch_size']}: dense {entry['dense_ms']:.3f} ms, "
            f"sparse {entry['sparse_ms']:.3f} ms, ratio {entry['ratio']:.1f}, "
            f"MAC ratio {entry['mac_ratio']:.1f}, overflow {entry['overflow_rate']:.4f}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
