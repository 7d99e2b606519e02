"""Shared command-line plumbing of the entrypoints: one-line errors and exit codes."""

from __future__ import annotations

import sys

from absl import flags


def fail(message, status: int = 2) -> None:
  """Prints ``error: <message>`` on one line to stderr and exits with ``status``."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(status)


INTERRUPTED_STATUS = 130  # 128 + SIGINT, what shells report for Ctrl-C.


def fail_interrupted(error: KeyboardInterrupt) -> None:
  """Ctrl-C: one line (the loop's message names the last checkpoint), exit 130."""
  fail(str(error) or "interrupted; rerun the same command to resume", INTERRUPTED_STATUS)


def parse_flags(argv):
  """absl flag parsing whose errors are one line and exit 2 (pass as ``flags_parser``)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(error)


def reject_extra_args(argv) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; flags look like --name=value")
