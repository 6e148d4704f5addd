"""Inputs cut into chunks, and a chunk read into rows with pyarrow.

A chunk is the unit of work of both passes and of the output: the single process and the Ray path
cut the inputs the same way and write each chunk's rows with one `DatasetWriter.write` per split,
in chunk order, so their content hashes match. Cuts depend on the input only:

    text     byte ranges of about `chunk_bytes` (default 32 MiB) aligned to line starts: a cut
             falls on the first line start at or after each multiple of `chunk_bytes` (counted
             from the end of the header line, if any); a file smaller than that is one chunk
    Parquet  `chunk_rows` rows each (default 100,000), as `iter_batches(batch_size=...)` cuts

`read_text` turns a text chunk into its well-formed rows, one Arrow column per requested field,
with the semantics of `text.python_split` (lines end at "\\n", trailing "\\r"s dropped, blank lines
skipped, undecodable lines and wrong field counts reported with their line) but at the speed of
`pyarrow.csv` (about 1.2 us a Criteo row on one core here, against ~100 us in Python):

    * the text is prepared so pyarrow splits it the same way: "\\r"s before a "\\n" are removed
      (pyarrow would also end a line at a lone "\\r"), a multi-character delimiter ("::") becomes
      "\\x1f", non-UTF-8 text is transcoded, and lines that are not valid UTF-8 (one check of the
      whole chunk, ~0.5 ms/MB) are found line by line and blanked;
    * pyarrow reads it with quoting off, empty lines skipped, and rows with the wrong field count
      skipped by `ParseOptions(invalid_row_handler=...)`;
    * where rows were skipped, or a later check needs a row's line, the lines are located with
      numpy (`text.line_table`), so messages carry "file:line" like Python's line counter (the
      handler's own row number leaves blank lines out, and is relative to the chunk anyway);
    * text pyarrow cannot split the same way (a "\\r" inside a line, a UTF-8 byte-order mark at the
      start of a file, which pyarrow drops) goes through `python_split` instead.

Fields may be read typed (`Dialect.types`: numbers parsed by pyarrow; `Dialect.narrow`: ids of
a fixed width) as a fast path; a chunk whose typed read fails is read with fewer types, and one
whose caller finds a value it needs the text of is read again with every field as bytes
(`typed=False`) and checked value by value with Python's semantics.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from hilomoe.data.convert.text import ChunkProblems, ConvertError, line_table, python_split

CHUNK_BYTES = 32 << 20
CHUNK_ROWS = 100_000
BLOCK_BYTES = 1 << 20  # pyarrow's parse block: 1 MiB parsed fastest here (cache-sized)
UNIT_SEPARATOR = b"\x1f"  # stands in for a multi-character delimiter


@dataclass(frozen=True)
class Chunk:
    """One unit of work: a byte range of a text file aligned to line starts, or a row range of
    a Parquet file. `index` orders the conversion's chunks (the order of writing)."""

    index: int
    path: str
    kind: str  # "text" | "parquet"
    start: int  # first byte / row
    end: int  # one past the last byte / row
    first_line: int = 0  # text: 1-based line number of the first line when known at planning
    # (the file's first chunk), else 0: the driver counts it from the chunks before
    file_end: bool = True  # text: the chunk ends its file


def plan_text(path: Path, chunk_bytes: int, header: bool, first_index: int) -> list[Chunk]:
    """Chunks of a text file: cuts at line starts, about `chunk_bytes` apart."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = _line_end(f, 0, size) if header else 0
        cuts = [start]
        while cuts[-1] + chunk_bytes < size:
            cut = _line_end(f, cuts[-1] + chunk_bytes - 1, size)
            if cut >= size:
                break
            cuts.append(cut)
    cuts.append(size)
    spans = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    return [Chunk(first_index + i, str(path), "text", a, b,
                  first_line=(2 if header else 1) if i == 0 else 0, file_end=b == size)
            for i, (a, b) in enumerate(spans)]


def _line_end(f, pos: int, size: int) -> int:
    """The offset just after the first "\\n" at or after `pos` (or the file size)."""
    f.seek(pos)
    while pos < size:
        window = f.read(1 << 16)
        if not window:
            break
        hit = window.find(b"\n")
        if hit >= 0:
            return pos + hit + 1
        pos += len(window)
    return size


def plan_parquet(path: Path, chunk_rows: int, first_index: int) -> list[Chunk]:
    rows = parquet_file(path).metadata.num_rows
    return [Chunk(first_index + i, str(path), "parquet", a, min(a + chunk_rows, rows))
            for i, a in enumerate(range(0, rows, chunk_rows))]


def parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ConvertError(f"{path}: not a readable Parquet file ({err}).") from None


def mean_line_bytes(path: Path, header: bool) -> float:
    """Mean line length over the file's first 64 KiB: turns a row count into chunk bytes."""
    with open(path, "rb") as f:
        sample = f.read(1 << 16)
    lines = sample.split(b"\n")[1 if header else 0:-1] or [sample]
    return max(1.0, sum(len(x) + 1 for x in lines) / len(lines))


