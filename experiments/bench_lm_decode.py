r"""Batch-1 decode time per token, dense vs sparse, of a trained or a calibrated random LM.

  python -m experiments.bench_lm_decode --workdir=runs/lm            # a trained gated run
  python -m experiments.bench_lm_decode --workdir=- --random --d_model=512 --mlp_width=2048
  CCJAX_BACKEND=xla python -m experiments.bench_lm_decode --workdir=- --random  # XLA MLPs

Reports (:func:`ccjax.lm_decode.benchmark`) ``mlp_ms_per_token`` (the MLPs' compute: 64
tokens one after another inside one jitted call), ``mlp_call_ms_per_token`` (one jitted
call per token, dispatch included), ``decode_ms_per_token`` (the whole decode step, one
jitted call per token) and the sparse MLPs' ``backend``; the sparse decode uses the
run's ``--eval_policy`` (``top_k`` / ``capped`` with ``round(tau * blocks)`` blocks per
token).

With ``--random`` (``--workdir`` is then unused) the model is random and each MLP
policy's bias is calibrated (:func:`ccjax.calibrate_policies`) so that ``threshold`` runs
about ``--tau`` of the blocks on random unit-variance inputs (what a LayerNorm feeds the MLP). Prints one JSON
line (with the machine) and writes nothing.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import jax
import numpy as np

from ccjax import lm_decode
from ccjax import lm_train
from ccjax import loop
from ccjax import timing
from ccjax.inference import api
from experiments import cli
from experiments import shared_flags as shared
from experiments import lm

_REPEATS = flags.DEFINE_integer("repeats", 200, "Timed calls per variant.")
_RANDOM = flags.DEFINE_bool("random", False, "Time a random model with calibrated policies "
                            "instead of the run in --workdir.")
_SCAN_LENGTH = flags.DEFINE_integer("scan_length", 64, "Tokens per jitted call of the MLP-only "
                                    "compute time (mlp_ms_per_token).")


def _calibrated_random(config: lm_train.LMConfig):
  model = config.build_model()
  tokens = np.zeros((1, config.context), np.int32)
  params = model.init({"params": jax.random.PRNGKey(config.seed),
                       "gate": jax.random.PRNGKey(1)}, tokens, mode="all")["params"]
  tau = config.train.taus(config.num_layers)[0]
  inputs = jax.random.normal(jax.random.PRNGKey(2), (512, config.d_model))
  params = dict(params)
  for index, name in enumerate(model.gate_names()):
    mlp_params = api.calibrate_policies(model.mlp_module(index), model.mlp_params(params)[index],
                                        inputs, tau)
    params[name] = {**params[name], "mlp": mlp_params}
  return model, params


def main(argv):
  cli.reject_extra_args(argv)
  loop.quiet_library_logs()
  with cli.one_line_errors():
    config = lm.config_from_flags()
    lm.reject_given((lm.SAMPLE, "samples from a trained run (experiments.lm)"),
                    (lm.PROMPT, "is the prompt of experiments.lm --sample"))
    if _RANDOM.value:
      model, params = _calibrated_random(config)
    else:
      model, params = config.build_model(), lm_train.load_params(config, shared.WORKDIR.value)
    tokens = np.frombuffer(b"The 3 red foxes sold 12 lamps for $4.50 at 10:45 near the mill. "
                           * 4, np.uint8)[None, :config.context].astype(np.int32)
    mode, top_k = config.eval_mode(), config.eval_capacity()
    _, aux = model.apply({"params": params}, tokens, mode=mode if model.gated else "all",
                         capacity=top_k)
    active = [float(a.mask.mean()) for a in aux] if model.gated else None
    result = lm_decode.benchmark(model, params, tokens, active, repeats=_REPEATS.value,
                                 scan_length=_SCAN_LENGTH.value, mode=mode, top_k=top_k)
    result.update({"active_fraction": active, "d_model": config.d_model,
                   "mlp_width": config.mlp_width, "block_size": config.block_size,
                   "trained": not _RANDOM.value, "machine": timing.machine_info(),
                   "load_average_1m": os.getloadavg()[0]})
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
