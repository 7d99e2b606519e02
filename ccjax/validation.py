"""Validation of configuration values, with errors that name the field.

Every config type validates its own fields with these checks and raises
:class:`ConfigError`; the entrypoints turn the field name into the flag name in one
place (``experiments/shared_flags.py``), so a rule is written once and its message names the
flag the user typed.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


class ConfigError(ValueError):
  """A bad configuration value.

  Attributes:
    field: the config field (e.g. ``lambda_s``), which is also the default flag name.
    detail: the rest of the message, e.g. ``must be >= 0, got -1.0``.

  ``str(error)`` names the field as a flag: ``--lambda_s must be >= 0, got -1.0``.
  """

  def __init__(self, field: str, detail: str):
    self.field = field
    self.detail = detail
    super().__init__(self.for_flag())

  def for_flag(self, flag_name: str | None = None) -> str:
    """The message naming ``--flag_name`` (default: the field name)."""
    separator = "" if self.detail.startswith("=") else " "   # e.g. "--arch=cnn needs ..."
    return f"--{flag_name or self.field}{separator}{self.detail}"


def check_choice(field: str, value: Any, allowed: Sequence[str]) -> str:
  """``value`` if it is one of ``allowed``."""
  if value not in allowed:
    raise ConfigError(field, f"must be one of {'|'.join(allowed)}, got {value!r}")
  return value


def check_int(field: str, value: Any, *, minimum: int = 1) -> int:
  """``value`` if it is an integer (not a bool) ``>= minimum``."""
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise ConfigError(field, f"must be {what}, got {value!r}")
  return value


def check_float(field: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
  """``float(value)`` if it is a finite number within the given bounds.

  Args:
    field: name for the message.
    value: the value.
    low, high: bounds (``None``: unbounded on that side).
    low_open, high_open: exclude the bound itself.

  Returns:
    the value as a float.
  """
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ConfigError(field, f"must be a finite number, got {value!r}")
  below = low is not None and (value <= low if low_open else value < low)
  above = high is not None and (value >= high if high_open else value > high)
  if below or above:
    if high is None:
      bound = f"> {low:g}" if low_open else f">= {low:g}"
      raise ConfigError(field, f"must be {bound}, got {value!r}")
    interval = (f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                if low is not None else f"<= {high:g}")
    raise ConfigError(field, f"must be in {interval}, got {value!r}")
  return float(value)


def per_layer_values(value, num_layers: int, field: str) -> tuple:
  """``value`` as a tuple with one entry per gated layer (a scalar is repeated)."""
  if isinstance(value, (int, float)):
    return (value,) * num_layers
  value = tuple(value)
  if len(value) != num_layers:
    raise ConfigError(field, f"needs one value or one per gated layer ({num_layers}), "
                             f"got {len(value)}")
  return value
