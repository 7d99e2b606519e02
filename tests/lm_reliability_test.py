"""The LM entrypoints held to the classifiers' standard (issue 21, items 1, 6, 7, 9, 12,
13 and hole (b)), through the real CLI with a tiny model (seconds per run)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import ccjax
from ccjax import text
from experiments import lm
from tests import experiment_utils

ARCH_FLAGS = ("--num_layers=1", "--d_model=16", "--num_heads=2", "--mlp_width=32",
              "--block_size=8", "--context=16")
TINY = (*ARCH_FLAGS, "--batch_size=4", "--steps=4", "--eval_every=4", "--log_every=2",
        "--checkpoint_every=2", "--plots=false")


def _corpus(path, seed=0) -> str:
  with open(path, "wb") as stream:
    stream.write(text.grammar_corpus(6000, seed=seed))
  return f"--dataset=text:{path}"


def _error_line(process, status=2) -> str:
  assert process.returncode == status, process.stderr[-3000:]
  assert "Traceback" not in process.stderr, process.stderr[-3000:]
  errors = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, process.stderr[-3000:]
  return errors[0]


@pytest.fixture(scope="module")
def idle_run(tmp_path_factory):
  """A finished tiny LM run whose only layer ends with no active block (tau 0.01, policies
  initialised at 0.01: nothing passes p > 0.5), decode benchmark on (the default)."""
  root = tmp_path_factory.mktemp("lm")
  dataset = _corpus(root / "corpus.txt")
  workdir = str(root / "run")
  process = experiment_utils.run_module("experiments.lm", f"--workdir={workdir}", dataset,
                                        *TINY, "--tau=0.01", "--policy_init_prob=0.01")
  assert process.returncode == 0, process.stderr[-3000:]
  return workdir, dataset


@pytest.mark.slow  # an LM CLI run (idle_run, 14 s) read by further CLI runs
def test_a_layer_with_no_active_block_still_writes_results(idle_run):
  workdir, _ = idle_run
  with open(os.path.join(workdir, "results.json")) as stream:
    results = json.load(stream)
  assert results["active_fraction"] == [0.0]
  assert results["decode_ms_per_token"]["sparse"] > 0
  assert results["capacity_active_fraction"] == [0.25]   # one block of 4
  # The entrypoint's own flags (defined in experiments/lm.py) are recorded too.
  assert results["flags"]["num_layers"] == 1 and results["flags"]["model"] == "gated"
  assert results["flags"]["seed"] == 0


@pytest.mark.slow  # LM readers end to end, 12 s
def test_readers_load_an_lm_run_and_classifier_sources_refuse_it(idle_run, tmp_path):
  workdir, dataset = idle_run
  run = ccjax.load_run(workdir)   # any task's run loads
  assert run.task == "lm" and isinstance(run.module, ccjax.GatedTransformer)
  with open(os.path.join(workdir, "results.json")) as stream:
    results = json.load(stream)
  predict = experiment_utils.run_module("experiments.predict", f"--workdir={workdir}",
                                        dataset, "--json")
  assert predict.returncode == 0, predict.stderr[-3000:]
  report = json.loads(predict.stdout.strip().splitlines()[-1])
  assert report["bits_per_byte"] == results["bits_per_byte"]   # the run's own test number
  refused = experiment_utils.run_module("experiments.predict", f"--workdir={workdir}",
                                        dataset, "--batch_size=4")
  assert "--batch_size is a flag of classifier runs" in _error_line(refused)
  init = experiment_utils.run_module(
      "experiments.condnet", f"--workdir={tmp_path}/new", f"--init_from={workdir}",
      *experiment_utils.TINY_FLAGS)
  assert "--init_from: --workdir" in _error_line(init)
  assert "holds a run of task 'lm'" in _error_line(init)
  assert not os.path.exists(tmp_path / "new")


@pytest.mark.slow  # an LM CLI run (idle_run, 14 s) read by further CLI runs
def test_sample_leaves_a_save_in_progress_alone(idle_run, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(idle_run[0], workdir)
  in_progress = os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(in_progress, "state"))
  before = experiment_utils.listing(os.path.join(workdir, "checkpoints"))
  process = experiment_utils.run_module("experiments.lm", f"--workdir={workdir}", idle_run[1],
                                        *ARCH_FLAGS, "--tau=0.01", "--sample=3")
  assert process.returncode == 0, process.stderr[-3000:]
  assert experiment_utils.listing(os.path.join(workdir, "checkpoints")) == before


@pytest.mark.slow  # an LM CLI run (idle_run, 14 s) read by further CLI runs
def test_eval_policy_lists_what_the_lm_serves(idle_run, tmp_path):
  refused = experiment_utils.run_module("experiments.lm", f"--workdir={tmp_path}/x",
                                        "--eval_policy=sample")
  assert "<threshold|top_k|capped>" in _error_line(refused)
  workdir = str(tmp_path / "copy")
  shutil.copytree(idle_run[0], workdir)
  capped = experiment_utils.run_module(
      "experiments.lm", f"--workdir={workdir}", idle_run[1], *TINY, "--tau=0.01",
      "--policy_init_prob=0.01", "--eval_policy=capped", "--decode_benchmark=false")
  assert capped.returncode == 0, capped.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as stream:
    assert json.load(stream)["eval_policy"] == "capped"


# Refusals before any work, one batch of forked children per entrypoint:
# name -> (entrypoint, arguments after --workdir).
REFUSAL_CASES = {
    "classifier_flag": ("experiments.lm", ["--arch=cnn", *TINY]),
    "huge_windows": ("experiments.lm", ["--batch_size=4000000"]),
    "huge_memory": ("experiments.lm", ["--batch_size=300000"]),
    "prompt_without_sample": ("experiments.lm", ["--prompt=Hi", *TINY]),
    "sweep_seed": ("experiments.sweep", ["--task=lm", "--seed=3", *TINY]),
    "sweep_model": ("experiments.sweep", ["--task=lm", "--model=dense", *TINY]),
    "decode_sample": ("experiments.bench_lm_decode", ["--sample=5", *TINY]),
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
  """``{name: (process, workdir)}`` of every REFUSAL_CASES case (a fresh workdir each)."""
  root = tmp_path_factory.mktemp("refusals")
  results = {}
  for module in dict.fromkeys(module for module, _ in REFUSAL_CASES.values()):
    names = [name for name, (case_module, _) in REFUSAL_CASES.items() if case_module == module]
    processes = experiment_utils.run_module_cases(
        module, [[f"--workdir={root / name}", *REFUSAL_CASES[name][1]] for name in names])
    results.update({name: (process, root / name) for name, process in zip(names, processes)})
  return results


def test_classifier_flags_are_refused(refusals):
  # One real CLI case shows the refusal; every other classifier flag goes through the same
  # loop over experiments.lm.CLASSIFIER_ONLY_FLAGS.
  process, workdir = refusals["classifier_flag"]
  assert "--arch is a flag of the classifier entrypoints" in _error_line(process)
  assert not os.path.exists(workdir)
  refused = {holder.name for holder in lm.CLASSIFIER_ONLY_FLAGS}
  assert {"arch", "hidden", "init_from", "num_classes", "epochs"} <= refused


def test_huge_batches_are_refused_before_the_workdir_exists(refusals):
  (windows, windows_dir), (memory, memory_dir) = (refusals["huge_windows"],
                                                  refusals["huge_memory"])
  assert "--batch_size must be in [1, " in _error_line(windows)   # as the classifier says
  assert "GiB per training step" in _error_line(memory)
  assert "use a smaller --batch_size" in _error_line(memory)
  assert not os.path.exists(windows_dir) and not os.path.exists(memory_dir)


@pytest.mark.slow  # three LM CLI runs, 20 s
def test_resume_on_a_changed_corpus_needs_allow_data_change(tmp_path):
  corpus = tmp_path / "corpus.txt"
  dataset = _corpus(corpus)
  workdir = f"--workdir={tmp_path}/run"
  flags = (*TINY, "--decode_benchmark=false")
  first = experiment_utils.run_module("experiments.lm", workdir, dataset, *flags, "--steps=2")
  assert first.returncode == 0, first.stderr[-3000:]
  _corpus(corpus, seed=1)   # the same path, other bytes
  refused = experiment_utils.run_module("experiments.lm", workdir, dataset, *flags)
  line = _error_line(refused)
  assert "holds different data than the checkpoint" in line and "--allow_data_change" in line
  allowed = experiment_utils.run_module("experiments.lm", workdir, dataset, *flags,
                                        "--allow_data_change")
  assert allowed.returncode == 0, allowed.stderr[-3000:]
  with open(tmp_path / "run" / "results.json") as stream:
    results = json.load(stream)
  assert results["steps"] == 4
  assert results["corpus_sha256"] == text.fingerprint(corpus.read_bytes())


@pytest.mark.parametrize("name,message", [
    ("prompt_without_sample", "--prompt is the prompt of --sample, and --sample is not given"),
    ("sweep_seed", "--seed is one run's seed; the sweep takes --seeds"),
    ("sweep_model", "--model is one run's model; the sweep takes --variants"),
    ("decode_sample", "--sample samples from a trained run"),
])
def test_flags_an_lm_entrypoint_would_ignore_are_refused(refusals, name, message):
  process, workdir = refusals[name]
  assert message in _error_line(process)
  assert not os.path.exists(workdir)
