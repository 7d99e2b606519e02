r"""The capacity regime on MNIST-1D at 50,000 examples (``mnist1d_large``; for
``experiments.sweep`` only): at the active MACs of a dense 128-128 MLP, condnets of width
256, 512, 1024 (tau = 1/2, 1/4, 1/8) against dense 128 and dense 256 / 512 / 1024, with the
dense-to-sparse recipe and both of its estimators (``regroup+router``,
``regroup+reinforce_topk``) and the paper's recipe (``paper``); 6,000 steps, every
configuration trained at lr 0.001 and 0.003, the lr chosen on validation
(docs/studies/mnist1d_capacity.md).

  python -m experiments.sweep --config=mnist1d_capacity --workdir=runs/capacity \
      --seeds=0,1,2,3,4
"""

from experiments.configs import mnist1d_large


def get_config():
  return {**mnist1d_large.get_config(), "hidden": (128, 128), "steps": 6000,
          "capacity_widths": (256, 512, 1024), "lrs": (0.001, 0.003),
          "recipes": ("regroup+router", "regroup+reinforce_topk", "paper")}
