"""The README's code example runs as written."""

from __future__ import annotations

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_linen_example_runs():
  with open(README) as stream:
    text = stream.read()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README has no python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["logits"].shape == (8, 10)
  assert set(namespace["metrics"]) >= {"loss", "error", "active_fraction", "l_b", "l_e", "l_v"}
