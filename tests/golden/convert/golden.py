"""Golden outputs of `hilomoe data convert`: the inputs, how a conversion is summarised, and the
script that regenerates the summaries from the converter at a given commit.

Every case builds small input files (the inputs of tests/test_convert.py, tests/test_cli.py and
the README's convert commands, frozen here, plus edge cases of each format) and converts them
with fixed options. Its summary is what must not change when the converter is rewritten:

    {"meta": dataset.json without extra.inputs (machine-specific paths),
     "shards": {split: [{"file": name, "rows": n, "sha256": hash of the decoded rows}]}}
    or {"error": the ConvertError message}                      (paths shown as <dir>)

Regenerate (from the repository root; it reads the converter at COMMIT with `git show`, so the
golden files stay the reference whatever the working tree holds):

    python tests/golden/convert/golden.py                 # every case, at COMMIT
    python tests/golden/convert/golden.py --commit HEAD criteo_values
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
COMMIT = "477da6f5a67a658dbc32bba99661198193597f95"  # the converter before the pyarrow rewrite
# cases whose output changed on purpose since COMMIT, and the converter that made each one:
# issue 15 made a number that is not finite (inf, 1e400, nan) a malformed row and counts a row
# with several problems once, its example naming them all
CASE_COMMITS = {name: "5a13d5726191b4d282a427b9548e4646f8331fa7" for name in (
    "criteo_edges", "criteo_edges_numeric", "criteo_edges_hash", "criteo_edges_stray",
    "criteo_two_files", "avazu_edges", "avazu_edges_time", "avazu_edges_hash",
    "table_edges_time", "table_edges_random", "table_parquet_types",
    "table_parquet_types_hash")}

# -- inputs ---------------------------------------------------------------------------------------

CRITEO_ROWS = [
    # label, I1..I13, C1..C26
    ["1", "5", "", "-1", "0", "300"] + [""] * 8 + ["68fd1e64", ""] + ["a1"] * 24,
    ["0", "1", "2", "3", "", ""] + ["7"] * 8 + ["68fd1e64", "80e26c9b"] + ["a2"] * 24,
    ["0", "20", "", "", "", ""] + [""] * 8 + ["fb936136", "80e26c9b"] + ["a1"] * 24,
]


def write_criteo(path: Path, extra_lines=()) -> Path:
    lines = ["\t".join(r) for r in CRITEO_ROWS] + list(extra_lines)
    path.write_bytes(("\n".join(lines) + "\n").encode())
    return path


def write_malformed_criteo(path: Path) -> Path:
    """CRITEO_ROWS, then one malformed row of each kind on lines 4-7."""
    write_criteo(path, extra_lines=[
        "1\t2\t3",  # line 4: wrong field count
        "\t".join(["1", "x"] + [""] * 38),  # line 5: text in a numeric field
        "\t".join(["2"] + [""] * 39),  # line 6: label other than 0/1
    ])
    with open(path, "ab") as f:
        f.write(b"1" + b"\t" * 39 + b"\xff\xfe\n")  # line 7: undecodable bytes
    return path


AVAZU_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,"
                "app_category,device_id,device_ip,device_model,device_type,device_conn_type,C14,"
                "C15,C16,C17,C18,C19,C20,C21")


def write_avazu(path: Path, rows: int = 100) -> Path:
    lines = [AVAZU_HEADER]
    for i in range(rows):
        day, hour = 21 + i // 40, i % 24
        lines.append(f"{10**18 + i},{i % 2},1410{day}{hour:02d},1005,0,1fbe01fe,f3845767,"
                     f"28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,ddd2926e,44956a24,1,2,"
                     f"15706,320,50,1722,0,35,-1,79")
    path.write_text("\n".join(lines) + "\n")
    return path


TABLE_SPEC = ("columns:\n  label: label\n  user: categorical\n  item: categorical\n"
              "  price: numeric\n  note: ignore\n")


def write_table(d: Path) -> tuple[Path, Path]:
    """frappe.csv (one row with text in its numeric field) and its field spec."""
    spec = d / "spec.yaml"
    spec.write_text(TABLE_SPEC)
    csv = d / "frappe.csv"
    csv.write_text("label,user,item,price,note\n1,u1,i1,2.0,x\n0,u2,i1,4.0,y\n1,u1,i2,,z\n"
                   "0,u3,i3,oops,w\n")
    return csv, spec


def write_movielens(d: Path) -> list[Path]:
    (d / "users.dat").write_bytes(b"1::F::1::10::48067\n2::M::56::16::70072\n")
    (d / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Café Society (1995)::Drama\n".encode("latin-1"))  # a latin-1 title
    ratings = [f"{1 + i % 2}::{1 + i % 3 // 2}::{1 + i % 5}::{978300760 + i}" for i in range(50)]
    (d / "ratings.dat").write_text("\n".join(ratings) + "\n")
    return [d / n for n in ("ratings.dat", "users.dat", "movies.dat")]


def _readme_inputs(d: Path) -> None:
    """The files tests/test_readme.py writes for the README's convert commands (frozen copy)."""
    criteo = ["1\t5\t\t-1\t0\t300" + "\t" * 8 + "\t68fd1e64\t" + "\ta1" * 24,
              "0\t1\t2\t3\t\t" + "\t7" * 8 + "\t68fd1e64\t80e26c9b" + "\ta2" * 24]
    (d / "train.txt").write_text("\n".join(criteo * 30) + "\n")
    rows = [f"{10**18 + i},{i % 2},1410{21 + i // 40}{i % 24:02d},1005,0,1fbe01fe,f3845767,"
            f"28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,ddd2926e,44956a24,1,2,15706,320,50,"
            f"1722,0,35,-1,79" for i in range(100)]
    (d / "train.csv").write_text("\n".join([AVAZU_HEADER, *rows]) + "\n")
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (d / "movies.dat").write_bytes("1::Toy Story (1995)::Animation|Comedy\n"
                                   "2::Café Society (1995)::Drama\n".encode("latin-1"))
    (d / "ratings.dat").write_text("\n".join(f"{1 + i % 2}::{1 + i % 3 // 2}::{1 + i % 5}::"
                                             f"{978300760 + i}" for i in range(60)) + "\n")
    (d / "frappe.yaml").write_text("columns:\n  label: label\n  user: categorical\n"
                                   "  item: categorical\n  price: numeric\n")
    (d / "frappe.csv").write_text("label,user,item,price\n" + "".join(
        f"{i % 2},u{i % 7},i{i % 5},{i / 10}\n" for i in range(80)))


