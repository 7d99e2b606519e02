"""Tests for ccjax.data: digits, TFDS (mocked), npz and its error catalogue, batching."""

import os
import re
import subprocess
import sys

import numpy as np
import numpy.testing as npt
import pytest

from ccjax import data


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_scaling():
  dataset = data.load_dataset("digits")
  assert dataset.name == "digits"
  assert dataset.num_classes == 10
  assert dataset.input_shape == (8, 8, 1)
  assert dataset.input_dim == 64
  total = 0
  for split in ("train", "valid", "test"):
    x, y = dataset.split(split)
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.shape[1:] == (8, 8, 1) and x.shape[0] == y.shape[0] > 0
    assert 0.0 <= x.min() and x.max() <= 1.0
    total += len(y)
  assert total == 1797
  assert len(dataset.y_test) == 359  # stratified 20%, rounded per class.
  assert dataset.x_train.max() == 1.0  # 16/16 occurs.
  npt.assert_array_equal(np.bincount(dataset.y_test, minlength=10) >= 35, True)


def test_digits_test_split_is_fixed_and_valid_split_follows_seed():
  first = data.load_dataset("digits", seed=0)
  again = data.load_dataset("digits", seed=0)
  other = data.load_dataset("digits", seed=1)
  npt.assert_array_equal(first.x_test, other.x_test)
  npt.assert_array_equal(first.y_test, other.y_test)
  npt.assert_array_equal(first.x_valid, again.x_valid)
  npt.assert_array_equal(first.x_train, again.x_train)
  assert first.x_valid.shape == other.x_valid.shape
  assert not np.array_equal(first.x_valid, other.x_valid)
  # Train and valid together are the same examples whatever the seed.
  pool = lambda d: np.sort(np.concatenate([d.x_train, d.x_valid]).reshape(-1, 64), axis=0)
  npt.assert_array_equal(pool(first), pool(other))


def test_digits_valid_fraction_zero_and_flattened():
  dataset = data.load_dataset("digits", valid_fraction=0.0)
  assert dataset.x_valid.shape == (0, 8, 8, 1) and dataset.y_valid.shape == (0,)
  assert len(dataset.y_train) == 1797 - 359
  flat = dataset.flattened()
  assert flat.x_train.shape == (len(dataset.y_train), 64)
  assert flat.x_valid.shape == (0, 64) and flat.input_dim == 64
  npt.assert_array_equal(flat.x_test[3], dataset.x_test[3].ravel())


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan"), "a", None])
def test_bad_valid_fraction(fraction):
  with pytest.raises(data.DataError, match=r"valid_fraction must be in \[0, 1\)"):
    data.load_dataset("digits", valid_fraction=fraction)


@pytest.mark.parametrize("spec", ["imagenet", "MNIST", "", "tfds:mnist"])
def test_unknown_dataset_lists_allowed(spec):
  with pytest.raises(data.DataError) as error:
    data.load_dataset(spec)
  message = str(error.value)
  assert "\n" not in message
  for name in ("digits", "mnist", "cifar10", "svhn_cropped", "npz:PATH"):
    assert name in message


def test_import_ccjax_does_not_import_tensorflow():
  code = ("import sys, ccjax, ccjax.data; "
          "print('tensorflow' in sys.modules, 'tensorflow_datasets' in sys.modules, "
          "'matplotlib' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.split() == ["False", "False", "False"]


# ----------------------------------------------------------------------------- TFDS


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3)),
                                        ("svhn_cropped", (32, 32, 3))])
