"""Malformed rows, and text split into rows the way the converter has always split it.

A converter reads its input in chunks (chunks.py); a chunk's problems are found where the chunk is
parsed (maybe in another process), the whole conversion's `Problems` report is kept in the driver:

    ChunkProblems   per chunk: how many malformed rows (a row failing several checks is one row),
                    and the first few rows as (position in the chunk, reasons), in the order the
                    checks found them: structural problems (a wrong field count, undecodable
                    bytes) by line, then the format's value checks column by column; an example
                    row lists all its problems
    Problems        per conversion: the count and the first few as "file:line: reason"; under
                    `strict` the first one raises instead

The reference semantics of a line are Python's (`python_split`): lines end at "\\n", trailing
"\\r"s are dropped, a blank line is skipped, a line that does not decode is a problem, the rest is
split on the delimiter (no quoting) and must have the expected field count. The pyarrow reader in
chunks.py reproduces exactly this on the inputs it can handle and hands the others to
`python_split`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hilomoe.errors import HilomoeError

EXAMPLES = 5  # malformed rows named in the report (and kept per chunk to find them)


class ConvertError(HilomoeError):
    """Input that cannot be converted; the message names the file and the problem."""


@dataclass
class Problems:
    """Malformed rows: counted, the first few kept with their location."""

    strict: bool = False
    keep: int = EXAMPLES
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        if self.strict:
            raise ConvertError(f"{where}: {reason} (--strict stops at the first malformed row).")
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{where}: {reason}")

    def add_chunk(self, count: int, located: list[tuple[str, str]]) -> None:
        """A chunk's `count` problems, of which `located` are the first few (where, reason)."""
        for where, reason in located:
            self.add(where, reason)
        self.count += count - len(located)


@dataclass
class ChunkProblems:
    """One chunk's malformed rows: how many rows (not problems: a row failing several checks
    counts once), and the first EXAMPLES rows as (position, reasons) with the position a line
    index from the chunk's first line (text) or a row index (Parquet), and reasons all of that
    row's problems, "; "-joined in the order the checks ran."""

    count: int = 0
    examples: list[tuple[int, str]] = field(default_factory=list)
    # parsed-row indices already counted by add_rows (sorted), and which example each names
    _rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    _example_of: dict[int, int] = field(default_factory=dict)

    def add_at(self, position: int, reason: str) -> None:
        """A line that is not a row (a structural problem): one row, one problem."""
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append((position, reason))

    def add_rows(self, rows: np.ndarray, reason: Callable[[int], str],
                 locate: Callable[[np.ndarray], np.ndarray]) -> None:
        """Problems at parsed-row indices `rows` (ascending); `reason(row)` words one, `locate`
        turns row indices into positions. A row seen by an earlier check is not counted again;
        only the example rows' problems are worded."""
        if not len(rows):
            return
        rows = np.asarray(rows, dtype=np.int64)
        named = np.fromiter(self._example_of, dtype=np.int64, count=len(self._example_of))
        for r in np.intersect1d(rows, named).tolist():  # more problems of an example row
            k = self._example_of[r]
            position, reasons = self.examples[k]
            self.examples[k] = (position, f"{reasons}; {reason(r)}")
        new = rows[~np.isin(rows, self._rows, assume_unique=True)] if len(self._rows) else rows
        room = EXAMPLES - len(self.examples)
        if room > 0 and len(new):
            first = new[:room]
            for r, p in zip(first.tolist(), locate(first).tolist()):
                self._example_of[r] = len(self.examples)
                self.examples.append((int(p), reason(r)))
        self.count += len(new)
        self._rows = np.union1d(self._rows, new) if len(self._rows) else new


@dataclass
class SplitLines:
    """Rows split by `python_split`: the kept rows' fields, where they are, and the problems."""

    rows: list[list[str]]
    row_lines: list[int]  # line index (from the start of the text) of each kept row
    problems: list[tuple[int, str]]  # (line index, reason), in line order


def python_split(data: bytes, delimiter: str, num_fields: int, encoding: str) -> SplitLines:
    """Split text into rows of exactly `num_fields` fields, line by line in Python: the
    reference semantics, and the path for text pyarrow cannot split the same way."""
    rows, row_lines, problems = [], [], []
    for i, raw in enumerate(data.split(b"\n")):
        raw = raw.rstrip(b"\r\n")
        if not raw:
            continue
        try:
            line = raw.decode(encoding)
        except UnicodeDecodeError as err:
            problems.append((i, f"bytes that are not {encoding} ({err.reason})"))
            continue
        parts = line.split(delimiter)
        if len(parts) != num_fields:
            problems.append((i, f"{len(parts)} fields where {num_fields} are expected"))
            continue
        rows.append(parts)
        row_lines.append(i)
    return SplitLines(rows, row_lines, problems)


@dataclass
class LineTable:
    """Where the rows of a text are, found with numpy (for text whose lines end in "\\n" only,
    with one-byte delimiters): line i is blank, a row, or has the wrong field count."""

    row_lines: np.ndarray  # (rows,) int64: line index of each row, in order
    bad_lines: np.ndarray  # (k,) int64: non-blank lines with the wrong field count
    bad_fields: np.ndarray  # (k,) int64: their field counts


def line_table(data: bytes, delimiter: bytes, num_fields: int) -> LineTable:
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [len(buf)]])
    if starts[-1] == len(buf):  # text ending in "\n": no line after it
        starts, ends = starts[:-1], ends[:-1]
    delims = np.flatnonzero(buf == delimiter[0])
    fields = np.searchsorted(delims, ends) - np.searchsorted(delims, starts) + 1
    nonblank = ends > starts
    good = nonblank & (fields == num_fields)
    bad = nonblank & ~good
    return LineTable(np.flatnonzero(good), np.flatnonzero(bad), fields[bad])
