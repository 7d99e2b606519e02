"""Tests of ccjax.modes: one list of gate modes, from which every other list derives."""

import pytest

import ccjax
from ccjax import layers
from ccjax import modes
from ccjax import policy
from ccjax.inference import api


def test_derived_lists_keep_their_members_and_order():
  assert policy.POLICY_MODES == ("sample", "threshold", "top_k", "capped", "all")
  assert policy.DETERMINISTIC_MODES == ("threshold", "top_k", "capped", "all")
  assert layers.LAYER_MODES == policy.POLICY_MODES + (layers.ACTIVATION_TOP_K,)
  assert api.INFERENCE_MODES == ("threshold", "top_k", "capped")
  assert modes.CAPACITY_MODES == ("top_k", "capped", "activation_top_k")


def test_every_mode_is_described_and_unique():
  names = [mode.name for mode in modes.MODES]
  assert len(names) == len(set(names))
  for mode in modes.MODES:
    assert mode.description and "\n" not in mode.description
    assert modes.get(mode.name) is mode
  assert not modes.get("sample").deterministic


def test_unknown_mode_is_one_line_listing_the_allowed():
  with pytest.raises(ValueError, match=r"mode must be one of sample\|threshold\|") as error:
    modes.get("greedy")
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match=r"eval_policy must be one of threshold\|top_k, "
                                       r"got 'sample'"):
    modes.check("sample", ("threshold", "top_k"), "eval_policy")


def test_help_text_names_each_mode_with_its_description():
  text = modes.help_text(("threshold", "top_k"))
  assert text.startswith("threshold (the blocks with p > 0.5) | top_k (exactly k")


def test_layers_and_inference_use_the_list():
  with pytest.raises(ValueError, match="mode must be one of threshold|top_k|capped"):
    api.check_mode("all", api.Capacities())
  with pytest.raises(ValueError, match="needs Capacities"):
    api.check_mode("capped", api.Capacities())
  with pytest.raises(ValueError, match="mode must be one of sample"):
    layers.validate_layer_mode("greedy")
  assert ccjax.GatedMLP  # the package imports with the derived lists
