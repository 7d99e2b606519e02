"""Byte-level language modelling runs: ``train_and_evaluate_lm(config, workdir)``.

The run is the one driver's (:func:`ccjax.tasks.train_and_evaluate`) with the ``lm`` task
(:mod:`ccjax.tasks.language_model`): the same train step, loop, checkpoints, resume rule
and ``metrics.jsonl`` as the classifiers. Writes ``metrics.jsonl``, ``checkpoints/``,
``plots/`` and ``results.json``: test bits per byte, active fraction per layer, MACs per
token, batch-1 decode time per token (dense vs sparse), the corpus sha256, flags and
seed. A dense run also reports TEAL-style training-free thresholding at the fraction
``tau`` (``teal_bits_per_byte``). The config is :class:`ccjax.lm_config.LMConfig`,
re-exported here with the LM helpers the entrypoints use.
"""

from __future__ import annotations

import os
from typing import Any

from ccjax import checkpoint as checkpoint_lib
from ccjax import resume
from ccjax import tasks
from ccjax.lm_config import LM_EVAL_POLICIES as LM_EVAL_POLICIES
from ccjax.lm_config import LM_MODELS as LM_MODELS
from ccjax.lm_config import LMConfig as LMConfig
from ccjax.lm_config import decode_policy as decode_policy
from ccjax.lm_config import train_step_bytes as train_step_bytes
from ccjax.tasks.language_model import evaluate_lm as evaluate_lm


def train_and_evaluate_lm(config: LMConfig, workdir: str,
                          flag_values: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains (or resumes) one LM run: :func:`ccjax.tasks.train_and_evaluate` with the
  ``lm`` task (same arguments, results and errors)."""
  return tasks.train_and_evaluate(tasks.TASKS[LMConfig.TASK], config, workdir, flag_values)


def load_params(config: LMConfig, workdir: str):
  """The parameters of the newest intact checkpoint of the LM run in ``workdir``.

  Reads only (the checkpoints are opened read-only: a run training in ``workdir`` is
  never harmed, and a step it is still writing is never read).

  Raises:
    ValueError: no checkpoint there, a classifier run, or one written for another
      architecture (one line).
  """
  checkpoint_dir = os.path.join(os.path.abspath(workdir), resume.CHECKPOINT_DIR)
  if not os.path.isdir(checkpoint_dir):
    raise ValueError(f"--workdir {workdir!r} holds no checkpoints/ (train a run there first)")
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, read_only=True)
  try:
    step = checkpointer.latest_intact_step().step
    if step is None:
      raise ValueError(f"--workdir {workdir!r} holds no complete checkpoint")
    saved = resume.read_meta(checkpointer, step)
    if saved["task"] != config.TASK:
      raise ValueError(f"--workdir {workdir!r} holds a classifier run (experiments.condnet), "
                       "not a language model of experiments.lm; use experiments.predict on it")
    if saved.get("architecture") != config.architecture():
      raise ValueError(f"the run in {workdir} has architecture {saved.get('architecture')}; "
                       "pass the flags it was trained with")
    return checkpointer.restore_raw(step)["params"]
  finally:
    checkpointer.close()