def write_criteo_edges(path: Path, stray: bool = False) -> Path:
    """Criteo rows with the quirks a text reader meets: CRLF and CR-CR-LF line ends, blank
    lines, quotes, numbers Python reads but Arrow may not (or reads differently), non-integers,
    too many / too few fields, a row with two problems, UTF-8 and undecodable bytes, and no
    newline at the end. `stray` adds a CR inside a value and a byte-order mark at the start,
    which only a line-by-line reader splits like Python."""
    rng = np.random.default_rng(11)
    lines: list[bytes] = []
    for i in range(60):
        ints = [str(v) if rng.random() > 0.2 else "" for v in rng.integers(-3, 400, 13)]
        cats = [f"{v:08x}" if rng.random() > 0.15 else "" for v in rng.integers(0, 6, 26)]
        end = b"\r\n" if i % 3 == 0 else b"\n"
        lines.append("\t".join([str(i % 2), *ints, *cats]).encode() + end)
    good = ["1"] + ["4"] * 13 + ["00000001"] * 26

    def row(**at) -> bytes:
        r = list(good)
        for k, v in at.items():
            r[int(k[1:])] = v
        return "\t".join(r).encode() + b"\n"

    lines[5:5] = [b"\n", b"\r\n", b"\r\n"]  # blank lines (a lone CR line is blank too)
    lines += [
        row(c0="0", c15='a"b', c16='"quoted"'),  # quotes are plain characters
        row(c1="NA"), row(c2="1.5"), row(c3=" 7"), row(c4="+3"), row(c5="nan"),
        row(c6="1e2"), row(c7="007"), row(c8="-0"), row(c9="2.0"), row(c10="0x10"),
        row(c11="nan(1)"), row(c12="1_000"), row(c13="-inf"),
        b"\t".join([b"1"] * 41) + b"\n", b"\t".join([b"0"] * 39) + b"\n",
        b"\t" * 39 + b"\n",  # 40 empty fields: an empty label
        b"  \n",  # whitespace is not a blank line
        row(c0="x", c1="y"),  # two problems in one row
        row(c17="café", c18="naïve", c19="ÿ"),  # UTF-8
        "\t".join(good).encode()[:-8] + b"\xc3\x28\xa0\xa1zzzz\n",  # undecodable
        row(c2="3").rstrip(b"\n") + b"\r\r\n",  # CR CR LF
        row(c21="00000009").rstrip(b"\n"),  # no newline at the end
    ]
    if stray:
        lines.insert(8, row(c20="ab\rcd"))  # a carriage return inside a value
        lines.insert(0, b"\xef\xbb\xbf" + lines.pop(0))
    path.write_bytes(b"".join(lines))
    return path


