"""What an inference kernel backend is: the small protocol every backend file fills in.

A backend is one :class:`Backend` object, defined in its own module
(:mod:`~ccjax.inference.kernels.xla`, :mod:`~ccjax.inference.kernels.ffi_cpu`,
:mod:`~ccjax.inference.kernels.pallas_gpu`) and listed once in
:data:`ccjax.inference.kernels.REGISTRY`. It says its name, on which model families and
dtypes it runs, whether it can run on this machine (and why not), and provides the
operations the sparse paths need; an operation it leaves ``None`` falls back to the
generic path on stock XLA ops. Callers never compare backend names.

Axis letters as in :mod:`~ccjax.inference.kernels.xla`: ``groups``, ``rows``, ``k``,
``n``, ``weights``; ``in`` input features, ``classes`` logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

# The model families of :func:`ccjax.make_inference` (its adapters' names).
MLP = "mlp"
TRANSFORMER = "transformer"
CNN = "cnn"
FAMILIES = (MLP, TRANSFORMER, CNN)


@dataclasses.dataclass(frozen=True)
class Backend:
  """One inference kernel backend.

  Attributes:
    name: the name runs report (``results.json``, ``fn.backend``, ``python -m ccjax.info``).
    unavailable_reason: ``platform -> None`` when the backend runs on the default JAX
      device of that platform (``cpu``, ``gpu``, ...), else one line saying why not.
    platform: the JAX platform whose fast kernel this is (``python -m ccjax.info`` says
      whether it is in use there); ``None`` for the portable reference.
    families: the model families it runs (:data:`FAMILIES`).
    float32_only: it runs float32 models only (others get the best backend that does not).
    layout_tiles: the block-major layout must also store the weights padded for its
      grouped matmul (:func:`ccjax.inference.kernels.pallas_gpu.pad_weight_tiles`).
    grouped_matmul: ``(x [groups, rows, k], weights [weights, k, n], weight_index
      [groups] | None, group_sizes [groups], tiles) -> [groups, rows, n]``, the
      minibatch path's product; ``None``: the XLA one.
    network_forward: ``(block_major, x [batch, in], config) -> (logits [batch, classes],
      traces)``, the whole sparse MLP as one kernel (every batch size); ``None``: the
      batch-1 and minibatch paths of :mod:`ccjax.inference.mlp`.
    batch1_forward: ``(block_major, x [in], config) -> (logits [classes], traces)``, its
      own batch-1 path; ``None``: the XLA batch-1 path.
  """
  name: str
  unavailable_reason: Callable[[str], str | None]
  platform: str | None = None
  families: tuple[str, ...] = FAMILIES
  float32_only: bool = False
  layout_tiles: bool = False
  grouped_matmul: Callable[..., Any] | None = None
  network_forward: Callable[..., Any] | None = None
  batch1_forward: Callable[..., Any] | None = None

  def runs(self, *, float32: bool = True, family: str = MLP) -> bool:
    """Whether it runs a model of ``family`` (float32 or not) at all, on any machine."""
    return family in self.families and (float32 or not self.float32_only)
