"""Datasets as in-memory numpy arrays, and pure, resumable batch orders.

Axis letters: ``n`` examples of a split, ``batch`` examples of a batch, ``H, W, C``
image height, width and channels.

:func:`load_dataset` reads one of

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (no download). The test
  split is a fixed stratified 20% (independent of ``seed``); validation is drawn from the
  rest with ``seed``.
* ``mnist`` | ``cifar10`` | ``svhn_cropped``: tensorflow-datasets, already prepared in
  ``data_dir`` (never downloaded here; TFDS is imported only inside the loader).
* ``mnist1d`` | ``mnist1d:N``: MNIST-1D (Greydanus 2020), 40-sample 1-D signals of 10
  classes, generated offline from the templates in the ``mnist1d`` package
  (``make_dataset``; its ``get_dataset`` would download and is never called) with
  :data:`MNIST1D_ARGS` and ``N`` examples (``mnist1d``: 10,000), 80 % train / 20 % test as
  the generator splits them (``mnist1d:50000``: 40,000 / 10,000); validation is drawn
  from train with ``seed``. Each size has its own fingerprint (:data:`MNIST1D_SHA256`);
  the arrays of a size are generated once per process. ``mnist1d`` is an optional
  dependency (``python -m pip install -e ".[mnist1d]"`` from a clone), imported only here.
* ``npz:PATH``: a user's archive with ``x_train, y_train, x_test, y_test`` and optional
  ``x_valid, y_valid`` (and optional scalar ``num_classes``).

Each is a loader registered in the data-source registry (:mod:`ccjax.datasets`), which
parses a spec once; :data:`DATASETS` lists them.

Every problem with the user's data raises :class:`DataError`, a ``ValueError`` whose
message is one line naming the dataset/field and what is allowed.

Batching is a pure function of ``(seed, step)``: :func:`train_batch_indices` gives the
examples of any step without iterator state, so a resumed run sees exactly the batches an
uninterrupted one would. :func:`eval_batches` pads the last batch to a fixed size (with
weight 0) so one jitted eval function serves every batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import zipfile
from typing import Iterator

import numpy as np

from ccjax import datasets

TFDS_DATASETS = ("mnist", "cifar10", "svhn_cropped")
# mnist1d.data.make_dataset arguments (the package defaults, with 10,000 examples;
# mnist1d:N replaces num_samples).
MNIST1D_ARGS = {"num_samples": 10000, "train_split": 0.8, "template_len": 12,
                "padding": [36, 60], "scale_coeff": 0.4, "max_translation": 48,
                "corr_noise_scale": 0.25, "iid_noise_scale": 2e-2, "shear_scale": 0.75,
                "shuffle_seq": False, "final_seq_length": 40, "seed": 42}
MNIST1D_PACKAGE_VERSION = "0.0.2.post1"
MNIST1D_PREFIX = "mnist1d:"
# N of mnist1d:N: the generator makes N // 10 examples per class, so N is a multiple of 10.
MNIST1D_MIN_SAMPLES = 100
MNIST1D_MAX_SAMPLES = 1_000_000
MNIST1D_SAMPLES_RULE = (f"N of mnist1d:N is the number of examples (80 % train, 20 % test), "
                        f"a multiple of 10 in [{MNIST1D_MIN_SAMPLES}, {MNIST1D_MAX_SAMPLES}], "
                        f"e.g. mnist1d:50000")
# mnist1d_fingerprint(N): sha256 of the generated float32 x_train, int32 y_train, x_test,
# y_test with mnist1d 0.0.2.post1 (numpy's legacy seeded generator), per number of examples.
MNIST1D_SHA256 = {
    2_000: "068c39be17cfb068273535977ff2710f59a79214c5f2b404bcf3fdaba4306f09",
    10_000: "0b3f3b9432060ad6628e1a5f661004cfa12919dea8e5ca2965e6b0fe62b8ecee",
    50_000: "4a6b1ced05fce5db625d4e99dc2536fac4e86bd34d58b6ab5c22aec27d9540c6",
}
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
_SPLITS = ("train", "valid", "test")
_TFDS_CHUNK = 4096
# Class ids inferred as max label + 1 must look like class ids: at most this many times the
# number of distinct labels, and at most MAX_NUM_CLASSES (which also caps --num_classes).
CLASS_ID_FACTOR = 4
MAX_NUM_CLASSES = 100_000


DataError = datasets.DataError


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Train/valid/test splits in memory.

  Attributes:
    name: the spec it was loaded from (``digits``, ``mnist``, ``npz:PATH``...).
    x_train, x_valid, x_test: float32 ``[n, H, W, C]`` for image datasets, ``[n, features]``
      for flat ``npz`` data (the stored shape is kept). ``x_valid`` has ``n == 0`` when
      ``valid_fraction == 0`` and the source has no validation split.
    y_train, y_valid, y_test: int32 ``[n]`` class labels in ``[0, num_classes)``.
    num_classes: number of classes.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_valid: np.ndarray
  y_valid: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one example, e.g. ``(8, 8, 1)`` or ``(features,)``."""
    return tuple(int(d) for d in self.x_train.shape[1:])

  @property
  def input_dim(self) -> int:
    """Number of features of one flattened example."""
    return int(math.prod(self.input_shape))

  def flattened(self) -> "Dataset":
    """The same data with every ``x`` reshaped to ``[n, input_dim]`` (for MLPs)."""
    flat = lambda x: x.reshape(x.shape[0], self.input_dim)
    return dataclasses.replace(self, x_train=flat(self.x_train), x_valid=flat(self.x_valid),
                               x_test=flat(self.x_test))

  def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of split ``name`` in ``train | valid | test``."""
    if name not in _SPLITS:
      raise ValueError(f"split must be one of {', '.join(_SPLITS)}; got {name!r}")
    return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


# ----------------------------------------------------------------------------- loading


def load_dataset(spec: str, *, data_dir: str | None = None, valid_fraction: float = 0.1,
                 seed: int = 0, num_classes: int | None = None) -> Dataset:
  """Loads a dataset by name into memory.

  Args:
    spec: ``digits`` | ``mnist1d`` | ``mnist1d:N`` | ``mnist`` | ``cifar10`` |
      ``svhn_cropped`` | ``npz:PATH``.
    data_dir: TFDS data directory (``None``: TFDS's default, ``~/tensorflow_datasets``).
      Ignored by ``digits`` and ``npz``.
    valid_fraction: fraction of the training split held out for validation when the
      source has no validation split, in ``[0, 1)``.
    seed: seed of the validation hold-out (the ``digits`` test split does not depend on it).
    num_classes: the number of output classes (``None``: the source's; for npz, max
      label + 1 when the labels look like class ids, see :data:`CLASS_ID_FACTOR`).

  Returns:
    a :class:`Dataset`.

  Raises:
    DataError: unknown name, bad ``N`` of ``mnist1d:N``, missing TFDS or TFDS data,
      unreadable or invalid npz data, bad ``valid_fraction``.
  """
  parsed = datasets.parse(spec, datasets.CLASSIFICATION)
  options = datasets.LoadOptions(data_dir, _check_valid_fraction(valid_fraction), seed,
                                 num_classes)
  dataset = parsed.source.loader(parsed, options)
  if num_classes is None or dataset.num_classes == num_classes:
    return dataset
  labels = {split: dataset.split(split)[1] for split in _SPLITS}
  return dataclasses.replace(dataset, num_classes=_declared_num_classes(spec, labels,
                                                                        num_classes))


def fingerprint(dataset: Dataset) -> dict:
  """What identifies the data a run was trained on: shapes, dtypes and a SHA-256.

  Returns:
    ``{"sha256": hex digest over every split's arrays (shape, dtype and bytes),
    "shapes": {array name: shape}, "dtypes": {array name: dtype}}``.
  """
  digest = hashlib.sha256()
  shapes, dtypes = {}, {}
  for split in _SPLITS:
    for name, array in zip((f"x_{split}", f"y_{split}"), dataset.split(split)):
      array = np.ascontiguousarray(array)
      shapes[name], dtypes[name] = list(array.shape), str(array.dtype)
      digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
      digest.update(array.data)
  return {"sha256": digest.hexdigest(), "shapes": shapes, "dtypes": dtypes}


def _check_valid_fraction(valid_fraction) -> float:
  try:
    value = float(valid_fraction)
  except (TypeError, ValueError):
    value = float("nan")
  if not 0.0 <= value < 1.0:
    raise DataError(f"valid_fraction must be in [0, 1); got {valid_fraction!r}")
  return value


def _holdout(x: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator,
             name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Splits ``fraction`` of ``(x, y)`` off at random; returns ``x_kept, y_kept, x_out, y_out``.

  At least one example is held out when ``fraction > 0``; original order is kept within
  each part.
  """
  num_examples = len(y)
  num_out = int(round(fraction * num_examples))
  if fraction > 0:
    num_out = max(num_out, 1)
  if num_out >= num_examples:
    raise DataError(
        f"dataset {name}: holding out valid_fraction={fraction} of {num_examples} training "
        f"examples leaves none to train on; use a smaller valid_fraction or provide "
        f"x_valid/y_valid")
  out = np.zeros(num_examples, bool)
  out[rng.permutation(num_examples)[:num_out]] = True
  return x[~out], y[~out], x[out], y[out]


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Boolean ``[n]`` mask choosing ``round(fraction * n_c)`` examples of every class ``c``."""
  rng = np.random.default_rng(seed)
  chosen = np.zeros(len(labels), bool)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = int(round(fraction * len(members)))
    chosen[rng.permutation(members)[:count]] = True
  return chosen


def _finish(name: str, x_train, y_train, x_valid, y_valid, x_test, y_test, num_classes: int,
            valid_fraction: float, seed: int) -> Dataset:
  """Holds out validation data if none is given and packs the arrays."""
  if x_valid is None:
    rng = np.random.default_rng([int(seed), 1])  # stream 1: the validation hold-out.
    x_train, y_train, x_valid, y_valid = _holdout(x_train, y_train, valid_fraction, rng, name)
  return Dataset(
      name=name,
      x_train=np.ascontiguousarray(x_train, np.float32),
      y_train=np.ascontiguousarray(y_train, np.int32),
      x_valid=np.ascontiguousarray(x_valid, np.float32),
      y_valid=np.ascontiguousarray(y_valid, np.int32),
      x_test=np.ascontiguousarray(x_test, np.float32),
      y_test=np.ascontiguousarray(y_test, np.int32),
      num_classes=int(num_classes))


def _check_seed(seed) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
  return int(seed)


@datasets.register("digits", datasets.CLASSIFICATION)
def _load_digits(spec: datasets.DataSpec, options: datasets.LoadOptions) -> Dataset:
  del spec  # one dataset
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  seed = _check_seed(options.seed)
  digits = sk_datasets.load_digits()
  images = (np.asarray(digits.images, np.float32) / 16.0)[..., None]  # [n, 8, 8, 1]
  labels = np.asarray(digits.target, np.int32)
  test = _stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
  return _finish("digits", images[~test], labels[~test], None, None, images[test],
                 labels[test], 10, options.valid_fraction, seed)


def mnist1d_num_samples(spec: str) -> int:
  """The number of examples ``N`` of ``mnist1d`` (10,000) or ``mnist1d:N``.

  Raises:
    DataError: ``spec`` is neither, or ``N`` breaks :data:`MNIST1D_SAMPLES_RULE`.
  """
  if spec == "mnist1d":
    return MNIST1D_ARGS["num_samples"]
  if not spec.startswith(MNIST1D_PREFIX):
    raise DataError(f"dataset {spec!r} is not mnist1d or mnist1d:N")
  digits = spec[len(MNIST1D_PREFIX):]
  # isascii: str.isdigit also accepts other scripts' digits and superscripts.
  if not (digits.isascii() and digits.isdigit()) or not (
      MNIST1D_MIN_SAMPLES <= int(digits) <= MNIST1D_MAX_SAMPLES and int(digits) % 10 == 0):
    raise DataError(f"dataset {spec}: {MNIST1D_SAMPLES_RULE}; got {digits!r}")
  return int(digits)


@functools.lru_cache(maxsize=4)
def mnist1d_arrays(num_samples: int = MNIST1D_ARGS["num_samples"]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """``(x_train [0.8 N, 40], y_train, x_test [0.2 N, 40], y_test)`` of MNIST-1D, generated
  offline with ``N = num_samples`` examples.

  Calls ``mnist1d.data.make_dataset`` (no network access: it transforms the templates
  bundled in the package's code) with :data:`MNIST1D_ARGS` and ``num_samples``; the
  package seeds numpy's global generator, whose state is restored afterwards. Cached per
  ``num_samples`` in the process (50,000 examples take tens of seconds to generate).

  Raises:
    DataError: the optional ``mnist1d`` package is not installed.
  """
  try:
    from mnist1d import data as mnist1d_data  # pylint: disable=g-import-not-at-top
    from mnist1d import utils as mnist1d_utils  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError("dataset mnist1d needs the mnist1d package: python -m pip install -e "
                    "\".[mnist1d]\" from a clone (or pip install "
                    f"'mnist1d=={MNIST1D_PACKAGE_VERSION}')") from None
  state = np.random.get_state()
  try:
    generated = mnist1d_data.make_dataset(
        mnist1d_utils.ObjectView(dict(MNIST1D_ARGS, num_samples=int(num_samples))))
  finally:
    np.random.set_state(state)
  return (np.asarray(generated["x"], np.float32), np.asarray(generated["y"], np.int32),
          np.asarray(generated["x_test"], np.float32), np.asarray(generated["y_test"], np.int32))


def mnist1d_fingerprint(num_samples: int = MNIST1D_ARGS["num_samples"]) -> str:
  """sha256 (hex) of the generated MNIST-1D arrays of ``num_samples`` examples, to check a
  reproduction against :data:`MNIST1D_SHA256`."""
  digest = hashlib.sha256()
  for array in mnist1d_arrays(int(num_samples)):
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


@datasets.register("mnist1d", datasets.CLASSIFICATION, argument="N", argument_optional=True,
                   parse_argument=mnist1d_num_samples)
def _load_mnist1d(spec: datasets.DataSpec, options: datasets.LoadOptions) -> Dataset:
  seed = _check_seed(options.seed)
  x_train, y_train, x_test, y_test = mnist1d_arrays(spec.argument)
  return _finish(spec.spec, x_train, y_train, None, None, x_test, y_test, 10,
                 options.valid_fraction, seed)


# ----------------------------------------------------------------------------- TFDS


def _prepare_hint(name: str, data_dir: str | None) -> str:
  where = repr(data_dir) if data_dir else "None"
  return (f"prepare it on a machine with internet: python -c \"import tensorflow_datasets as "
          f"tfds; tfds.builder('{name}', data_dir={where}).download_and_prepare()\" and copy "
          f"the directory to --data_dir, or use --dataset=digits")


def _load_tfds(spec: datasets.DataSpec, options: datasets.LoadOptions) -> Dataset:
  name, data_dir = spec.spec, options.data_dir
  seed = _check_seed(options.seed)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise DataError(
        f"dataset {name} needs tensorflow-datasets ({error}); install it with "
        f"'pip install tensorflow-datasets tensorflow-cpu', or use --dataset=digits") from None
  location = f"--data_dir={data_dir}" if data_dir else "--data_dir (default ~/tensorflow_datasets)"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    has_valid = "validation" in builder.info.splits
    num_classes = int(builder.info.features["label"].num_classes)
    train = _tfds_split_arrays(tfds, builder, "train")
    valid = _tfds_split_arrays(tfds, builder, "validation") if has_valid else None
    test = _tfds_split_arrays(tfds, builder, "test")
  except (AssertionError, OSError) as error:
    detail = (str(error).split(". ")[0].splitlines() or [type(error).__name__])[0]
    raise DataError(f"dataset {name}: TFDS data not found or unreadable in {location} "
                    f"({detail}); {_prepare_hint(name, data_dir)}") from None
  x_valid, y_valid = valid if valid is not None else (None, None)
  for split, (_, labels) in (("train", train), ("test", test)):
    if len(labels) == 0:
      raise DataError(f"dataset {name}: the {split} split in {location} is empty; "
                      f"{_prepare_hint(name, data_dir)}")
  return _finish(name, *train, x_valid, y_valid, *test, num_classes, options.valid_fraction,
                 seed)


for _name in TFDS_DATASETS:
  datasets.register(_name, datasets.CLASSIFICATION)(_load_tfds)
del _name


def _tfds_split_arrays(tfds, builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """``x [n, H, W, C]`` float32 in [0, 1] and ``y [n]`` int32 of one TFDS split.

  Reads in chunks rather than with ``batch_size=-1`` (which aborts the process under
  ``tfds.testing.mock_data`` when the split sizes are unknown).
  """
  dataset = builder.as_dataset(split=split, shuffle_files=False).batch(_TFDS_CHUNK)
  images, labels = [], []
  for chunk in tfds.as_numpy(dataset):
    images.append(np.asarray(chunk["image"]))
    labels.append(np.asarray(chunk["label"]))
  if not images:
    shape = tuple(builder.info.features["image"].shape)
    return np.zeros((0, *shape), np.float32), np.zeros((0,), np.int32)
  pixels = np.concatenate(images)
  x = pixels.astype(np.float32)
  if np.issubdtype(pixels.dtype, np.integer):
    x /= 255.0
  return x, np.concatenate(labels).astype(np.int32)


# ----------------------------------------------------------------------------- npz


def _npz_path(spec: str) -> str:
  """The PATH of ``npz:PATH`` (non-empty)."""
  path = spec.partition(":")[2]
  if not path:
    raise DataError("dataset npz:PATH needs a file path after 'npz:', e.g. npz:/data/mine.npz")
  return path


@datasets.register("npz", datasets.CLASSIFICATION, argument="PATH", parse_argument=_npz_path)
def _load_npz(parsed: datasets.DataSpec, options: datasets.LoadOptions) -> Dataset:
  seed = _check_seed(options.seed)
  spec, path = parsed.spec, parsed.argument
  if not os.path.isfile(path):
    raise DataError(f"dataset {spec}: file not found: {path}")
  try:
    archive = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise DataError(f"dataset {spec}: cannot read {path} as .npz ({detail})") from None
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise DataError(f"dataset {spec}: {path} is a single array, not an .npz archive; save "
                    f"it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
  try:
    with archive:
      arrays = {key: archive[key] for key in archive.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise DataError(f"dataset {spec}: cannot read the arrays of {path} ({detail})") from None
  return _npz_dataset(spec, arrays, options.valid_fraction, seed, options.num_classes)


# Every way to write a classification dataset: digits, mnist1d, mnist1d:N, mnist, ...
DATASETS = datasets.usages(datasets.CLASSIFICATION)


def _npz_dataset(name: str, arrays: dict[str, np.ndarray], valid_fraction: float,
                 seed: int, num_classes: int | None = None) -> Dataset:
  """Validates the arrays of an npz archive and builds the :class:`Dataset`."""
  required = ("x_train", "y_train", "x_test", "y_test")
  missing = [key for key in required if key not in arrays]
  if missing:
    raise DataError(f"dataset {name}: missing keys {', '.join(missing)}; required: "
                    f"{', '.join(required)} (optional: x_valid, y_valid, num_classes); "
                    f"found: {', '.join(sorted(arrays)) or 'none'}")
  has_valid = ("x_valid" in arrays, "y_valid" in arrays)
  if has_valid[0] != has_valid[1]:
    present, absent = ("x_valid", "y_valid") if has_valid[0] else ("y_valid", "x_valid")
    raise DataError(f"dataset {name}: has {present} but not {absent}; give both or neither")
  splits = ["train", "valid", "test"] if has_valid[0] else ["train", "test"]

  features = {split: _check_features(name, f"x_{split}", arrays[f"x_{split}"])
              for split in splits}
  labels = {split: _check_labels(name, f"y_{split}", arrays[f"y_{split}"]) for split in splits}
  for split in splits:
    if len(features[split]) != len(labels[split]):
      raise DataError(f"dataset {name}: x_{split} has {len(features[split])} examples but "
                      f"y_{split} has {len(labels[split])}; they must match")
    if len(labels[split]) == 0:
      raise DataError(f"dataset {name}: x_{split}/y_{split} are empty; every split needs "
                      f"at least one example")
  shape = features["train"].shape[1:]
  for split in splits[1:]:
    if features[split].shape[1:] != shape:
      raise DataError(f"dataset {name}: x_{split} examples have shape "
                      f"{features[split].shape[1:]} but x_train examples have {shape}; "
                      f"all splits must match")

  if num_classes is None and "num_classes" in arrays:
    num_classes = _check_num_classes(name, arrays["num_classes"])
  if num_classes is None:
    num_classes = _inferred_num_classes(name, labels)
  else:
    num_classes = _declared_num_classes(name, labels, num_classes)
  x_valid, y_valid = (features["valid"], labels["valid"]) if has_valid[0] else (None, None)
  return _finish(name, features["train"], labels["train"], x_valid, y_valid, features["test"],
                 labels["test"], num_classes, valid_fraction, seed)


def _check_features(name: str, key: str, x: np.ndarray) -> np.ndarray:
  """float32 ``[n, ...]`` features, finite; raises :class:`DataError` naming ``key``."""
  x = np.asarray(x)
  if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
    raise DataError(f"dataset {name}: {key} has dtype {x.dtype}; features must be numeric")
  if np.iscomplexobj(x):
    raise DataError(f"dataset {name}: {key} is complex; features must be real numbers")
  if x.ndim < 2:
    raise DataError(f"dataset {name}: {key} has shape {x.shape}; features must be "
                    f"[n, features] or [n, H, W, C]")
  if 0 in x.shape[1:]:
    raise DataError(f"dataset {name}: {key} has shape {x.shape}: examples with no features; "
                    f"every example needs at least one feature")
  with np.errstate(over="ignore"):
    x = x.astype(np.float32)
  if not np.all(np.isfinite(x)):
    bad = int(np.sum(~np.isfinite(x)))
    raise DataError(f"dataset {name}: {key} has {bad} NaN/Inf values (after conversion to "
                    f"float32); features must be finite")
  return x


def _check_labels(name: str, key: str, y: np.ndarray) -> np.ndarray:
  """int32 ``[n]`` labels >= 0; raises :class:`DataError` naming ``key``."""
  y = np.asarray(y)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    hint = " (one-hot? store the argmax)" if y.ndim == 2 else ""
    raise DataError(f"dataset {name}: {key} has shape {y.shape}; labels must be integer class "
                    f"ids of shape [n]{hint}")
  if np.issubdtype(y.dtype, np.floating):
    whole = np.isfinite(y) & (y == np.round(y))
    if not np.all(whole):
      raise DataError(f"dataset {name}: {key} has non-integer values (e.g. "
                      f"{y[~whole][0].item()!r}); labels must be integers >= 0")
  elif not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
    raise DataError(f"dataset {name}: {key} has dtype {y.dtype}; labels must be integers >= 0")
  if y.size and y.min() < 0:
    raise DataError(f"dataset {name}: {key} has negative label {y.min().item()!r}; labels must be "
                    f"integers >= 0")
  if y.size and y.max() > np.iinfo(np.int32).max - 1:
    raise DataError(f"dataset {name}: {key} has label {y.max().item()!r}; labels must be < 2**31 - 1")
  return y.astype(np.int32)


def _check_num_classes(name: str, value: np.ndarray) -> int:
  value = np.asarray(value)
  if (value.shape != () or not np.issubdtype(value.dtype, np.integer)
      or value.dtype == np.bool_ or not 2 <= value <= MAX_NUM_CLASSES):
    raise DataError(f"dataset {name}: num_classes must be a scalar integer in "
                    f"[2, {MAX_NUM_CLASSES}]; got {value.tolist()!r}")
  return int(value)


def _largest_label(labels: dict[str, np.ndarray]) -> tuple[str, int]:
  """``(split, label)`` of the largest label over the splits."""
  return max(((split, int(y.max())) for split, y in labels.items() if y.size),
             key=lambda item: item[1])


def _declared_num_classes(name: str, labels: dict[str, np.ndarray], num_classes: int) -> int:
  """``num_classes`` given by the user, if every label is below it."""
  split, label = _largest_label(labels)
  if label >= num_classes:
    raise DataError(f"dataset {name}: y_{split} has label {label} but num_classes="
                    f"{num_classes}; labels must be in [0, {num_classes})")
  return num_classes


def _inferred_num_classes(name: str, labels: dict[str, np.ndarray]) -> int:
  """max label + 1, when the labels look like class ids (see :data:`CLASS_ID_FACTOR`)."""
  split, label = _largest_label(labels)
  if label == 0:
    raise DataError(f"dataset {name}: labels take only the value 0; classification needs "
                    f"at least 2 classes (labels in [0, num_classes))")
  distinct = np.unique(np.concatenate([y for y in labels.values()])).size
  limit = min(CLASS_ID_FACTOR * distinct, MAX_NUM_CLASSES)
  if label + 1 > limit:
    raise DataError(f"dataset {name}: y_{split} has label {label} but only {distinct} distinct "
                    f"labels; max label + 1 must be <= {limit} ({CLASS_ID_FACTOR} x distinct "
                    f"labels, at most {MAX_NUM_CLASSES}) to be taken as the number of classes; "
                    f"renumber the labels 0..K-1 or pass --num_classes")
  return label + 1


# ----------------------------------------------------------------------------- batching


def _check_batch_size(num_examples, batch_size) -> tuple[int, int]:
  if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or (
      num_examples < 1):
    raise ValueError(f"num_examples must be an integer >= 1; got {num_examples!r}")
  if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
      or not 1 <= batch_size <= num_examples):
    raise ValueError(f"batch_size must be an integer in [1, {int(num_examples)}] (the number "
                     f"of training examples); got {batch_size!r}")
  return int(num_examples), int(batch_size)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped): ``num_examples // batch_size``."""
  num_examples, batch_size = _check_batch_size(num_examples, batch_size)
  return num_examples // batch_size


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  order.setflags(write=False)
  return order


def train_batch_indices(num_examples: int, batch_size: int, seed: int, step: int
                        ) -> np.ndarray:
  """Indices ``[batch_size]`` of the training examples of step ``step``.

  A pure function of its arguments: epoch ``step // steps_per_epoch`` visits a permutation
  of the examples seeded by ``(seed, epoch)``, in consecutive slices of ``batch_size``
  (the last ``num_examples % batch_size`` examples of each permutation are dropped), so
  each example is seen at most once per epoch and a resumed run replays the same order.

  Args:
    num_examples: training examples, >= 1.
    batch_size: in ``[1, num_examples]``.
    seed: integer >= 0.
    step: global step, integer >= 0.

  Returns:
    int64 ``[batch_size]`` indices (a fresh array).
  """
  num_examples, batch_size = _check_batch_size(num_examples, batch_size)
  seed = _check_seed(seed)
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step must be an integer >= 0; got {step!r}")
  epoch, position = divmod(int(step), num_examples // batch_size)
  order = _epoch_permutation(num_examples, seed, epoch)
  return order[position * batch_size:(position + 1) * batch_size].astype(np.int64)


def train_batch(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, step: int
                ) -> dict[str, np.ndarray]:
  """The batch ``{'x': [batch_size, ...], 'y': [batch_size]}`` of step ``step``.

  See :func:`train_batch_indices`.
  """
  if len(x) != len(y):
    raise ValueError(f"x and y must have the same number of examples; got {len(x)} and {len(y)}")
  indices = train_batch_indices(len(y), batch_size, seed, step)
  return {"x": x[indices], "y": y[indices]}


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Yields every example once in fixed-size batches, padding the last one.

  Args:
    x: ``[n, ...]`` features.
    y: ``[n]`` labels.
    batch_size: >= 1; may exceed ``n``.

  Yields:
    ``{'x': [batch_size, ...], 'y': [batch_size], 'weight': [batch_size]}`` in order;
    padding rows are zeros with ``weight`` 0 (real rows have weight 1, float32).
    Nothing is yielded for ``n == 0``.
  """
  if len(x) != len(y):
    raise ValueError(f"x and y must have the same number of examples; got {len(x)} and {len(y)}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
      batch_size < 1):
    raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
  x, y = np.asarray(x), np.asarray(y)
  for start in range(0, len(y), batch_size):
    x_part, y_part = x[start:start + batch_size], y[start:start + batch_size]
    pad = batch_size - len(y_part)
    weight = np.ones(batch_size, np.float32)
    if pad:
      weight[len(y_part):] = 0.0
      x_part = np.concatenate([x_part, np.zeros((pad, *x.shape[1:]), x.dtype)])
      y_part = np.concatenate([y_part, np.zeros((pad,), y.dtype)])
    yield {"x": x_part, "y": y_part, "weight": weight}
