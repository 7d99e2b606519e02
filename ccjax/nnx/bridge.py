"""One train step, one checkpoint format and one ``make_inference`` for NNX models.

An NNX model keeps its parameters inside the object; ccjax's train step, loop and
checkpoints work on a pure parameter tree. :class:`FunctionalModel` gives any NNX model
that returns ``(logits, aux)`` (e.g. :class:`ccjax.nnx.GatedMLP`, or a user model with
:class:`ccjax.nnx.GatedDense` inside) the two methods the train step calls on a Linen
module, ``init_with_output`` and ``apply``, by merging a pure parameter tree into the
model's graph for each call (``nnx.split`` / ``nnx.merge``: the NNX module's own
``__call__`` runs, under ``jax.jit``, as a pure function). :func:`params_of` and
:func:`load_params` move parameters between the object and the pure tree, which is the
tree the Linen twin uses (:meth:`ccjax.nnx.GatedMLP.to_linen`), so trained NNX parameters
are checkpointed and served exactly like Linen ones.
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx
import jax

from ccjax.nnx import layers as nnx_layers


def params_of(model: nnx.Module) -> dict[str, Any]:
  """The model's parameters as a pure nested dict (the Linen parameter tree)."""
  return nnx.state(model, nnx.Param).to_pure_dict()


def load_params(model: nnx.Module, params: dict[str, Any]) -> None:
  """Writes a pure parameter tree (e.g. ``TrainState.params``) into ``model`` in place.

  Raises:
    ValueError: ``params`` does not have the model's parameter tree.
  """
  state = nnx.state(model, nnx.Param)
  expected = jax.tree_util.tree_structure(state.to_pure_dict())
  if jax.tree_util.tree_structure(params) != expected:
    raise ValueError(f"params must have the model's parameter tree {expected}, got "
                     f"{jax.tree_util.tree_structure(params)}")
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)


def _gated_layers(model: nnx.Module) -> list[nnx_layers.GatedDense]:
  return [node for _, node in nnx.iter_graph(model)
          if isinstance(node, nnx_layers.GatedDense) and node.gated]


class FunctionalModel:
  """The Linen-style functional face of an NNX model, for :func:`ccjax.make_train_step`,
  :func:`ccjax.make_eval_step` and :func:`ccjax.init_train_state`.

  ``apply({'params': params}, x, mode=..., rngs={'gate': key}, **kwargs)`` runs
  ``model(x, mode=..., rng=key, **kwargs)`` with ``params`` merged in; the model object
  itself is never mutated (write trained parameters back with :func:`load_params`).

  Attributes:
    estimator: the gated layers' estimator (the train step checks it against its config).
    gated: whether the model has a gated layer.
  """

  def __init__(self, model: nnx.Module):
    if not isinstance(model, nnx.Module):
      raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    self._graphdef, self._params, self._rest = nnx.split(model, nnx.Param, ...)
    gated = _gated_layers(model)
    estimators = sorted({layer.estimator for layer in gated})
    if len(estimators) > 1:
      raise ValueError(f"the model's gated layers use several estimators {estimators}; "
                       "one train step trains one")
    self.gated = bool(gated)
    self.estimator = estimators[0] if estimators else None
    if isinstance(model, nnx_layers.GatedMLP):
      self.hidden: Sequence[int] = model.hidden   # the train step checks taus against it

  def model_with(self, params: dict[str, Any]) -> nnx.Module:
    """A copy of the model holding ``params`` (a pure tree; may hold tracers)."""
    state = jax.tree_util.tree_map(lambda leaf: leaf, self._params)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self._graphdef, state, self._rest)

  def apply(self, variables: dict[str, Any], inputs: jax.Array, *, mode: str = "sample",
            rngs: dict[str, jax.Array] | None = None, **kwargs):
    """``(logits, aux)`` of the model with ``variables['params']`` on ``inputs``."""
    rng = (rngs or {}).get("gate")
    return self.model_with(variables["params"])(inputs, mode=mode, rng=rng, **kwargs)

  def init_with_output(self, rngs: dict[str, jax.Array], inputs: jax.Array, *,
                       mode: str = "all"):
    """``(outputs, {'params': params})`` with the model's current parameters (NNX models
    are initialised when built; ``rngs`` only feeds ``mode='sample'``)."""
    params = self._params.to_pure_dict()
    return self.apply({"params": params}, inputs, mode=mode, rngs=rngs), {"params": params}


def make_inference(model: nnx_layers.GatedMLP, **kwargs):
  """:func:`ccjax.make_inference` of an NNX :class:`~ccjax.nnx.GatedMLP` (its Linen twin
  with the same parameters); keyword arguments as there."""
  from ccjax.inference import api  # pylint: disable=g-import-not-at-top
  if not isinstance(model, nnx_layers.GatedMLP):
    raise TypeError("ccjax.nnx.make_inference takes a ccjax.nnx.GatedMLP, got "
                    f"{type(model).__name__}")
  return api.make_inference(model.to_linen(), params_of(model), **kwargs)
