"""Compute costs of a trained model: MACs per example and measured batch-1 latency."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from ccjax import conv
from ccjax import conv_sparse
from ccjax import flops
from ccjax import sparse
from ccjax import timing


def model_costs(config, model, params, dataset, test: dict[str, Any], *,
                measure_latency: bool) -> dict[str, Any]:
  """MACs per example (policy included) on the test masks, and batch-1 latency.

  Args:
    config: the run's ``ExperimentConfig``.
    model: the trained module.
    params: its parameters (host arrays).
    dataset: the run's ``Dataset``.
    test: :func:`ccjax.trainer.evaluate` output on the test set with ``keep_gates``.
    measure_latency: time dense and sparse inference at batch 1.

  Returns:
    ``macs_per_example``, ``dense_macs_per_example`` and, when measured, ``latency_ms``
    (``{"dense": ms, "sparse": ms}``; for a dense model only ``dense``).
  """
  if config.arch == "cnn":
    return _cnn_costs(config, model, params, dataset, test, measure_latency=measure_latency)
  dense_macs = flops.dense_mlp_macs(dataset.input_dim, config.hidden, dataset.num_classes)
  costs = {"dense_macs_per_example": float(dense_macs)}
  if config.model == "condnet":
    costs["macs_per_example"] = float(np.mean(flops.gated_mlp_macs(
        dataset.input_dim, test["mask"], config.block_size, dataset.num_classes)))
  else:
    costs["macs_per_example"] = float(dense_macs)
  if measure_latency:
    example = np.asarray(dataset.x_test[:1], np.float32).reshape(1, -1)
    if config.model == "condnet":
      latency = sparse.measure_latency(
          params, input_dim=dataset.input_dim, hidden=tuple(config.hidden),
          block_size=config.block_size, num_classes=dataset.num_classes,
          policy_eps=model.policy_eps, x=example)
      costs["latency_ms"] = {"dense": latency["dense_ms"], "sparse": latency["sparse_ms"]}
    else:
      costs["latency_ms"] = {"dense": timing.median_ms(jax.jit(sparse.dense_forward), params,
                                                       example)}
  return costs


def _cnn_costs(config, model, params, dataset, test, *, measure_latency: bool) -> dict[str, Any]:
  """As :func:`model_costs` for a :class:`ccjax.conv.GatedCNN`."""
  specs = model.layer_specs(dataset.input_shape)
  dense_macs = flops.dense_cnn_macs(specs, dataset.num_classes)
  costs = {"dense_macs_per_example": float(dense_macs), "macs_per_example": float(dense_macs)}
  if config.model == "condnet":
    costs["macs_per_example"] = float(np.mean(flops.gated_cnn_macs(
        specs, test["mask"], dataset.num_classes)))
  if measure_latency:
    example = np.asarray(dataset.x_test[:1], np.float32)
    dense_model = dataclasses.replace(model, gated=False)
    dense_params = conv.strip_policy_params(params)
    dense_fn = jax.jit(lambda p, x: dense_model.apply({"params": p}, x, mode="all")[0])
    costs["latency_ms"] = {"dense": timing.median_ms(dense_fn, dense_params, example)}
    if config.model == "condnet":
      skipping = jax.jit(conv_sparse.make_cnn_inference(model, mode="threshold"))
      costs["latency_ms"]["sparse"] = timing.median_ms(skipping, params, example)
  return costs
