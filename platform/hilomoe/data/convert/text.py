"""Streaming reader for delimited text files, with malformed rows counted, not fatal.

Lines are read in chunks of bytes (bounded memory, whatever the file size), decoded with the
format's encoding, and split on its delimiter. A line with the wrong field count or bytes that
do not decode is recorded in the `Problems` report (file, line, reason) and skipped; under
`strict` the first one raises instead. Value-level problems (text in a numeric field, a label
other than 0/1) are reported by the format's parser through the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from hilomoe.errors import HilomoeError


class ConvertError(HilomoeError):
    """Input that cannot be converted; the message names the file and the problem."""


@dataclass
class Problems:
    """Malformed rows: counted, the first few kept with their location."""

    strict: bool = False
    keep: int = 5
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        if self.strict:
            raise ConvertError(f"{where}: {reason} (--strict stops at the first malformed row).")
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{where}: {reason}")


@dataclass
class Rows:
    """A chunk of parsed rows: one array of strings per column, and each row's location."""

    columns: list[np.ndarray]  # each (n,) of str
    where: list[str]  # "file:line" of each row, for value-level problems


def read_delimited(path: Path, delimiter: str, num_fields: int, problems: Problems,
                   encoding: str = "utf-8", header: bool = False,
                   chunk_rows: int = 100_000) -> Iterator[Rows]:
    """Yield chunks of rows with exactly `num_fields` fields."""
    if not path.is_file():
        raise ConvertError(f"{path}: no such input file.")
    buf: list[list[str]] = []
    where: list[str] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if header and lineno == 1:
                continue
            raw = raw.rstrip(b"\r\n")
            if not raw:
                continue
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as err:
                problems.add(f"{path}:{lineno}", f"bytes that are not {encoding} ({err.reason})")
                continue
            parts = line.split(delimiter) if len(delimiter) > 0 else [line]
            if len(parts) != num_fields:
                problems.add(f"{path}:{lineno}",
                             f"{len(parts)} fields where {num_fields} are expected")
                continue
            buf.append(parts)
            where.append(f"{path}:{lineno}")
            if len(buf) >= chunk_rows:
                yield _chunk(buf, where)
                buf, where = [], []
    if buf:
        yield _chunk(buf, where)


def _chunk(buf: list[list[str]], where: list[str]) -> Rows:
    columns = [np.array(col, dtype=object) for col in zip(*buf)]
    return Rows(columns, where)


def parse_float(values: np.ndarray, rows: Rows, problems: Problems, column: str,
                missing_ok: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> float64 with NaN for empty; returns (values, ok) where ok marks rows whose
    text parsed (a non-number is reported and its row dropped by the caller)."""
    out = np.full(len(values), np.nan)
    ok = np.ones(len(values), dtype=bool)
    for i, v in enumerate(values):
        if v == "":
            if not missing_ok:
                ok[i] = False
                problems.add(rows.where[i], f"empty {column}")
            continue
        try:
            out[i] = float(v)
        except ValueError:
            ok[i] = False
            problems.add(rows.where[i], f"{column} is not a number: {v[:20]!r}")
    return out, ok
