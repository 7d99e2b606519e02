"""Regrouping a trained MLP's hidden units into blocks of co-active units (dense-to-sparse).

Contiguous blocks of a dense-trained layer are arbitrary groups of units: gating them
fights the network. MoEfication (Zhang et al. 2022) instead clusters the units by when
they fire and makes each cluster an expert. Here a balanced k-means on the units' binary
activation patterns gives every layer a permutation that puts each cluster's units
next to each other, so that ccjax's contiguous blocks *are* the clusters. A permutation
of a hidden layer's units (its kernel's columns and bias, the next layer's kernel rows
and the rows of the next policy's input matrix) leaves the network's function unchanged.

:func:`regroup_mlp_state` applies it to a whole :class:`ccjax.TrainState` (parameters,
the optimizer's per-parameter moments, the distillation snapshot), which is what the
``regroup_step`` option of :class:`ccjax.ExperimentConfig` does at the end of the dense
warm start.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ccjax import layers

# Training examples whose activation patterns decide the grouping (MoEfication uses a
# sample of the training set too).
REGROUP_EXAMPLES = 8000
KMEANS_ITERATIONS = 20


def co_activation_permutation(activations: np.ndarray, block_size: int, seed: int,
                              iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
  """Balanced k-means of a layer's units on their binary activation patterns.

  Each unit is the unit-normalised vector of where it fires (``activation > 0``) over the
  examples; clusters of exactly ``block_size`` units are formed greedily by similarity to
  the centroids (farthest-point initialisation), ``iterations`` times.

  Args:
    activations: ``[examples, units]`` activations after the nonlinearity.
    block_size: units per cluster; must divide ``units``.
    seed: the first centroid's draw.
    iterations: assignment / centroid rounds.

  Returns:
    ``[units]`` int permutation: ``activations[:, perm]`` has each cluster contiguous.
  """
  activations = np.asarray(activations)
  if activations.ndim != 2 or activations.shape[1] % block_size:
    raise ValueError(f"activations must be [examples, units] with units a multiple of "
                     f"block_size={block_size}, got shape {activations.shape}")
  patterns = (activations > 0).astype(np.float32).T
  patterns /= np.linalg.norm(patterns, axis=1, keepdims=True) + 1e-6
  units, clusters = patterns.shape[0], patterns.shape[0] // block_size
  chosen = [int(np.random.default_rng(seed).integers(units))]
  for _ in range(clusters - 1):  # each next centroid: the unit least like those chosen
    chosen.append(int(np.argmin((patterns @ patterns[chosen].T).max(axis=1))))
  centroids = patterns[chosen].copy()
  assignment = np.zeros(units, int)
  for _ in range(iterations):
    similarity = patterns @ centroids.T                              # [units, clusters]
    assignment[:] = -1
    counts = np.zeros(clusters, int)
    for flat in np.argsort(-similarity, axis=None, kind="stable"):   # most similar first
      unit, cluster = divmod(int(flat), clusters)
      if assignment[unit] < 0 and counts[cluster] < block_size:
        assignment[unit] = cluster
        counts[cluster] += 1
    for cluster in range(clusters):
      centroid = patterns[assignment == cluster].mean(0)
      centroids[cluster] = centroid / (np.linalg.norm(centroid) + 1e-6)
  return np.argsort(assignment, kind="stable")


def mlp_hidden_activations(module: layers.GatedMLP, params, x: jax.Array) -> list[np.ndarray]:
  """Every hidden layer's activations with every block on.

  Args:
    module: the :class:`ccjax.GatedMLP`.
    params: its parameters.
    x: ``[examples, ...]`` inputs.

  Returns:
    one ``[examples, units]`` array per hidden layer.
  """
  _, state = module.apply({"params": params}, x, mode="all",
                          capture_intermediates=lambda mdl, _: isinstance(mdl, layers.GatedDense))
  captured = state["intermediates"]
  return [np.asarray(captured[name]["__call__"][0][0]) for name in module.gate_names()]


def _is_array(leaf: Any) -> bool:
  return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def _map_at(tree: Mapping, path: Sequence[str], fn: Callable) -> Mapping:
  """A copy of the nested dict ``tree`` with ``fn`` applied at ``path`` (an array leaf;
  other leaves, e.g. optax's masked placeholders, and missing paths stay as they are)."""
  if not path:
    return fn(tree) if _is_array(tree) else tree
  if not isinstance(tree, Mapping) or path[0] not in tree:
    return tree
  return {**tree, path[0]: _map_at(tree[path[0]], path[1:], fn)}


def permute_mlp_units(module: layers.GatedMLP, tree: Mapping,
                      permutations: Sequence[np.ndarray], reference: Mapping | None = None
                      ) -> Mapping:
  """The parameters (or any tree of the parameters' structure) with every hidden layer's
  units permuted; the function of the network is unchanged.

  Args:
    module: the :class:`ccjax.GatedMLP` the tree belongs to.
    tree: its parameters, or an optimizer moment of the same structure (leaves that are
      not arrays are left alone).
    permutations: one ``[units]`` permutation per hidden layer.
    reference: the parameters, to find which policy matrix reads each layer's input
      (default: ``tree``).

  Returns:
    the permuted tree.
  """
  reference = tree if reference is None else reference
  names = module.gate_names()
  if len(permutations) != len(names):
    raise ValueError(f"need one permutation per hidden layer ({len(names)}), "
                     f"got {len(permutations)}")
  dense = layers.DENSE_MODULE_NAME
  for index, (name, order) in enumerate(zip(names, permutations)):
    order = jnp.asarray(order)
    columns = lambda leaf, order=order: jnp.take(leaf, order, axis=-1)
    rows = lambda leaf, order=order: jnp.take(leaf, order, axis=0)
    tree = _map_at(tree, (name, dense, "kernel"), columns)
    tree = _map_at(tree, (name, dense, "bias"), columns)
    if index + 1 < len(names):
      following = names[index + 1]
      tree = _map_at(tree, (following, dense, "kernel"), rows)
      policy_path = layers.policy_input_kernel_path(reference[following])
      if policy_path is not None:
        tree = _map_at(tree, (following, *policy_path), rows)
    else:
      tree = _map_at(tree, (layers.OUTPUT_MODULE_NAME, "kernel"), rows)
  return tree


def _is_params_like(node: Any, params: Mapping) -> bool:
  return isinstance(node, Mapping) and set(node) == set(params)


def regroup_mlp_state(module: layers.GatedMLP, state, x: np.ndarray, seed: int):
  """A train state whose hidden units are regrouped into blocks of co-active units.

  Args:
    module: the :class:`ccjax.GatedMLP` of the state.
    state: a :class:`ccjax.TrainState`; its parameters, every optimizer-state subtree of
      the parameters' structure (Adam's moments) and the distillation snapshot are
      permuted alike, each array keeping its sharding.
    x: ``[examples, ...]`` training inputs whose activation patterns decide the groups.
    seed: seed of the clustering.

  Returns:
    ``(state, permutations)``: the new state and one ``[units]`` permutation per layer.
  """
  params = state.params
  activations = mlp_hidden_activations(module, params, jnp.asarray(x))
  permutations = [co_activation_permutation(acts, module.block_size, seed + index)
                  for index, acts in enumerate(activations)]

  def permute(node):
    if _is_params_like(node, params):
      return permute_mlp_units(module, node, permutations, reference=params)
    return node

  def regrouped(tree):
    return jax.tree_util.tree_map(permute, tree,
                                  is_leaf=lambda node: _is_params_like(node, params))

  new_state = state.replace(params=regrouped(params), opt_state=regrouped(state.opt_state),
                            distill_snapshot=regrouped(state.distill_snapshot))
  placed = jax.tree_util.tree_map(
      lambda new, old: jax.device_put(new, old.sharding) if hasattr(old, "sharding") else new,
      new_state, state)
  return placed, permutations
