r"""MNIST-1D at 50,000 examples (``--dataset=mnist1d:50000``: 40,000 train of which 4,000 held
out for validation, 10,000 test), where data is not the limit; otherwise as ``mnist1d``.

  python -m experiments.condnet --config=mnist1d_large --workdir=runs/mnist1d_large
  python -m experiments.sweep --config=mnist1d_large --workdir=runs/mnist1d_large_sweep \
      --seeds=0,1,2,3,4 --taus=0.25
"""

from experiments.configs import mnist1d


def get_config():
  return {**mnist1d.get_config(), "dataset": "mnist1d:50000"}
