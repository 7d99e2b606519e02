"""Statistics over seeds for the sweeps' tables: mean ± sample std and paired differences.

Pure functions on plain sequences (one value per seed), shared by the one sweep
(:mod:`ccjax.sweep`, every task). The std is the sample standard deviation
(``ddof = 1``); it and the interval are ``None`` where they are undefined (fewer than two
values). A paired difference compares two configurations seed by seed (gated − dense on
the same seed), and its 95 % interval is the Student t interval of the mean difference:
``mean ± t_{0.975, n-1} · std / sqrt(n)``.

Example::

  from ccjax import stats
  stats.mean_std([0.10, 0.12, 0.11])            # MeanStd(mean=0.11, std=0.01, n=3)
  stats.paired_difference([0.10, 0.12, 0.11],   # gated, per seed
                          [0.09, 0.10, 0.11])   # dense, same seeds in the same order
  # PairedDifference(mean=0.01, std=0.01, n=3, ci95=0.0248...)
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

CONFIDENCE = 0.95


class MeanStd(NamedTuple):
  """Mean and sample std of one quantity over seeds.

  Attributes:
    mean: the mean, ``None`` when there are no values.
    std: the sample standard deviation (``ddof = 1``), ``None`` when ``n < 2``.
    n: the number of values (``None`` entries of the input are not counted).
  """
  mean: float | None
  std: float | None
  n: int


class PairedDifference(NamedTuple):
  """Per-seed differences ``first − second``, summarised.

  Attributes:
    mean: mean of the differences.
    std: their sample standard deviation (``ddof = 1``), ``None`` when ``n < 2``.
    n: the number of pairs.
    ci95: half-width of the 95 % Student t interval of the mean, ``None`` when ``n < 2``;
      the interval is ``[mean - ci95, mean + ci95]``.
  """
  mean: float
  std: float | None
  n: int
  ci95: float | None


def _finite_floats(values: Sequence[float], name: str) -> np.ndarray:
  try:
    array = np.asarray([float(value) for value in values], dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from None
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} must be finite numbers, got {list(values)!r}")
  return array


def mean_std(values: Sequence[float | None]) -> MeanStd:
  """Mean and sample std (``ddof = 1``) of ``values``, skipping ``None`` (not measured).

  Args:
    values: ``[seeds]`` finite numbers or ``None``.

  Returns:
    :class:`MeanStd`; ``(None, None, 0)`` when no value is given.

  Raises:
    ValueError: a value that is neither a finite number nor ``None``.
  """
  present = _finite_floats([value for value in values if value is not None], "values")
  if present.size == 0:
    return MeanStd(None, None, 0)
  std = float(np.std(present, ddof=1)) if present.size > 1 else None
  return MeanStd(float(np.mean(present)), std, int(present.size))


def t_quantile(probability: float, degrees_of_freedom: int) -> float:
  """The ``probability`` quantile of Student's t with ``degrees_of_freedom`` (>= 1)."""
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  return float(scipy_stats.t.ppf(probability, degrees_of_freedom))


def paired_difference(first: Sequence[float], second: Sequence[float]) -> PairedDifference:
  """Per-seed differences ``first[i] − second[i]``: mean, sample std, n, 95 % half-width.

  Args:
    first: ``[seeds]`` values of one configuration (e.g. the gated net's test error).
    second: ``[seeds]`` values of the other (e.g. a dense baseline), on the same seeds in
      the same order.

  Returns:
    :class:`PairedDifference`.

  Raises:
    ValueError: empty or unequal-length inputs, or a value that is not a finite number.
  """
  first_array = _finite_floats(first, "first")
  second_array = _finite_floats(second, "second")
  if first_array.size == 0 or first_array.size != second_array.size:
    raise ValueError(f"paired_difference needs two equally long, non-empty sequences (one value "
                     f"per seed), got lengths {first_array.size} and {second_array.size}")
  differences = first_array - second_array
  n = int(differences.size)
  mean = float(np.mean(differences))
  if n < 2:
    return PairedDifference(mean, None, n, None)
  std = float(np.std(differences, ddof=1))
  half_width = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
  return PairedDifference(mean, std, n, half_width)
