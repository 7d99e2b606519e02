"""Tests of experiments/named_configs.py and the configs in experiments/configs/."""

from __future__ import annotations

import json
import os

from absl import flags
import pytest

from ccjax import config as config_lib
from ccjax import lm_config
from ccjax import sweep
from ccjax import validation
from experiments import shared_flags as shared
from experiments import named_configs
from tests import experiment_utils

# The flags only experiments.sweep has (beside the shared ones).
_SWEEP_ONLY = {"seeds", "taus", "recipes", "lrs", "capacity_widths", "variants"}


def test_available_lists_the_config_modules():
  names = named_configs.available()
  assert {"digits", "digits_reinforce", "mnist1d", "mnist1d_large",
          "mnist1d_capacity", "lm_capacity"} <= set(names)
  assert all(not name.startswith("_") for name in names)


@pytest.mark.parametrize("name", named_configs.available())
def test_every_config_is_a_valid_run_of_its_entrypoint(name):
  values = named_configs.load(name)
  shared_names = {holder.name for holder in shared.SHARED_FLAGS}
  # A config with LM fields is one of experiments.lm / experiments.sweep --task=lm.
  lm_only = set(values) - shared_names - _SWEEP_ONLY
  config_type = lm_config.LMConfig if lm_only else config_lib.ExperimentConfig
  run_fields = shared_names | set(config_type.own_fields())
  assert set(values) <= run_fields | _SWEEP_ONLY, set(values) - run_fields - _SWEEP_ONLY
  base = config_type.create(**{key: value for key, value in values.items() if key in run_fields})
  sweep_values = {key: value for key, value in values.items() if key in _SWEEP_ONLY}
  if sweep_values:   # a sweep config: its grid validates too
    capacity = sweep_values.get("capacity_widths", ())
    sweep.validate_grid(base, seeds=sweep_values.get("seeds", (0,)),
                        taus=sweep_values.get("taus", () if capacity else (0.25,)),
                        recipes=sweep_values.get("recipes", ()),
                        lrs=sweep_values.get("lrs", ()), capacity_widths=capacity,
                        variants=sweep_values.get("variants", ()))


def test_unknown_name_lists_the_names():
  with pytest.raises(validation.ConfigError, match=r"^--config must be one of digits\|"):
    named_configs.load("no_such_config")
  with pytest.raises(validation.ConfigError, match="must be one of"):
    named_configs.load("../flags")


def _flag_values(argv, steps_lower_bound=1):
  """A fresh FlagValues with the flags the ``digits`` config sets, parsed from ``argv``."""
  values = flags.FlagValues()
  flags.DEFINE_string("dataset", "x", "", flag_values=values)
  flags.DEFINE_string("arch", "x", "", flag_values=values)
  flags.DEFINE_list("hidden", [], "", flag_values=values)
  flags.DEFINE_integer("block_size", 1, "", flag_values=values)
  flags.DEFINE_string("estimator", "x", "", flag_values=values)
  flags.DEFINE_string("eval_policy", "x", "", flag_values=values)
  flags.DEFINE_float("lr", 0.5, "", flag_values=values)
  flags.DEFINE_integer("batch_size", 1, "", flag_values=values)
  flags.DEFINE_integer("steps", max(7, steps_lower_bound), "", lower_bound=steps_lower_bound,
                       flag_values=values)
  flags.DEFINE_float("valid_fraction", 0.0, "", flag_values=values)
  values(argv)
  return values


def test_apply_sets_every_flag_the_command_line_did_not_give():
  values = _flag_values(["prog", "--lr=0.25", "--steps=3"])
  applied = named_configs.apply("digits", values, allowed=[flag for flag in values])
  config = named_configs.load("digits")
  assert values.lr == 0.25 and values.steps == 3   # the command line wins
  assert "lr" not in applied and "steps" not in applied
  assert values.eval_policy == config["eval_policy"] == applied["eval_policy"]
  assert values.batch_size == config["batch_size"]   # the config wins over the default
  assert values.hidden == [512, 512]   # a tuple passes absl's list parser


