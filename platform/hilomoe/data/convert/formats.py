"""Source formats: each turns its files into chunks of `Parsed` rows (strings per categorical
field, floats per numeric field, a 0/1 label, and a time key where the format has one).

    criteo  label, I1-I13 integers, C1-C26 hex strings; tab-separated, no header; empty = missing
    avazu   CSV with header: id, click, hour (YYMMDDHH), C1, banner_pos, site_*, app_*,
            device_*, C14-C21; hour becomes hour-of-day and weekday fields, id is dropped
    movielens  MovieLens-1M ratings.dat joined with users.dat and movies.dat ("::", latin-1)
    table   any CSV / TSV / Parquet with a header, described by a YAML field spec
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict

from hilomoe.config import parse_config
from hilomoe.data.convert.text import ConvertError, Problems, Rows, parse_float, read_delimited


@dataclass
class Parsed:
    cat: list[np.ndarray]  # per categorical field, (n,) strings; "" = missing
    num: np.ndarray  # (n, F_n) float64; NaN = missing
    label: np.ndarray  # (n,) float32, 0 or 1
    time: np.ndarray | None = None  # (n,) int64 sort key for time-based splits


def parse_label(values: np.ndarray, rows: Rows, problems: Problems) -> tuple[np.ndarray, np.ndarray]:
    ok = (values == "0") | (values == "1")
    for i in np.flatnonzero(~ok):
        problems.add(rows.where[i], f"label {values[i][:20]!r} is not 0 or 1")
    return (values == "1").astype(np.float32), ok


def _keep(parsed_parts: list[np.ndarray], ok: np.ndarray) -> list[np.ndarray]:
    return [p[ok] for p in parsed_parts]


# ----------------------------------------------------------------------------------------------
# criteo


def log_square_bucket(v: np.ndarray) -> np.ndarray:
    """The usual Criteo integer transform: v > 2 -> floor(log(v)^2), else v; as strings."""
    out = np.empty(len(v), dtype=object)
    missing = np.isnan(v)
    big = ~missing & (v > 2)
    small = ~missing & ~big
    out[missing] = ""
    out[big] = np.floor(np.log(v[big]) ** 2).astype(np.int64).astype(str)
    out[small] = v[small].astype(np.int64).astype(str)
    return out


class Criteo:
    name = "criteo"
    has_time = False

    def __init__(self, int_mode: Literal["categorical", "numeric"] = "categorical"):
        self.int_mode = int_mode
        ints = [f"I{i}" for i in range(1, 14)]
        cats = [f"C{i}" for i in range(1, 27)]
        self.cat_fields = (ints if int_mode == "categorical" else []) + cats
        self.num_fields = ints if int_mode == "numeric" else []
        self.transforms = ({f: "log1p, standardised" for f in ints} if int_mode == "numeric"
                           else {f: "floor(log(v)^2) if v > 2 else v" for f in ints})

    def read(self, inputs: list[Path], problems: Problems) -> Iterator[Parsed]:
        for path in inputs:
            for rows in read_delimited(path, "\t", 40, problems):
                cols = rows.columns
                label, ok = parse_label(cols[0], rows, problems)
                ints = []
                for j in range(13):
                    v, good = parse_float(cols[1 + j], rows, problems, f"I{j + 1}")
                    bad = good & ~np.isnan(v) & (v != np.round(v))
                    for i in np.flatnonzero(bad):
                        problems.add(rows.where[i], f"I{j + 1} is not an integer: {cols[1 + j][i]!r}")
                    ints.append(v)
                    ok &= good & ~bad
                cats = list(cols[14:40])
                if self.int_mode == "categorical":
                    cats = [log_square_bucket(v) for v in ints] + cats
                    num = np.zeros((len(label), 0))
                else:
                    num = np.log1p(np.maximum(np.stack(ints, axis=1), 0.0))
                yield Parsed(_keep(cats, ok), num[ok], label[ok])


# ----------------------------------------------------------------------------------------------
# avazu

AVAZU_COLUMNS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain",
                 "site_category", "app_id", "app_domain", "app_category", "device_id",
                 "device_ip", "device_model", "device_type", "device_conn_type", "C14", "C15",
                 "C16", "C17", "C18", "C19", "C20", "C21"]


class Avazu:
    name = "avazu"
    has_time = True
    num_fields: list[str] = []

    def __init__(self) -> None:
        self.cat_fields = ["hour_of_day", "weekday"] + AVAZU_COLUMNS[3:]
        self.transforms = {"hour_of_day": "HH of hour", "weekday": "weekday of YYMMDD"}

    def read(self, inputs: list[Path], problems: Problems) -> Iterator[Parsed]:
        for path in inputs:
            check_header(path, ",", AVAZU_COLUMNS)
            for rows in read_delimited(path, ",", len(AVAZU_COLUMNS), problems, header=True):
                cols = rows.columns
                label, ok = parse_label(cols[1], rows, problems)
                hour = cols[2]
                good = np.array([len(h) == 8 and h.isdigit() for h in hour])
                for i in np.flatnonzero(~good):
                    problems.add(rows.where[i], f"hour {hour[i][:20]!r} is not YYMMDDHH")
                ok &= good
                hour_of_day = np.array([h[6:8] for h in hour], dtype=object)
                weekday = np.array([_weekday(h) if g else "" for h, g in zip(hour, good)],
                                   dtype=object)
                time = np.array([int(h) if g else 0 for h, g in zip(hour, good)], dtype=np.int64)
                cats = [hour_of_day, weekday] + list(cols[3:])
                yield Parsed(_keep(cats, ok), np.zeros((ok.sum(), 0)), label[ok], time[ok])


def _weekday(h: str) -> str:
    try:
        return str(dt.date(2000 + int(h[:2]), int(h[2:4]), int(h[4:6])).weekday())
    except ValueError:
        return ""


def check_header(path: Path, delimiter: str, expected: list[str]) -> list[str]:
    if not path.is_file():
        raise ConvertError(f"{path}: no such input file.")
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    got = first.split(delimiter)
    if expected and got != expected:
        raise ConvertError(f"{path}: header {first[:80]!r} is not the expected "
                           f"{delimiter.join(expected)[:80]!r}...")
    return got


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

    def _check_columns(self, path: Path, header: list[str]) -> None:
        unknown = [c for c in self.spec.columns if c not in header]
        if unknown:
            raise ConvertError(f"{self.spec_path}: columns: {', '.join(unknown)} not in "
                               f"{path} (its columns: {', '.join(header)[:200]}).")
        if self.spec.time and self.spec.time not in header:
            raise ConvertError(f"{self.spec_path}: time: {self.spec.time!r} not in {path}.")

    def read(self, inputs: list[Path], problems: Problems) -> Iterator[Parsed]:
        for path in inputs:
            if path.suffix == ".parquet":
                yield from self._read_parquet(path, problems)
                continue
            delim = self.spec.delimiter or ("\t" if path.suffix in (".tsv", ".txt") else ",")
            header = check_header(path, delim, [])
            self._check_columns(path, header)
            pos = {c: header.index(c) for c in header}
            for rows in read_delimited(path, delim, len(header), problems, header=True):
                yield self._parse(lambda c: rows.columns[pos[c]], rows, problems)

    def _read_parquet(self, path: Path, problems: Problems) -> Iterator[Parsed]:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise ConvertError(f"{path}: not a readable Parquet file ({err}).") from None
        self._check_columns(path, pf.schema_arrow.names)
        offset = 0
        for rb in pf.iter_batches(batch_size=100_000):
            n = rb.num_rows
            cols = {c: np.array(["" if v is None else str(v) for v in rb.column(c).to_pylist()],
                                dtype=object) for c in self.spec.columns}
            rows = Rows(list(cols.values()), [f"{path}:row {offset + i}" for i in range(n)])
            offset += n
            yield self._parse(cols.__getitem__, rows, problems)

    def _parse(self, col, rows: Rows, problems: Problems) -> Parsed:
        label_text = col(self.label)
        label_text = np.where(label_text == "1.0", "1", np.where(label_text == "0.0", "0",
                                                                  label_text))
        label, ok = parse_label(label_text.astype(object), rows, problems)
        nums = []
        for c in self.num_fields:
            v, good = parse_float(col(c), rows, problems, c)
            nums.append(v)
            ok &= good
        num = np.stack(nums, axis=1) if nums else np.zeros((len(label), 0))
        time = None
        if self.spec.time:
            t, good = parse_float(col(self.spec.time), rows, problems, self.spec.time,
                                  missing_ok=False)
            ok &= good
            time = np.nan_to_num(t).astype(np.int64)[ok]
        return Parsed(_keep([col(c) for c in self.cat_fields], ok), num[ok], label[ok], time)


# ----------------------------------------------------------------------------------------------
# movielens


class MovieLens:
    """MovieLens-1M: ratings.dat joined with users.dat and movies.dat (`::`-separated; titles
    in latin-1). label = rating >= threshold; with drop_neutral, ratings of threshold - 1 are
    left out (the common "drop 3" protocol). Time key: the rating's timestamp."""

    name = "movielens"
    has_time = True
    num_fields: list[str] = []
    cat_fields = ["user_id", "movie_id", "gender", "age", "occupation", "zip", "genre",
                  "genres", "year"]
    transforms = {"genre": "first of the pipe-separated genres", "year": "from the title"}

    def __init__(self, threshold: int = 4, drop_neutral: bool = False):
        self.threshold, self.drop_neutral = threshold, drop_neutral

    def _files(self, inputs: list[Path]) -> dict[str, Path]:
        files = {p.name.split(".")[0]: p for p in inputs}
        missing = [n for n in ("ratings", "users", "movies") if n not in files]
        if missing:
            raise ConvertError(f"--format movielens needs ratings.dat, users.dat and movies.dat; "
                               f"missing {', '.join(m + '.dat' for m in missing)}.")
        return files

    def _table(self, path: Path, width: int, problems: Problems) -> dict[str, list[str]]:
        out = {}
        for rows in read_delimited(path, "::", width, problems, encoding="latin-1"):
            for parts in zip(*rows.columns):
                out[parts[0]] = list(parts[1:])
        return out

    def read(self, inputs: list[Path], problems: Problems) -> Iterator[Parsed]:
        files = self._files(inputs)
        users = self._table(files["users"], 5, problems)
        movies = self._table(files["movies"], 3, problems)
        for rows in read_delimited(files["ratings"], "::", 4, problems, encoding="latin-1"):
            user, movie, rating_text, ts = rows.columns
            rating, ok = parse_float(rating_text, rows, problems, "Rating", missing_ok=False)
            t, good = parse_float(ts, rows, problems, "Timestamp", missing_ok=False)
            ok &= good
            if self.drop_neutral:
                ok &= rating != self.threshold - 1
            u = [users.get(x, ["", "", "", ""]) for x in user]
            m = [movies.get(x, ["", ""]) for x in movie]
            genres = np.array([g for _, g in m], dtype=object)
            cats = [user, movie,
                    *(np.array([row[i] for row in u], dtype=object) for i in range(4)),
                    np.array([g.split("|")[0] for g in genres], dtype=object), genres,
                    np.array([_year(title) for title, _ in m], dtype=object)]
            label = (rating >= self.threshold).astype(np.float32)
            yield Parsed(_keep(cats, ok), np.zeros((ok.sum(), 0)), label[ok],
                         np.nan_to_num(t).astype(np.int64)[ok])


def _year(title: str) -> str:
    """'Toy Story (1995)' -> '1995'."""
    title = title.rstrip()
    return title[-5:-1] if len(title) > 6 and title.endswith(")") and title[-5:-1].isdigit() else ""


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