# ----------------------------------------------------------------------------------------------
# reading a chunk


@dataclass(frozen=True)
class Dialect:
    """How a format's text splits: `num_fields` fields per line, of which `columns` are read
    (in that order); `types` are fast-path Arrow types of some of those fields (else bytes)."""

    delimiter: str
    num_fields: int
    columns: tuple[int, ...]
    encoding: str = "utf-8"
    types: tuple[tuple[int, pa.DataType], ...] = ()
    # narrower types that hold only if every value fits (Criteo's 8-hex-digit ids as
    # fixed-size binary: hashed ~30% faster), tried first; empty values become null
    narrow: tuple[tuple[int, pa.DataType], ...] = ()

    def attempts(self, typed: bool) -> list[dict[int, pa.DataType]]:
        """Column types to try reading with, fastest first; fields not named are bytes."""
        out = [dict(self.types + self.narrow), dict(self.types)] if typed else []
        return [t for i, t in enumerate(out) if t and t not in out[:i]] + [{}]


@dataclass
class RawRows:
    """A chunk's well-formed rows: `columns[k]` holds field `Dialect.columns[k]` (an Array or a
    ChunkedArray of bytes, or of its fast-path type; `typed`: the numbers are typed).
    `positions` is the number of lines (text) or rows (Parquet) the chunk spans; `locate` maps
    parsed-row indices to positions within the chunk, for messages; `problems` holds the
    structural problems, to which the format adds its own."""

    columns: list[pa.Array | pa.ChunkedArray]
    typed: bool
    positions: int
    problems: ChunkProblems
    locate: Callable[[np.ndarray], np.ndarray]

    @property
    def num_rows(self) -> int:
        return len(self.columns[0]) if self.columns else 0


def read_chunk_bytes(chunk: Chunk) -> bytes:
    try:
        with open(chunk.path, "rb") as f:
            f.seek(chunk.start)
            return f.read(chunk.end - chunk.start)
    except OSError as err:  # e.g. a Ray node that does not see the file
        raise ConvertError(f"{chunk.path}: cannot be read here ({err.strerror or err}); on Ray, "
                           f"every node must see the input files at the same path.") from None


def read_text(chunk: Chunk, dialect: Dialect, typed: bool = True) -> RawRows:
    """Well-formed rows of a text chunk (see the module docstring)."""
    data = read_chunk_bytes(chunk)
    positions = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    prepared = _prepare(data, chunk, dialect)
    if prepared is None:
        return _python_rows(data, dialect, positions)
    text, delimiter, undecodable = prepared
    attempts = [(t, BLOCK_BYTES) for t in dialect.attempts(typed)] + [({}, len(text) + 1)]
    for types, block in attempts:
        try:
            table, invalid = _arrow_read(text, delimiter, dialect, types, block)
            break
        except pa.ArrowInvalid:  # a typed value pyarrow cannot read, or a row over a block
            continue
    else:
        return _python_rows(data, dialect, positions)
    columns = table.columns  # chunked (one chunk per parse block): no copy
    problems = ChunkProblems()
    lines: list[np.ndarray] = []

    def row_lines() -> np.ndarray:
        if not lines:  # the text again (rarely needed: not kept meanwhile, it is large)
            again = _prepare(read_chunk_bytes(chunk), chunk, dialect)[0]
            lines.append(line_table(again, delimiter, dialect.num_fields).row_lines)
        return lines[0]

    if invalid or undecodable:
        table_ = line_table(text, delimiter, dialect.num_fields)
        if len(table_.row_lines) != table.num_rows:  # not split as Python would: never seen
            return _python_rows(data, dialect, positions)
        lines.append(table_.row_lines)
        found = [(int(i), f"{n} fields where {dialect.num_fields} are expected")
                 for i, n in zip(table_.bad_lines, table_.bad_fields)]
        for line, reason in sorted(found + undecodable):
            problems.add_at(line, reason)
    typed_read = bool(dialect.types) and all(i in types for i, _ in dialect.types)
    return RawRows(columns, typed_read, positions, problems, lambda rows: row_lines()[rows])


