"""What sparse inference reports, the same for every gated model family."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np


class InferenceInfo(NamedTuple):
  """What one call of a sparse inference function did, per gated layer.

  Attributes:
    masks: one effective ``[batch, blocks]`` 0/1 mask per gated layer (``[batch, 1]``
      for a skippable residual block): what was really computed, overflow applied. The
      module applied with ``block_masks=masks`` gives the same logits.
    probs: the policies' probabilities, same shapes as ``masks``.
    requested: ``[layers]`` int32, (example, block) pairs the test-time policy asked to run.
    dropped: ``[layers]`` int32, of those, how many the static capacities dropped.
  """
  masks: tuple[jax.Array, ...]
  probs: tuple[jax.Array, ...]
  requested: jax.Array
  dropped: jax.Array


def overflow_rate(infos: InferenceInfo | list[InferenceInfo]) -> float:
  """Dropped / requested (example, block) pairs over layers (and calls); 0.0 if none."""
  infos = [infos] if isinstance(infos, InferenceInfo) else infos
  requested = sum(int(np.sum(np.asarray(info.requested))) for info in infos)
  dropped = sum(int(np.sum(np.asarray(info.dropped))) for info in infos)
  return dropped / requested if requested else 0.0
