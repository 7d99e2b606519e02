"""Shared command-line plumbing of the entrypoints: one-line errors, exit codes, ``--help``."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Mapping

from absl import flags

from ccjax import loop
from ccjax import validation
from experiments import flag_groups


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


# What asks for help; --helpfull (every flag, absl's own included) stays absl's.
HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "--help=true")
HELP_WIDTH = 100
_REQUIRED_MESSAGE = "must have a value other than None"


def own_flags(flag_values: flags.FlagValues = flags.FLAGS) -> list[flags.Flag]:
  """The flags the running entrypoint defines: those of ``experiments.*`` modules and of
  the main module (not absl's or a library's), each once.

  absl files the main module's flags under ``sys.argv[0]`` (e.g. the path of
  ``experiments/condnet.py`` under ``python -m``), not under ``__main__``.
  """
  main_names = ("__main__", sys.argv[0])
  seen = {}
  for module_name, module_flags in flag_values.flags_by_module_dict().items():
    if module_name.startswith("experiments") or module_name in main_names:
      for flag in module_flags:
        seen.setdefault(flag.name, flag)
  return list(seen.values())


def is_required(flag: flags.Flag) -> bool:
  """Whether ``flag`` was marked with ``flags.mark_flag_as_required``."""
  return any(_REQUIRED_MESSAGE in str(getattr(validator, "message", ""))
             for validator in flag.validators)


def _describe_flag(flag: flags.Flag) -> str:
  name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
  notes = []
  if is_required(flag):
    notes.append("REQUIRED")
  if flag.default is not None:
    notes.append(f"default: {flag.default_as_str}")
  help_line = " ".join(str(flag.help).split())
  text = f"{help_line} ({'; '.join(notes)})" if notes else help_line
  return flags.text_wrap(text, length=HELP_WIDTH, indent=" " * 6,
                         firstline_indent=f"  {name}: ")


def help_text(entrypoint: str | None, doc: str | None,
              flag_values: flags.FlagValues = flags.FLAGS) -> str:
  """``--help`` of an entrypoint: its docstring, then its own flags grouped by concern
  (:mod:`experiments.flag_groups`; a flag without an entry under ``other``), required
  flags marked ``REQUIRED``."""
  by_group = {}
  for flag in sorted(own_flags(flag_values), key=lambda flag: flag.name):
    by_group.setdefault(flag_groups.group_of(flag.name, entrypoint), []).append(flag)
  program = f"python -m {entrypoint}" if entrypoint else "this program"
  parts = [(doc or "").strip(), "",
           f"Flags of {program} by concern (absl's own flags: --helpfull):"]
  for group in (*flag_groups.GROUPS, flag_groups.OTHER):
    if group in by_group:
      parts += ["", f"{group}:", *(_describe_flag(flag) for flag in by_group[group])]
  return "\n".join(parts).lstrip("\n") + "\n"


def wants_help(argv) -> bool:
  """Whether ``argv`` (program name first) asks for ``--help`` before any ``--``."""
  for arg in argv[1:]:
    if arg == "--":
      return False
    if arg in HELP_ARGS:
      return True
  return False


def parse_flags(argv):
  """absl flag parsing whose errors are one line and exit 2 (pass as ``flags_parser``).

  ``--help`` (also ``-h``, ``--helpshort``) prints :func:`help_text` for the ``__main__``
  module and exits 0.
  """
  if wants_help(argv):
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    sys.stdout.write(help_text(spec.name if spec else None, getattr(main, "__doc__", None)))
    sys.stdout.flush()
    sys.exit(0)
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
