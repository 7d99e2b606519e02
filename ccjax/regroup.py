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
warm start; :func:`regroup_transformer_state` does the same for every MLP of a
:class:`ccjax.GatedTransformer` (per token), for the LM's ``regroup_step``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ccjax import layers
from ccjax import transformer as transformer_lib

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


def _captured_gated_dense(module, params, inputs: jax.Array) -> Mapping:
  """The intermediates of every :class:`ccjax.GatedDense` of ``module`` with every block
  on (one jitted forward pass)."""
  def forward(params, inputs):
    _, state = module.apply({"params": params}, inputs, mode="all",
                            capture_intermediates=lambda mdl, _: isinstance(mdl,
                                                                          layers.GatedDense))
    return state["intermediates"]
  return jax.jit(forward)(params, inputs)


def mlp_hidden_activations(module: layers.GatedMLP, params, x: jax.Array) -> list[np.ndarray]:
  """Every hidden layer's activations with every block on.

  Args:
    module: the :class:`ccjax.GatedMLP`.
    params: its parameters.
    x: ``[examples, ...]`` inputs.

  Returns:
    one ``[examples, units]`` array per hidden layer.
  """
  return mlp_hidden_activations_of(_captured_gated_dense(module, params, x), module)


def mlp_hidden_activations_of(captured: Mapping, module: layers.GatedMLP) -> list[np.ndarray]:
  """The hidden layers' outputs in a :class:`ccjax.GatedMLP`'s captured intermediates
  (``capture_intermediates`` of its :class:`ccjax.GatedDense` layers), in layer order."""
  return [np.asarray(captured[name]["__call__"][0][0]) for name in module.gate_names()]


def _is_array(leaf: Any) -> bool:
  return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def _map_at(tree: Mapping, path: Sequence[str], fn: Callable) -> Mapping:
  """A copy of the nested dict ``tree`` with ``fn`` applied to the subtree at ``path``
  (a missing path leaves ``tree`` as it is)."""
  if not path:
    return fn(tree)
  if not isinstance(tree, Mapping) or path[0] not in tree:
    return tree
  return {**tree, path[0]: _map_at(tree[path[0]], path[1:], fn)}


def _map_array_at(tree: Mapping, path: Sequence[str], fn: Callable) -> Mapping:
  """:func:`_map_at` for an array leaf; other leaves (e.g. optax's masked placeholders)
  stay as they are."""
  return _map_at(tree, path, lambda leaf: fn(leaf) if _is_array(leaf) else leaf)


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
    tree = _map_array_at(tree, (name, dense, "kernel"), columns)
    tree = _map_array_at(tree, (name, dense, "bias"), columns)
    if index + 1 < len(names):
      following = names[index + 1]
      tree = _map_array_at(tree, (following, dense, "kernel"), rows)
      policy_path = layers.policy_input_kernel_path(reference[following])
      if policy_path is not None:
        tree = _map_array_at(tree, (following, *policy_path), rows)
    else:
      tree = _map_array_at(tree, (layers.OUTPUT_MODULE_NAME, "kernel"), rows)
  return tree


def _is_params_like(node: Any, params: Mapping) -> bool:
  return isinstance(node, Mapping) and set(node) == set(params)


def regroup_state(state, sites: Sequence[tuple[Sequence[str], layers.GatedMLP]],
                  activations: Sequence[Sequence[np.ndarray]], seed: int):
  """A train state whose gated MLPs' hidden units are regrouped into blocks of co-active
  units.

  Args:
    state: a :class:`ccjax.TrainState`; its parameters, every optimizer-state subtree of
      the parameters' structure (Adam's moments) and the distillation snapshot are
      permuted alike, each array keeping its sharding.
    sites: ``(path, module)`` per gated MLP: where its parameters sit in ``state.params``
      (``()``: the whole tree) and its :class:`ccjax.GatedMLP`.
    activations: per site, one ``[examples, units]`` array per hidden layer (every block
      on) whose binary patterns decide the groups.
    seed: seed of the clustering (layer ``i`` of all sites, in order, uses ``seed + i``).

  Returns:
    ``(state, permutations)``: the new state and, per site, one ``[units]`` permutation
    per hidden layer.
  """
  params = state.params
  permutations, index = [], 0
  for (_, module), site_activations in zip(sites, activations):
    site_permutations = []
    for acts in site_activations:
      site_permutations.append(co_activation_permutation(acts, module.block_size, seed + index))
      index += 1
    permutations.append(site_permutations)

  references = [functools.reduce(lambda tree, name: tree[name], path, params)
                for path, _ in sites]

  def permute(node):
    if not _is_params_like(node, params):
      return node
    for (path, module), site_permutations, reference in zip(sites, permutations, references):
      node = _map_at(node, path, functools.partial(
          permute_mlp_units, module, permutations=site_permutations, reference=reference))
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


def regroup_mlp_state(module: layers.GatedMLP, state, x: np.ndarray, seed: int):
  """:func:`regroup_state` of a :class:`ccjax.GatedMLP`'s state on the activations of the
  inputs ``x [examples, ...]``.

  Returns:
    ``(state, permutations)``: the new state and one ``[units]`` permutation per layer.
  """
  activations = mlp_hidden_activations(module, state.params, jnp.asarray(x))
  new_state, permutations = regroup_state(state, [((), module)], [activations], seed)
  return new_state, permutations[0]


def transformer_mlp_activations(model, params, tokens: jax.Array) -> list[np.ndarray]:
  """Every transformer block's MLP hidden activations with every block on, per token.

  Args:
    model: the :class:`ccjax.GatedTransformer`.
    params: its parameters.
    tokens: ``[batch, seq]`` token ids.

  Returns:
    one ``[batch * seq, mlp_width]`` array per transformer block.
  """
  captured = _captured_gated_dense(model, params, tokens)
  return [mlp_hidden_activations_of(captured[name][transformer_lib.MLP_NAME],
                                    model.mlp_module(index))[0].reshape(-1, model.mlp_width)
          for index, name in enumerate(model.gate_names())]


def regroup_transformer_state(model, state, tokens: np.ndarray, seed: int):
  """:func:`regroup_state` of every MLP of a :class:`ccjax.GatedTransformer`'s state, on
  the per-token activations of ``tokens [batch, seq]``.

  Returns:
    ``(state, permutations)``: the new state and one ``[mlp_width]`` permutation per
    transformer block.
  """
  activations = transformer_mlp_activations(model, state.params, jnp.asarray(tokens))
  sites = [((name, transformer_lib.MLP_NAME), model.mlp_module(index))
           for index, name in enumerate(model.gate_names())]
  new_state, permutations = regroup_state(state, sites, [[acts] for acts in activations], seed)
  return new_state, [site[0] for site in permutations]