def test_tfds_mocked(tmp_path, name, shape):
  tfds = pytest.importorskip("tensorflow_datasets")
  # Offline, mock_data's default policy (AUTO) finds no stored dataset_info.json for these
  # datasets and falls back to USE_CODE: random examples generated from the builder's
  # feature spec; info.splits is then empty, so no validation split is known and the
  # loader holds out valid_fraction of train.
  with tfds.testing.mock_data(num_examples=20):
    dataset = data.load_dataset(name, data_dir=str(tmp_path), valid_fraction=0.25, seed=3)
    again = data.load_dataset(name, data_dir=str(tmp_path), valid_fraction=0.25, seed=3)
  assert dataset.num_classes == 10 and dataset.input_shape == shape
  assert dataset.x_train.shape == (15, *shape) and dataset.x_valid.shape == (5, *shape)
  assert dataset.x_test.shape == (20, *shape)
  for split in ("train", "valid", "test"):
    x, y = dataset.split(split)
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert 0 <= y.min() and y.max() < 10
  assert dataset.x_train.max() > 0.5  # scaled from uint8, not left in [0, 255] nor ~0.
  npt.assert_array_equal(dataset.x_valid, again.x_valid)


def test_tfds_missing_data_says_how_to_prepare(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(data.DataError) as error:
    data.load_dataset("mnist", data_dir=str(empty))
  message = str(error.value)
  assert "\n" not in message
  assert "--data_dir" in message and str(empty) in message
  assert "download_and_prepare" in message and "--dataset=digits" in message


def test_tfds_not_installed(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError.
  with pytest.raises(data.DataError, match="needs tensorflow-datasets.*--dataset=digits"):
    data.load_dataset("cifar10")


# ----------------------------------------------------------------------------- npz


def _arrays(num_train=30, num_test=10, features=5, num_classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "x_train": rng.normal(size=(num_train, features)),
      "y_train": np.arange(num_train) % num_classes,
      "x_test": rng.normal(size=(num_test, features)),
      "y_test": np.arange(num_test) % num_classes,
  }


def _save(tmp_path, arrays, name="d.npz"):
  path = tmp_path / name
  np.savez(path, **arrays)
  return f"npz:{path}"


def test_npz_without_valid_holds_out(tmp_path):
  arrays = _arrays()
  dataset = data.load_dataset(_save(tmp_path, arrays), valid_fraction=0.2, seed=5)
  assert dataset.x_train.shape == (24, 5) and dataset.x_valid.shape == (6, 5)
  assert dataset.x_test.shape == (10, 5) and dataset.input_shape == (5,)
  assert dataset.num_classes == 3
  assert dataset.x_train.dtype == np.float32 and dataset.y_valid.dtype == np.int32
  npt.assert_allclose(dataset.x_test, arrays["x_test"].astype(np.float32))
  # Held-out rows keep their labels.
  both_x = np.concatenate([dataset.x_train, dataset.x_valid])
  both_y = np.concatenate([dataset.y_train, dataset.y_valid])
  for row, label in zip(both_x, both_y):
    match = np.flatnonzero(np.all(arrays["x_train"].astype(np.float32) == row, axis=1))
    assert len(match) == 1 and arrays["y_train"][match[0]] == label


def test_npz_with_valid_keeps_it_and_image_shape(tmp_path):
  rng = np.random.default_rng(1)
  arrays = {
      "x_train": rng.uniform(size=(12, 4, 4, 2)), "y_train": np.array([0, 1, 2, 3] * 3),
      "x_valid": rng.uniform(size=(3, 4, 4, 2)), "y_valid": np.array([4, 0, 1]),
      "x_test": rng.uniform(size=(5, 4, 4, 2)), "y_test": np.array([0, 1, 2, 3, 0.0]),
  }
  dataset = data.load_dataset(_save(tmp_path, arrays), valid_fraction=0.5)
  assert dataset.x_train.shape == (12, 4, 4, 2)  # nothing held out.
  npt.assert_allclose(dataset.x_valid, arrays["x_valid"].astype(np.float32))
  npt.assert_array_equal(dataset.y_test, [0, 1, 2, 3, 0])  # whole floats accepted.
  assert dataset.num_classes == 5  # max label over all splits + 1 (4 is only in valid).
  assert dataset.input_shape == (4, 4, 2) and dataset.input_dim == 32


def test_npz_num_classes_key(tmp_path):
  arrays = dict(_arrays(), num_classes=np.int64(7))
  assert data.load_dataset(_save(tmp_path, arrays)).num_classes == 7


def _bad(**changes):
  arrays = _arrays()
  for key, value in changes.items():
    if value is None:
      del arrays[key]
    else:
      arrays[key] = value
  return arrays


@pytest.mark.parametrize("arrays,pattern", [
    (_bad(y_test=None), r"missing keys y_test; required: x_train, y_train, x_test, y_test"),
    (_bad(x_train=None, y_train=None), r"missing keys x_train, y_train"),
    (_bad(x_valid=np.zeros((2, 5))), r"has x_valid but not y_valid"),
    (_bad(y_train=np.arange(29) % 3), r"x_train has 30 examples but y_train has 29"),
    (_bad(y_train=np.full(30, 0.5)), r"y_train has non-integer values"),
    (_bad(y_test=np.array(["a"] * 10)), r"y_test has dtype <U1; labels must be integers"),
    (_bad(y_test=np.full(10, -1)), r"y_test has negative label -1"),
    (_bad(y_train=np.eye(3)[np.arange(30) % 3]), r"y_train has shape \(30, 3\).*one-hot"),
    (_bad(num_classes=np.int64(2)), r"y_train has label 2 but num_classes=2"),
    (_bad(num_classes=np.float32(3.5)), r"num_classes must be a scalar integer in \[2, 100000\]"),
    (_bad(x_train=np.where(np.arange(150).reshape(30, 5) == 7, np.nan, 1.0)),
     r"x_train has 1 NaN/Inf values"),
    (_bad(x_test=np.full((10, 5), np.inf)), r"x_test has 50 NaN/Inf values"),
    (_bad(x_test=np.full((10, 5), 1e300)), r"x_test has 50 NaN/Inf values"),
    (_bad(x_test=np.zeros((10, 6))), r"x_test examples have shape \(6,\) but x_train"),
    (_bad(x_train=np.zeros(30)), r"x_train has shape \(30,\); features must be"),
    (_bad(x_train=np.array([["a"] * 5] * 30)), r"x_train has dtype <U1; features must be"),
    (_bad(x_test=np.zeros((0, 5)), y_test=np.zeros(0, int)), r"x_test/y_test are empty"),
    (_bad(y_train=np.zeros(30, int), y_test=np.zeros(10, int)), r"at least 2 classes"),
])
def test_npz_errors_are_one_line_and_name_the_field(tmp_path, arrays, pattern):
  spec = _save(tmp_path, arrays)
  with pytest.raises(data.DataError, match=pattern) as error:
    data.load_dataset(spec)
  assert "\n" not in str(error.value) and spec in str(error.value)


def test_npz_holdout_leaving_no_train(tmp_path):
  spec = _save(tmp_path, _arrays(num_train=1))
  with pytest.raises(data.DataError, match="leaves none to train on"):
    data.load_dataset(spec, valid_fraction=0.1)


def test_npz_file_problems(tmp_path):
  with pytest.raises(data.DataError, match="file not found"):
    data.load_dataset(f"npz:{tmp_path / 'absent.npz'}")
  with pytest.raises(data.DataError, match="needs a file path"):
    data.load_dataset("npz:")
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"PK\x03\x04 this is not a zip")
  with pytest.raises(data.DataError, match="cannot read"):
    data.load_dataset(f"npz:{garbage}")
  text = tmp_path / "text.npz"
  text.write_text("hello")
  with pytest.raises(data.DataError, match="cannot read"):
    data.load_dataset(f"npz:{text}")
  single = tmp_path / "single.npy"
  np.save(single, np.zeros(3))
  with pytest.raises(data.DataError, match="not an .npz archive"):
    data.load_dataset(f"npz:{single}")
  with pytest.raises(data.DataError, match="file not found"):
    data.load_dataset(f"npz:{tmp_path}")  # a directory.
  pickled = tmp_path / "pickled.npz"
  np.savez(pickled, **dict(_arrays(), y_test=np.array([object()] * 10)))
  with pytest.raises(data.DataError, match="cannot read the arrays"):
    data.load_dataset(f"npz:{pickled}")


# ----------------------------------------------------------------------------- batching


def test_steps_per_epoch():
  assert data.steps_per_epoch(10, 3) == 3
  assert data.steps_per_epoch(10, 10) == 1
  assert data.steps_per_epoch(np.int64(9), 3) == 3


@pytest.mark.parametrize("batch_size", [0, -1, 11, 2.0, True, None])
def test_bad_batch_size_names_range(batch_size):
  with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, 10\]"):
    data.train_batch_indices(10, batch_size, seed=0, step=0)
  with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, 10\]"):
    data.steps_per_epoch(10, batch_size)


