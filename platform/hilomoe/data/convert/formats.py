"""Source formats: each cuts its files into chunks and turns a chunk into a `Block` of checked rows
(codes per categorical field, floats per numeric field, a 0/1 label, and a time key where the
format has one).

    criteo  label, I1-I13 integers, C1-C26 hex strings; tab-separated, no header; empty = missing
    avazu   CSV with header: id, click, hour (YYMMDDHH), C1, banner_pos, site_*, app_*,
            device_*, C14-C21; hour becomes hour-of-day and weekday fields, id is dropped
    movielens  MovieLens-1M ratings.dat joined with users.dat and movies.dat ("::", latin-1)
    table   any CSV / TSV / Parquet with a header, described by a YAML field spec

`parse(chunk)` is a pure function of the chunk and the format's settings, so it runs the same in a
thread, in a Ray task, in pass 1 and in pass 2. Rows failing a check are counted in the block's
problems (in the order: structural, label, then the format's columns) and left out.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict

from hilomoe.config import parse_config
from hilomoe.data.convert.blocks import Block, Sizes, check_header, keep_mask, texts_at
from hilomoe.data.convert.chunks import (Chunk, Dialect, RawRows, parquet_file,
                                         plan_parquet, plan_text, read_parquet, read_text)
from hilomoe.data.convert.columns import (Codes, check_label, codes_of, derived_codes, numbers,
                                          per_value, typed_floats_exact)
from hilomoe.data.convert.text import ChunkProblems, ConvertError


# ----------------------------------------------------------------------------------------------
# criteo


def _log_square(v: np.ndarray) -> np.ndarray:
    """v > 2 -> floor(log(v)^2), else v; as int64 (the old transform's arithmetic exactly)."""
    with np.errstate(all="ignore"):  # log of v <= 2 is not used; inf -> int64 as before
        return np.where(v > 2, np.floor(np.log(v) ** 2), v).astype(np.int64)


def bucket_codes(v: np.ndarray) -> Codes:
    """The usual Criteo integer transform as codes: v > 2 -> floor(log(v)^2), else v, each
    bucket named by its decimal text; NaN (missing) -> "". `v` holds finite integers (`numbers`).
    Codes number the buckets in increasing order (some may hold no row)."""
    lo, hi = np.fmin.reduce(v, initial=np.inf), np.fmax.reduce(v, initial=-np.inf)  # NaN-blind
    missing = np.isnan(v)
    if np.isfinite(lo) and np.isfinite(hi) and hi - lo < 1 << 16:
        # a short range of integers: transform each integer of the range once, make the
        # buckets distinct, then one gather per row; slot hi - lo + 1: missing
        uniq, code = np.unique(_log_square(np.arange(lo, hi + 1)), return_inverse=True)
        code = np.append(code.astype(np.int32), len(uniq))
        indices = code[(np.where(missing, hi + 1, v) - lo).astype(np.int64)]
    else:
        present = _log_square(v[~missing])
        b_lo = int(present.min()) if len(present) else 0
        b_hi = int(present.max()) if len(present) else -1
        if b_hi - b_lo < 1 << 16:
            # a short range of buckets (floor(log(v)^2) < 1,400 for any v; only v <= 2 maps
            # to itself): the buckets held, marked in a table over the range; no sort
            held = np.zeros(b_hi - b_lo + 1, dtype=bool)
            held[present - b_lo] = True
            uniq = np.flatnonzero(held) + b_lo
            inverse = (np.cumsum(held, dtype=np.int32) - 1)[present - b_lo]
        else:
            uniq, inverse = np.unique(present, return_inverse=True)
        indices = np.full(len(v), len(uniq), dtype=np.int32)
        indices[~missing] = inverse
    values = pa.array([str(x) for x in uniq.tolist()] + [""], pa.string()).cast(pa.binary())
    return Codes(indices, values)


class Criteo:
    name = "criteo"
    has_time = False
    # integers are read as float64 (what Python's float() reads them as); categories as bytes,
    # as 8-byte ids where they all are
    dialect = Dialect("\t", 40, tuple(range(40)),
                      types=tuple((1 + j, pa.float64()) for j in range(13)),
                      narrow=tuple((14 + f, pa.binary(8)) for f in range(26)))

    def __init__(self, int_mode: Literal["categorical", "numeric"] = "categorical"):
        self.int_mode = int_mode
        ints = [f"I{i}" for i in range(1, 14)]
        cats = [f"C{i}" for i in range(1, 27)]
        self.cat_fields = (ints if int_mode == "categorical" else []) + cats
        self.num_fields = ints if int_mode == "numeric" else []
        self.transforms = ({f: "log1p, standardised" for f in ints} if int_mode == "numeric"
                           else {f: "floor(log(v)^2) if v > 2 else v" for f in ints})

    def plan(self, paths: list[Path], sizes: Sizes) -> list[Chunk]:
        chunks: list[Chunk] = []
        for path in paths:
            chunks += plan_text(path, sizes.text_bytes(path, False), False, len(chunks))
        return chunks

    def parse(self, chunk: Chunk) -> Block:
        raw = read_text(chunk, self.dialect)
        if raw.typed and not self._typed_exact(raw):
            raw = read_text(chunk, self.dialect, typed=False)
        label, ok = check_label(raw, 0)
        ints = []
        for j in range(13):
            v, good = numbers(raw, 1 + j, f"I{j + 1}")
            bad = good & ~np.isnan(v) & (v != np.round(v))
            col = raw.columns[1 + j]
            raw.problems.add_rows(
                np.flatnonzero(bad),
                lambda i, j=j, col=col: f"I{j + 1} is not an integer: {col[i].as_py().decode()!r}",
                raw.locate)
            ints.append(v)
            ok &= good & ~bad
        keep = keep_mask(ok)
        cats = [codes_of(raw.columns[14 + f]).take(keep) for f in range(26)]
        if self.int_mode == "categorical":
            cats = [bucket_codes(v if keep is None else v[keep]) for v in ints] + cats
            num = np.zeros((int(ok.sum()), 0))
        else:
            num = np.log1p(np.maximum(np.stack(ints, axis=1), 0.0))[ok]
        return Block(cats, num, label[ok], None, raw.positions, raw.problems)

    @staticmethod
    def _typed_exact(raw: RawRows) -> bool:
        """Typed integers need no text: none is NaN-like or fractional (those are reported
        with their text, so the chunk is read again as text)."""
        if not typed_floats_exact(raw):
            return False
        for col in raw.columns[1:14]:
            v = col.to_numpy(zero_copy_only=False)
            if not np.all(np.isnan(v) | (v == np.round(v))):
                return False
        return True


# ----------------------------------------------------------------------------------------------
# avazu

AVAZU_COLUMNS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain",
                 "site_category", "app_id", "app_domain", "app_category", "device_id",
                 "device_ip", "device_model", "device_type", "device_conn_type", "C14", "C15",
                 "C16", "C17", "C18", "C19", "C20", "C21"]


