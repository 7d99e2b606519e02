"""``train_and_evaluate(config, workdir)``: trains the run ``config`` describes, any task.

The task follows from the config's type (:func:`ccjax.tasks.task_for`:
:class:`ccjax.ExperimentConfig` -> classification, :class:`ccjax.lm_train.LMConfig` ->
language modelling); the one driver is :func:`ccjax.tasks.train_and_evaluate`. The loop's
parts live in their own modules (:mod:`ccjax.run_loop`, :mod:`ccjax.resume`,
:mod:`ccjax.metrics_log`, :mod:`ccjax.progress`); their names used by the entrypoints
are re-exported here.
"""

from __future__ import annotations

from ccjax.metrics_log import METRICS_FILE as METRICS_FILE
from ccjax.metrics_log import MetricsLog as MetricsLog
from ccjax.progress import format_error as format_error
from ccjax.progress import kernel_backend as kernel_backend
from ccjax.progress import log_run_start as log_run_start
from ccjax.progress import quiet_library_logs as quiet_library_logs
from ccjax.resume import check_workdir as check_workdir
from ccjax.run_loop import Interrupted as Interrupted
from ccjax.run_loop import MAX_SKIPPED_FRACTION as MAX_SKIPPED_FRACTION
from ccjax.run_loop import NonFiniteError as NonFiniteError
from ccjax.run_loop import seed_key as seed_key
from ccjax.tasks import train as train_and_evaluate