def test_bad_seed_and_step():
  with pytest.raises(ValueError, match="seed must be an integer >= 0"):
    data.train_batch_indices(10, 2, seed=-1, step=0)
  with pytest.raises(ValueError, match="step must be an integer >= 0"):
    data.train_batch_indices(10, 2, seed=0, step=-3)


def test_batches_are_a_pure_function_of_seed_and_step():
  first = [data.train_batch_indices(103, 10, 7, step) for step in range(40)]
  # Recompute out of order (as a resumed run would) and after the cache has moved on.
  for step in [39, 0, 25, 10, 11, 9]:
    npt.assert_array_equal(data.train_batch_indices(103, 10, 7, step), first[step])
  assert first[0].shape == (10,) and first[0].dtype == np.int64
  other_seed = [data.train_batch_indices(103, 10, 8, step) for step in range(10)]
  assert not np.array_equal(np.concatenate(first[:10]), np.concatenate(other_seed))
  # Epochs differ from each other.
  assert not np.array_equal(np.concatenate(first[:10]), np.concatenate(first[10:20]))
  # The returned array is the caller's to modify.
  first[0][:] = -1
  assert data.train_batch_indices(103, 10, 7, 0).min() >= 0


def test_each_example_once_per_epoch_with_remainder_dropped():
  num_examples, batch_size = 23, 5
  per_epoch = data.steps_per_epoch(num_examples, batch_size)
  assert per_epoch == 4
  for epoch in range(3):
    seen = np.concatenate([data.train_batch_indices(num_examples, batch_size, 1, step)
                           for step in range(epoch * per_epoch, (epoch + 1) * per_epoch)])
    assert len(seen) == 20 and len(np.unique(seen)) == 20
    assert seen.min() >= 0 and seen.max() < num_examples


