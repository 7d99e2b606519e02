"""Shared command-line plumbing of the entrypoints: one-line errors, number parsing."""

from __future__ import annotations

import sys

from absl import flags


def fail(message, status: int = 2) -> None:
  """Prints ``error: <message>`` on one line to stderr and exits with ``status``."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(status)


def parse_flags(argv):
  """absl flag parsing whose errors are one line and exit 2 (pass as ``flags_parser``)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(error)


def reject_extra_args(argv) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; flags look like --name=value")


def number(name: str, text: str | None, kind=float):
  """``kind(text)``, ``None`` for ``None``; ValueError naming ``--name`` otherwise."""
  if text is None:
    return None
  try:
    return kind(text)
  except ValueError:
    wanted = "an integer" if kind is int else "a number"
    raise ValueError(f"--{name} must be {wanted}, got {text!r}") from None


def number_list(name: str, text: str | None, kind=float) -> tuple:
  """A comma-separated list of numbers; ValueError naming ``--name`` if empty or bad."""
  parts = [part.strip() for part in (text or "").split(",")]
  if not text or not text.strip() or any(not part for part in parts):
    raise ValueError(f"--{name} must be a comma-separated list of numbers, got {text!r}")
  return tuple(number(name, part, kind) for part in parts)


def own_flag_values(module_globals: dict) -> dict:
  """``{name: value}`` of the flags a module defined (its ``FlagHolder`` globals)."""
  return {holder.name: holder.value for holder in module_globals.values()
          if isinstance(holder, flags.FlagHolder)}