def _prepare(data: bytes, chunk: Chunk, dialect: Dialect):
    """(text pyarrow splits like Python, its one-byte delimiter, [(line, reason)] of the lines
    blanked because they do not decode), or None where only `python_split` is exact."""
    delimiter = dialect.delimiter.encode(dialect.encoding)
    if len(delimiter) > 1:
        if UNIT_SEPARATOR in data:
            return None
        data, delimiter = data.replace(delimiter, UNIT_SEPARATOR), UNIT_SEPARATOR
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
        if b"\r\n" in data:  # several CRs before a LF
            data = re.sub(rb"\r+\n", b"\n", data)
        if chunk.file_end:  # a last line without "\n"
            data = data.rstrip(b"\r")
        if b"\r" in data:  # a CR inside a line, which pyarrow would take for a line end
            return None
    undecodable: list[tuple[int, str]] = []
    if dialect.encoding.replace("-", "").lower() == "utf8":
        if chunk.start == 0 and data.startswith(codecs.BOM_UTF8):
            return None  # pyarrow drops a byte-order mark, Python keeps it in the first field
        if not _valid_utf8(data):
            data, undecodable = _blank_undecodable(data)
    else:
        try:
            data = data.decode(dialect.encoding).encode("utf-8")
        except UnicodeDecodeError:
            return None
    return data, delimiter, undecodable


def _valid_utf8(data: bytes) -> bool:
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int64))
    whole = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])
    try:
        whole.cast(pa.large_string())
        return True
    except pa.ArrowInvalid:
        return False


def _blank_undecodable(data: bytes) -> tuple[bytes, list[tuple[int, str]]]:
    """Empty the lines that are not UTF-8 (pyarrow then skips them as blank); report each with
    the reason Python gives for the line alone."""
    lines = data.split(b"\n")
    found = []
    for i, line in enumerate(lines):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            found.append((i, f"bytes that are not utf-8 ({err.reason})"))
            lines[i] = b""
    return b"\n".join(lines), found


def _arrow_read(text: bytes, delimiter: bytes, dialect: Dialect, column_types: dict,
                block: int) -> tuple[pa.Table, int]:
    names = [f"f{i}" for i in range(dialect.num_fields)]
    types = {names[i]: column_types.get(i, pa.binary()) for i in dialect.columns}
    invalid = [0]

    def skip(row) -> str:
        invalid[0] += 1
        return "skip"

    table = pacsv.read_csv(
        pa.py_buffer(text),
        read_options=pacsv.ReadOptions(column_names=names, block_size=max(block, 1 << 10),
                                       use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter.decode(), quote_char=False,
                                         escape_char=False, newlines_in_values=False,
                                         ignore_empty_lines=True, invalid_row_handler=skip),
        convert_options=pacsv.ConvertOptions(
            column_types=types, include_columns=[names[i] for i in dialect.columns],
            null_values=[""], strings_can_be_null=False, quoted_strings_can_be_null=False,
            check_utf8=False))
    return table, invalid[0]


def _python_rows(data: bytes, dialect: Dialect, positions: int) -> RawRows:
    split = python_split(data, dialect.delimiter, dialect.num_fields, dialect.encoding)
    problems = ChunkProblems()
    for line, reason in split.problems:
        problems.add_at(line, reason)
    columns = [pa.array([row[i] for row in split.rows], pa.string()).cast(pa.binary())
               for i in dialect.columns]
    row_lines = np.array(split.row_lines, dtype=np.int64)
    return RawRows(columns, False, positions, problems, lambda rows: row_lines[rows])


def read_parquet(chunk: Chunk, names: list[str]) -> RawRows:
    """Rows `chunk.start` to `chunk.end` of a Parquet file, each column as the text Python's
    `str` gives its values ("" for null), as bytes; positions are row indices."""
    pf = parquet_file(Path(chunk.path))
    groups, first, offset = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < chunk.end and offset + n > chunk.start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    table = pf.read_row_groups(groups, columns=names).slice(chunk.start - (first or 0),
                                                            chunk.end - chunk.start)
    columns = [as_text(table.column(c)) for c in names]
    return RawRows(columns, False, chunk.end - chunk.start, ChunkProblems(), lambda rows: rows)


def as_text(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Values as the bytes of `"" if v is None else str(v)`, computed once per distinct value."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    enc = arr.dictionary_encode()
    texts = [str(v) for v in enc.dictionary.to_pylist()] + [""]  # the last one: null
    indices = enc.indices.fill_null(len(texts) - 1)
    return pa.array(texts, pa.string()).cast(pa.binary()).take(indices)
