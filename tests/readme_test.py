"""The README's code example runs as written."""

from __future__ import annotations

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


import pytest


def _python_blocks() -> list[str]:
  with open(README) as stream:
    return re.findall(r"```python\n(.*?)```", stream.read(), flags=re.S)


def test_readme_has_nnx_then_linen_examples():
  blocks = _python_blocks()
  assert len(blocks) >= 2, "README needs the NNX and the Linen example"
  assert "from flax import nnx" in blocks[0] and "flax.linen" in blocks[1]


@pytest.mark.parametrize("index", [0, 1], ids=["nnx", "linen"])
def test_readme_example_runs_and_prints(index, capsys):
  namespace = {}
  exec(compile(_python_blocks()[index], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["logits"].shape == (8, 10)
  assert set(namespace["metrics"]) >= {"loss", "error", "active_fraction", "l_b", "l_e", "l_v"}
  assert "active blocks" in capsys.readouterr().out
