"""The finished runs a classifier run starts from (``--init_from``) or distils from
(``--distill_from``): loaded and checked before anything is written."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ccjax import config as config_lib
from ccjax import layers
from ccjax import runs
from ccjax import step as step_lib


class Sources(NamedTuple):
  """Finished runs a run starts from (``--init_from``) or distils from (``--distill_from``)."""
  init_run: runs.Run | None
  teacher_run: runs.Run | None


def load_sources(config: config_lib.ExperimentConfig, module, dataset) -> Sources:
  """Loads and checks ``--init_from`` / ``--distill_from`` before anything is written."""
  init_run = _load_source_run(config.init_from, "init_from", config, dataset)
  teacher_run = _load_source_run(config.distill_from, "distill_from", config, dataset)
  if init_run is not None:
    abstract = jax.eval_shape(lambda: step_lib.init_train_state(
        module, config.train, jax.random.PRNGKey(0), jnp.asarray(dataset.x_train[:1])))
    check_network_shapes(abstract.params, init_run)
  return Sources(init_run, teacher_run)


def _load_source_run(workdir: str | None, flag: str, config: config_lib.ExperimentConfig,
                     dataset) -> runs.Run | None:
  """The finished run named by ``--init_from`` / ``--distill_from``, checked against the data.

  Raises:
    ValueError: not a finished run, or trained on data of another shape (one line).
  """
  if workdir is None:
    return None
  try:
    run = runs.load_run(workdir)
  except runs.RunError as error:
    raise ValueError(f"--{flag}: {error}") from None
  if run.task != config.TASK:
    raise ValueError(f"--{flag}: --workdir {workdir} holds a run of task {run.task!r}; --{flag} "
                     "takes a finished classifier run (experiments.condnet)")
  if (tuple(run.input_shape) != tuple(dataset.input_shape)
      or run.num_classes != dataset.num_classes):
    raise ValueError(
        f"--{flag}={workdir} was trained on examples of shape {list(run.input_shape)} with "
        f"{run.num_classes} classes; this run has {list(dataset.input_shape)} and "
        f"{dataset.num_classes}")
  return run


def init_from_run(state: step_lib.TrainState, run: runs.Run,
                  train_config: step_lib.TrainConfig) -> step_lib.TrainState:
  """``state`` with its network parameters replaced by a finished run's (policies kept).

  The source may be a dense or a gated run; its network part must have exactly the
  shapes of this model's network part.

  Raises:
    ValueError: the shapes differ (one line naming the first mismatch).
  """
  check_network_shapes(state.params, run)

  def merge(ours_tree, theirs_tree):
    if isinstance(ours_tree, dict) or hasattr(ours_tree, "items"):
      return {key: (merge(value, theirs_tree[key]) if key in theirs_tree else value)
              for key, value in ours_tree.items()}
    return jnp.asarray(theirs_tree, jnp.asarray(ours_tree).dtype)

  params = merge(state.params, run.params)
  return state.replace(params=params,
                       opt_state=step_lib.make_optimizer(train_config).init(params))


def check_network_shapes(params, run: runs.Run) -> None:
  """Raises ``ValueError`` (one line) unless ``run``'s network part has the shapes of
  ``params``' network part (arrays or ``ShapeDtypeStruct``)."""
  ours = layers.strip_policy_params(params)
  theirs = layers.strip_policy_params(run.params)
  our_shapes = {jax.tree_util.keystr(path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_flatten_with_path(ours)[0]}
  their_shapes = {jax.tree_util.keystr(path): tuple(np.shape(leaf))
                  for path, leaf in jax.tree_util.tree_flatten_with_path(theirs)[0]}
  if our_shapes != their_shapes:
    mismatch = sorted(set(our_shapes.items()) ^ set(their_shapes.items()))[0][0]
    raise ValueError(
        f"--init_from: the run's network does not have this model's shape (first difference "
        f"at {mismatch}: run {their_shapes.get(mismatch)}, model {our_shapes.get(mismatch)}); "
        "use a run with the same --arch, --hidden and --block_size")


def teacher_fn(run: runs.Run | None):
  """``x -> logits`` of a distillation teacher run with every block on (``None``: none)."""
  if run is None:
    return None
  module = run.module.clone(gated=False)
  params = jax.tree_util.tree_map(jnp.asarray, layers.strip_policy_params(run.params))
  return lambda x: jax.lax.stop_gradient(module.apply({"params": params}, x, mode="all")[0])
