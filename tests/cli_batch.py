r"""Runs one entrypoint on several argument lists, each as ``python -m MODULE ARGS`` would,
paying the interpreter start and the imports once (``experiment_utils.run_module_cases``).

  python -m tests.cli_batch MODULE CASES_JSON RESULTS_JSON

The driver imports what MODULE imports at its top level (not MODULE itself), then forks one
child per argument list. A child points its stdout and stderr (the file descriptors, so
that native libraries' output is caught too) at files of its own, and runs MODULE as
``__main__`` with ``sys.argv`` set, as ``python -m`` does (its flags are defined in the
child, its ``app.run`` parses them); its exit status is the one the CLI would give. The
driver imports no backend, so each child starts its own, as a fresh process would.
RESULTS_JSON gets one ``{"returncode", "stdout", "stderr"}`` per argument list.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import runpy
import sys
import tempfile
import traceback


def top_level_imports(module: str) -> list[str]:
  """The modules that ``module``'s source imports outside any function (its own excluded)."""
  with open(importlib.util.find_spec(module).origin, encoding="utf-8") as stream:
    tree = ast.parse(stream.read())
  names = []
  for node in tree.body:
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
      names.append(node.module)
      names += [f"{node.module}.{alias.name}" for alias in node.names]
  return [name for name in names if name != module]


def _preload(module: str) -> None:
  for name in top_level_imports(module):
    try:
      importlib.import_module(name)
    except ImportError:  # ``from package import attribute``: not a module
      pass


def _exit_status(code) -> int:
  """What the interpreter makes of ``SystemExit(code)``."""
  if code is None:
    return 0
  if isinstance(code, int):
    return code
  print(code, file=sys.stderr)
  return 1


def _run_child(module: str, args: list[str], stdout_path: str, stderr_path: str) -> None:
  """In the forked child: runs the CLI and leaves with its exit status (never returns)."""
  status = 1
  try:
    for fd, path in ((1, stdout_path), (2, stderr_path)):
      target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
      os.dup2(target, fd)
      os.close(target)
    sys.argv = [module, *args]  # runpy sets argv[0] to the module's file, as -m does
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
      status = 0
    except SystemExit as exit_:
      status = _exit_status(exit_.code)
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
      status = 1
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access


def run_cases(module: str, cases: list[list[str]]) -> list[dict]:
  """Each argument list of ``cases`` run as the CLI ``module`` in a forked child."""
  _preload(module)
  results = []
  with tempfile.TemporaryDirectory(prefix="cli-batch-") as scratch:
    for index, args in enumerate(cases):
      stdout_path = os.path.join(scratch, f"{index}.stdout")
      stderr_path = os.path.join(scratch, f"{index}.stderr")
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        _run_child(module, args, stdout_path, stderr_path)
      _, wait_status = os.waitpid(pid, 0)
      outputs = {}
      for name, path in (("stdout", stdout_path), ("stderr", stderr_path)):
        with open(path, encoding="utf-8", errors="replace") as stream:
          outputs[name] = stream.read()
      results.append({"returncode": os.waitstatus_to_exitcode(wait_status), **outputs})
  return results


def main(argv: list[str]) -> None:
  module, cases_path, results_path = argv[1:]
  with open(cases_path, encoding="utf-8") as stream:
    cases = json.load(stream)
  results = run_cases(module, cases)
  with open(results_path, "w", encoding="utf-8") as stream:
    json.dump(results, stream)


if __name__ == "__main__":
  main(sys.argv)
