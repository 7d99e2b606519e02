"""Tests of ccjax.stats against values computed by hand."""

from __future__ import annotations

import math

import pytest

from ccjax import stats


def test_mean_std_is_sample_std():
  # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, / (n - 1) = 5/3.
  result = stats.mean_std([1.0, 2.0, 3.0, 4.0])
  assert result.n == 4
  assert result.mean == pytest.approx(2.5, abs=1e-12)
  assert result.std == pytest.approx(math.sqrt(5 / 3), abs=1e-12)


def test_mean_std_skips_missing_and_has_no_std_for_one_value():
  assert stats.mean_std([None, 0.3, None]) == stats.MeanStd(0.3, None, 1)
  assert stats.mean_std([]) == stats.MeanStd(None, None, 0)
  assert stats.mean_std([None]) == stats.MeanStd(None, None, 0)


def test_t_quantile_matches_tables():
  # Two-sided 95 % critical values of Student's t (any statistics table).
  assert stats.t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
  assert stats.t_quantile(0.975, 3) == pytest.approx(3.182, abs=1e-3)
  assert stats.t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)


def test_paired_difference_by_hand():
  # Differences 2, 3, 2, 3: mean 2.5, sample std sqrt(4 * 0.25 / 3) = sqrt(1/3),
  # half-width t_{0.975,3} * std / sqrt(4) = 3.18245 * 0.57735 / 2 = 0.91869.
  result = stats.paired_difference([3.0, 5.0, 4.0, 6.0], [1.0, 2.0, 2.0, 3.0])
  assert result.n == 4
  assert result.mean == pytest.approx(2.5, abs=1e-12)
  assert result.std == pytest.approx(math.sqrt(1 / 3), abs=1e-12)
  assert result.ci95 == pytest.approx(0.91869, abs=1e-5)


def test_paired_difference_pairs_by_position():
  # Unpaired, the two sets have equal means; paired, every seed differs by exactly +1.
  result = stats.paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
  assert result.mean == pytest.approx(1.0) and result.std == pytest.approx(0.0)
  assert result.ci95 == pytest.approx(0.0)
  assert stats.paired_difference([2.0, 3.0, 4.0], [3.0, 2.0, 1.0]).std == pytest.approx(
      math.sqrt(((-1 - 1) ** 2 + (1 - 1) ** 2 + (3 - 1) ** 2) / 2))


def test_paired_difference_of_one_seed_has_no_interval():
  assert stats.paired_difference([0.5], [0.25]) == stats.PairedDifference(0.25, None, 1, None)


@pytest.mark.parametrize("first, second", [([], []), ([1.0, 2.0], [1.0]),
                                           ([1.0, None], [1.0, 2.0]),
                                           ([1.0, float("nan")], [1.0, 2.0])])
def test_paired_difference_rejects_bad_input(first, second):
  with pytest.raises(ValueError, match="paired_difference|first|second"):
    stats.paired_difference(first, second)
