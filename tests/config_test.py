"""Tests of ccjax.config: one validated config (nesting TrainConfig), model building,
resume compatibility."""

from __future__ import annotations

import pytest

import ccjax
from ccjax import config as config_lib
from ccjax import step as step_lib
from ccjax import validation

create = config_lib.ExperimentConfig.create


def test_defaults_are_valid_and_taus_broadcast():
  config = config_lib.ExperimentConfig()
  assert config.taus() == (0.25, 0.25)
  assert config.train == config_lib.DEFAULT_TRAIN  # the study's recipe (docs/recipes.md)
  cnn = create(arch="cnn")
  assert cnn.hidden == (32, 64) and cnn.block_size == 8
  assert cnn.num_gated_layers == 4 and len(cnn.taus()) == 4


def test_one_set_of_defaults():
  """The train-step defaults are the experiment's: nothing is defined twice."""
  assert config_lib.ExperimentConfig().train.lambda_s == step_lib.TrainConfig().lambda_s
  assert create(lr=0.01).train.lr == 0.01
  assert create(lr=0.01).replace(seed=3).train.lr == 0.01
  with pytest.raises(TypeError, match="unknown config fields"):
    create(learning_rate=0.1)


@pytest.mark.parametrize("changes,message", [
    (dict(tau=(0.0,)), "tau must be in (0, 1]"),
    (dict(tau=(float("nan"),)), "tau must be a finite number"),
    (dict(hidden=()), "hidden must list at least one width"),
    (dict(hidden=(30,)), "block_size must divide every hidden width, got 32 and width 30"),
    (dict(lambda_v=-1.0), "lambda_v must be >= 0"),
    (dict(lr=float("inf")), "lr must be a finite number"),
    (dict(policy_lr=0.0), "policy_lr must be > 0"),
    (dict(dataset="svhn"), "dataset must be one of"),
    (dict(dataset="npz:"), "dataset npz:PATH needs a file path after 'npz:'"),
    (dict(steps=5, epochs=1), "steps and --epochs: give one, not both"),
    (dict(arch="rnn"), "arch must be one of mlp|cnn"),
    (dict(eval_policy="capped"), "eval_policy must be one of threshold|sample|top_k"),
    (dict(num_devices=0), "num_devices must be a positive integer"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(tau=(0.2, 0.3, 0.4)), "tau needs one value or one per gated layer (2), got 3"),
    # k-subset training would never skip the CNN's one-block residual gates.
    (dict(arch="cnn", estimator="reinforce_top_k"),
     "estimator must be one of reinforce|straight_through|gumbel with --arch=cnn, got "
     "'reinforce_top_k': it trains exactly k blocks per example"),
    (dict(arch="cnn", estimator="router"), "with --arch=cnn, got 'router'"),
])
def test_bad_values_name_the_field(changes, message):
  with pytest.raises(validation.ConfigError) as error:
    create(**changes)
  assert message in str(error.value)
  assert error.value.for_flag().startswith(f"--{error.value.field} ")


def test_tau_one_is_a_valid_config():
  """tau = 1 (every block on) passes the documented (0, 1] check and builds a model."""
  config = create(tau=(1.0,))
  module = config_lib.build_model(config, (8, 8, 1), 10)
  assert max(module.policy_init_prob) < 1.0


def test_as_dict_round_trips():
  config = create(arch="cnn", tau=(0.5, 0.25, 0.5, 0.25), lr=0.003, seed=7)
  assert config_lib.ExperimentConfig.from_dict(config.as_dict()) == config


def test_build_model_gated_and_dense():
  condnet = config_lib.build_model(config_lib.ExperimentConfig(), (8, 8, 1), 10)
  dense = config_lib.build_model(create(model="dense"), (8, 8, 1), 10)
  assert isinstance(condnet, ccjax.GatedMLP) and condnet.gated and not dense.gated
  assert condnet.policy_init_prob == (0.25, 0.25)


def test_model_for_rebuilds_the_checkpointed_model():
  config = create(hidden=(32, 32), block_size=8)
  module, input_shape, num_classes = config.model_for(config.architecture_for((8, 8, 1), 10))
  assert module == config_lib.build_model(config, (8, 8, 1), 10)
  assert input_shape == (8, 8, 1) and num_classes == 10
  with pytest.raises(ValueError, match="input_shape"):
    config.model_for(config.architecture_for((0, 8), 10))

