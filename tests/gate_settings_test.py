"""Tests of ccjax.gate_settings: one GateSettings for every gated family (Linen and NNX)."""

import dataclasses

from flax import nnx
import pytest

import ccjax
from ccjax import gate_settings
from ccjax import nnx as ccnnx

_SETTINGS = ccjax.GateSettings(block_size=8, estimator="straight_through",
                               policy_init_prob=0.3, policy_eps=0.02, policy_hidden=4,
                               gumbel_temperature=0.7)


def test_every_linen_family_has_the_fields_and_reads_them_back():
  modules = [
      ccjax.GatedDense(16, **_SETTINGS.as_kwargs()),
      ccjax.GatedMLP(hidden=(16, 16), num_classes=3, **_SETTINGS.as_kwargs()),
      ccjax.GatedConv(16, **_SETTINGS.as_kwargs()),
      ccjax.GatedResidualBlock(**_SETTINGS.as_kwargs()),
      ccjax.GatedCNN(num_classes=3, stage_features=(16,), **_SETTINGS.as_kwargs()),
      ccjax.GatedTransformer(d_model=16, num_heads=2, mlp_width=16, **_SETTINGS.as_kwargs()),
  ]
  for module in modules:
    assert module.gate_settings == _SETTINGS, type(module).__name__


def test_family_defaults_of_block_size_are_kept():
  assert ccjax.GatedMLP(hidden=(64,), num_classes=2).block_size == 64
  assert ccjax.GatedCNN(num_classes=2).block_size == 8
  assert ccjax.GatedConv(16).block_size == 8
  assert ccjax.GatedTransformer().block_size == 32
  assert ccjax.GatedMLP(hidden=(64,), num_classes=2).gate_settings == ccjax.GateSettings()


def test_positional_required_fields_still_work():
  assert ccjax.GatedMLP((32,), 4, block_size=16).hidden == (32,)
  assert ccjax.GatedDense(64).features == 64


def test_sub_modules_get_the_settings_of_their_layer():
  model = ccjax.GatedTransformer(d_model=16, num_heads=2, mlp_width=16, num_layers=2,
                                 block_size=8, policy_init_prob=(0.2, 0.4))
  assert model.mlp_module(1).gate_settings == dataclasses.replace(
      model.gate_settings, policy_init_prob=0.4)


def test_layer_splits_per_layer_init_probs():
  settings = ccjax.GateSettings(policy_init_prob=(0.2, 0.4))
  assert settings.layer(1, 2).policy_init_prob == 0.4
  with pytest.raises(ValueError, match="policy_init_prob"):
    settings.layer(0, 3)


@pytest.mark.parametrize("changes, message", [
    ({"estimator": "magic"}, "estimator must be one of"),
    ({"policy_init_prob": 1.5}, "policy_init_prob must be in"),
    ({"policy_hidden": -1}, "policy_hidden"),
    ({"block_size": 0}, "block_size"),
])
def test_validate_rejects_bad_settings_in_one_line(changes, message):
  with pytest.raises(ValueError, match=message) as error:
    ccjax.GateSettings(**changes).validate()
  assert "\n" not in str(error.value)


def test_replace_rejects_unknown_field_naming_the_allowed_ones():
  with pytest.raises(ValueError, match=r"unknown gate setting 'tau'; allowed: block_size\|"):
    ccjax.GateSettings().replace(tau=0.5)


def test_linen_module_rejects_bad_settings():
  with pytest.raises(ValueError, match="estimator must be one of"):
    ccjax.GatedCNN(num_classes=2, estimator="magic")


def test_nnx_modules_take_settings_and_overrides():
  settings = ccjax.GateSettings(block_size=8, estimator="straight_through")
  model = ccnnx.GatedMLP(12, (16,), 3, settings=settings, policy_init_prob=0.25,
                         rngs=nnx.Rngs(0))
  assert model.gate_settings == settings.replace(policy_init_prob=0.25)
  assert model.to_linen().gate_settings == model.gate_settings
  assert model.hidden_0.estimator == "straight_through" and model.hidden_0.gated


def test_nnx_rejects_a_hidden_policy_and_unknown_fields():
  with pytest.raises(ValueError, match="policy_hidden must be 0"):
    ccnnx.GatedDense(4, 8, block_size=4, policy_hidden=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown gate setting 'blocksize'"):
    ccnnx.GatedDense(4, 8, blocksize=4, rngs=nnx.Rngs(0))


def test_fields_are_declared_once():
  linen_fields = [field.name for field in dataclasses.fields(gate_settings.GateFields)
                  if field.name not in ("parent", "name")]
  assert tuple(linen_fields) == gate_settings.GATE_SETTING_NAMES