def test_train_batch_gathers_rows():
  x = np.arange(40, dtype=np.float32).reshape(20, 2)
  y = np.arange(20, dtype=np.int32)
  batch = data.train_batch(x, y, 4, seed=2, step=6)
  indices = data.train_batch_indices(20, 4, 2, 6)
  npt.assert_array_equal(batch["x"], x[indices])
  npt.assert_array_equal(batch["y"], y[indices])
  with pytest.raises(ValueError, match="same number of examples"):
    data.train_batch(x, y[:3], 2, 0, 0)


def test_eval_batches_pad_with_zero_weight():
  x = np.arange(7 * 3, dtype=np.float32).reshape(7, 3) + 1
  y = np.arange(7, dtype=np.int32) + 1
  batches = list(data.eval_batches(x, y, 3))
  assert len(batches) == 3
  for batch in batches:
    assert batch["x"].shape == (3, 3) and batch["y"].shape == (3,)
    assert batch["weight"].shape == (3,) and batch["weight"].dtype == np.float32
    assert batch["x"].dtype == np.float32 and batch["y"].dtype == np.int32
  npt.assert_array_equal(batches[2]["weight"], [1, 0, 0])
  npt.assert_array_equal(batches[2]["x"][1:], 0)
  npt.assert_array_equal(batches[2]["y"], [7, 0, 0])
  kept = np.concatenate([b["x"][b["weight"] > 0] for b in batches])
  npt.assert_array_equal(kept, x)
  assert sum(b["weight"].sum() for b in batches) == 7
  (single,) = data.eval_batches(x[:2], y[:2], 5)
  npt.assert_array_equal(single["weight"], [1, 1, 0, 0, 0])
  assert list(data.eval_batches(x[:0], y[:0], 4)) == []
  with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
    list(data.eval_batches(x, y, 0))
  with pytest.raises(ValueError, match="same number of examples"):
    list(data.eval_batches(x, y[:2], 2))


