r"""Trains a byte-level language model with per-token gated MLPs (or a baseline).

  python -m experiments.lm --workdir=runs/lm                 # gated (REINFORCE), tau = 1/4
  python -m experiments.lm --workdir=runs/lm_dense --model=dense
  python -m experiments.lm --workdir=runs/lm_router --model=router   # top-k router
  python -m experiments.lm --workdir=runs/lm --sample=200     # bytes from the trained run
  python -m experiments.lm --workdir=runs/own --dataset=text:/path/to/file.txt

The shared flags of ``experiments.condnet`` (recipes, ``--eval_policy``, ``--num_devices``,
...) keep their meaning, with LM defaults (``--estimator=reinforce``, ``--lambda_s=4``,
``--steps=1000``; the test policy is ``threshold``, or ``top_k`` for the router, unless
``--eval_policy`` is given: ``threshold`` | ``top_k`` | ``capped``). The classifier-only
flags (``--arch``, ``--hidden``, ``--init_from``, ...: :data:`CLASSIFIER_ONLY_FLAGS`) are
refused when given. All logic lives in :mod:`ccjax.tasks` (the one driver, task ``lm``);
bad flags or data exit with status 2 and a one-line message, and nothing is written.
Running again on the same workdir resumes (changed training settings are refused; a
changed corpus too, unless ``--allow_data_change``).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
import jax

from ccjax import lm_decode
from ccjax import lm_train
from ccjax import modes
from ccjax import progress
from ccjax import step as step_lib
from ccjax import tasks
from experiments import cli
from experiments import named_configs
from experiments import shared_flags as shared

_DEFAULT = lm_train.LMConfig()
# The shared flags keep their names (--dataset, --steps, --batch_size, --block_size, ...)
# with this entrypoint's defaults.
for _name, _value in (("dataset", _DEFAULT.dataset), ("steps", _DEFAULT.DEFAULT_STEPS),
                      ("batch_size", _DEFAULT.batch_size), ("block_size", _DEFAULT.block_size),
                      ("eval_every", _DEFAULT.eval_every), ("log_every", _DEFAULT.log_every),
                      ("checkpoint_every", _DEFAULT.checkpoint_every),
                      ("plots", _DEFAULT.plots), ("estimator", _DEFAULT.train.estimator),
                      ("lambda_s", _DEFAULT.train.lambda_s)):
  flags.FLAGS.set_default(_name, _value)
# The LM's test policies (the classifiers' list has sample, which the LM cannot serve).
flags.FLAGS["eval_policy"].parser = flags.EnumParser(list(lm_train.LM_EVAL_POLICIES))
flags.FLAGS.set_default("eval_policy", None)   # the model's own (config.eval_mode())
flags.FLAGS["eval_policy"].help = (
    f"<{'|'.join(lm_train.LM_EVAL_POLICIES)}>: test-time masks: "
    f"{modes.help_text(lm_train.LM_EVAL_POLICIES)}; k = round(tau * blocks) per token and "
    "layer; default threshold, top_k for --model=router.")
# Shared flags of the classifier entrypoints that no LM entrypoint uses: given, refused.
CLASSIFIER_ONLY_FLAGS = (shared.DATA_DIR, shared.ARCH, shared.HIDDEN, shared.EPOCHS,
                         shared.VALID_FRACTION, shared.NUM_CLASSES, shared.MEASURE_LATENCY,
                         shared.DISTILL_FROM, shared.INIT_FROM, shared.POLICY_HIDDEN,
                         shared.POLICY_RANK)
MODEL = flags.DEFINE_enum("model", _DEFAULT.model, lm_train.LM_MODELS,
                           "gated (per-token gated MLPs, policies trained by --estimator) | "
                           "dense (baseline) | router (MoE-style top-k router over the same "
                           "blocks, straight-through; sets --estimator=router).")
_TAU = shared.define_number_list(
    "tau", (0.25,), "Target active fraction in (0, 1]: one value or one per layer (dense "
    "runs: the fraction of TEAL-style thresholding).")
SEED = flags.DEFINE_integer("seed", 0, "Seed of parameters, batches and masks.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", _DEFAULT.num_layers, "Transformer blocks.")
_D_MODEL = flags.DEFINE_integer("d_model", _DEFAULT.d_model, "Model width.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", _DEFAULT.num_heads, "Attention heads.")
_MLP_WIDTH = flags.DEFINE_integer("mlp_width", _DEFAULT.mlp_width, "MLP hidden units.")
_CONTEXT = flags.DEFINE_integer("context", _DEFAULT.context, "Context length in bytes.")
_REINFORCE_COST = flags.DEFINE_enum(
    "reinforce_cost", _DEFAULT.train.reinforce_cost, step_lib.REINFORCE_COSTS,
    "position: each position's own loss (biased, low variance) | sequence: the sequence "
    "loss (unbiased).")
_POLICY_INIT_PROB = flags.DEFINE_float("policy_init_prob", _DEFAULT.policy_init_prob,
                                       "Initial block probability.")
_DECODE_BENCHMARK = flags.DEFINE_bool("decode_benchmark", _DEFAULT.decode_benchmark,
                                      "Time batch-1 decoding (dense vs sparse) at the end.")
SAMPLE = flags.DEFINE_integer("sample", None, "Print --prompt and this many bytes generated "
                               "by the trained run in --workdir (sparse decoding for gated "
                               "runs), write nothing and exit.")
PROMPT = flags.DEFINE_string("prompt", "The ", "Prompt of --sample.")

def reject_given(*unused: tuple[flags.FlagHolder, str]) -> None:
  """Raises ``ValueError`` for the first flag of ``unused`` given on the command line,
  with its reason (``(flag, why it is not used here)`` pairs)."""
  for holder, reason in unused:
    if holder.present:
      raise ValueError(f"--{holder.name} {reason}: remove it")


def reject_classifier_flags() -> None:
  """Raises ``ValueError`` naming the first :data:`CLASSIFIER_ONLY_FLAGS` flag given."""
  reject_given(*((holder, "is a flag of the classifier entrypoints (experiments.condnet); "
                          "language models do not use it (--helpfull lists the LM flags: "
                          "--num_layers, --d_model, --mlp_width, --block_size, ...)")
                 for holder in CLASSIFIER_ONLY_FLAGS))


def config_from_flags() -> lm_train.LMConfig:
  """The validated run configuration (``ConfigError`` if a value breaks a rule,
  ``ValueError`` for a classifier-only flag)."""
  reject_classifier_flags()
  train = shared.train_config_from_flags(tau=_TAU.value, reinforce_cost=_REINFORCE_COST.value)
  return lm_train.LMConfig(
      dataset=shared.DATASET.value, model=MODEL.value, num_layers=_NUM_LAYERS.value,
      d_model=_D_MODEL.value, num_heads=_NUM_HEADS.value, mlp_width=_MLP_WIDTH.value,
      block_size=shared.BLOCK_SIZE.value, context=_CONTEXT.value,
      batch_size=shared.BATCH_SIZE.value, steps=shared.STEPS.value,
      eval_every=shared.EVAL_EVERY.value, log_every=shared.LOG_EVERY.value,
      checkpoint_every=shared.CHECKPOINT_EVERY.value, seed=SEED.value,
      policy_init_prob=_POLICY_INIT_PROB.value, plots=shared.PLOTS.value,
      decode_benchmark=_DECODE_BENCHMARK.value,
      # Not given: the LM's own default (threshold, or top_k for --model=router).
      eval_policy=shared.EVAL_POLICY.value if shared.EVAL_POLICY.present else None,
      num_devices=shared.NUM_DEVICES.value,
      allow_data_change=shared.ALLOW_DATA_CHANGE.value,
      regroup_step=shared.REGROUP_STEP.value, train=train)


def sample(config: lm_train.LMConfig, workdir: str, num_bytes: int) -> bytes:
  """``num_bytes`` bytes generated by the run in ``workdir`` (its latest checkpoint)."""
  if num_bytes < 1:
    raise ValueError(f"--sample must be a positive number of bytes, got {num_bytes}")
  if not PROMPT.value:
    raise ValueError("--prompt must not be empty")
  params = lm_train.load_params(config, workdir)
  model = config.build_model()
  fns = lm_decode.make_decode(model, params, sparse=model.gated,
                              **lm_train.decode_policy(config))
  return lm_decode.generate(fns, PROMPT.value.encode("utf-8"), num_bytes,
                            jax.random.PRNGKey(config.seed))


def main(argv):
  cli.reject_extra_args(argv)
  progress.quiet_library_logs()
  with cli.one_line_errors():
    config = config_from_flags()
    if not SAMPLE.present:
      reject_given((PROMPT, "is the prompt of --sample, and --sample is not given"))
    if SAMPLE.present:
      generated = sample(config, shared.WORKDIR.value, SAMPLE.value)
      sys.stdout.write(PROMPT.value + generated.decode("utf-8", errors="replace") + "\n")
      return
    tasks.train_and_evaluate(tasks.TASKS[config.TASK], config, shared.WORKDIR.value,
                             flag_values=shared.experiment_flag_values())


if __name__ == "__main__":
  app.run(main, flags_parser=named_configs.parse_flags)
