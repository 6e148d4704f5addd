"""What every source format shares: the `Block` of checked rows a chunk becomes, how files are
cut into chunks (`Sizes`), and small checks the formats (formats.py) run on their chunks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hilomoe.data.convert.chunks import mean_line_bytes
from hilomoe.data.convert.columns import Codes
from hilomoe.data.convert.text import ChunkProblems, ConvertError


@dataclass
class Block:
    """A chunk's checked rows (n of them) and what the chunk reports."""

    cat: list[Codes]  # per categorical field
    num: np.ndarray  # (n, F_n) float64, C order; NaN = missing
    label: np.ndarray  # (n,) float32, 0 or 1
    time: np.ndarray | None  # (n,) int64 sort key for time-based splits
    positions: int  # lines (text) or rows (Parquet) the chunk spans
    problems: ChunkProblems

    def __len__(self) -> int:
        return len(self.label)


def keep_mask(ok: np.ndarray) -> np.ndarray | None:
    return None if ok.all() else ok


@dataclass
class Sizes:
    """How to cut text files: `chunk_bytes`, or `chunk_rows` times the file's mean line length;
    Parquet files: `chunk_rows` rows."""

    chunk_bytes: int | None
    chunk_rows: int

    def text_bytes(self, path: Path, header: bool) -> int:
        if self.chunk_bytes is not None:
            return self.chunk_bytes
        return max(1, int(self.chunk_rows * mean_line_bytes(path, header)))


def check_header(path: Path, delimiter: str, expected: list[str]) -> list[str]:
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    got = first.split(delimiter)
    if expected and got != expected:
        raise ConvertError(f"{path}: header {first[:80]!r} is not the expected "
                           f"{delimiter.join(expected)[:80]!r}...")
    return got


def texts_at(codes: Codes, i: int) -> str:
    return codes.values[int(codes.indices[i])].as_py().decode()
