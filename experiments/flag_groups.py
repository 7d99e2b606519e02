"""Which concern each entrypoint flag belongs to, for ``--help`` (:func:`experiments.cli.help_text`).

One table keyed by flag name (:data:`GROUP_OF_FLAG`), plus the few flags whose concern
depends on the entrypoint (:data:`ENTRYPOINT_OVERRIDES`, keyed by ``(module, flag)``). A
flag missing from both is listed under :data:`OTHER`, so a new flag is never hidden.
"""

from __future__ import annotations

GROUPS = ("data", "model", "training", "recipes", "inference", "devices", "output")
OTHER = "other"

GROUP_OF_FLAG = {
    # data
    "dataset": "data", "data_dir": "data", "valid_fraction": "data", "num_classes": "data",
    "allow_data_change": "data",
    # model
    "model": "model", "arch": "model", "hidden": "model", "block_size": "model",
    "tau": "model", "taus": "model", "num_layers": "model", "d_model": "model",
    "num_heads": "model", "mlp_width": "model", "context": "model",
    "policy_init_prob": "model", "variants": "model", "task": "model", "input_dim": "model",
    "cnn_stages": "model", "cnn_block_size": "model", "cnn_tau": "model", "dtype": "model",
    "policy_hidden": "model", "capacity_widths": "model", "policy_rank": "model",
    # training
    "seed": "training", "seeds": "training", "steps": "training", "epochs": "training",
    "batch_size": "training", "lr": "training", "policy_lr": "training",
    "lambda_s": "training", "lambda_v": "training", "l2": "training", "baseline": "training",
    "estimator": "training", "reinforce_cost": "training", "skip_nonfinite": "training",
    "eval_every": "training", "lrs": "training", "load_balance_weight": "training",
    "config": "training",
    # recipes (ccjax.recipes)
    "recipes": "recipes", "warm_steps": "recipes", "tau_schedule": "recipes",
    "tau_schedule_steps": "recipes", "distill_weight": "recipes",
    "distill_temperature": "recipes", "distill_from": "recipes", "init_from": "recipes",
    "entropy_weight": "recipes", "entropy_ramp_steps": "recipes", "budget": "recipes",
    "dual_lr": "recipes", "advantage": "recipes", "distill_teacher": "recipes",
    "batch_shaping_weight": "recipes", "batch_shaping_concentration": "recipes",
    "batch_shaping_steps": "recipes", "regroup_step": "recipes", "imitation_weight": "recipes",
    # inference (test-time policy, latency, benchmarks, sampling)
    "eval_policy": "inference", "measure_latency": "inference",
    "decode_benchmark": "inference", "backend": "inference", "batch_sizes": "inference",
    "repeats": "inference", "example_slack": "inference", "num_buckets": "inference",
    "scan_length": "inference", "random": "inference", "sample": "inference",
    "prompt": "inference", "models": "inference",
    # devices
    "num_devices": "devices", "coordinator_address": "devices", "num_processes": "devices",
    "process_id": "devices",
    # output
    "workdir": "output", "plots": "output", "json": "output", "log_every": "output",
    "checkpoint_every": "output",
}

# Flags whose concern differs in one entrypoint (module name as run with ``python -m``).
ENTRYPOINT_OVERRIDES = {
    ("experiments.predict", "batch_size"): "inference",
    ("experiments.bench_inference", "hidden"): "model",
    ("experiments.bench_inference", "num_classes"): "model",
    ("experiments.bench_inference", "seed"): "model",
    ("experiments.bench_inference", "tau"): "model",
}


def group_of(flag_name: str, entrypoint: str | None = None) -> str:
  """The concern of ``--flag_name`` in ``entrypoint`` (one of :data:`GROUPS`, else
  :data:`OTHER`)."""
  return ENTRYPOINT_OVERRIDES.get((entrypoint, flag_name),
                                  GROUP_OF_FLAG.get(flag_name, OTHER))
