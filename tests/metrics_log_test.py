"""Tests of ccjax.metrics_log: metrics.jsonl across resumes."""

import numpy as np

from ccjax import metrics_log


def test_truncate_keeps_records_up_to_the_resume_step(tmp_path):
  log = metrics_log.MetricsLog(str(tmp_path / "metrics.jsonl"))
  for step in (1, 2, 3):
    log.write({"step": step, "kind": "train", "loss": float(step)})
  log.write({"step": 3, "kind": "final"})
  with open(log.path, "a") as stream:
    stream.write('{"step": 4, "kind": "tr')   # a torn line of a killed run
  log.truncate_after(2)
  assert [(r["step"], r["kind"]) for r in log.read()] == [(1, "train"), (2, "train")]


def test_a_disabled_log_writes_nothing(tmp_path):
  log = metrics_log.MetricsLog(str(tmp_path / "metrics.jsonl"), enabled=False)
  log.write({"step": 1})
  log.truncate_after(0)
  assert log.read() == [] and not (tmp_path / "metrics.jsonl").exists()


def test_to_python():
  assert metrics_log.to_python(np.float32(0.5)) == 0.5
  assert metrics_log.to_python(np.arange(3)) == [0, 1, 2]
