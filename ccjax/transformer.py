"""A small decoder-only transformer whose MLPs are gated per token, in blocks.

Axis letters: ``batch`` sequences, ``seq`` positions, ``vocab`` tokens, ``d`` model
width, ``heads`` attention heads, ``blocks`` gated blocks of one MLP hidden layer.

Each block is pre-LayerNorm causal self-attention followed by an MLP that is a
:class:`ccjax.GatedMLP` with one hidden layer (``flatten=False``): its policy gives every
position its own mask ``[batch, seq, blocks]``, trained by the same train step as the
classifiers (:func:`ccjax.make_train_step`, token-level loss). ``gated=False`` is the
dense baseline with the same parameters minus the policies.

Decoding (``decode=True``) keeps a KV cache in the Flax collection ``'cache'`` (create it
with :func:`init_cache`, pass ``mutable=['cache']``); ``mlp_fns`` replaces each block's
MLP by a function (the batch-1 sparse path of :mod:`ccjax.lm_decode`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ccjax import flops
from ccjax import gate_settings as gate_settings_lib
from ccjax import layers
from ccjax import validation

# Name of each transformer block's gated MLP (its parameters: params[block][MLP_NAME]).
MLP_NAME = "mlp"
_NEG_INF = -1e30


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with an optional KV cache.

  Attributes:
    num_heads: attention heads; must divide the model width.
    max_len: longest sequence (the cache length).
    dtype: computation dtype (``None``: inferred).
  """
  num_heads: int
  max_len: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, *, decode: bool = False) -> jax.Array:
    """``x [batch, seq, d]`` -> ``[batch, seq, d]``; with ``decode`` the positions follow
    those already in the cache."""
    batch, seq, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = nn.Dense(3 * dim, name="qkv", dtype=self.dtype)(x)
    query, key, value = (qkv.reshape(batch, seq, 3, self.num_heads, head_dim)[:, :, i]
                         for i in range(3))
    query_pos = jnp.arange(seq)
    if decode:
      cached_key = self.variable("cache", "key", jnp.zeros,
                                 (batch, self.max_len, self.num_heads, head_dim), key.dtype)
      cached_value = self.variable("cache", "value", jnp.zeros,
                                   (batch, self.max_len, self.num_heads, head_dim), value.dtype)
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      start = index.value
      key = jax.lax.dynamic_update_slice(cached_key.value, key, (0, start, 0, 0))
      value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, start, 0, 0))
      cached_key.value, cached_value.value, index.value = key, value, start + seq
      query_pos = query_pos + start
    allowed = jnp.arange(key.shape[1])[None, :] <= query_pos[:, None]      # [seq, keys]
    scores = jnp.einsum("bqhc,bkhc->bhqk", query, key) / math.sqrt(head_dim)
    scores = jnp.where(allowed, scores.astype(jnp.float32), _NEG_INF)
    weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    out = jnp.einsum("bhqk,bkhc->bqhc", weights, value).reshape(batch, seq, dim)
    return nn.Dense(dim, name="out", dtype=self.dtype)(out)


def _gated_mlp(d_model: int, mlp_width: int, settings: gate_settings_lib.GateSettings,
               **kwargs) -> layers.GatedMLP:
  """The MLP of one block: ``[..., d] -> [..., d]``, one mask per position."""
  return layers.GatedMLP(hidden=(mlp_width,), num_classes=d_model, flatten=False,
                         **settings.as_kwargs(), **kwargs)