def _weekday(h: str) -> str:
    try:
        return str(dt.date(2000 + int(h[:2]), int(h[2:4]), int(h[4:6])).weekday())
    except ValueError:
        return ""


def _hour(h: str) -> tuple[bool, str, str, int]:
    """(is YYMMDDHH, hour of day, weekday, time key) of an hour text."""
    good = len(h) == 8 and h.isdigit()
    return good, h[6:8], _weekday(h) if good else "", int(h) if good else 0


class Avazu:
    name = "avazu"
    has_time = True
    num_fields: list[str] = []
    dialect = Dialect(",", len(AVAZU_COLUMNS), tuple(range(1, len(AVAZU_COLUMNS))))  # no id

    def __init__(self) -> None:
        self.cat_fields = ["hour_of_day", "weekday"] + AVAZU_COLUMNS[3:]
        self.transforms = {"hour_of_day": "HH of hour", "weekday": "weekday of YYMMDD"}

    def plan(self, paths: list[Path], sizes: Sizes) -> list[Chunk]:
        chunks: list[Chunk] = []
        for path in paths:
            check_header(path, ",", AVAZU_COLUMNS)
            chunks += plan_text(path, sizes.text_bytes(path, True), True, len(chunks))
        return chunks

    def parse(self, chunk: Chunk) -> Block:
        raw = read_text(chunk, self.dialect)
        label, ok = check_label(raw, 0)
        hours, results = per_value(raw.columns[1], _hour)
        good = np.array([r[0] for r in results], dtype=bool)[hours.indices]
        raw.problems.add_rows(
            np.flatnonzero(~good),
            lambda i: f"hour {texts_at(hours, i)[:20]!r} is not YYMMDDHH", raw.locate)
        ok &= good
        keep = keep_mask(ok)
        time = np.array([r[3] for r in results], dtype=np.int64)[hours.indices][ok]
        cats = [derived_codes(hours.indices, [r[1] for r in results]).take(keep),
                derived_codes(hours.indices, [r[2] for r in results]).take(keep)]
        cats += [codes_of(raw.columns[k]).take(keep) for k in range(2, len(raw.columns))]
        return Block(cats, np.zeros((int(ok.sum()), 0)), label[ok], time, raw.positions,
                     raw.problems)




