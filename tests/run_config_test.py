"""Tests of ccjax.run_config: one set of shared defaults, each task's own on top."""

import dataclasses

import pytest

from ccjax import config as config_lib
from ccjax import lm_config
from ccjax import run_config
from ccjax import validation

TASK_CONFIGS = (config_lib.ExperimentConfig, lm_config.LMConfig)


def test_shared_fields_are_declared_once_with_one_set_of_defaults():
  shared = {field.name for field in dataclasses.fields(run_config.RunConfig)}
  for config_type in TASK_CONFIGS:
    assert issubclass(config_type, run_config.RunConfig)
    assert shared <= {field.name for field in dataclasses.fields(config_type)}
  classifier, lm = config_lib.ExperimentConfig(), lm_config.LMConfig()
  # Shared defaults neither task overrides are equal in both.
  for name in ("log_every", "seed", "num_devices", "allow_data_change", "plots"):
    default = next(f.default for f in dataclasses.fields(run_config.RunConfig) if f.name == name)
    assert getattr(classifier, name) == getattr(lm, name) == default
  # Each task keeps its own (documented) defaults: the runs of before are unchanged.
  assert (classifier.batch_size, classifier.eval_every,
          classifier.checkpoint_every) == (64, 500, 500)
  assert (lm.batch_size, lm.eval_every, lm.checkpoint_every) == (32, 250, 250)
  assert classifier.total_steps(1000) == 4000 and lm.total_steps(1000) == 1000
  assert classifier.train.estimator == "straight_through" and classifier.eval_mode() == "top_k"
  assert lm.train.estimator == "reinforce" and lm.train.lambda_s == 4.0
  assert lm.eval_mode() == "threshold"


@pytest.mark.parametrize("config_type", TASK_CONFIGS)
def test_flat_fields_round_trip(config_type):
  config = config_type.create(lr=0.003, tau=(0.5,), seed=3)
  assert config.train.lr == 0.003 and config.seed == 3
  assert config.replace(lr=0.01).train.lr == 0.01
  values = config.as_dict()
  assert values["tau"] == [0.5] and "train" not in values
  assert config_type.from_dict(values) == config
  with pytest.raises(TypeError, match="unknown config fields"):
    config_type.create(no_such_field=1)


@pytest.mark.parametrize("config_type", TASK_CONFIGS)
@pytest.mark.parametrize("fields,message", [
    ({"batch_size": 0}, "--batch_size must be"),
    ({"steps": -1}, "--steps must be"),
    ({"seed": -1}, "--seed must be"),
    ({"seed": 2**63}, r"--seed must be in \[0, 2\*\*63\)"),
    ({"num_devices": 0}, "--num_devices must be"),
    ({"model": "nope"}, "--model must be one of"),
])
def test_shared_rules_give_the_same_error_in_every_task(config_type, fields, message):
  with pytest.raises(validation.ConfigError, match=message):
    config_type.create(**fields)
