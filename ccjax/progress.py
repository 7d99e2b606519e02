"""Progress lines of a training run: quiet library logs, the start line, error rates."""

from __future__ import annotations

import logging as py_logging
import os

from absl import logging

from ccjax.inference import kernels

_OWN_PACKAGE_DIRS = (os.path.dirname(os.path.abspath(__file__)),
                     os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "experiments"))


def _keep_log_record(record) -> bool:
  return record.levelno >= py_logging.WARNING or record.pathname.startswith(_OWN_PACKAGE_DIRS)


def quiet_library_logs() -> None:
  """Shows ccjax's own INFO lines (progress) but only warnings from libraries.

  orbax logs every save step and JAX/TFDS their backend and dataset probing at INFO;
  that drowns the progress lines.
  """
  handler = logging.get_absl_handler()
  if _keep_log_record not in handler.filters:
    handler.addFilter(_keep_log_record)


def kernel_backend(family: str = "mlp") -> str:
  """The inference kernel backend this process's ``family`` models use
  (:func:`ccjax.select_backend`: ``mlp``, ``cnn``, ``transformer``), for progress lines;
  an unusable ``$CCJAX_BACKEND`` is described, not raised (whatever needs the backend
  raises it)."""
  try:
    return kernels.select_backend(family=family)
  except ValueError as error:
    return f"none ({error})"


def log_run_start(what: str, workdir: str, start_step: int | None, family: str = "mlp") -> str:
  """The first progress line of a run, once its inputs are validated (so that a bad flag,
  dataset or workdir stays a one-line error): what runs, where, from which step, and the
  kernel backend.

  Args:
    what: the run and its data, e.g. ``condnet mlp on digits (1294 train / 144 valid /
      359 test examples)``.
    workdir: the run's directory.
    start_step: the checkpoint step it resumes from (``None``: a fresh run).
    family: the model's inference family (the backend is chosen per family).

  Returns:
    the backend name (:func:`kernel_backend`).
  """
  backend = kernel_backend(family)
  start = f"resuming from step {start_step}" if start_step else "starting"
  logging.info("%s in %s: %s; kernel backend %s (details: python -m ccjax.info); building "
               "the train state", what, os.path.abspath(workdir), start, backend)
  return backend


def format_error(value: float | None) -> str:
  """An error rate for a progress line: 4 decimals, ``n/a`` without data."""
  return "n/a" if value is None else f"{value:.4f}"
