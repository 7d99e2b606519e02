"""Shared command-line plumbing of the entrypoints: one-line errors and exit codes."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Mapping

from absl import flags

from ccjax import loop
from ccjax import validation


def _print_error(message) -> None:
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)


def _exit_now(status: int) -> None:
  """Flushes and leaves without interpreter shutdown: library threads (orbax's event
  loop) can otherwise print tracebacks after the one error line. Every write of a run is
  synchronous and atomic, so nothing is lost."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def fail(message, status: int = 2) -> None:
  """Prints ``error: <message>`` on one line to stderr and exits with ``status``."""
  _print_error(message)
  _exit_now(status)


INTERRUPTED_STATUS = 130  # 128 + SIGINT, what shells report for Ctrl-C.


def fail_interrupted(error: KeyboardInterrupt) -> None:
  """Ctrl-C: one line (the loop's message names the last checkpoint), exit 130.

  Like :func:`fail`, exits without interpreter shutdown (threads that Ctrl-C interrupted
  mid-callback would print tracebacks after the one line).
  """
  _print_error(str(error) or "interrupted; rerun the same command to resume")
  _exit_now(INTERRUPTED_STATUS)


def parse_flags(argv):
  """absl flag parsing whose errors are one line and exit 2 (pass as ``flags_parser``)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(error)


def reject_extra_args(argv) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; flags look like --name=value")


@contextlib.contextmanager
def one_line_errors(flag_for_field: Mapping[str, str] | None = None) -> Iterator[None]:
  """Turns every error a user can cause into one ``error:`` line and an exit status.

  A :class:`ccjax.ConfigError` names the flag (``flag_for_field`` maps config fields to
  other flag names, e.g. the sweep's ``--taus`` for ``tau``); bad data, flags or workdirs
  exit 2, a non-finite training run exits 1, Ctrl-C exits 130.
  """
  try:
    yield
  except validation.ConfigError as error:
    fail(error.for_flag((flag_for_field or {}).get(error.field)))
  except loop.NonFiniteError as error:
    fail(error, status=1)
  except (ValueError, OSError) as error:
    fail(error)
  except KeyboardInterrupt as error:
    fail_interrupted(error)
