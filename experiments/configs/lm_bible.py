r"""The byte-level LM on real English text (``--dataset=bible``, the King James Bible
shipped by an installed package, pinned by sha256): the runs of ``docs/lm_text.md``.

  python -m experiments.lm --config=lm_bible --workdir=runs/lm_bible_one
  python -m experiments.sweep --task=lm --config=lm_bible --workdir=runs/lm_bible \
      --seeds=0,1,2,3,4

1,000 steps (about 4 minutes per run on 2 CPU cores), evaluation every 500; decode timing
and plots off (the sweep compares quality; ``experiments.bench_lm_decode`` times decoding).
"""


def get_config():
  return {"dataset": "bible", "steps": 1000, "eval_every": 500, "log_every": 250,
          "checkpoint_every": 500, "decode_benchmark": False, "plots": False}
