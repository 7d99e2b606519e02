r"""The paper's method on digits: REINFORCE with the EMA baseline, threshold test policy
(p > 0.5); otherwise as ``digits``.

  python -m experiments.condnet --config=digits_reinforce --workdir=runs/digits_reinforce
  python -m experiments.sweep --config=digits_reinforce --workdir=runs/digits_reinforce_sweep \
      --seeds=0,1,2,3,4
"""

from experiments.configs import digits


def get_config():
  return {**digits.get_config(), "estimator": "reinforce", "baseline": "ema",
          "eval_policy": "threshold"}
