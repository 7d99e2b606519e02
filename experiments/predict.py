r"""Evaluates a finished run of any task: a classifier with real skipping (accuracy,
compute, latency, overflow), a language model by bits per byte on its test split.

  python -m experiments.predict --workdir=runs/digits
  python -m experiments.predict --workdir=runs/digits --batch_size=128 --json
  python -m experiments.predict --workdir=runs/lm

Loads the run (:func:`ccjax.load_run`), runs its test split through
:func:`ccjax.make_inference` (blocks that do not run are never computed) and reports
``test_error``, ``active_fraction`` (per gated layer), ``macs_per_example``,
``latency_ms`` {``dense``, ``sparse``} at ``--batch_size`` (same process, interleaved
medians), ``overflow_rate``, ``backend`` and ``checkpoint_step`` (the step evaluated:
the one ``results.json`` describes); writes them to ``<workdir>/predict.json``.
With the run's own test-time policy and no overflow, ``test_error`` equals the run's
``results.json`` at any batch size.

A language-model run (``experiments.lm``) reports ``bits_per_byte`` on the test split of
its corpus (or ``--dataset``), ``active_fraction`` and ``macs_per_token`` with its own
test-time policy (or ``--eval_policy``); with the run's policy ``bits_per_byte`` equals
its ``results.json``. ``--batch_size``, ``--repeats`` and ``--data_dir`` are the
classifier's and refused for an LM.

Reads the run without writing into its checkpoints (a run training there is not
harmed). Before any work it checks that ``predict.json`` can be written and that
``--batch_size`` is at most the test split's size; a failed check is one ``error:`` line
and exit status 2.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

import jax

import ccjax
from ccjax import atomic
from ccjax import data as data_lib
from ccjax import lm_config
from ccjax import progress
from ccjax import runs
from ccjax import step as step_lib
from ccjax import text
from ccjax import timing
from ccjax import transformer
from ccjax.tasks import language_model
from experiments import cli

PREDICT_FILE = "predict.json"
INFERENCE_POLICIES = ("threshold", "top_k")

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's --workdir.")
_DATASET = flags.DEFINE_string("dataset", None, "Dataset to evaluate (default: the run's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (default: the run's).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "Examples per inference call.", lower_bound=1)
_EVAL_POLICY = flags.DEFINE_enum("eval_policy", None, list(INFERENCE_POLICIES),
                                 "Test-time policy of the sparse path (default: the run's "
                                 "--eval_policy when it is one of these, else threshold); "
                                 "top_k runs round(tau * blocks) blocks per example and layer.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per latency (median).",
                                lower_bound=1)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
flags.mark_flag_as_required("workdir")


def evaluate(run: runs.Run, dataset: data_lib.Dataset, batch_size: int, mode: str,
             repeats: int) -> dict:
  """The predict report of ``run`` on ``dataset``'s test split."""
  capacities = (ccjax.Capacities(top_k=run.config.top_k_capacities()) if mode == "top_k"
                else None)
  inference = ccjax.make_inference(run.module, run.params, mode=mode, capacities=capacities)
  x, y = np.asarray(dataset.x_test, np.float32), np.asarray(dataset.y_test)
  num_examples = x.shape[0]
  padded = -(-num_examples // batch_size) * batch_size
  x_padded = np.concatenate([x, np.zeros((padded - num_examples, *x.shape[1:]), x.dtype)])
  predictions, masks, infos = [], [], []
  for start in range(0, padded, batch_size):
    logits, info = inference(jnp.asarray(x_padded[start:start + batch_size]))
    predictions.append(np.argmax(np.asarray(logits), -1))
    masks.append([np.asarray(mask) for mask in info.masks])
    infos.append(info)
  keep = slice(0, num_examples)   # padding examples are dropped from every statistic
  prediction = np.concatenate(predictions)[keep]
  layer_masks = [np.concatenate(layer)[keep] for layer in zip(*masks)]
  batches = [jnp.asarray(x_padded[start:start + batch_size])
             for start in range(0, min(padded, 16 * batch_size), batch_size)]
  latency = ccjax.measure_latency(run.module, run.params, batches, repeats=repeats,
                                  inference=ccjax.make_inference(run.module, run.params,
                                                                 mode=mode, capacities=capacities,
                                                                 with_info=False))
  return {
      "workdir": os.path.abspath(_WORKDIR.value), "dataset": dataset.name,
      "batch_size": batch_size, "eval_policy": mode,
      "test_error": float(np.mean(prediction != y)),
      "active_fraction": [float(np.mean(mask)) for mask in layer_masks],
      "macs_per_example": float(np.mean(ccjax.macs_per_example(
          run.module, run.input_shape, layer_masks))),
      "dense_macs_per_example": float(ccjax.dense_macs_per_example(run.module,
                                                                   run.input_shape)),
      "latency_ms": latency, "overflow_rate": ccjax.overflow_rate(infos),
      "backend": inference.backend, "checkpoint_step": run.step,
      "machine": timing.machine_info(),
  }


def evaluate_lm(run: runs.Run, dataset: str, mode: str | None) -> dict:
  """The predict report of the language-model ``run`` on the test split of ``dataset``
  (``mode``: the test-time policy; ``None``: the run's)."""
  config: lm_config.LMConfig = run.config
  mode = mode or config.eval_mode()
  capacity = None if mode == "threshold" else config.layer_capacities()
  splits = text.load_text(dataset, config.context)
  eval_fn = jax.jit(step_lib.make_eval_step(run.module, mode, capacity))
  test = language_model.evaluate_lm(eval_fn, run.params, splits.test, config.context)
  return {
      "workdir": os.path.abspath(_WORKDIR.value), "task": run.task, "dataset": dataset,
      "eval_policy": mode, "bits_per_byte": test["bits_per_byte"],
      "active_fraction": test["active_fraction"],
      "macs_per_token": transformer.macs_per_token(run.module,
                                                   test["active_fraction"] or None),
      "dense_macs_per_token": transformer.macs_per_token(run.module.clone(gated=False)),
      "checkpoint_step": run.step, "machine": timing.machine_info(),
  }


def reject_classifier_flags() -> None:
  """Raises ``ValueError`` for a classifier-only flag given for a language-model run."""
  for holder in (_BATCH_SIZE, _REPEATS, _DATA_DIR):
    if holder.present:
      raise ValueError(f"--{holder.name} is a flag of classifier runs; --workdir "
                       f"{_WORKDIR.value} holds a language-model run: remove it")


def check_writable(workdir: str) -> None:
  """Raises ``ValueError`` unless ``<workdir>/predict.json`` can be written (an existing
  directory only: a missing one is reported by :func:`ccjax.load_run`)."""
  if not os.path.isdir(workdir):
    return
  target = os.path.join(workdir, PREDICT_FILE)
  if os.path.isdir(target):
    raise ValueError(f"--workdir {workdir}: {target} is a directory; predict writes its "
                     "report there: move it away")
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f"--workdir {workdir} is not writable by this user, and predict writes "
                     f"{PREDICT_FILE} there: make it writable or evaluate a copy of the run")


