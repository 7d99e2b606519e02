"""Tests of ccjax.experiment: flag-level validation, model building, resume compatibility."""

from __future__ import annotations

import pytest

import ccjax
from ccjax import experiment


def test_defaults_are_valid_and_taus_broadcast():
  config = experiment.ExperimentConfig()
  assert config.taus() == (0.25, 0.25)
  assert config.train_config().tau == 0.25
  cnn = experiment.ExperimentConfig(arch="cnn", hidden=(32, 64), block_size=8)
  assert cnn.num_gated_layers == 4 and len(cnn.taus()) == 4


@pytest.mark.parametrize("changes,message", [
    (dict(tau=(0.0,)), "--tau must be in (0, 1]"),
    (dict(hidden=()), "--hidden must list at least one width"),
    (dict(hidden=(30,)), "--block_size=32 must divide"),
    (dict(lambda_v=-1.0), "--lambda_v must be >= 0"),
    (dict(policy_lr=0.0), "--policy_lr (learning rate) must be > 0"),
    (dict(dataset="svhn"), "--dataset must be one of"),
    (dict(dataset="npz:"), "--dataset must be one of"),
    (dict(steps=5, epochs=1), "either --steps or --epochs"),
    (dict(arch="rnn"), "--arch must be one of mlp|cnn"),
    (dict(eval_policy="top_k"), "--eval_policy must be one of threshold|sample"),
    (dict(num_devices=0), "--num_devices must be a positive integer"),
    (dict(seed=-1), "--seed must be a non-negative integer"),
])
def test_bad_values_name_the_flag(changes, message):
  with pytest.raises(ValueError) as error:
    experiment.ExperimentConfig(**changes)
  assert message in str(error.value)


def test_build_model_gated_and_dense():
  condnet = experiment.build_model(experiment.ExperimentConfig(), (8, 8, 1), 10)
  dense = experiment.build_model(experiment.ExperimentConfig(model="dense"), (8, 8, 1), 10)
  assert isinstance(condnet, ccjax.GatedMLP) and condnet.gated and not dense.gated
  assert condnet.policy_init_prob == (0.25, 0.25)


def test_resume_compatibility_messages():
  config = experiment.ExperimentConfig()
  saved = {"architecture": experiment.architecture_meta(config, (8, 8, 1), 10),
           "config": config.as_dict()}
  experiment.check_resume_compatible(saved, experiment.ExperimentConfig(steps=99), (8, 8, 1), 10)
  with pytest.raises(ValueError, match="input dimension 100"):
    experiment.check_resume_compatible(saved, config, (100,), 10)
  with pytest.raises(ValueError, match=r"different architecture \(hidden"):
    experiment.check_resume_compatible(saved, experiment.ExperimentConfig(hidden=(64,)),
                                       (8, 8, 1), 10)
  with pytest.raises(ValueError, match="--lr=0.001"):
    experiment.check_resume_compatible(saved, experiment.ExperimentConfig(lr=0.01), (8, 8, 1), 10)
