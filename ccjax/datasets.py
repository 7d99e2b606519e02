"""The data-source registry: a dataset name (``--dataset``) -> its loader, specs parsed once.

A source is one loader function registered with :func:`register` where it is defined
(:mod:`ccjax.data`: classification sources, :mod:`ccjax.text`: byte corpora), e.g.::

  @datasets.register("npz", datasets.CLASSIFICATION, argument="PATH", parse_argument=_npz_path)
  def _load_npz(spec: datasets.DataSpec, options: datasets.LoadOptions) -> Dataset: ...

A spec is ``NAME`` or ``NAME:ARGUMENT`` (``mnist1d:50000``, ``npz:/data/mine.npz``,
``text:/data/book.txt``); :func:`parse` turns it into a :class:`DataSpec` once (the
source, and the argument already checked by the source's ``parse_argument``), so a config
can validate ``--dataset`` without loading anything and the loader reads the parsed
argument. Adding a dataset: its loader function and its ``@register`` line.

Every problem with a spec raises :class:`DataError`, a ``ValueError`` whose message is
one line naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

CLASSIFICATION = "classification"   # loaders return a ccjax.data.Dataset
TEXT = "text"                       # loaders return the corpus bytes
KINDS = (CLASSIFICATION, TEXT)
# The modules whose loaders register themselves (imported before the first lookup).
SOURCE_MODULES = ("ccjax.data", "ccjax.text")


class DataError(ValueError):
  """A problem with the user's data or data arguments; the message is one line."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True)
class LoadOptions:
  """What a classification loader may use besides its spec.

  Attributes:
    data_dir: TFDS data directory (``None``: TFDS's default).
    valid_fraction: fraction of train held out for validation, in ``[0, 1)`` (checked).
    seed: seed of the validation hold-out.
    num_classes: the declared number of classes (``None``: the source's).
  """
  data_dir: str | None = None
  valid_fraction: float = 0.1
  seed: int = 0
  num_classes: int | None = None


@dataclasses.dataclass(frozen=True)
class Source:
  """One registered data source.

  Attributes:
    name: the part of a spec before ``:``.
    kind: :data:`CLASSIFICATION` or :data:`TEXT`.
    loader: ``(DataSpec, LoadOptions) -> Dataset`` (classification) or ``(DataSpec) ->
      bytes`` (text).
    argument: what follows ``name:`` (``PATH``, ``N``), ``None``: the source takes none.
    argument_optional: ``name`` alone is valid too (``mnist1d`` = ``mnist1d:10000``).
    parse_argument: ``spec -> value`` checks the whole spec once and returns what the
      loader reads as ``DataSpec.argument`` (raises :class:`DataError`).
  """
  name: str
  kind: str
  loader: Callable[..., Any]
  argument: str | None = None
  argument_optional: bool = False
  parse_argument: Callable[[str], Any] | None = None

  @property
  def usages(self) -> tuple[str, ...]:
    """How the source is written: ``("digits",)``, ``("mnist1d", "mnist1d:N")``, ..."""
    if self.argument is None:
      return (self.name,)
    with_argument = f"{self.name}:{self.argument}"
    return (self.name, with_argument) if self.argument_optional else (with_argument,)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A parsed dataset spec.

  Attributes:
    spec: the string as given (the dataset's name in results and fingerprints).
    source: its registered :class:`Source`.
    argument: the source's parsed argument (a path, a number of examples), or ``None``.
  """
  spec: str
  source: Source
  argument: Any = None


_REGISTRY: dict[str, Source] = {}


def register(name: str, kind: str, *, argument: str | None = None,
             argument_optional: bool = False,
             parse_argument: Callable[[str], Any] | None = None) -> Callable:
  """Decorator registering ``loader`` as the source ``name`` (see :class:`Source`)."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {'|'.join(KINDS)}, got {kind!r}")

  def decorate(loader: Callable[..., Any]) -> Callable[..., Any]:
    if name in _REGISTRY and _REGISTRY[name].loader is not loader:
      raise ValueError(f"dataset {name!r} is registered twice")
    _REGISTRY[name] = Source(name, kind, loader, argument, argument_optional, parse_argument)
    return loader
  return decorate


def _registry() -> dict[str, Source]:
  for module in SOURCE_MODULES:
    importlib.import_module(module)
  return _REGISTRY


def sources(kind: str) -> tuple[Source, ...]:
  """The registered sources of ``kind``, in registration order."""
  return tuple(source for source in _registry().values() if source.kind == kind)


def usages(kind: str) -> tuple[str, ...]:
  """Every way to write a ``kind`` dataset: ``digits``, ``mnist1d``, ``mnist1d:N``, ..."""
  return tuple(usage for source in sources(kind) for usage in source.usages)


def parse(spec: Any, kind: str, field: str = "dataset") -> DataSpec:
  """Parses a dataset spec of ``kind`` once.

  Args:
    spec: ``NAME`` or ``NAME:ARGUMENT``.
    kind: :data:`CLASSIFICATION` or :data:`TEXT`.
    field: the name in error messages (``dataset``, ``--dataset``).

  Raises:
    DataError: an unknown name (the message lists :func:`usages`), or a bad argument
      (the source's own message).
  """
  known = _registry()
  name, colon, _ = spec.partition(":") if isinstance(spec, str) else ("", "", "")
  source = known.get(name)
  if (source is None or source.kind != kind or (colon and source.argument is None)
      or (not colon and source.argument is not None and not source.argument_optional)):
    raise DataError(f"{field} must be one of {'|'.join(usages(kind))}, got {spec!r}")
  argument = source.parse_argument(spec) if source.parse_argument else None
  return DataSpec(spec, source, argument)
