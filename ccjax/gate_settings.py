"""The settings every gated layer family shares, declared once.

:class:`GateSettings` is a frozen dataclass (block size, gated or dense, estimator, the
policies' initial probability, bound and hidden units, the Gumbel temperature, the
computation dtype). The Linen modules (:class:`ccjax.GatedDense`,
:class:`ccjax.GatedMLP`, :class:`ccjax.GatedConv`, :class:`ccjax.GatedResidualBlock`,
:class:`ccjax.GatedCNN`, :class:`ccjax.GatedTransformer`) inherit these fields as
keyword-only module attributes from :class:`GateFields` (built from the dataclass, so
the list exists once), read them back as ``module.gate_settings`` and hand them to
their sub-modules with ``**settings.as_kwargs()``. The NNX twins
(:mod:`ccjax.nnx`) take ``settings=GateSettings(...)`` and/or the same keywords.

Example::

  settings = ccjax.GateSettings(block_size=32, estimator="straight_through")
  model = ccjax.GatedMLP(hidden=(256, 256), num_classes=10, **settings.as_kwargs())
  assert model.gate_settings == settings
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn

from ccjax import estimators
from ccjax import policy as policy_lib
from ccjax import validation


def validate_policy_hidden(policy_hidden: Any) -> int:
  """``policy_hidden`` if it is an integer >= 0 (the policy's hidden units; 0: linear)."""
  return validation.check_int("policy_hidden", policy_hidden, minimum=0)


def validate_policy_rank(policy_rank: Any, policy_hidden: int = 0) -> int:
  """``policy_rank`` if it is an integer >= 0 (0: the full ``[in, blocks]`` policy matrix)
  and not combined with a hidden layer."""
  rank = validation.check_int("policy_rank", policy_rank, minimum=0)
  if rank and policy_hidden:
    raise validation.ConfigError(
        "policy_rank", f"={rank} factorises the linear policy; it cannot be combined with "
        f"policy_hidden={policy_hidden} (a hidden layer): give one of them")
  return rank


def validate_gate_settings(estimator: str, policy_eps: float, policy_init_prob) -> None:
  """Checks a gated module's policy settings (one init prob or a sequence of them)."""
  estimators.get(estimator)  # raises, naming the registered estimators
  policy_lib.validate_eps(policy_eps)
  probs = (policy_init_prob,) if isinstance(policy_init_prob, (int, float)) else policy_init_prob
  for prob in probs:
    if not isinstance(prob, (int, float)) or not 0.0 < prob < 1.0:
      raise ValueError(f"policy_init_prob must be in (0, 1), got {prob!r}")


@dataclasses.dataclass(frozen=True)
class GateSettings:
  """What a gated layer (or every gated layer of a model) is configured with.

  Attributes:
    block_size: units (channels) per gated block.
    gated: ``False`` gives the dense baseline (no policies, ``aux=None``).
    estimator: a registered estimator name (:data:`ccjax.ESTIMATORS`): how ``mode='sample'``
      draws masks during training.
    policy_init_prob: initial probability of every block: one value, or one per gated
      layer of a model.
    policy_eps: probability bound of the policies (:func:`ccjax.policy_probs`).
    policy_hidden: hidden units of every policy (:class:`ccjax.BlockPolicy`), 0: linear.
    policy_rank: rank ``r`` of a factorised linear policy ``Z = A B`` (``A [in, r]``,
      ``B [r, blocks]``; ``in * r + r * blocks`` MACs instead of ``in * blocks``), 0: the
      full matrix. Sparse inference folds ``A B`` into one matrix (the same function).
    gumbel_temperature: temperature of the ``gumbel`` estimator.
    dtype: computation dtype of the gated products (``None``: from the inputs); the
      policies always run in float32.
  """
  block_size: int = 64
  gated: bool = True
  estimator: str = "reinforce"
  policy_init_prob: float | Sequence[float] = 0.5
  policy_eps: float = policy_lib.DEFAULT_EPS
  policy_hidden: int = 0
  policy_rank: int = 0
  gumbel_temperature: float = 0.5
  dtype: Any = None

  def validate(self, num_gated_layers: int | None = None) -> "GateSettings":
    """Returns ``self`` if the settings are valid, else raises a one-line ValueError.

    Args:
      num_gated_layers: the model's gated layers: a per-layer ``policy_init_prob`` must
        have this many values (``None``: not checked).
    """
    validation.check_int("block_size", self.block_size)
    init_probs = self.policy_init_prob
    if num_gated_layers is not None:
      init_probs = validation.per_layer_values(init_probs, num_gated_layers, "policy_init_prob")
    validate_gate_settings(self.estimator, self.policy_eps, init_probs)
    validate_policy_hidden(self.policy_hidden)
    validate_policy_rank(self.policy_rank, self.policy_hidden)
    return self

  def layer(self, index: int, num_gated_layers: int) -> "GateSettings":
    """The settings of gated layer ``index`` of ``num_gated_layers``: one init prob."""
    init_probs = validation.per_layer_values(self.policy_init_prob, num_gated_layers,
                                             "policy_init_prob")
    return dataclasses.replace(self, policy_init_prob=init_probs[index])

  def replace(self, **changes: Any) -> "GateSettings":
    """A copy with ``changes``; an unknown name raises a one-line ValueError."""
    unknown = sorted(set(changes) - set(GATE_SETTING_NAMES))
    if unknown:
      raise ValueError(f"unknown gate setting {unknown[0]!r}; allowed: "
                       f"{'|'.join(GATE_SETTING_NAMES)}")
    return dataclasses.replace(self, **changes)

  def as_kwargs(self) -> dict[str, Any]:
    """``{field: value}`` (shallow), to construct a gated module with these settings."""
    return {name: getattr(self, name) for name in GATE_SETTING_NAMES}


GATE_SETTING_NAMES = tuple(field.name for field in dataclasses.fields(GateSettings))


def _linen_gate_fields() -> type:
  """A Linen module base with every :class:`GateSettings` field as a keyword-only attribute
  (same name, type and default): the fields are declared once, in the dataclass."""
  fields = dataclasses.fields(GateSettings)
  namespace = {"__annotations__": {field.name: field.type for field in fields},
               "__module__": __name__,
               "__qualname__": "GateFields",
               "__doc__": "The :class:`GateSettings` fields as keyword-only module attributes.",
               "gate_settings": property(lambda module: GateSettings(
                   **{name: getattr(module, name) for name in GATE_SETTING_NAMES}),
                   doc="This module's :class:`GateSettings` (its gate fields)."),
               **{field.name: field.default for field in fields}}
  return type("GateFields", (nn.Module,), namespace, kw_only=True)


GateFields = _linen_gate_fields()


def block_size_default(size: int) -> Any:
  """A module's own default ``block_size`` (a keyword-only dataclass field)."""
  return dataclasses.field(default=size, kw_only=True)


def resolve(settings: GateSettings | None, overrides: dict[str, Any]) -> GateSettings:
  """``settings`` (default :class:`GateSettings`) with keyword ``overrides`` applied."""
  return (settings or GateSettings()).replace(**overrides)
