"""Compute costs of a trained model: MACs per example and measured batch-1 latency."""

from __future__ import annotations

from typing import Any

import numpy as np

from ccjax import data as data_lib
from ccjax.inference import api


def model_costs(module, params, dataset: data_lib.Dataset, test: dict[str, Any], *,
                measure_latency: bool) -> dict[str, Any]:
  """MACs per example (policies included) on the test masks, and batch-1 latency.

  Args:
    module: the trained module (any gated family, gated or dense).
    params: its parameters (host arrays).
    dataset: the run's dataset.
    test: :func:`ccjax.loop.evaluate` output on the test set with ``keep_gates``.
    measure_latency: time dense and sparse inference at batch 1.

  Returns:
    ``macs_per_example``, ``dense_macs_per_example``, ``backend`` and, when measured,
    ``latency_ms`` (``{"dense": ms, "sparse": ms}``; for a dense model only ``dense``).
  """
  dense_macs = float(api.dense_macs_per_example(module, dataset.input_shape))
  costs = {"dense_macs_per_example": dense_macs, "macs_per_example": dense_macs}
  if module.gated:
    costs["macs_per_example"] = float(np.mean(api.macs_per_example(
        module, dataset.input_shape, test["mask"])))
  if measure_latency:
    example = np.asarray(dataset.x_test[:1], np.float32)
    inference = None
    if module.gated:
      inference = api.make_inference(module, params, with_info=False)
      costs["backend"] = inference.backend
    costs["latency_ms"] = api.measure_latency(module, params, [example], inference=inference)
  return costs