def write_criteo_planted(path: Path, rows: int = 3000, seed: int = 0) -> Path:
    """Criteo-shaped rows: Zipf-distributed categorical values (many ties at the tail), integers
    with empties and negatives, labels from a coin."""
    rng = np.random.default_rng(seed)
    ints = rng.integers(-2, 1000, (rows, 13)).astype(str)
    ints[rng.random((rows, 13)) < 0.2] = ""
    ids = np.minimum(rng.zipf(1.3, (rows, 26)), 500)
    cats = np.char.mod("%08x", ids * 2654435761 % 2**32).astype(object)
    cats[rng.random((rows, 26)) < 0.1] = ""
    label = (rng.random(rows) < 0.3).astype(int).astype(str)
    table = np.column_stack([label, ints, cats])
    path.write_text("\n".join("\t".join(r) for r in table) + "\n")
    return path


def write_avazu_edges(path: Path) -> Path:
    rng = np.random.default_rng(5)
    lines = [AVAZU_HEADER]
    for i in range(90):
        day, hour = 21 + i // 30, int(rng.integers(0, 24))
        site = ["1fbe01fe", "85f751fd", "d6137915"][int(rng.integers(0, 3))]
        lines.append(f"{10**18 + i},{int(rng.integers(0, 2))},1410{day}{hour:02d},1005,"
                     f"{int(rng.integers(0, 3))},{site},f3845767,28905ebd,ecad2386,7801e8d9,"
                     f"07d7df22,a99f214a,{int(rng.integers(0, 9))},44956a24,1,2,15706,320,50,"
                     f"1722,0,35,{int(rng.integers(-1, 3))},79")
    bad = lines[1].split(",")

    def variant(**at) -> str:
        r = list(bad)
        for k, v in at.items():
            r[int(k[1:])] = v
        return ",".join(r)

    lines[10:10] = [""]  # a blank line
    lines += [variant(c2="1410210"), variant(c2="14102x00"), variant(c2="14133100"),
              variant(c2="１４１０２１００"), variant(c1="2"), variant(c1=""),
              variant(c5="a b"), variant(c2="1410221a", c1="x"), "1,2,3"]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return path


def write_table_edges(d: Path) -> tuple[list[Path], Path]:
    """Two TSV files with a time column, columns in another order than the spec's, labels as
    floats, numbers Python reads but Arrow may not, an empty and a non-numeric time."""
    spec = d / "spec.yaml"
    spec.write_text("columns:\n  label: label\n  user: categorical\n  item: categorical\n"
                    "  price: numeric\n  qty: numeric\n  note: ignore\ntime: ts\n")
    a = d / "a.tsv"
    rows = ["note\tts\titem\tlabel\tuser\tprice\tqty\textra"]
    for i in range(40):
        rows.append(f"n{i}\t{1000 + (i * 37) % 50}\ti{i % 6}\t{['1.0', '0.0', '1', '0'][i % 4]}"
                    f"\tu{(i * i) % 9}\t{i / 7:.3f}\t{i % 5}\tz")
    rows += ["x\t1050\ti1\tyes\tu1\t1\t1\tz", "x\t1051\ti1\t1\tu1\t1e3\t-0.5\tz",
             "x\t1052\ti1\t0\tu1\t\t \tz", "x\t1053\ti1\t1\tu1\tabc\t2\tz",
             "x\t\ti1\t1\tu1\t1\t1\tz", "x\tt9\ti1\t1\tu1\t1\t1\tz",
             "x\t1054\t\"i 1\"\t0\t\tnan\t 2\tz", "x\t1055\ti1\t1", ""]
    a.write_text("\n".join(rows) + "\n")
    b = d / "b.tsv"
    b.write_text("ts\tlabel\tuser\titem\tprice\tqty\tnote\n" + "".join(
        f"{990 + i}\t{i % 2}\tu{i % 4}\ti{i % 3}\t{i * 1.5}\t{-i}\tq\n" for i in range(25)))
    return [a, b], spec