def check_batch_size(batch_size: int, dataset: data_lib.Dataset) -> None:
  """Raises ``ValueError`` unless ``batch_size`` is at most the test split's size."""
  num_test = int(dataset.x_test.shape[0])
  if batch_size > num_test:
    raise ValueError(f"--batch_size must be in [1, {num_test}] (the test split of "
                     f"{dataset.name} has {num_test} examples), got {batch_size}")


def _evaluate_classifier(run: runs.Run) -> dict:
  """The predict report of the classifier ``run`` (flags: dataset, batch size, policy)."""
  if not run.module.gated:
    raise ValueError(f"--workdir {_WORKDIR.value} holds a dense run (--model=dense): there "
                     "is nothing to skip; predict evaluates condnet runs")
  config = run.config
  dataset = data_lib.load_dataset(
      _DATASET.value or config.dataset, data_dir=_DATA_DIR.value or config.data_dir,
      valid_fraction=config.valid_fraction, seed=config.seed, num_classes=run.num_classes)
  if tuple(dataset.input_shape) != run.input_shape:
    raise ValueError(f"--dataset {dataset.name} has examples of shape "
                     f"{list(dataset.input_shape)}, the run was trained on "
                     f"{list(run.input_shape)}")
  check_batch_size(_BATCH_SIZE.value, dataset)
  mode = _EVAL_POLICY.value or (run.config.eval_policy
                                if run.config.eval_policy in INFERENCE_POLICIES else "threshold")
  return evaluate(run, dataset, _BATCH_SIZE.value, mode, _REPEATS.value)


def main(argv):
  cli.reject_extra_args(argv)
  progress.quiet_library_logs()
  try:
    check_writable(_WORKDIR.value)
    run = runs.load_run(_WORKDIR.value)
    if run.task == lm_config.LMConfig.TASK:
      reject_classifier_flags()
      report = evaluate_lm(run, _DATASET.value or run.config.dataset, _EVAL_POLICY.value)
    else:
      report = _evaluate_classifier(run)
  except (ValueError, OSError) as error:
    cli.fail(error)
  except KeyboardInterrupt:
    cli.fail_interrupted(KeyboardInterrupt(
        f"interrupted; nothing written (the run in --workdir {_WORKDIR.value} is unchanged)"))
  try:
    atomic.write_json(os.path.join(_WORKDIR.value, PREDICT_FILE), report)
  except OSError as error:
    cli.fail(f"cannot write {os.path.join(_WORKDIR.value, PREDICT_FILE)} ({error.strerror})")
  if _JSON.value:
    print(atomic.dumps(report))
  elif "bits_per_byte" in report:
    print(f"test bits/byte {report['bits_per_byte']:.4f}  active "
          f"{np.round(report['active_fraction'], 3).tolist()}  MACs/token "
          f"{report['macs_per_token']['total']:.0f} (dense "
          f"{report['dense_macs_per_token']['total']:.0f})  policy {report['eval_policy']}  "
          f"checkpoint step {report['checkpoint_step']}")
  else:
    print(f"test error {report['test_error']:.4f}  active {np.round(report['active_fraction'], 3).tolist()}  "
          f"MACs/example {report['macs_per_example']:.0f} (dense {report['dense_macs_per_example']:.0f})  "
          f"latency dense {report['latency_ms']['dense']:.3f} ms / sparse "
          f"{report['latency_ms']['sparse']:.3f} ms at batch {report['batch_size']}  "
          f"overflow {report['overflow_rate']:.4f}  backend {report['backend']}  "
          f"checkpoint step {report['checkpoint_step']}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
