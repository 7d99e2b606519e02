"""Tests of ccjax.memory."""

from ccjax import memory


def test_available_bytes_is_positive_and_names_where():
  available, where = memory.available_bytes()
  assert isinstance(available, int) and available > 0
  assert where == "host" or where.endswith(" device")