def write_parquet_types(d: Path) -> tuple[Path, Path]:
    spec = d / "types.yaml"
    spec.write_text("columns:\n  label: label\n  user: categorical\n  item: categorical\n"
                    "  flag: categorical\n  score: categorical\n  price: numeric\n")
    pq.write_table(pa.table({
        "label": pa.array([1, 0, 1, 0, 1, None, 2, 0, 1, 1, 0, 0, 1, 0], pa.int64()),
        "user": pa.array(["u1", "u2", None, "u1", "", "u3", "u1", "u2", "u2", "u1", "u4", "u1",
                          "é", "u2"]),
        "item": pa.array([3, 1, 2, 3, None, 1, 1, 2, 3, 3, 7, 1, 2, 3], pa.int64()),
        "flag": pa.array([True, False, True, None, True, True, False, False, True, True,
                          False, True, True, False]),
        "score": pa.array([1.0, 2.5, 1.0, None, 0.1, 1e-5, 1.0, 2.5, 3.0, 1.0, 2.5, 1e20, 1.0,
                           float("nan")]),
        "price": pa.array([1.5, None, 2.0, float("nan"), 4.0, 1.0, 0.5, 2.0, 3.0, 1.0, 2.0,
                           5.0, 1.0, 2.5]),
    }), d / "types.parquet", row_group_size=5)
    return d / "types.parquet", spec


def write_movielens_edges(d: Path) -> list[Path]:
    (d / "users.dat").write_bytes(b"1::F::1::10::48067\n2::M::56::16::70072\n3::F::25\n"
                                  b"2::F::18::4::02139\n4::M::35::7::1234-5\n")
    (d / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Café Society (1995)::Drama\n"
        "3::Star Wars: Episode IV (1977)::Action|Sci-Fi\n"
        "4::No Year::Comedy\n5::Odd (19x5)::\n6::Bad:::Title (2000)::Drama|War\n"
        "7::Broken\n".encode("latin-1"))
    ratings = [f"{1 + i % 5}::{1 + i % 8}::{1 + i % 5}::{978300760 + (i * 7919) % 300}"
               for i in range(70)]
    ratings[20:20] = ["2::3::x::978300800", "2::3::4::", "9::9::5::978300801", "1::2::3",
                      "", "3::1::4.0::978300802", "4::6::5::978300803.5"]
    (d / "ratings.dat").write_text("\n".join(ratings) + "\n")
    return [d / n for n in ("ratings.dat", "users.dat", "movies.dat")]


# -- cases ----------------------------------------------------------------------------------------

CASES: dict[str, Callable[[Path], dict]] = {}  # name -> builds the inputs, returns convert() args


def case(fn: Callable[[Path], dict]) -> Callable[[Path], dict]:
    CASES[fn.__name__] = fn
    return fn


def _args(fmt: str, inputs, field_spec=None, **options) -> dict:
    return {"format": fmt, "inputs": inputs if isinstance(inputs, list) else [inputs],
            "field_spec": field_spec, "options": options}


# tests/test_convert.py

@case
def criteo_values(d):
    return _args("criteo", write_criteo(d / "train.txt"), min_count=1, valid_fraction=0.0,
                 test_fraction=0.0)


@case
def criteo_min_count(d):
    return _args("criteo", write_criteo(d / "train.txt"), min_count=2)


@case
def criteo_hash(d):
    return _args("criteo", write_criteo(d / "train.txt"), hash_buckets=1000, seed=1)


@case
def criteo_numeric(d):
    return _args("criteo", write_criteo(d / "train.txt"), criteo_ints="numeric", min_count=1)


@case
def criteo_malformed(d):
    return _args("criteo", write_malformed_criteo(d / "train.txt"), min_count=1)


@case
def criteo_malformed_strict(d):
    return _args("criteo", write_malformed_criteo(d / "train.txt"), strict=True)


@case
def avazu_time(d):
    return _args("avazu", write_avazu(d / "train.csv"), min_count=1, split="time")


@case
def avazu_bad_header(d):
    (d / "bad.csv").write_text("click,hour\n1,14102100\n")
    return _args("avazu", d / "bad.csv")


@case
def table_csv(d):
    return _args("table", *write_table(d), min_count=1)


@case
def table_parquet(d):
    _, spec = write_table(d)
    pq.write_table(pa.table({"label": [1, 0], "user": ["u1", "u2"], "item": ["a", "b"],
                             "price": [1.0, 3.0], "note": ["", ""]}), d / "t.parquet")
    return _args("table", d / "t.parquet", spec, min_count=1)


