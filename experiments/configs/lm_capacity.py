r"""The capacity regime of the byte LM on real text (``lm_bible``; for ``experiments.sweep
--task=lm`` only): at the active MLP MACs of dense width 128 (k = 4 blocks of 32 per token
and layer), gated MLPs of width 512 and 1024 (tau = 1/4, 1/8) with the dense-to-sparse
recipe ``lm_regroup`` and REINFORCE at the test budget (``gated_top_k``), against dense
128, 512 and 1024; 1,000 steps every run (docs/studies/lm_capacity.md).

  python -m experiments.sweep --task=lm --config=lm_capacity --workdir=runs/lm_capacity \
      --seeds=0,1,2,3,4
"""

from experiments.configs import lm_bible


def get_config():
  return {**lm_bible.get_config(), "capacity_widths": (512, 1024), "recipes": ("lm_regroup",),
          "variants": ("gated_top_k",)}
