r"""MNIST-1D (generated offline, ``ccjax.data.MNIST1D_ARGS``: 8,000 train of which 800 held
out for validation, 2,000 test), MLP 512-512 in blocks of 32, the experiments' recipe,
4,000 steps.

  python -m experiments.condnet --config=mnist1d --workdir=runs/mnist1d
  python -m experiments.sweep --config=mnist1d --workdir=runs/mnist1d_sweep --seeds=0,1,2,3,4
"""

from experiments.configs import digits


def get_config():
  return {**digits.get_config(), "dataset": "mnist1d"}