@case
def table_unknown_column(d):
    csv, spec = write_table(d)
    spec.write_text("columns:\n  label: label\n  usr: categorical\n")
    return _args("table", csv, spec)


@case
def missing_input(d):
    return _args("criteo", d / "missing.txt")


@case
def movielens_time(d):
    return _args("movielens", write_movielens(d), min_count=1, split="time")


@case
def movielens_drop_neutral(d):
    return _args("movielens", write_movielens(d), min_count=1, drop_neutral=True)


@case
def movielens_missing_file(d):
    ratings, _, movies = write_movielens(d)
    return _args("movielens", [ratings, movies])


# tests/test_cli.py

def _write_day0(d: Path) -> Path:
    good = "\t".join(["1"] + ["3"] * 13 + ["68fd1e64"] * 26)
    (d / "day_0").write_text("\n".join([good, good, "0\tbroken", good]) + "\n")
    return d / "day_0"


@case
def cli_day0(d):
    return _args("criteo", _write_day0(d), min_count=1)


@case
def cli_day0_strict(d):
    return _args("criteo", _write_day0(d), strict=True)


# the README's convert commands (tests/test_readme.py)

@case
def readme_criteo(d):
    _readme_inputs(d)
    return _args("criteo", d / "train.txt")


@case
def readme_avazu_time(d):
    _readme_inputs(d)
    return _args("avazu", d / "train.csv", split="time")


@case
def readme_movielens_time(d):
    _readme_inputs(d)
    return _args("movielens", [d / "ratings.dat", d / "users.dat", d / "movies.dat"],
                 split="time")


@case
def readme_frappe(d):
    _readme_inputs(d)
    return _args("table", d / "frappe.csv", d / "frappe.yaml")


@case
def readme_frappe_hashed(d):
    _readme_inputs(d)
    return _args("table", d / "frappe.csv", d / "frappe.yaml", hash_buckets=100000)


# edge cases of each format

@case
def criteo_edges(d):
    return _args("criteo", write_criteo_edges(d / "edges.txt"), min_count=1, seed=3,
                 valid_fraction=0.2, test_fraction=0.2)


@case
def criteo_edges_numeric(d):
    return _args("criteo", write_criteo_edges(d / "edges.txt"), criteo_ints="numeric")


@case
def criteo_edges_hash(d):
    return _args("criteo", write_criteo_edges(d / "edges.txt"), hash_buckets=50, seed=2)


@case
def criteo_edges_stray(d):
    return _args("criteo", write_criteo_edges(d / "edges.txt", stray=True), min_count=1)


@case
def criteo_edges_strict(d):
    return _args("criteo", write_criteo_edges(d / "edges.txt"), strict=True)


@case
def criteo_two_files(d):
    return _args("criteo", [write_malformed_criteo(d / "a.txt"),
                            write_criteo_edges(d / "b.txt")], seed=5)


@case
def criteo_planted(d):
    return _args("criteo", write_criteo_planted(d / "p.txt"))


@case
def criteo_planted_numeric(d):
    return _args("criteo", write_criteo_planted(d / "p.txt"), criteo_ints="numeric",
                 min_count=3, seed=9)


@case
def criteo_planted_hash(d):
    return _args("criteo", write_criteo_planted(d / "p.txt"), hash_buckets=97)


@case
def criteo_no_valid_rows(d):
    (d / "bad.txt").write_text("1\t2\n\n0\n")
    return _args("criteo", d / "bad.txt")


@case
def criteo_time_split(d):
    return _args("criteo", write_criteo(d / "t.txt"), split="time")


@case
def criteo_one_bucket(d):
    return _args("criteo", write_criteo(d / "t.txt"), hash_buckets=1)


@case
def avazu_edges(d):
    return _args("avazu", write_avazu_edges(d / "a.csv"), min_count=1)


@case
def avazu_edges_time(d):
    return _args("avazu", write_avazu_edges(d / "a.csv"), split="time", valid_fraction=0.3,
                 test_fraction=0.25)


@case
def avazu_edges_hash(d):
    return _args("avazu", write_avazu_edges(d / "a.csv"), hash_buckets=1000, seed=4)


@case
def table_edges_time(d):
    return _args("table", *write_table_edges(d), min_count=1, split="time")


@case
def table_edges_random(d):
    return _args("table", *write_table_edges(d), seed=8)


