"""Test tiers of a parametrized grid: a representative subset in the fast tier, the rest slow.

The README's test command deselects ``@pytest.mark.slow`` (setup.cfg); ``.ci/run`` runs
both tiers. A grid keeps in the fast tier the cases that cover each of its classes (every
value of every axis at least once); the other combinations run in the slow tier only.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import pytest


def split(cases: Iterable[Sequence], fast: Iterable[Sequence]) -> list:
  """``cases`` as ``pytest.param``\\ s, those not in ``fast`` marked slow.

  Args:
    cases: the grid, one tuple of parameter values per case (the ids pytest derives from
      the values are those of a plain parametrize).
    fast: the cases of the fast tier; each must be one of ``cases``.

  Returns:
    One ``pytest.param`` per case, in the order of ``cases``.
  """
  cases = [tuple(case) for case in cases]
  fast = {tuple(case) for case in fast}
  unknown = fast - set(cases)
  if unknown:
    raise ValueError(f"fast cases {sorted(map(str, unknown))} are not in the grid")
  return [pytest.param(*case, marks=() if case in fast else pytest.mark.slow)
          for case in cases]


def split_product(axes: Sequence[Sequence], fast: Iterable[Sequence]) -> list:
  """:func:`split` of the product of ``axes`` (the first axis varies slowest)."""
  return split(itertools.product(*axes), fast)