class TransformerBlock(gate_settings_lib.GateFields):
  """Pre-LN attention + gated MLP (a one-hidden-layer :class:`ccjax.GatedMLP`), residual.

  Attributes:
    num_heads: attention heads.
    max_len: longest sequence.
    mlp_width: the MLP's hidden units.
    block_size, gated, estimator, policy_init_prob, policy_eps, policy_hidden,
      gumbel_temperature, dtype: the MLP's :class:`ccjax.GateSettings` (keyword-only; one
      ``policy_init_prob``); ``dtype`` is also the attention's.
  """
  num_heads: int
  max_len: int
  mlp_width: int

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: str, capacity: int | None,
               block_mask: jax.Array | None, decode: bool,
               mlp_fn: Callable[[jax.Array], jax.Array] | None
               ) -> tuple[jax.Array, layers.GateAux | None]:
    """``x [batch, seq, d]`` -> ``(x [batch, seq, d], aux)`` (``aux`` of the MLP's gate)."""
    attention = CausalSelfAttention(self.num_heads, self.max_len, self.dtype, name="attention")
    x = x + attention(nn.LayerNorm(name="ln_attention", dtype=self.dtype)(x), decode=decode)
    hidden = nn.LayerNorm(name="ln_mlp", dtype=self.dtype)(x)
    if mlp_fn is not None:
      return x + mlp_fn(hidden), None
    mlp = _gated_mlp(x.shape[-1], self.mlp_width, self.gate_settings, name=MLP_NAME)
    out, aux = mlp(
        hidden, mode=mode, capacity=capacity,
        block_masks=None if block_mask is None else (block_mask,))
    return x + out, aux[0]


class GatedTransformer(gate_settings_lib.GateFields):
  """Decoder-only byte/token language model with per-token gated MLPs.

  Attributes:
    vocab_size: tokens (256 for bytes).
    max_len: context length (learned position embeddings, cache length).
    num_layers: transformer blocks.
    d_model: model width.
    num_heads: attention heads; must divide ``d_model``.
    mlp_width: MLP hidden units, a multiple of ``block_size``.
    block_size, gated, estimator, policy_init_prob, policy_eps, policy_hidden,
      gumbel_temperature, dtype: the :class:`ccjax.GateSettings` of every MLP
      (keyword-only; ``block_size`` defaults to 32 here); ``gated=False`` is the dense
      baseline, ``policy_init_prob`` is one value or one per layer, ``policy_hidden > 0``
      is evaluated masked-dense only (sparse inference runs linear policies), ``dtype``
      is the whole model's computation dtype.
  """
  vocab_size: int = 256
  max_len: int = 64
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  mlp_width: int = 512
  block_size: int = gate_settings_lib.block_size_default(32)

  def __post_init__(self):
    for name in ("vocab_size", "max_len", "num_layers", "d_model", "num_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if self.d_model % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}")
    for layer in range(self.num_layers):  # validates mlp_width, block_size, policy settings
      self.mlp_module(layer)
    super().__post_init__()

  @property
  def num_blocks(self) -> int:
    """Gated blocks per MLP."""
    return self.mlp_width // self.block_size

  def gate_names(self) -> tuple[str, ...]:
    """Sub-module names of the transformer blocks, in the order of ``aux``."""
    return tuple(f"block_{index}" for index in range(self.num_layers))

  def mlp_module(self, layer: int) -> layers.GatedMLP:
    """The (unbound) :class:`ccjax.GatedMLP` of block ``layer``: ``[..., d] -> [..., d]``."""
    return _gated_mlp(self.d_model, self.mlp_width,
                      self.gate_settings.layer(layer, self.num_layers), parent=None)

  def mlp_params(self, params) -> tuple[Any, ...]:
    """The parameters of each block's MLP (for :meth:`mlp_module`), in layer order."""
    return tuple(params[name][MLP_NAME] for name in self.gate_names())

  @nn.compact
  def __call__(self, tokens: jax.Array, *, mode: str = "sample",
               capacity: int | Sequence[int] | None = None,
               block_masks: Sequence[jax.Array] | None = None, decode: bool = False,
               mlp_fns: Sequence[Callable[[jax.Array], jax.Array]] | None = None
               ) -> tuple[jax.Array, tuple[layers.GateAux | None, ...]]:
    """Applies the model.

    Args:
      tokens: ``[batch, seq]`` int token ids, ``seq <= max_len``.
      mode: gate mode of every MLP (see :class:`ccjax.GatedDense`; ``activation_top_k``
        gives training-free TEAL-style masks, also on the dense model).
      capacity: blocks per position for ``top_k`` / ``activation_top_k``, one value or
        one per layer.
      block_masks: optional ``[batch, seq, blocks]`` masks, one per layer, used instead of
        the policies' own.
      decode: use and extend the KV cache (collection ``'cache'``, see
        :func:`init_cache`); ``tokens`` then continue the cached positions.
      mlp_fns: optional per-layer functions ``[batch, seq, d] -> [batch, seq, d]`` run
        instead of the MLPs (decode-time sparse path); ``aux`` is then ``None``.

    Returns:
      ``(logits [batch, seq, vocab], aux)``, one :class:`ccjax.GateAux` (``None`` when
      ungated) per layer, with ``[batch, seq, blocks]`` probabilities and masks.
    """
    seq = tokens.shape[1]
    if seq > self.max_len:
      raise ValueError(f"sequence length {seq} exceeds max_len={self.max_len}")
    capacities = ((None,) * self.num_layers if capacity is None else
                  validation.per_layer_values(capacity, self.num_layers, "capacity"))
    if block_masks is not None and len(block_masks) != self.num_layers:
      raise ValueError(f"block_masks needs one mask per layer ({self.num_layers}), "
                       f"got {len(block_masks)}")
    positions = jnp.arange(seq)
    if decode:
      offset = self.variable("cache", "offset", lambda: jnp.zeros((), jnp.int32))
      positions = positions + offset.value
      offset.value = offset.value + seq
    x = nn.Embed(self.vocab_size, self.d_model, name="embed", dtype=self.dtype)(tokens)
    x = x + nn.Embed(self.max_len, self.d_model, name="position",
                     dtype=self.dtype)(positions)[None]
    aux = []
    for index, name in enumerate(self.gate_names()):
      x, layer_aux = TransformerBlock(
          self.num_heads, self.max_len, self.mlp_width, name=name,
          **self.gate_settings.layer(index, self.num_layers).as_kwargs())(
              x, mode=mode, capacity=capacities[index],
              block_mask=None if block_masks is None else block_masks[index], decode=decode,
              mlp_fn=None if mlp_fns is None else mlp_fns[index])
      aux.append(layer_aux)
    x = nn.LayerNorm(name="ln_final", dtype=self.dtype)(x)
    logits = nn.Dense(self.vocab_size, name="head", dtype=self.dtype)(x)
    return logits, tuple(aux)


