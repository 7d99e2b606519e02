r"""Digits (scikit-learn 8x8, offline), MLP 512-512 in blocks of 32, the experiments' recipe
(straight-through estimator, ``top_k`` test policy), 4,000 steps: the Quickstart's run,
with every setting pinned so that its tables do not move when a default does.

  python -m experiments.condnet --config=digits --workdir=runs/digits
  python -m experiments.sweep --config=digits --workdir=runs/digits_sweep --seeds=0,1,2,3,4
"""


def get_config():
  return {"dataset": "digits", "arch": "mlp", "hidden": (512, 512), "block_size": 32,
          "estimator": "straight_through", "eval_policy": "top_k", "lr": 0.001,
          "batch_size": 64, "steps": 4000, "valid_fraction": 0.1}
