"""Attribute filters: a Search's Filter message checked and compiled, then evaluated per shard as a mask.

Each shard keeps its attributes as columns over HNSW labels (lookalike.searcher.shard): per attribute a
code per label (the index of its string value), and for the attributes the searcher declares numeric a
float per label. Columns are built the first time a filter names the attribute and then kept up to date
by every write (at most MAX_COLUMNS of each kind per shard, the oldest dropped past it), so a filter costs a
few vectorised comparisons over the shard, whatever its selectivity.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from lookalike.serving.errors import InvalidArgument
from lookalike.v1 import searcher_pb2

MAX_CONDITIONS = 32
MAX_ONE_OF_VALUES = 1024
# Columns kept per shard and kind; past it the oldest is dropped (rebuilt if named again), so filters naming
# ever new attributes cannot grow a shard's memory, or the work of every write, without bound.
MAX_COLUMNS = 64


@dataclass(frozen=True)
class Test:
    """One compiled condition: equality / one-of over strings, or a numeric range; maybe negated."""

    attribute: str
    values: tuple[str, ...] = ()
    numeric: bool = False
    low: float = -math.inf
    low_inclusive: bool = True
    high: float = math.inf
    high_inclusive: bool = True
    negate: bool = False


@dataclass(frozen=True)
class AttributeFilter:
    """The AND of its tests."""

    tests: tuple[Test, ...]


def compile_filter(message: searcher_pb2.Filter, numeric_attributes: frozenset[str],
                   field: str = "filter") -> AttributeFilter | None:
    """The filter of a request (None when it has no conditions); InvalidArgument naming the field when bad."""
    if len(message.all) > MAX_CONDITIONS:
        raise InvalidArgument(f"{field}.all has {len(message.all)} conditions, limit is {MAX_CONDITIONS}")
    return AttributeFilter(tuple(_test(c, numeric_attributes, f"{field}.all[{n}]")
                                 for n, c in enumerate(message.all))) if message.all else None


def _test(condition: searcher_pb2.Condition, numeric_attributes: frozenset[str], field: str) -> Test:
    if not condition.attribute:
        raise InvalidArgument(f"{field}.attribute is empty, expected an attribute name")
    kind = condition.WhichOneof("test")
    if kind == "equals":
        return Test(condition.attribute, (condition.equals,), negate=condition.negate)
    if kind == "one_of":
        if not condition.one_of.values:
            raise InvalidArgument(f"{field}.one_of is empty, expected at least one value")
        if len(condition.one_of.values) > MAX_ONE_OF_VALUES:
            raise InvalidArgument(f"{field}.one_of has {len(condition.one_of.values)} values, limit is "
                                  f"{MAX_ONE_OF_VALUES}")
        return Test(condition.attribute, tuple(condition.one_of.values), negate=condition.negate)
    if kind == "range":
        if condition.attribute not in numeric_attributes:
            raise InvalidArgument(f"{field}.range: attribute {condition.attribute!r} is not numeric (the searcher's "
                                  f"numeric attributes: {sorted(numeric_attributes) or 'none'})")
        bounds = condition.range
        given = [name for name in ("gte", "gt", "lte", "lt") if bounds.HasField(name)]
        if not given:
            raise InvalidArgument(f"{field}.range has no bounds, expected at least one of gte, gt, lte, lt")
        if any(math.isnan(getattr(bounds, name)) for name in given):
            raise InvalidArgument(f"{field}.range has a NaN bound, expected numbers")
        if bounds.HasField("gte") and bounds.HasField("gt") or bounds.HasField("lte") and bounds.HasField("lt"):
            raise InvalidArgument(f"{field}.range gives two lower or two upper bounds, expected at most one of each")
        low, low_inclusive = ((bounds.gte, True) if bounds.HasField("gte") else
                              (bounds.gt, False) if bounds.HasField("gt") else (-math.inf, True))
        high, high_inclusive = ((bounds.lte, True) if bounds.HasField("lte") else
                                (bounds.lt, False) if bounds.HasField("lt") else (math.inf, True))
        return Test(condition.attribute, numeric=True, low=low, low_inclusive=low_inclusive, high=high,
                    high_inclusive=high_inclusive, negate=condition.negate)
    raise InvalidArgument(f"{field} has no test, expected one of equals, one_of, range (an unknown operator from "
                          "a newer client?)")


# A number as clients write one: ASCII digits, optional sign, fraction and exponent. Python's float() also
# takes spaces, underscores ("1_000") and other scripts' digits ("１２"), which other readers of the
# stored text would not read as that number.
NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def as_number(text: str | None) -> float:
    """The finite number the text writes, else NaN: a value stored before its attribute was declared numeric
    may be no number, and counts as having none (Upsert would have refused it)."""
    if text is None or not NUMBER.fullmatch(text):
        return math.nan
    number = float(text)
    return number if math.isfinite(number) else math.nan  # "1e999" overflows to inf


def numeric_value(text: str, field: str) -> float:
    """An attribute value the searcher declares numeric, as a float; InvalidArgument when it is not one."""
    value = as_number(text)
    if math.isnan(value):
        raise InvalidArgument(f"{field} is {text[:40]!r}, expected a finite number written in ASCII digits "
                              "(a numeric attribute)")
    return value


class AttributeColumns:
    """A shard's attributes as columns over labels, built on first use and kept current by every write."""

    def __init__(self, numeric_attributes: frozenset[str],
                 current: Callable[[], Iterable[tuple[int, Mapping[str, str]]]]) -> None:
        self.numeric_attributes = numeric_attributes
        # (label, attributes) of every live item, to build a column the first time it is needed.
        self._current = current
        self._size = 0
        self.live = np.zeros(0, dtype=bool)
        # attribute -> (code per label, -1 for none; value -> code)
        self._codes: dict[str, tuple[np.ndarray, dict[str, int]]] = {}
        self._numbers: dict[str, np.ndarray] = {}
        # Every attribute name any item has had (read once, then kept by writes): a filter naming another one
        # passes nothing without a scan (a scan per made-up name was a way to pin a core from a read token).
        self._names: set[str] | None = None

    def _grow(self, label: int) -> None:
        if label < self._size:
            return
        size = max(label + 1, 2 * self._size, 1024)
        self.live = np.concatenate([self.live, np.zeros(size - self._size, dtype=bool)])
        for attribute, (codes, vocabulary) in self._codes.items():
            self._codes[attribute] = (np.concatenate([codes, np.full(size - self._size, -1, np.int32)]), vocabulary)
        for attribute, numbers in self._numbers.items():
            self._numbers[attribute] = np.concatenate([numbers, np.full(size - self._size, np.nan)])
        self._size = size

    def set(self, label: int, attributes: Mapping[str, str]) -> None:
        """Records a label's attributes (an added or replaced item); the caller holds the shard's write lock."""
        self._grow(label)
        self.live[label] = True
        if self._names is not None:
            self._names.update(attributes)
        for attribute, (codes, vocabulary) in self._codes.items():
            value = attributes.get(attribute)
            codes[label] = -1 if value is None else vocabulary.setdefault(value, len(vocabulary))
        for attribute, numbers in self._numbers.items():
            value = attributes.get(attribute)
            numbers[label] = as_number(value)

    def set_live(self, labels: np.ndarray) -> None:
        """Marks labels live in bulk (a shard loaded from a snapshot, before any column is built)."""
        if len(labels):
            self._grow(int(labels.max()))
            self.live[labels] = True

    def clear(self, label: int) -> None:
        """Forgets a removed label."""
        if label < self._size:
            self.live[label] = False

    def _code_column(self, attribute: str) -> tuple[np.ndarray, dict[str, int]]:
        column = self._codes.get(attribute)
        if column is None:
            codes, vocabulary = np.full(self._size, -1, np.int32), {}
            for label, attributes in self._current():
                value = attributes.get(attribute)
                if value is not None:
                    codes[label] = vocabulary.setdefault(value, len(vocabulary))
            column = (codes, vocabulary)
            _keep(self._codes, attribute, column)
        return column

    def _number_column(self, attribute: str) -> np.ndarray:
        numbers = self._numbers.get(attribute)
        if numbers is None:
            numbers = np.full(self._size, np.nan)
            for label, attributes in self._current():
                value = attributes.get(attribute)
                numbers[label] = as_number(value)
            _keep(self._numbers, attribute, numbers)
        return numbers

    def mask(self, where: AttributeFilter) -> np.ndarray:
        """A boolean per label: live and passing every test. The caller holds the shard's lock (read or write);
        building a missing column under a read lock races only with another reader building the same one."""
        passing = self.live.copy()
        if self._names is None:
            self._names = {name for _, attributes in self._current() for name in attributes}
        for test in where.tests:
            if test.attribute not in self._names:
                result = np.zeros(self._size, dtype=bool)  # no item has it: it passes no test
            elif test.numeric:
                numbers = self._number_column(test.attribute)
                with np.errstate(invalid="ignore"):  # NaN (no value) compares False: it fails the test
                    low = numbers >= test.low if test.low_inclusive else numbers > test.low
                    high = numbers <= test.high if test.high_inclusive else numbers < test.high
                result = low & high
            else:
                codes, vocabulary = self._code_column(test.attribute)
                wanted = [vocabulary[v] for v in test.values if v in vocabulary]
                result = (codes == wanted[0]) if len(wanted) == 1 else np.isin(codes, wanted)
            passing &= ~result if test.negate else result
        return passing


def _keep(columns: dict[str, object], attribute: str, column: object) -> None:
    """Caches a column built under a read lock, dropping the oldest past MAX_COLUMNS. Readers may run this at
    once: list() and pop(key, None) are single steps under the interpreter lock, and a dropped column is
    only rebuilt when named again."""
    columns[attribute] = column
    while len(columns) > MAX_COLUMNS:
        columns.pop(list(columns)[0], None)
