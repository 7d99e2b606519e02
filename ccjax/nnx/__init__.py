"""Flax NNX gated modules (Flax's recommended API), on ccjax's pure core.

``ccjax.nnx.GatedDense`` / ``GatedMLP`` are twins of the Linen modules with the same
parameter tree; :class:`FunctionalModel` lets the one train step train any NNX model,
:func:`params_of` / :func:`load_params` move parameters in and out, and
:func:`make_inference` serves a trained NNX :class:`GatedMLP` with real skipping.
"""

from ccjax.nnx.bridge import FunctionalModel as FunctionalModel
from ccjax.nnx.bridge import load_params as load_params
from ccjax.nnx.bridge import make_inference as make_inference
from ccjax.nnx.bridge import params_of as params_of
from ccjax.nnx.layers import BlockPolicy as BlockPolicy
from ccjax.nnx.layers import GatedDense as GatedDense
from ccjax.nnx.layers import GatedMLP as GatedMLP

__all__ = (
    "BlockPolicy",
    "FunctionalModel",
    "GatedDense",
    "GatedMLP",
    "load_params",
    "make_inference",
    "params_of",
)