@case
def table_parquet_types(d):
    return _args("table", *write_parquet_types(d), min_count=1)


@case
def table_parquet_types_hash(d):
    return _args("table", *write_parquet_types(d), hash_buckets=31)


@case
def table_parquet_chunks(d):
    """A Parquet file of three of the old converter's 100,000-row chunks, row groups across."""
    rng = np.random.default_rng(3)
    n = 210_000
    pq.write_table(pa.table({
        "label": rng.integers(0, 2, n), "user": np.char.mod("u%d", rng.zipf(1.5, n) % 5000),
        "item": rng.integers(0, 300, n), "price": np.round(rng.normal(3, 1, n), 2)}),
        d / "big.parquet", row_group_size=70_001)
    (d / "big.yaml").write_text("columns:\n  label: label\n  user: categorical\n"
                                "  item: categorical\n  price: numeric\n")
    return _args("table", d / "big.parquet", d / "big.yaml", seed=6)


@case
def movielens_edges(d):
    return _args("movielens", write_movielens_edges(d), min_count=1, split="time")


@case
def movielens_edges_threshold(d):
    return _args("movielens", write_movielens_edges(d), rating_threshold=3, drop_neutral=True)


# -- summaries ------------------------------------------------------------------------------------


def shard_digest(path: Path) -> dict:
    """Rows and a sha256 of a shard's decoded rows (ids, numerics, labels as stored)."""
    table = pq.read_table(path)
    h = hashlib.sha256()
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        values = col.flatten() if pa.types.is_fixed_size_list(col.type) else col
        h.update(name.encode())
        h.update(np.asarray(values.to_numpy(zero_copy_only=False)).tobytes())
    return {"file": path.name, "rows": table.num_rows, "sha256": h.hexdigest()}


def summarize(out: Path, workdir: Path) -> dict:
    meta = json.loads((out / "dataset.json").read_text())
    meta["extra"].pop("inputs", None)
    text = json.dumps(meta).replace(str(workdir), "<dir>")
    meta = json.loads(text)
    shards = {split: [shard_digest(out / split / f) for f in info["files"]]
              for split, info in meta["splits"].items()}
    return {"meta": meta, "shards": shards}


def run_case(name: str, workdir: Path, convert, options_cls, **convert_kwargs) -> dict:
    """Build case `name`'s inputs in `workdir`, convert them with `convert` (today's or an
    earlier converter) and summarise the result."""
    from hilomoe.errors import HilomoeError

    args = CASES[name](workdir)
    out = workdir / "out"
    try:
        convert(args["format"], args["inputs"], out, options_cls(**args["options"]),
                field_spec=args["field_spec"], **convert_kwargs)
    except HilomoeError as err:
        return {"error": str(err).replace(str(workdir), "<dir>")}
    return summarize(out, workdir)


def load_golden(name: str) -> dict:
    return json.loads((HERE / f"{name}.json").read_text())


def converter_at(commit: str):
    """The `hilomoe.data.convert` package as it was at `commit`, imported under another name."""
    root = Path(tempfile.mkdtemp(prefix="golden-convert-"))
    pkg_name = "golden_convert_" + commit[:12].replace("-", "_")
    pkg = root / pkg_name
    pkg.mkdir()
    prefix = "platform/hilomoe/data/convert/"
    files = subprocess.check_output(["git", "ls-tree", "--name-only", commit, prefix],
                                    cwd=REPO, text=True).split()
    for f in files:
        src = subprocess.check_output(["git", "show", f"{commit}:{f}"], cwd=REPO, text=True)
        (pkg / Path(f).name).write_text(src.replace("hilomoe.data.convert", pkg_name))
    sys.path.insert(0, str(root))
    return importlib.import_module(pkg_name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="regenerate the golden conversion summaries")
    p.add_argument("cases", nargs="*", help="case names (default: all)")
    p.add_argument("--commit", default=None, help=f"converter to run (default {COMMIT[:12]}, "
                                                   f"or the case's in CASE_COMMITS)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "platform"))
    converters: dict[str, object] = {}
    for name in args.cases or list(CASES):
        commit = args.commit or CASE_COMMITS.get(name, COMMIT)
        if commit not in converters:
            converters[commit] = converter_at(commit)
        old = converters[commit]
        with tempfile.TemporaryDirectory() as d:
            summary = run_case(name, Path(d), old.convert, old.ConvertOptions)
        (HERE / f"{name}.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        print(name, summary.get("error") or summary["meta"]["content_hash"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