def test_apply_refuses_a_key_that_is_not_an_allowed_flag():
  values = _flag_values(["prog"])
  allowed = [flag for flag in values if flag != "steps"]
  with pytest.raises(validation.ConfigError,
                     match=r"^--config=digits sets steps, not a flag .*allowed: arch, batch_size"):
    named_configs.apply("digits", values, allowed=allowed)
  assert values.batch_size == 1   # nothing was set


def test_apply_names_the_flag_whose_parser_refuses_the_value():
  values = _flag_values(["prog"], steps_lower_bound=5000)
  with pytest.raises(validation.ConfigError, match=r"^--config=digits sets steps to 4000: "):
    named_configs.apply("digits", values, allowed=list(values))


def test_cli_unknown_and_sweep_configs_are_one_line_and_write_nothing(tmp_path):
  unknown, sweep_config = experiment_utils.run_module_cases(
      "experiments.condnet", [[f"--workdir={tmp_path}/unknown", "--config=nope"],
                              [f"--workdir={tmp_path}/sweep", "--config=mnist1d_capacity"]])
  assert unknown.returncode == 2
  assert unknown.stderr.strip() == (
      f"error: --config must be one of {'|'.join(named_configs.available())}, got 'nope'")
  assert sweep_config.returncode == 2   # a sweep's config is refused by condnet
  line = sweep_config.stderr.strip()
  assert line.startswith("error: --config=mnist1d_capacity sets capacity_widths, lrs, "
                         "recipes, not a flag this entrypoint lets a config set; allowed: "), line
  assert "tau, " in line and "taus" not in line and len(line.splitlines()) == 1
  assert not os.path.exists(tmp_path / "unknown") and not os.path.exists(tmp_path / "sweep")


@pytest.mark.slow  # a CLI run; the config-loading and override rules are tested in-process here
def test_cli_command_line_flags_override_the_config(tmp_path):
  workdir = str(tmp_path / "run")
  process = experiment_utils.run_module(
      "experiments.condnet", f"--workdir={workdir}", "--config=digits_reinforce",
      "--hidden=16,16", "--block_size=8", "--steps=4", "--batch_size=32", "--eval_every=2",
      "--checkpoint_every=2", "--log_every=2", "--measure_latency=false", "--plots=false")
  assert process.returncode == 0, process.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as stream:
    recorded = json.load(stream)["flags"]
  # From the config (the experiments' defaults are straight_through / top_k / 4000 steps):
  assert recorded["config"] == "digits_reinforce"
  assert recorded["estimator"] == "reinforce" and recorded["eval_policy"] == "threshold"
  # From the command line, over the config's 512,512 / 32 / 4000 / 64:
  assert recorded["hidden"] == [16, 16] and recorded["block_size"] == 8
  assert recorded["steps"] == 4 and recorded["batch_size"] == 32


@pytest.mark.slow  # a sweep CLI run; the condnet CLI case stays fast
def test_cli_sweep_command_line_choices_win_over_the_config(tmp_path):
  # mnist1d_capacity sets capacity_widths and lrs; the command line's --taus and --lr win, so
  # the sweep gets past its grid checks and stops at the (missing) data, having written nothing.
  workdir = str(tmp_path / "sweep")
  missing = str(tmp_path / "missing.npz")
  process = experiment_utils.run_module(
      "experiments.sweep", f"--workdir={workdir}", "--config=mnist1d_capacity", "--taus=0.25",
      "--lr=0.002", f"--dataset=npz:{missing}")
  assert process.returncode == 2
  line = process.stderr.strip()
  assert line.startswith("error: ") and missing in line and len(line.splitlines()) == 1, line
  assert not os.path.exists(workdir)
  both = experiment_utils.run_module(
      "experiments.sweep", f"--workdir={workdir}", "--config=mnist1d_capacity", "--lrs=0.01",
      "--lr=0.002")
  assert both.stderr.strip() == "error: --lr and --lrs: give one (--lrs trains every " \
                                "configuration at each lr)"