def init_cache(model: GatedTransformer, batch_size: int) -> Any:
  """An empty KV cache (all zeros, position 0) for ``batch_size`` sequences."""
  shapes = jax.eval_shape(
      lambda: model.init({"params": jax.random.PRNGKey(0), "gate": jax.random.PRNGKey(0)},
                         jnp.zeros((batch_size, 1), jnp.int32), mode="all", decode=True))
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def macs_per_token(model: GatedTransformer, active_fraction: Sequence[float] | None = None,
                   context: float | None = None) -> dict[str, float]:
  """Multiply-accumulates per generated token (weights, attention and policies).

  Args:
    model: the transformer.
    active_fraction: fraction of MLP blocks that run, per layer (``None``: all; a gated
      model then still pays for its policies).
    context: attended positions per token (default ``(max_len + 1) / 2``, the mean over a
      full context window).

  Returns:
    ``{'total', 'mlp', 'policy', 'attention'}`` MACs per token (``mlp`` excludes policies).
  """
  d, width = model.d_model, model.mlp_width
  context = (model.max_len + 1) / 2 if context is None else context
  fractions = ((1.0,) * model.num_layers if active_fraction is None
               else tuple(float(f) for f in active_fraction))
  mlp = sum(2 * d * width * f for f in fractions)
  policy_width = model.policy_hidden or model.policy_rank
  policy = (model.num_layers * flops.policy_macs(d, model.num_blocks, policy_width)
            if model.gated else 0)
  attention = model.num_layers * (4 * d * d + 2 * context * d)
  head = d * model.vocab_size
  return {"total": float(mlp + policy + attention + head), "mlp": float(mlp),
          "policy": float(policy), "attention": float(attention)}
