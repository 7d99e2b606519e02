"""``LMConfig``: the config of a byte-level language-modelling run, and its model.

The shared fields and their defaults are :class:`ccjax.run_config.RunConfig`'s; this
class adds the transformer's fields and the LM's own defaults (each with its reason).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from ccjax import memory
from ccjax import policy as policy_lib
from ccjax import run_config
from ccjax import step as step_lib
from ccjax import text
from ccjax import transformer
from ccjax import validation

# gated: per-token policies trained by REINFORCE (or --estimator); dense: no gates;
# router: MoE-style top-k router over the same blocks (estimator 'router').
LM_MODELS = ("gated", "dense", "router")
# Test-time policies of gated LMs (default: threshold for gated, top_k for router).
LM_EVAL_POLICIES = ("threshold", "top_k", "capped")
_ARCH_FIELDS = ("model", "num_layers", "d_model", "num_heads", "mlp_width", "block_size",
                "context")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig(run_config.RunConfig):
  """One language-modelling run, validated at construction: the shared fields of
  :class:`ccjax.run_config.RunConfig` and the transformer's own.

  Attributes:
    dataset: ``grammar`` (generated, fixed) or ``text:PATH``.
    model: ``gated`` (per-token gated MLPs, policies trained with ``train.estimator``),
      ``dense`` (``gated=False``) or ``router`` (the same gated MLPs with an MoE-style
      top-k router: ``train.estimator`` is set to ``router``).
    num_layers, d_model, num_heads, mlp_width, block_size, context: the transformer.
    policy_init_prob: initial block probability.
    decode_benchmark: time batch-1 decoding at the end.
    eval_policy: test-time masks ``threshold`` | ``top_k`` (exactly ``round(tau *
      blocks)`` per token) | ``capped``; ``None``: ``top_k`` for ``router``, else
      ``threshold``.
    train: the train step's hyperparameters (``tau`` is also the TEAL fraction of a
      dense run).
  """
  TASK = "lm"
  MODELS = LM_MODELS
  EVAL_POLICIES = LM_EVAL_POLICIES
  DEFAULT_STEPS = 1000
  # The test policy does not change the trained numbers of an LM (its default follows
  # the model), so a resume may change it.
  RESUME_FREE_FIELDS = run_config.SHARED_RESUME_FREE_FIELDS | {"decode_benchmark",
                                                               "eval_policy"}

  # The LM's values of shared fields (the others: RunConfig's defaults).
  dataset: str = text.DEFAULT_CORPUS
  model: str = "gated"
  block_size: int = 32
  batch_size: int = 32
  eval_every: int = 250
  checkpoint_every: int = 250
  # lambda_s = 4 (not the classifiers' 2): chosen on validation, the smallest weight that
  # keeps every layer of every seed within 0.03 of tau (docs/lm.md).
  train: step_lib.TrainConfig = step_lib.TrainConfig(reinforce_cost="position", lambda_s=4.0)
  # Its own fields; the model's shape defaults are the module's (one place).
  num_layers: int = transformer.GatedTransformer.num_layers
  d_model: int = transformer.GatedTransformer.d_model
  num_heads: int = transformer.GatedTransformer.num_heads
  mlp_width: int = transformer.GatedTransformer.mlp_width
  context: int = transformer.GatedTransformer.max_len
  policy_init_prob: float = 0.5
  decode_benchmark: bool = True

  def __post_init__(self):
    super().__post_init__()
    if self.model == "router" and self.train.estimator != "router":
      object.__setattr__(self, "train", dataclasses.replace(self.train, estimator="router"))
    if self.model == "gated" and self.train.estimator == "router":
      raise validation.ConfigError("estimator", "=router is --model=router; --model=gated "
                                   "takes reinforce|straight_through|gumbel")
    for name in ("num_layers", "d_model", "num_heads", "mlp_width", "block_size", "context"):
      validation.check_int(name, getattr(self, name))
    validation.check_float("policy_init_prob", self.policy_init_prob, low=0.0, high=1.0,
                           low_open=True, high_open=True)
    if self.d_model % self.num_heads:
      raise validation.ConfigError("num_heads", f"={self.num_heads} must divide "
                                   f"--d_model={self.d_model}")
    if self.mlp_width % self.block_size:
      raise validation.ConfigError("block_size", f"={self.block_size} must divide "
                                   f"--mlp_width={self.mlp_width}")
    self.train.taus(self.num_layers)
    if self.regroup_step and self.model == "dense":
      raise validation.ConfigError(
          "regroup_step", f"={self.regroup_step} regroups a gated model's MLP units into "
          "blocks: needs --model=gated or router, got dense")

  def build_model(self) -> transformer.GatedTransformer:
    return transformer.GatedTransformer(
        vocab_size=256, max_len=self.context, num_layers=self.num_layers,
        d_model=self.d_model, num_heads=self.num_heads, mlp_width=self.mlp_width,
        block_size=self.block_size, gated=self.model != "dense",
        estimator=self.train.estimator, policy_init_prob=self.policy_init_prob)

  def layer_capacities(self) -> tuple[int, ...]:
    """Blocks per token and layer of the ``top_k`` / ``capped`` policies (and of the router
    in training): ``round(tau * blocks)``, >= 1."""
    blocks = self.mlp_width // self.block_size
    return tuple(policy_lib.top_k_capacity(tau, blocks)
                 for tau in self.train.taus(self.num_layers))

  def top_k_capacity(self) -> int:
    """The first layer's :meth:`layer_capacities` (TEAL-style thresholding's budget)."""
    return self.layer_capacities()[0]

  def eval_mode(self) -> str:
    """The test-time policy: ``eval_policy``, or by default ``top_k`` for ``router`` and
    ``threshold`` otherwise."""
    if self.eval_policy is not None:
      return self.eval_policy
    return "top_k" if self.model == "router" else "threshold"

  def eval_capacity(self) -> tuple[int, ...] | None:
    """Per-layer capacity of the test-time policy (``None`` for ``threshold``)."""
    return None if self.eval_mode() == "threshold" else self.layer_capacities()

  def architecture(self) -> dict[str, Any]:
    """What a checkpoint must match to be resumed."""
    return {name: getattr(self, name) for name in _ARCH_FIELDS}

  def model_for(self, architecture: dict[str, Any]
                ) -> tuple[transformer.GatedTransformer, tuple[int, ...], int]:
    """``(module, input_shape, num_classes)`` of a checkpoint whose metadata has
    ``architecture`` (:meth:`architecture`: this config's own fields): one window of
    ``context`` bytes in, 256 byte logits out."""
    del architecture  # the config's own fields are the architecture
    return self.build_model(), (self.context,), 256


def train_step_bytes(config: LMConfig, model: transformer.GatedTransformer) -> int:
  """About how many bytes one training step of ``config`` needs (float32).

  The train state (parameters, gradients and two Adam moments: 16 bytes per parameter)
  plus the activations kept for the backward pass, per token of the batch
  (``batch_size * context`` tokens): per layer about 16 ``d_model``-wide and 6
  ``mlp_width``-wide rows and 3 attention rows of ``context`` scores per head, and the
  logits and their gradients (3 ``vocab``-wide rows).
  """
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0), "gate": jax.random.PRNGKey(0)},
      jnp.zeros((1, config.context), jnp.int32), mode="all"))
  num_params = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))
  per_token = (config.num_layers * (16 * config.d_model + 6 * config.mlp_width
                                    + 3 * config.num_heads * config.context)
               + 3 * model.vocab_size)
  return 16 * num_params + 4 * config.batch_size * config.context * per_token


def check_batch_fits_memory(config: LMConfig, model: transformer.GatedTransformer) -> None:
  """Raises ``ConfigError`` (``batch_size``) if a training step needs more memory than is
  free."""
  needed = train_step_bytes(config, model)
  available, where = memory.available_bytes()
  if needed > available:
    raise validation.ConfigError(
        "batch_size", f"={config.batch_size} needs about {needed / 2**30:.1f} GiB per "
        f"training step (--context={config.context}, --d_model={config.d_model}, "
        f"--mlp_width={config.mlp_width}, --num_layers={config.num_layers}), more than the "
        f"{available / 2**30:.1f} GiB free on the {where}; use a smaller --batch_size")


def decode_policy(config: LMConfig) -> dict[str, Any]:
  """The test-time policy as :func:`ccjax.lm_decode.make_decode` takes it (``mode``,
  ``top_k``): sparse decoding runs the blocks the evaluation ran."""
  return {"mode": config.eval_mode(), "top_k": config.eval_capacity()}
