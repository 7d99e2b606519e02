"""Compute costs of a trained model: MACs per example and measured batch-1 latency."""

from __future__ import annotations

from typing import Any

import numpy as np

from ccjax import data as data_lib
from ccjax.inference import api


def model_costs(module, params, dataset: data_lib.Dataset, test: dict[str, Any], *,
                measure_latency: bool, mode: str = "threshold",
                top_k: tuple[int, ...] | None = None) -> dict[str, Any]:
  """MACs per example (policies included) on the test masks, and batch-1 latency.

  Args:
    module: the trained module (any gated family, gated or dense).
    params: its parameters (host arrays).
    dataset: the run's dataset.
    test: :func:`ccjax.loop.evaluate` output on the test set with ``keep_gates``.
    measure_latency: time dense and sparse inference at batch 1.
    mode: the test policy whose masks are in ``test`` (``threshold``, ``top_k`` or
      ``sample``); the sparse latency is timed for ``top_k`` with ``top_k`` blocks per
      example and layer, otherwise with the threshold (there is no sampled sparse path).
    top_k: blocks per example and gated layer for ``mode='top_k'``.

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
      if mode == "top_k":
        inference = api.make_inference(module, params, mode="top_k",
                                       capacities=api.Capacities(top_k=top_k), with_info=False)
      else:
        inference = api.make_inference(module, params, with_info=False)
      costs["backend"] = inference.backend
      costs["latency_policy"] = "top_k" if mode == "top_k" else "threshold"
    costs["latency_ms"] = api.measure_latency(module, params, [example], inference=inference)
  return costs
