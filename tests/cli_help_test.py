"""``--help`` of every entrypoint: its own flags, grouped by concern, required ones marked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import flags
import pytest

from experiments import cli
from experiments import flag_groups
from tests import experiment_utils

# Entrypoints, with the arguments that decide their flags (the sweep's --task).
ENTRYPOINTS = ("condnet", "sweep", "lm", "sweep --task=lm", "predict", "bench_inference",
               "bench_lm_decode")
REQUIRED = {"condnet": {"workdir"}, "sweep": {"workdir"}, "lm": {"workdir"},
            "predict": {"workdir"}, "bench_lm_decode": {"workdir"}}

# Runs the entrypoint as ``python -m`` would, with --help, then prints (after the help
# text) the flags that the entrypoint and the experiments package define, found from
# absl's registry by defining module: not from the help code under test.
_PROBE = r"""
import importlib.util, json, os, runpy, sys
from absl import flags
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:], "--help"]
try:
  runpy.run_module(module, run_name="__main__", alter_sys=True)
  code = None
except SystemExit as exit:
  code = exit.code
main_file = importlib.util.find_spec(module).origin  # absl files __main__'s flags under it
own = sorted({flag.name for name, defined in flags.FLAGS.flags_by_module_dict().items()
              if name.startswith("experiments.") or name == main_file for flag in defined})
required = sorted(flag.name for flag in map(flags.FLAGS.__getitem__, own)
                  if any("other than None" in str(v.message) for v in flag.validators))
print("\n" + json.dumps({"code": code, "own": own, "required": required}))
"""


@pytest.mark.parametrize("entrypoint", ENTRYPOINTS)
def test_help_lists_every_own_flag_by_concern(entrypoint):
  entrypoint, *arguments = entrypoint.split()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([experiment_utils.REPO_ROOT,
                                         os.environ.get("PYTHONPATH", "")]))
  process = subprocess.run([sys.executable, "-c", _PROBE, f"experiments.{entrypoint}",
                            *arguments],
                           cwd=experiment_utils.REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
  assert process.returncode == 0, process.stderr[-3000:]
  text, _, probe_line = process.stdout.rstrip().rpartition("\n")
  probe = json.loads(probe_line)
  assert probe["code"] == 0
  assert f"Flags of python -m experiments.{entrypoint} by concern" in text
  own = probe["own"]
  assert len(own) >= 5
  listed = {line.split(":")[0].strip().replace("--[no]", "--")
            for line in text.splitlines() if line.startswith("  --")}
  assert listed == {f"--{name}" for name in own}
  # absl's own flags are left to --helpfull.
  assert "--logtostderr" not in text and "--verbosity" not in text
  # Groups in their fixed order, each flag under its group.
  headers = [line[:-1] for line in text.splitlines() if line.endswith(":") and
             line[:-1] in (*flag_groups.GROUPS, flag_groups.OTHER)]
  order = [*flag_groups.GROUPS, flag_groups.OTHER]
  assert headers == sorted(headers, key=order.index) and len(headers) >= 2
  group = None
  for line in text.splitlines():
    if line[:-1] in order and line.endswith(":"):
      group = line[:-1]
    elif line.startswith("  --"):
      name = line.split(":")[0].strip().replace("--[no]", "--")[2:]
      assert group == flag_groups.group_of(name, f"experiments.{entrypoint}"), line
  # Required flags are marked, and only they.
  assert set(probe["required"]) == REQUIRED.get(entrypoint, set())
  marked = {line.split(":")[0].strip()[2:] for line in _flag_entries(text) if "REQUIRED" in line}
  assert marked == set(probe["required"])


def _flag_entries(text: str) -> list[str]:
  """Each flag's entry (its first line and wrapped continuation lines) as one string."""
  entries = []
  for line in text.splitlines():
    if line.startswith("  --"):
      entries.append(line)
    elif line.startswith("      ") and entries:
      entries[-1] += " " + line.strip()
  return entries


def test_flag_without_group_is_listed_under_other():
  values = flags.FlagValues()
  flags.DEFINE_integer("brand_new_flag", 3, "Added by someone today.", flag_values=values,
                       module_name="experiments.someone")
  flags.DEFINE_string("workdir", None, "Where.", flag_values=values,
                      module_name="experiments.someone")
  flags.mark_flag_as_required("workdir", flag_values=values)
  flags.DEFINE_integer("library_flag", 1, "Not ours.", flag_values=values,
                       module_name="somelib.module")
  text = cli.help_text("experiments.someone", "Does something.", values)
  assert text.startswith("Does something.\n")
  assert "other:\n  --brand_new_flag: Added by someone today. (default: '3')" in text
  assert "output:\n  --workdir: Where. (REQUIRED)" in text
  assert "library_flag" not in text


@pytest.mark.parametrize("argv, wanted", [
    (["prog", "--help"], True), (["prog", "-h"], True), (["prog", "--helpshort"], True),
    (["prog", "--workdir=x", "-?"], True), (["prog", "--helpfull"], False),
    (["prog", "--", "--help"], False), (["prog", "--workdir=--help"], False),
])
def test_wants_help(argv, wanted):
  assert cli.wants_help(argv) is wanted
