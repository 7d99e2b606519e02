r"""Named experiment configs: ``experiments/configs/<name>.py``, selected with ``--config``.

  python -m experiments.condnet --config=mnist1d --workdir=runs/m1d --seed=3
  python -m experiments.sweep --config=mnist1d_capacity --workdir=runs/capacity --seeds=0,1,2,3,4

A config is a plain Python module whose ``get_config()`` returns ``{flag name: value}``
(values as the flag would hold them: ``(512, 512)``, ``"top_k"``, ``False``), as in Flax's
examples and big_vision. After absl has parsed the command line, every config value
becomes the value of the flag of its name unless the command line gave that flag: a flag
typed by the user wins over the config, the config wins over the entrypoint's defaults.
An unknown config name, or a key that is not a flag of the entrypoint, is a one-line error
listing the allowed names (exit 2).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Collection

from absl import flags

from ccjax import validation
from experiments import cli
from experiments import configs as configs_package

# Flags a config may not set: the config's own name, and where the run's files go.
RESERVED_FLAGS = ("config", "workdir")


def available() -> tuple[str, ...]:
  """The config names: the modules of ``experiments/configs/``, sorted."""
  return tuple(sorted(module.name for module in pkgutil.iter_modules(configs_package.__path__)
                      if not module.name.startswith("_")))


CONFIG = flags.DEFINE_string(
    "config", None, "Named experiment config, experiments/configs/NAME.py (one of "
    f"{'|'.join(available())}); flags given on the command line override its values.")


def load(name: str) -> dict[str, Any]:
  """``get_config()`` of the config ``name``.

  Raises:
    validation.ConfigError: an unknown name, or a ``get_config()`` that does not return a
      dict keyed by flag names (field ``config``).
  """
  names = available()
  if name not in names:
    raise validation.ConfigError("config", f"must be one of {'|'.join(names)}, got {name!r}")
  values = importlib.import_module(f"{configs_package.__name__}.{name}").get_config()
  if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
    raise validation.ConfigError("config", f"={name}: get_config() must return a dict of flag "
                                           f"values, got {type(values).__name__}")
  return dict(values)


def apply(name: str, flag_values: flags.FlagValues, allowed: Collection[str]) -> dict[str, Any]:
  """Sets the config ``name`` on every flag in ``flag_values`` the command line did not give.

  Args:
    name: a config name (:func:`available`).
    flag_values: parsed flags (``flags.FLAGS``).
    allowed: the flags the entrypoint lets a config set.

  Returns:
    ``{flag: value}`` of the config values that were set (those the command line did not
    override).

  Raises:
    validation.ConfigError: an unknown name, a key outside ``allowed`` (or reserved), or a
      value its flag's parser refuses (field ``config``).
  """
  values = load(name)
  allowed = set(allowed) - set(RESERVED_FLAGS)
  unknown = sorted(set(values) - allowed)
  if unknown:
    raise validation.ConfigError(
        "config", f"={name} sets {', '.join(unknown)}, not a flag this entrypoint lets a config "
        f"set; allowed: {', '.join(sorted(allowed))}")
  applied = {}
  for key, value in values.items():
    if flag_values[key].present:
      continue
    try:   # absl's list parsers take lists, not tuples
      flag_values.set_default(key, list(value) if isinstance(value, tuple) else value)
    except flags.Error as error:
      raise validation.ConfigError(
          "config", f"={name} sets {key} to {value!r}: {' '.join(str(error).split())}") from None
    applied[key] = value
  return applied


def parse_flags(argv):
  """:func:`experiments.cli.parse_flags`, then the ``--config`` named on the command line
  (pass as ``flags_parser``); a bad config is one ``error:`` line, exit 2."""
  argv = cli.parse_flags(argv)
  if CONFIG.value is not None:
    try:
      apply(CONFIG.value, flags.FLAGS, [flag.name for flag in cli.own_flags()])
    except validation.ConfigError as error:
      cli.fail(error)
  return argv
