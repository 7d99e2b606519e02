"""Sparse inference (being restructured into this package; see issue 10)."""
