"""Progress lines name the kernel backend of the run's own model family."""

from __future__ import annotations

from absl import logging as absl_logging

from ccjax import config as config_lib
from ccjax import lm_config
from ccjax import progress
from ccjax.inference import kernels
from ccjax.tasks import classification
from ccjax.tasks import language_model


def test_each_family_gets_its_own_backend():
  for family in ("mlp", "cnn", "transformer"):
    assert progress.kernel_backend(family) == kernels.select_backend(family=family)
  # The CPU kernel runs MLPs and transformer MLPs, never CNNs: a CNN run's line says xla.
  assert "ffi-cpu" not in kernels.available_backends(family="cnn")


def test_run_start_line_names_the_family_backend(monkeypatch):
  lines = []
  monkeypatch.setattr(absl_logging, "info", lambda message, *args: lines.append(message % args))
  backend = progress.log_run_start("condnet cnn on x", "/tmp/w", None, family="cnn")
  assert backend == kernels.select_backend(family="cnn")
  assert f"kernel backend {backend} " in lines[0]


def test_task_runs_say_their_family():
  digits = classification.ClassificationRun(config_lib.ExperimentConfig.create(steps=1))
  assert digits.family == "mlp"
  lm = language_model.LanguageModelRun(lm_config.LMConfig(steps=1))
  assert lm.family == "transformer"