# ----------------------------------------------------------------------------------------------
# table


class TableSpec(BaseModel):
    """The YAML field spec of the `table` format."""

    model_config = ConfigDict(extra="forbid")

    columns: dict[str, Literal["categorical", "numeric", "label", "ignore"]]
    delimiter: str | None = None  # default: by extension (.tsv tab, else comma)
    time: str | None = None  # a column to split by time instead of at random


class Table:
    name = "table"

    def __init__(self, spec_path: Path):
        if not spec_path.is_file():
            raise ConvertError(f"{spec_path}: no such field spec file.")
        self.spec = parse_config(yaml.safe_load(spec_path.read_text()), str(spec_path), TableSpec)
        self.spec_path = spec_path
        kinds = self.spec.columns
        labels = [c for c, k in kinds.items() if k == "label"]
        if len(labels) != 1:
            raise ConvertError(f"{spec_path}: columns: exactly one column must be 'label', "
                               f"got {len(labels)}.")
        self.label = labels[0]
        self.cat_fields = [c for c, k in kinds.items() if k == "categorical"]
        self.num_fields = [c for c, k in kinds.items() if k == "numeric"]
        self.has_time = self.spec.time is not None
        self.transforms = {f: "standardised" for f in self.num_fields}
        # what a chunk reads: the label, categorical, numeric and time columns, in that order
        self.needed = list(dict.fromkeys([self.label, *self.cat_fields, *self.num_fields,
                                          *([self.spec.time] if self.spec.time else [])]))
        self.dialects: dict[str, Dialect] = {}  # per text file: its header's layout

    def _check_columns(self, path: Path, header: list[str]) -> None:
        unknown = [c for c in self.spec.columns if c not in header]
        if unknown:
            raise ConvertError(f"{self.spec_path}: columns: {', '.join(unknown)} not in "
                               f"{path} (its columns: {', '.join(header)[:200]}).")
        if self.spec.time and self.spec.time not in header:
            raise ConvertError(f"{self.spec_path}: time: {self.spec.time!r} not in {path}.")

    def plan(self, paths: list[Path], sizes: Sizes) -> list[Chunk]:
        chunks: list[Chunk] = []
        # numbers pyarrow may read itself (a column also read as text is not one of them)
        numeric = ((set(self.num_fields) | ({self.spec.time} if self.spec.time else set()))
                   - set(self.cat_fields) - {self.label})
        for path in paths:
            if path.suffix == ".parquet":
                self._check_columns(path, parquet_file(path).schema_arrow.names)
                chunks += plan_parquet(path, sizes.chunk_rows, len(chunks))
                continue
            delim = self.spec.delimiter or ("\t" if path.suffix in (".tsv", ".txt") else ",")
            header = check_header(path, delim, [])
            self._check_columns(path, header)
            fields = tuple(header.index(c) for c in self.needed)
            self.dialects[str(path)] = Dialect(delim, len(header), fields, types=tuple(
                (header.index(c), pa.float64()) for c in self.needed if c in numeric))
            chunks += plan_text(path, sizes.text_bytes(path, True), True, len(chunks))
        return chunks

    def parse(self, chunk: Chunk) -> Block:
        if chunk.kind == "parquet":
            raw = read_parquet(chunk, self.needed)
        else:
            dialect = self.dialects[chunk.path]
            raw = read_text(chunk, dialect)
            if raw.typed and not typed_floats_exact(raw):
                raw = read_text(chunk, dialect, typed=False)
        at = {c: k for k, c in enumerate(self.needed)}
        label, ok = check_label(raw, at[self.label], table_style=True)
        nums = []
        for c in self.num_fields:
            v, good = numbers(raw, at[c], c)
            nums.append(v)
            ok &= good
        num = np.stack(nums, axis=1) if nums else np.zeros((len(label), 0))
        time = None
        if self.spec.time:
            t, good = numbers(raw, at[self.spec.time], self.spec.time, missing_ok=False)
            ok &= good
            time = np.nan_to_num(t).astype(np.int64)[ok]
        keep = keep_mask(ok)
        cats = [codes_of(raw.columns[at[c]]).take(keep) for c in self.cat_fields]
        return Block(cats, num[ok], label[ok], time, raw.positions, raw.problems)


