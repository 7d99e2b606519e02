"""Tests of ccjax.resume: the one checkpoint-metadata format and the one resume rule."""

import pytest

from ccjax import config as config_lib
from ccjax import lm_config
from ccjax import resume


def _classifier_meta(config, input_shape=(8, 8, 1), sha256="a" * 64):
  return resume.checkpoint_meta(config.TASK, config.architecture_for(input_shape, 10), config,
                                {"sha256": sha256, "shapes": {"x_train": [10, 8, 8, 1]}})


def _lm_meta(config, sha256="b" * 64):
  return resume.checkpoint_meta(config.TASK, config.architecture(), config, {"sha256": sha256})


def test_classifier_resume_messages():
  config = config_lib.ExperimentConfig()
  saved = _classifier_meta(config)
  longer = config.replace(steps=99, eval_every=7, measure_latency=False)
  resume.check_resume_compatible(saved, _classifier_meta(longer), longer)
  with pytest.raises(ValueError, match="input dimension 100"):
    resume.check_resume_compatible(saved, _classifier_meta(config, (100,)), config)
  wider = config.replace(hidden=(64,))
  with pytest.raises(ValueError, match=r"different architecture \(hidden: checkpoint \[512, 512\]"):
    resume.check_resume_compatible(saved, _classifier_meta(wider), wider)
  faster = config.replace(lr=0.01)
  with pytest.raises(ValueError, match=r"other settings \(lr=0.001 -> 0.01\)"):
    resume.check_resume_compatible(saved, _classifier_meta(faster), faster)
  # The classifier's test policy is part of what it resumes (unlike the LM's).
  threshold = config.replace(eval_policy="threshold")
  with pytest.raises(ValueError, match="eval_policy='top_k' -> 'threshold'"):
    resume.check_resume_compatible(saved, _classifier_meta(threshold), threshold)


def test_the_same_mistakes_raise_the_same_errors_in_both_tasks():
  for config, meta_of in ((config_lib.ExperimentConfig(), _classifier_meta),
                          (lm_config.LMConfig(), _lm_meta)):
    saved = meta_of(config)
    other_data = meta_of(config, sha256="c" * 64)
    with pytest.raises(ValueError, match="--dataset .* holds different data than the "
                       "checkpoint in --workdir was trained on .*--allow_data_change"):
      resume.check_resume_compatible(saved, other_data, config)
    allowed = config.replace(allow_data_change=True)
    resume.check_resume_compatible(saved, meta_of(allowed, sha256="c" * 64), allowed)
    faster = config.replace(lr=0.01)
    with pytest.raises(ValueError, match=r"^the checkpoint was trained with other settings "
                       r"\(lr=0.001 -> 0.01\); only .*steps may change on resume"):
      resume.check_resume_compatible(saved, meta_of(faster), faster)
    bigger = config.replace(block_size=16)
    with pytest.raises(ValueError, match=r"^--workdir holds a checkpoint of a different "
                       r"architecture \(block_size: checkpoint 32, now 16\)"):
      resume.check_resume_compatible(saved, meta_of(bigger), bigger)
  lm = lm_config.LMConfig()
  with pytest.raises(ValueError, match="checkpoint of task 'classify', this run is task 'lm'"):
    resume.check_resume_compatible(_classifier_meta(config_lib.ExperimentConfig()),
                                   _lm_meta(lm), lm)


def test_older_metadata_is_read_in_the_current_format():
  config = lm_config.LMConfig()
  nested = {"model": "gated", "context": 64, "seed": 0, "steps": None,
            "train": {"tau": 0.25, "lr": 0.001, "lambda_s": 4.0}}
  old_lm = {"architecture": config.architecture(), "sha256": "b" * 64, "config": nested,
            "kind": "lm", "skipped_nonfinite": 2}
  upgraded = resume.upgrade_meta(old_lm)
  assert upgraded["task"] == "lm" and upgraded["data"] == {"sha256": "b" * 64}
  assert upgraded["config"]["tau"] == [0.25] and upgraded["config"]["lr"] == 0.001
  assert "train" not in upgraded["config"] and upgraded["skipped_nonfinite"] == 2
  # An old LM checkpoint resumes under the current rule (same settings: no error).
  resume.check_resume_compatible(old_lm, _lm_meta(config, sha256="b" * 64), config)
  old_classifier = {"architecture": {"arch": "mlp"}, "config": {}, "data": None}
  assert resume.upgrade_meta(old_classifier)["task"] == "classify"