def test_eval_batches_keep_image_shape():
  x = np.ones((5, 4, 4, 1), np.float32)
  batches = list(data.eval_batches(x, np.zeros(5, np.int32), 4))
  assert [b["x"].shape for b in batches] == [(4, 4, 4, 1)] * 2
  npt.assert_array_equal(batches[1]["x"][1:], 0)


def test_mnist1d_is_generated_offline_and_fingerprinted(monkeypatch):
  pytest.importorskip("mnist1d")
  import socket  # pylint: disable=g-import-not-at-top

  def no_network(*args, **kwargs):
    raise AssertionError("mnist1d tried to use the network")

  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  data.mnist1d_arrays.cache_clear()
  state = np.random.get_state()
  dataset = data.load_dataset("mnist1d", valid_fraction=0.1, seed=0)
  assert dataset.x_train.shape == (7200, 40) and dataset.x_valid.shape == (800, 40)
  assert dataset.x_test.shape == (2000, 40) and dataset.num_classes == 10
  assert np.array_equal(np.random.get_state()[1], state[1])  # numpy's global RNG restored
  assert data.mnist1d_fingerprint() == (
      "0b3f3b9432060ad6628e1a5f661004cfa12919dea8e5ca2965e6b0fe62b8ecee")


def test_mnist1d_num_samples_has_its_own_size_and_fingerprint(monkeypatch):
  pytest.importorskip("mnist1d")
  import socket  # pylint: disable=g-import-not-at-top

  def no_network(*args, **kwargs):
    raise AssertionError("mnist1d tried to use the network")

  monkeypatch.setattr(socket, "create_connection", no_network)
  monkeypatch.setattr(socket.socket, "connect", no_network)
  dataset = data.load_dataset("mnist1d:2000", valid_fraction=0.1, seed=1)
  assert dataset.name == "mnist1d:2000" and dataset.num_classes == 10
  assert dataset.x_train.shape == (1440, 40) and dataset.x_valid.shape == (160, 40)
  assert dataset.x_test.shape == (400, 40)  # the generator's 80 % / 20 %
  npt.assert_array_equal(np.bincount(np.concatenate([dataset.y_train, dataset.y_valid,
                                                     dataset.y_test])), [200] * 10)
  assert data.mnist1d_fingerprint(2000) == data.MNIST1D_SHA256[2000]
  assert data.MNIST1D_SHA256[2000] != data.MNIST1D_SHA256[10_000]
  # Generated once per size and process; a fresh generation gives the same arrays.
  cached = data.mnist1d_arrays(2000)
  assert data.mnist1d_arrays(2000) is cached
  data.mnist1d_arrays.cache_clear()
  for fresh, kept in zip(data.mnist1d_arrays(2000), cached):
    npt.assert_array_equal(fresh, kept)
  assert data.mnist1d_num_samples("mnist1d") == 10_000
  assert data.mnist1d_num_samples("mnist1d:50000") == 50_000


@pytest.mark.parametrize("spec", ["mnist1d:", "mnist1d:7", "mnist1d:90", "mnist1d:2005",
                                  "mnist1d:1000010", "mnist1d:1e4", "mnist1d:-100",
                                  "mnist1d: 100", "mnist1d:²⁰⁰"])
def test_mnist1d_bad_num_samples_is_one_line(spec):
  from ccjax import config  # pylint: disable=g-import-not-at-top
  with pytest.raises(data.DataError, match=r"a multiple of 10 in \[100, 1000000\]") as error:
    data.load_dataset(spec)
  assert "\n" not in str(error.value) and spec in str(error.value)
  with pytest.raises(ValueError, match="^" + re.escape(f"--dataset={spec}: N of mnist1d:N")):
    config.ExperimentConfig(dataset=spec)
