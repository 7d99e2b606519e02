"""Tests of ccjax.progress: the progress lines of a run."""

from absl import logging

from ccjax import progress


def test_format_error():
  assert progress.format_error(None) == "n/a"
  assert progress.format_error(0.01388888888888884) == "0.0139"


def test_start_line_names_the_run_the_step_and_the_backend(tmp_path, monkeypatch):
  lines = []
  monkeypatch.setattr(logging, "info", lambda message, *args: lines.append(message % args))
  backend = progress.log_run_start("lm gated on grammar", str(tmp_path), 250)
  assert backend == progress.kernel_backend()
  assert lines == [f"lm gated on grammar in {tmp_path}: resuming from step 250; kernel "
                   f"backend {backend} (details: python -m ccjax.info); building the train "
                   "state"]


def test_quiet_library_logs_is_idempotent():
  progress.quiet_library_logs()
  progress.quiet_library_logs()
  handler = logging.get_absl_handler()
  assert handler.filters.count(progress._keep_log_record) == 1  # pylint: disable=protected-access
