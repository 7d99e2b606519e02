"""Tests of ccjax.datasets: the data-source registry (name -> loader, specs parsed once)."""

import numpy as np
import pytest

from ccjax import data
from ccjax import datasets
from ccjax import text


def test_classification_and_text_sources_are_listed_in_order():
  assert datasets.usages(datasets.CLASSIFICATION) == (
      "digits", "mnist1d", "mnist1d:N", "mnist", "cifar10", "svhn_cropped", "npz:PATH")
  assert data.DATASETS == datasets.usages(datasets.CLASSIFICATION)
  assert text.LM_DATASETS == datasets.usages(datasets.TEXT) == ("grammar", "bible",
                                                                 "text:PATH")


@pytest.mark.parametrize("spec, kind", [
    ("imagenet", datasets.CLASSIFICATION), ("npz", datasets.CLASSIFICATION),
    ("digits:3", datasets.CLASSIFICATION), ("grammar", datasets.CLASSIFICATION),
    ("digits", datasets.TEXT), ("", datasets.TEXT), (None, datasets.CLASSIFICATION),
])
def test_unknown_specs_raise_one_line_listing_every_usage(spec, kind):
  with pytest.raises(datasets.DataError) as error:
    datasets.parse(spec, kind)
  message = str(error.value)
  assert "\n" not in message and message.startswith("dataset must be one of ")
  assert "|".join(datasets.usages(kind)) in message
  if kind == datasets.CLASSIFICATION:
    assert "mnist1d" in message


def test_arguments_are_parsed_once_by_the_source(tmp_path):
  parsed = datasets.parse("mnist1d:50000", datasets.CLASSIFICATION)
  assert parsed.source.name == "mnist1d" and parsed.argument == 50000
  assert datasets.parse("mnist1d", datasets.CLASSIFICATION).argument == 10_000
  with pytest.raises(datasets.DataError, match="multiple of 10"):
    datasets.parse("mnist1d:7", datasets.CLASSIFICATION)
  assert datasets.parse("npz:/x/y.npz", datasets.CLASSIFICATION).argument == "/x/y.npz"
  with pytest.raises(datasets.DataError, match="needs a file path after 'npz:'"):
    datasets.parse("npz:", datasets.CLASSIFICATION)
  corpus = tmp_path / "corpus.txt"
  corpus.write_bytes(b"abc")
  assert datasets.parse(f"text:{corpus}", datasets.TEXT).argument == str(corpus)
  with pytest.raises(datasets.DataError, match="needs a path"):
    datasets.parse("text:", datasets.TEXT)


def test_a_new_source_is_one_function_and_its_register_line(monkeypatch):
  monkeypatch.setattr(datasets, "_REGISTRY", dict(datasets._REGISTRY))

  @datasets.register("constant", datasets.CLASSIFICATION)
  def _load_constant(spec, options):
    del spec
    x = np.zeros((20, 3), np.float32)
    y = np.arange(20, dtype=np.int32) % 2
    return data._finish("constant", x, y, None, None, x, y, 2, options.valid_fraction,
                        options.seed)

  assert "constant" in datasets.usages(datasets.CLASSIFICATION)
  dataset = data.load_dataset("constant", valid_fraction=0.25)
  assert dataset.name == "constant" and len(dataset.y_valid) == 5
  with pytest.raises(ValueError, match="registered twice"):
    datasets.register("constant", datasets.CLASSIFICATION)(lambda spec, options: None)


def test_mnist1d_install_hint_names_the_extra(monkeypatch):
  import sys
  data.mnist1d_arrays.cache_clear()
  monkeypatch.setitem(sys.modules, "mnist1d", None)
  try:
    with pytest.raises(datasets.DataError,
                       match=r'python -m pip install -e "\.\[mnist1d\]" from a clone'):
      data.load_dataset("mnist1d:100")
  finally:
    data.mnist1d_arrays.cache_clear()
