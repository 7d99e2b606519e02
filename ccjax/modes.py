"""Every way a gate chooses its mask, listed once.

Each :class:`Mode` says what it does (one phrase, for flag help and errors), whether it
is deterministic, whether it needs a per-example block count (``capacity`` / ``top_k``),
whether the gate's policy chooses it, and whether sparse inference
(:func:`ccjax.make_inference`) runs it. The lists everything else uses (the layers'
``mode=`` values, the deterministic ones, the sparse-inference ones, the test-time
policies of a task) are derived from :data:`MODES`; adding a mode is one entry here
(plus its mask, in :func:`ccjax.policy.deterministic_mask` or an estimator).

This module imports nothing from ccjax (every layer may use it).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mode:
  """One gate mode.

  Attributes:
    name: the ``mode=`` / ``--eval_policy`` value.
    description: what it runs, one phrase (flag help).
    deterministic: no randomness (no ``'gate'`` key needed).
    needs_capacity: it needs blocks per example (``capacity=`` of a layer,
      ``Capacities(top_k=...)`` of sparse inference, ``round(tau * blocks)`` in a run).
    policy: the gate's policy chooses the mask (``False``: chosen without it).
    sparse: :func:`ccjax.make_inference` runs it (really skipping blocks).
  """
  name: str
  description: str
  deterministic: bool = True
  needs_capacity: bool = False
  policy: bool = True
  sparse: bool = True


MODES: tuple[Mode, ...] = (
    Mode("sample", "Bernoulli draws from the policy (the training masks)",
         deterministic=False, sparse=False),
    Mode("threshold", "the blocks with p > 0.5"),
    Mode("top_k", "exactly k most probable blocks per example (fixed compute)",
         needs_capacity=True),
    Mode("capped", "the blocks with p > 0.5, at most k per example", needs_capacity=True),
    Mode("all", "every block (the dense network)", sparse=False),
    Mode("activation_top_k", "the k blocks of largest activation norm (training-free, "
         "TEAL-style; no policy)", needs_capacity=True, policy=False, sparse=False),
)
_BY_NAME = {mode.name: mode for mode in MODES}


def get(name: str) -> Mode:
  """The mode called ``name``; an unknown name raises a one-line ValueError listing all."""
  if name not in _BY_NAME:
    raise ValueError(f"mode must be one of {'|'.join(_BY_NAME)}, got {name!r}")
  return _BY_NAME[name]


def names(**attributes: bool) -> tuple[str, ...]:
  """The modes whose :class:`Mode` attributes equal ``attributes``, in :data:`MODES` order.

  ``names(policy=True)`` are the policy modes, ``names(sparse=True)`` those of sparse
  inference, ``names(policy=True, deterministic=True)`` the deterministic policy modes.
  """
  return tuple(mode.name for mode in MODES
               if all(getattr(mode, key) == value for key, value in attributes.items()))


def check(mode: str, allowed: tuple[str, ...], field: str = "mode") -> str:
  """Returns ``mode`` if it is in ``allowed``, else raises a one-line ValueError naming
  ``field`` and the allowed values."""
  if mode not in allowed:
    raise ValueError(f"{field} must be one of {'|'.join(allowed)}, got {mode!r}")
  return mode


def help_text(allowed: tuple[str, ...]) -> str:
  """``"threshold (the blocks with p > 0.5) | top_k (...)"``: the modes, for flag help."""
  return " | ".join(f"{name} ({get(name).description})" for name in allowed)


# The lists the layers and inference use.
POLICY_MODES = names(policy=True)
DETERMINISTIC_MODES = names(policy=True, deterministic=True)
LAYER_MODES = tuple(mode.name for mode in MODES)
INFERENCE_MODES = names(sparse=True)
CAPACITY_MODES = names(needs_capacity=True)