# ----------------------------------------------------------------------------------------------
# movielens


def _year(title: str) -> str:
    """'Toy Story (1995)' -> '1995'."""
    title = title.rstrip()
    return title[-5:-1] if len(title) > 6 and title.endswith(")") and title[-5:-1].isdigit() else ""


class MovieLens:
    """MovieLens-1M: ratings.dat joined with users.dat and movies.dat (`::`-separated; titles
    in latin-1). label = rating >= threshold; with drop_neutral, ratings of threshold - 1 are
    left out (the common "drop 3" protocol). Time key: the rating's timestamp. users.dat and
    movies.dat are read once, in the driver (`plan`); their problems come first."""

    name = "movielens"
    has_time = True
    num_fields: list[str] = []
    cat_fields = ["user_id", "movie_id", "gender", "age", "occupation", "zip", "genre",
                  "genres", "year"]
    transforms = {"genre": "first of the pipe-separated genres", "year": "from the title"}
    ratings = Dialect("::", 4, (0, 1, 2, 3), "latin-1", types=((2, pa.float64()),
                                                                (3, pa.float64())))

    def __init__(self, threshold: int = 4, drop_neutral: bool = False):
        self.threshold, self.drop_neutral = threshold, drop_neutral
        self.users: dict[str, list[str]] = {}
        self.movies: dict[str, list[str]] = {}
        self.side_problems: list[tuple[str, ChunkProblems]] = []  # (path, problems) in order

    def _files(self, inputs: list[Path]) -> dict[str, Path]:
        files = {p.name.split(".")[0]: p for p in inputs}
        missing = [n for n in ("ratings", "users", "movies") if n not in files]
        if missing:
            raise ConvertError(f"--format movielens needs ratings.dat, users.dat and movies.dat; "
                               f"missing {', '.join(m + '.dat' for m in missing)}.")
        return files

    def _table(self, path: Path, width: int) -> dict[str, list[str]]:
        chunk = Chunk(0, str(path), "text", 0, path.stat().st_size, first_line=1)
        raw = read_text(chunk, Dialect("::", width, tuple(range(width)), "latin-1"))
        self.side_problems.append((str(path), raw.problems))
        rows = zip(*(c.cast(pa.string()).to_pylist() for c in raw.columns))
        return {parts[0]: list(parts[1:]) for parts in rows}

    def plan(self, paths: list[Path], sizes: Sizes) -> list[Chunk]:
        files = self._files(paths)
        self.side_problems = []
        self.users = self._table(files["users"], 5)
        self.movies = self._table(files["movies"], 3)
        return plan_text(files["ratings"], sizes.text_bytes(files["ratings"], False), False, 0)

    def parse(self, chunk: Chunk) -> Block:
        raw = read_text(chunk, self.ratings)
        if raw.typed and not typed_floats_exact(raw):
            raw = read_text(chunk, self.ratings, typed=False)
        rating, ok = numbers(raw, 2, "Rating", missing_ok=False)
        t, good = numbers(raw, 3, "Timestamp", missing_ok=False)
        ok &= good
        if self.drop_neutral:
            ok &= rating != self.threshold - 1
        keep = keep_mask(ok)
        user, users = per_value(raw.columns[0], lambda u: self.users.get(u, ["", "", "", ""]))
        movie, movies = per_value(raw.columns[1], lambda m: self.movies.get(m, ["", ""]))
        cats = [user, movie, *(derived_codes(user.indices, [u[i] for u in users])
                               for i in range(4)),
                derived_codes(movie.indices, [g.split("|")[0] for _, g in movies]),
                derived_codes(movie.indices, [g for _, g in movies]),
                derived_codes(movie.indices, [_year(title) for title, _ in movies])]
        label = (rating >= self.threshold).astype(np.float32)
        return Block([c.take(keep) for c in cats], np.zeros((int(ok.sum()), 0)), label[ok],
                     np.nan_to_num(t).astype(np.int64)[ok], raw.positions, raw.problems)


def make_format(name: str, spec: Path | None = None, criteo_ints: str = "categorical",
                threshold: int = 4, drop_neutral: bool = False):
    if name == "criteo":
        return Criteo(criteo_ints)
    if name == "avazu":
        return Avazu()
    if name == "movielens":
        return MovieLens(threshold, drop_neutral)
    if name == "table":
        if spec is None:
            raise ConvertError("--format table needs --field-spec YAML naming each column's role.")
        return Table(spec)
    raise ConvertError(f"--format {name!r}: not a known format (criteo, avazu, movielens, table).")
