r"""The capacity regime on MNIST-1D at 50,000 examples (``mnist1d_large``; for
``experiments.sweep`` only): at the active MACs of a dense 128-128 MLP, condnets of width
256, 512, 1024, 2048 (tau = 1/2, 1/4, 1/8, 1/16) against dense 128 and dense 2048; every
configuration trained at lr 0.001 and 0.003, the lr chosen on validation.

  python -m experiments.sweep --config=mnist1d_capacity --workdir=runs/capacity \
      --seeds=0,1,2,3,4
"""

from experiments.configs import mnist1d_large


def get_config():
  return {**mnist1d_large.get_config(), "hidden": (128, 128),
          "capacity_widths": (256, 512, 1024, 2048), "lrs": (0.001, 0.003)}
