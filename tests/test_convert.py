"""Converters on small files written in the original layouts, quirks included.

The inputs and the golden outputs of the line-by-line converter this one replaced live in
tests/golden/convert/ (golden.py builds the inputs; its README says how the outputs were made):
every case must convert to the same dataset.json and the same shards, byte for byte.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from helpers import load_golden
from hilomoe.data.convert import ConvertError, ConvertOptions, convert
from hilomoe.data.criteo_tsv import write_criteo_tsv
from hilomoe.data.dataset import DatasetError, open_dataset
from hilomoe.data.readers import ParquetBatches

golden = load_golden()


def read_all(path):
    """Every row of every split: {split: (cat, num, label)}."""
    ds = open_dataset(path)
    out = {}
    for split in ("train", "valid", "test"):
        batches = list(ParquetBatches(ds, split, 100_000).epoch(0))
        if batches:
            out[split] = tuple(np.concatenate([getattr(b, k).numpy() for b in batches])
                               for k in ("cat", "num", "label"))
    return ds, out


def all_rows(splits):
    return tuple(np.concatenate([s[i] for s in splits.values()]) for i in range(3))


def same_rows(a, b) -> None:
    """Two datasets hold the same rows in the same order in every split."""
    _, rows_a = read_all(a)
    _, rows_b = read_all(b)
    assert rows_a.keys() == rows_b.keys()
    for split in rows_a:
        for x, y in zip(rows_a[split], rows_b[split]):
            np.testing.assert_array_equal(x, y)


# -- identical output -------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(golden.CASES))
def test_output_is_identical_to_the_line_by_line_converter(case, tmp_path):
    """dataset.json (but its input paths), every shard's rows and the content hash, or the
    error message: exactly what the converter at golden.COMMIT wrote for the same input."""
    assert golden.run_case(case, tmp_path, convert, ConvertOptions) == golden.load_golden(case)


def test_a_chunk_boundary_changes_the_writes_not_the_rows(tmp_path):
    """Cut into many chunks, an input gives the same rows in the same splits (one random draw
    per row, in order, whatever the chunks), the same vocabularies and the same problems,
    located on the same lines; only the content hash, which follows the writes, differs."""
    src = golden.write_criteo_planted(tmp_path / "p.txt", rows=2000)
    with open(src, "ab") as f:  # malformed rows far from the first chunk
        f.write(b"1\t2\t3\n" + "\t".join(["2"] + [""] * 39).encode() + b"\n")
    one = convert("criteo", [src], tmp_path / "one", ConvertOptions(seed=4))
    many = convert("criteo", [src], tmp_path / "many", ConvertOptions(seed=4),
                   chunk_bytes=20_000)
    assert one["chunks"] == 1 and many["chunks"] > 20
    assert many["content_hash"] != one["content_hash"]
    for key in ("fields", "rows_skipped", "skipped_examples"):
        assert many[key] == one[key]
    assert "p.txt:2001: 3 fields where 40" in one["skipped_examples"][0]
    same_rows(tmp_path / "one", tmp_path / "many")
    # chunk_rows cuts text at about that many rows (times the file's mean line length)
    rows = convert("criteo", [src], tmp_path / "rows", ConvertOptions(seed=4), chunk_rows=300)
    assert 5 <= rows["chunks"] <= 9
    same_rows(tmp_path / "one", tmp_path / "rows")


def test_line_numbers_count_the_header_and_blank_lines_across_chunks(tmp_path):
    lines = [golden.AVAZU_HEADER]
    for i in range(400):
        lines.append(f"{i},{i % 2},14102{1 + i // 200}{i % 24:02d},1005,0,a,b,c,d,e,f,g,h,i,1,2,"
                     f"3,4,5,6,7,8,9,10")
    lines[150] = ""  # blank lines count as lines
    lines[151] = "\r"
    lines[300] = lines[300].replace(",1410", ",x1410")  # line 301: a bad hour
    lines[350] = "1,2"  # line 351: wrong field count
    src = tmp_path / "train.csv"
    src.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    for chunk_bytes in (None, 700, 5000):
        res = convert("avazu", [src], tmp_path / f"out{chunk_bytes}",
                      ConvertOptions(min_count=1), chunk_bytes=chunk_bytes)
        # (in a chunk, structural problems come first: the order depends on the cuts)
        assert sorted(res["skipped_examples"]) == [f"{src}:301: hour 'x14102211' is not YYMMDDHH",
                                                   f"{src}:351: 2 fields where 24 are expected"]
        assert sum(s["rows"] for s in res["splits"].values()) == 396  # 2 blank, 2 malformed


def test_parquet_chunks_are_row_ranges_across_row_groups(tmp_path):
    args = golden.CASES["table_parquet_chunks"](tmp_path)
    res = convert(args["format"], args["inputs"], tmp_path / "out",
                  ConvertOptions(**args["options"]), field_spec=args["field_spec"],
                  chunk_rows=33_333)
    assert res["chunks"] == 7
    same = golden.load_golden("table_parquet_chunks")["meta"]
    assert {s: v["rows"] for s, v in res["splits"].items()} == \
        {s: v["rows"] for s, v in same["splits"].items()}


# -- the formats, field by field ----------------------------------------------------------------


def test_criteo_values_field_by_field(tmp_path):
    src = golden.write_criteo(tmp_path / "train.txt")
    res = convert("criteo", [src], tmp_path / "out", ConvertOptions(min_count=1, test_fraction=0.0,
                                                                   valid_fraction=0.0))
    assert res["rows_skipped"] == 0
    ds, splits = read_all(tmp_path / "out")
    cat, num, label = splits["train"]
    assert cat.shape == (3, 39) and num.shape == (3, 0)
    assert label.tolist() == [1.0, 0.0, 0.0]
    names = [f.name for f in ds.meta.fields]
    i1, i2, i3, c1, c2 = (names.index(n) for n in ("I1", "I2", "I3", "C1", "C2"))
    # I1: 5 -> floor(log(5)^2) = 2, 1 -> 1, 20 -> floor(log(20)^2) = 8: three distinct buckets
    assert math.floor(math.log(5) ** 2) == 2 and math.floor(math.log(20) ** 2) == 8
    assert len(set(cat[:, i1])) == 3 and 0 not in cat[:, i1]
    assert cat[0, i2] == 0 and cat[2, i2] == 0 and cat[1, i2] != 0  # empty -> the OOV id
    assert cat[0, i3] != 0  # -1 is a value of its own
    # C1: 68fd1e64 twice (the most frequent: id 1), fb936136 once
    assert cat[0, c1] == cat[1, c1] == 1 and cat[2, c1] == 2
    assert cat[0, c2] == 0  # missing
    vocab = {f.name: f.vocab_size for f in ds.meta.fields}
    assert vocab["C1"] == 3 and vocab["C2"] == 2  # 2 values (+ OOV) / 1 value (+ OOV)


def test_criteo_min_count_and_hashing_and_numeric_ints(tmp_path):
    src = golden.write_criteo(tmp_path / "train.txt")
    convert("criteo", [src], tmp_path / "mc", ConvertOptions(min_count=2))
    ds, splits = read_all(tmp_path / "mc")
    cat = all_rows(splits)[0]
    c1 = [f.name for f in ds.meta.fields].index("C1")
    assert sorted(cat[:, c1].tolist()) == [0, 1, 1]  # fb936136 seen once: OOV

    convert("criteo", [src], tmp_path / "h", ConvertOptions(hash_buckets=1000, seed=1))
    ds, splits = read_all(tmp_path / "h")
    cat = all_rows(splits)[0]
    assert all(f.vocab_size == 1000 for f in ds.meta.fields)
    assert cat.max() < 1000

    convert("criteo", [src], tmp_path / "n", ConvertOptions(criteo_ints="numeric", min_count=1))
    ds, splits = read_all(tmp_path / "n")
    assert ds.schema.numeric == 13 and len(ds.schema.vocab_sizes) == 26
    num = all_rows(splits)[1]
    assert np.allclose(num.mean(0)[:1], 0, atol=1e-6)  # standardised (I1 has no missing)


def test_malformed_rows_are_counted_located_and_skipped(tmp_path):
    src = golden.write_malformed_criteo(tmp_path / "train.txt")
    res = convert("criteo", [src], tmp_path / "out", ConvertOptions(min_count=1))
    assert res["rows_skipped"] == 4
    text = "\n".join(res["skipped_examples"])
    for fragment in ("train.txt:4: 3 fields where 40", "train.txt:5: I1 is not a number",
                     "train.txt:6: label '2'", "train.txt:7: bytes that are not utf-8"):
        assert fragment in text
    assert sum(s["rows"] for s in res["splits"].values()) == 3
    with pytest.raises(ConvertError, match="train.txt:4: .*--strict"):
        convert("criteo", [src], tmp_path / "strict", ConvertOptions(strict=True))
    assert not (tmp_path / "strict").exists()
    assert [p.name for p in tmp_path.iterdir()] == [src.name, "out"]  # no temporary left


def test_avazu_hour_fields_and_time_split(tmp_path):
    src = golden.write_avazu(tmp_path / "train.csv")
    res = convert("avazu", [src], tmp_path / "out", ConvertOptions(min_count=1, split="time"))
    ds, splits = read_all(tmp_path / "out")
    names = [f.name for f in ds.meta.fields]
    assert names[:3] == ["hour_of_day", "weekday", "C1"] and "id" not in names
    assert res["splits"]["train"]["rows"] + res["splits"]["valid"]["rows"] + \
        res["splits"]["test"]["rows"] == 100
    # 2014-10-21 is a Tuesday (weekday 1), 2014-10-23 a Thursday: by time, the test split holds
    # only the last day's rows
    wd = names.index("weekday")
    vocab = {}
    for split, (cat, _, _) in splits.items():
        vocab[split] = set(cat[:, wd].tolist())
    assert vocab["test"].isdisjoint(vocab["train"])
    with pytest.raises(ConvertError, match="header"):
        bad = tmp_path / "bad.csv"
        bad.write_text("click,hour\n1,14102100\n")
        convert("avazu", [bad], tmp_path / "bad")


def test_table_csv_and_parquet_with_field_spec(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv, spec = golden.write_table(tmp_path)
    res = convert("table", [csv], tmp_path / "out", ConvertOptions(min_count=1), field_spec=spec)
    assert res["rows_skipped"] == 1 and "price is not a number" in res["skipped_examples"][0]
    ds, splits = read_all(tmp_path / "out")
    cat, num, label = all_rows(splits)
    assert [f.name for f in ds.meta.fields] == ["user", "item", "price"]
    assert sorted(label.tolist()) == [0.0, 1.0, 1.0]
    assert sorted(np.round(num[:, 0], 4).tolist()) == [-1.0, 0.0, 1.0]  # (2, 4, missing) -> z

    pq.write_table(pa.table({"label": [1, 0], "user": ["u1", "u2"], "item": ["a", "b"],
                             "price": [1.0, 3.0], "note": ["", ""]}), tmp_path / "t.parquet")
    convert("table", [tmp_path / "t.parquet"], tmp_path / "pq", ConvertOptions(min_count=1),
            field_spec=spec)
    assert sum(s.rows for s in open_dataset(tmp_path / "pq").meta.splits.values()) == 2

    spec.write_text("columns:\n  label: label\n  usr: categorical\n")
    with pytest.raises(ConvertError, match="spec.yaml: columns: usr not in"):
        convert("table", [csv], tmp_path / "bad", field_spec=spec)
    with pytest.raises(ConvertError, match="no such input file"):
        convert("criteo", [tmp_path / "missing.txt"], tmp_path / "m")


def test_movielens_join_labels_latin1_and_time_split(tmp_path):
    inputs = golden.write_movielens(tmp_path)
    ratings = inputs[0].read_text().splitlines()
    res = convert("movielens", inputs, tmp_path / "out", ConvertOptions(min_count=1, split="time"))
    assert res["rows_skipped"] == 0
    ds, splits = read_all(tmp_path / "out")
    names = [f.name for f in ds.meta.fields]
    cat, _, label = all_rows(splits)
    assert len(label) == 50
    assert label.sum() == sum(1 for r in ratings if int(r.split("::")[2]) >= 4)
    vocab = {f.name: f.vocab_size for f in ds.meta.fields}
    assert vocab["gender"] == 3 and vocab["year"] == 2 and vocab["genre"] == 3
    assert res["splits"]["test"]["rows"] == 5  # the last 10% by timestamp
    dropped = convert("movielens", inputs, tmp_path / "drop",
                      ConvertOptions(min_count=1, drop_neutral=True))
    assert sum(s["rows"] for s in dropped["splits"].values()) == 40  # the 3s are gone
    assert "genres" in names
    with pytest.raises(ConvertError, match="missing users.dat"):
        convert("movielens", [inputs[0], inputs[2]], tmp_path / "bad")


def _criteo_row(label: str = "1", **fields: str) -> str:
    """A well-formed Criteo line (integers 4, ids 00000001) with `fields` replaced: I1="x"
    sets the first integer, C3="" the third id."""
    row = {"label": label, **{f"I{i}": "4" for i in range(1, 14)},
           **{f"C{i}": "00000001" for i in range(1, 27)}}
    row.update(fields)
    return "\t".join(row.values())


def _append(path: Path, lines: list[str]) -> None:
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def test_a_row_with_many_problems_counts_once_and_lists_them_together(tmp_path):
    """rows_skipped counts rows: 6 malformed rows, one with text in all 13 integer fields and
    one with a bad label and a bad integer, are 6 (not 19 problems); each example names every
    problem of its row."""
    src = golden.write_criteo_planted(tmp_path / "day.txt", rows=200)
    _append(src, ["1\t2\t3",  # line 201: a wrong field count
                  _criteo_row("2"),  # 202: a bad label
                  _criteo_row("x", I2="y"),  # 203: a bad label and a bad integer
                  _criteo_row(**{f"I{i}": "x" for i in range(1, 14)}),  # 204: 13 bad integers
                  _criteo_row(I4="1.5"),  # 205: not an integer
                  _criteo_row(I5="abc")])  # 206: not a number
    for chunk_bytes in (None, 3000):
        res = convert("criteo", [src], tmp_path / f"out{chunk_bytes}",
                      ConvertOptions(min_count=1), chunk_bytes=chunk_bytes)
        assert res["rows_skipped"] == 6
        assert res["extra"]["rows_skipped"] == 6
        assert sum(s["rows"] for s in res["splits"].values()) == 200
        examples = {e.split(": ", 1)[0].rsplit(":", 1)[1]: e.split(": ", 1)[1]
                    for e in res["skipped_examples"]}
        assert examples["203"] == "label 'x' is not 0 or 1; I2 is not a number: 'y'"
        assert examples["204"] == "; ".join(f"I{i} is not a number: 'x'" for i in range(1, 14))
        assert examples["201"] == "3 fields where 40 are expected"
        assert len(res["skipped_examples"]) == 5


def test_non_finite_numbers_are_malformed_rows(tmp_path):
    """inf, 1e400 (read as inf) and nan are no numbers: their rows are counted as malformed
    like other unreadable integers, and neither the buckets nor the standardised numerics see
    an infinity (one inf used to turn a whole numeric column into inf / NaN)."""
    src = golden.write_criteo_planted(tmp_path / "day.txt", rows=300)
    _append(src, [_criteo_row(I5="inf"), _criteo_row(I3="1e400"), _criteo_row(I7="nan"),
                  _criteo_row(I1="-inf"), _criteo_row(I2="NaN")])
    for mode in ("categorical", "numeric"):
        res = convert("criteo", [src], tmp_path / mode,
                      ConvertOptions(min_count=1, criteo_ints=mode))
        assert res["rows_skipped"] == 5, mode
        text = "\n".join(res["skipped_examples"])
        for line, fragment in ((301, "I5 is not a finite number: 'inf'"),
                               (302, "I3 is not a finite number: '1e400'"),
                               (303, "I7 is not a finite number: 'nan'"),
                               (304, "I1 is not a finite number: '-inf'"),
                               (305, "I2 is not a finite number: 'NaN'")):
            assert f"day.txt:{line}: {fragment}" in text
        assert sum(s["rows"] for s in res["splits"].values()) == 300
    _, splits = read_all(tmp_path / "numeric")
    num = all_rows(splits)[1]
    assert num.shape == (300, 13) and np.isfinite(num).all()
    assert np.allclose(num.mean(0), 0.0, atol=1e-4)  # standardised over the 300 good rows

    # the table format's numeric columns, from text and from Parquet floats, alike
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv, spec = golden.write_table(tmp_path)
    _append(csv, ["1,u1,i1,inf,a", "0,u2,i2,-1e400,b", "1,u3,i1,nan,c"])
    res = convert("table", [csv], tmp_path / "table", ConvertOptions(min_count=1),
                  field_spec=spec)
    assert res["rows_skipped"] == 4  # "oops", then the three non-finite prices
    assert f"{csv}:7: price is not a finite number: '-1e400'" in res["skipped_examples"]
    pq.write_table(pa.table({"label": [1, 0, 1], "user": ["u1", "u2", "u3"],
                             "item": ["a", "b", "c"], "price": [1.0, float("inf"), 2.0],
                             "note": ["", "", ""]}), tmp_path / "t.parquet")
    res = convert("table", [tmp_path / "t.parquet"], tmp_path / "pq",
                  ConvertOptions(min_count=1), field_spec=spec)
    assert res["skipped_examples"] == [f"{tmp_path / 't.parquet'}:row 1: price is not a "
                                       f"finite number: 'inf'"]


# -- bounded vocabularies ------------------------------------------------------------------------


def _counted(path: Path, field: int) -> dict[str, int]:
    """Exact counts of one categorical column of a Criteo TSV (column 14 + field)."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        v = line.split("\t")[14 + field]
        if v:
            counts[v] = counts.get(v, 0) + 1
    return counts


def test_max_vocab_keeps_the_most_frequent_values_in_bounded_tables(tmp_path):
    src = write_criteo_tsv(tmp_path / "day.tsv", rows=6000, ids_per_field=3000, seed=2)
    exact = convert("criteo", [src], tmp_path / "exact", ConvertOptions(min_count=1, seed=1))
    n = 40
    opts = ConvertOptions(min_count=1, seed=1, max_vocab=n)
    # small chunks: many merges, and the count tables (capacity 4n) are pruned many times
    res = convert("criteo", [src], tmp_path / "top", opts, chunk_bytes=20_000)
    assert res["chunks"] > 50 and res["extra"]["max_vocab"] == n
    assert all(f["vocab_size"] == n + 1 for f in res["fields"][13:])
    errors = res["extra"]["vocab_count_error"]
    assert errors["C1"] > 0  # pruned: the counts of the tail are approximate ...
    assert errors["I1"] == 0  # ... but a field with few values is never pruned
    _, top = read_all(tmp_path / "top")
    _, full = read_all(tmp_path / "exact")
    for field in range(26):
        counts = _counted(src, field)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        col = 13 + field
        # heavy hitters, far above the error bound, keep their exact ids (their rank): rows
        # whose value is one of the top ten have the same id as without the bound
        heavy = ranked[9][1] > ranked[n][1] + errors[f"C{field + 1}"]
        if heavy:
            for split in full:
                exact_ids, top_ids = full[split][0][:, col], top[split][0][:, col]
                hit = (exact_ids >= 1) & (exact_ids <= 10)
                np.testing.assert_array_equal(top_ids[hit], exact_ids[hit])
        for split in top:
            assert top[split][0][:, col].max() <= n
    # deterministic: the same prunes at the same points
    again = convert("criteo", [src], tmp_path / "again", opts, chunk_bytes=20_000)
    assert again["content_hash"] == res["content_hash"]
    with pytest.raises(ConvertError, match="--max-vocab must be at least 1"):
        convert("criteo", [src], tmp_path / "bad", ConvertOptions(max_vocab=0))


def test_max_vocab_without_pruning_equals_the_exact_top_n(tmp_path):
    src = write_criteo_tsv(tmp_path / "day.tsv", rows=3000, ids_per_field=50, seed=5)
    res = convert("criteo", [src], tmp_path / "top", ConvertOptions(max_vocab=20, min_count=1))
    assert all(e == 0 for e in res["extra"]["vocab_count_error"].values())
    full = convert("criteo", [src], tmp_path / "full", ConvertOptions(min_count=1))
    _, top = read_all(tmp_path / "top")
    _, exact = read_all(tmp_path / "full")
    for split in exact:
        ids = exact[split][0][:, 13:]
        np.testing.assert_array_equal(top[split][0][:, 13:], np.where(ids <= 20, ids, 0))
    assert "max_vocab" not in full["extra"]


@pytest.mark.parametrize("max_vocab", [None, 3])
def test_count_tables_of_8_byte_ids_count_like_tables_of_bytes(max_vocab, tmp_path,
                                                                monkeypatch):
    """A field whose values are 8 bytes long (or empty) is counted in int64 keys until a value
    of another length arrives: the counts, prunes, error bound and vocabulary are those of the
    byte table, and the positions written for pass 2 name each chunk's values."""
    import pyarrow as pa

    from hilomoe.data.convert import vocab
    from hilomoe.data.convert.vocab import Encoder, FieldCounts, PositionFiles

    monkeypatch.setattr(vocab, "MERGE_ENTRIES", 16)  # merges every few chunks
    rng = np.random.default_rng(4)
    ids = [b"%08x" % i for i in range(40)]
    reports = []
    for chunk in range(30):
        pool = ids + [b""] + ([b"short", b"ninebytes"] if chunk >= 20 else [])  # bytes from 20
        values = list(rng.choice(np.array(pool, dtype=object), 12, replace=False))
        reports.append((pa.array(values, pa.binary()), rng.integers(1, 9, len(values))))
    tables = []
    for keyed in (True, False):
        where = tmp_path / str(keyed)
        where.mkdir()
        counts = FieldCounts(0, max_vocab, PositionFiles(where))
        if not keyed:
            counts._keyed = None  # bytes from the start, as for any other field
        for chunk, (values, n) in enumerate(reports):
            counts.add(chunk, values, n, None, len(values))
            if chunk == 19:
                assert (counts._keyed is not None) == keyed
        values, n = counts.result()
        assert counts._keyed is None  # the first value of another length: bytes
        encoder = Encoder.from_counts(counts, 1, max_vocab)
        tables.append((dict(zip(values.to_pylist(), n.tolist())), counts.error,
                       counts.peak_entries, encoder.vocab.to_pylist()))
        if counts.positional:  # no prune: every chunk's positions were written
            for chunk, (v, _) in enumerate(reports):
                at = PositionFiles(where).get(chunk, 0)
                assert values.take(pa.array(at)).to_pylist() == v.to_pylist()
    assert tables[0] == tables[1]
    assert (tables[0][1] > 0) == (max_vocab is not None)


def _distinct_csv(path: Path, rows: int) -> Path:
    """A CSV of `rows` rows whose two categorical columns hold a distinct value in every row
    (the worst case for a count table): label,a,b with a = "a<i>", b = "b<i * 7919 mod rows>"."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    i = np.arange(rows, dtype=np.int64)
    a = pc.binary_join_element_wise("a", pc.cast(pa.array(i), pa.string()), "")
    b = pc.binary_join_element_wise("b", pc.cast(pa.array(i * 7919 % rows), pa.string()), "")
    with open(path, "wb") as f:
        f.write(b"label,a,b\n")
        pacsv.write_csv(pa.table({"label": pa.array(i % 3 == 0).cast(pa.int8()), "a": a, "b": b}),
                        f, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    return path


_MEASURE = """
import json, sys
import pyarrow as pa
from hilomoe.data.convert import ConvertOptions, convert
src, spec, out, max_vocab, chunk_bytes = sys.argv[1:]
res = convert("table", [src], out, ConvertOptions(min_count=1, max_vocab=int(max_vocab)),
              field_spec=spec, chunk_bytes=int(chunk_bytes))
print(json.dumps({"arrow_peak_bytes": pa.default_memory_pool().max_memory(), **{
    k: res[k] for k in ("peak_rss_mb", "count_table_peak_entries", "rows_skipped", "fields")}}))
"""


@pytest.mark.slow
def test_max_vocab_bounds_the_count_tables_on_two_million_distinct_values(tmp_path,
                                                                          record_property):
    """2 million distinct values in each of two fields, counted with --max-vocab N in 1 MiB
    chunks (in a fresh process, so its memory is the conversion's): a count table never holds
    more than 8N + one chunk's values (the README's bound), and Arrow's peak allocation stays
    below what the fields' distinct values alone take (an exact count holds them all)."""
    import subprocess
    import sys

    rows, n, chunk_bytes = 2_000_000, 1000, 1 << 20
    src = _distinct_csv(tmp_path / "wide.csv", rows)
    spec = tmp_path / "spec.yaml"
    spec.write_text("columns:\n  label: label\n  a: categorical\n  b: categorical\n")
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(spec),
                           str(tmp_path / "out"), str(n), str(chunk_bytes)],
                          capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    record_property("peak_rss_mb", res["peak_rss_mb"])
    record_property("arrow_peak_mb", res["arrow_peak_bytes"] / 2**20)
    print(f"2M distinct values x 2 fields, --max-vocab {n}: peak RSS {res['peak_rss_mb']:.0f} MB,"
          f" Arrow peak {res['arrow_peak_bytes'] / 2**20:.1f} MB, count tables "
          f"{res['count_table_peak_entries']}")
    assert res["rows_skipped"] == 0
    assert [f["vocab_size"] for f in res["fields"]] == [n + 1, n + 1]
    one_chunk = chunk_bytes // len("0,a0,b0\n")  # a chunk's rows, at most
    for field, peak in res["count_table_peak_entries"].items():
        assert 2 * n < peak <= 8 * n + one_chunk < rows // 10, field
    # the values' bytes and 4-byte offsets: what the tables would hold without the bound
    distinct_bytes = 2 * (sum(len(str(i)) + 1 for i in range(rows)) + 4 * rows)
    assert res["arrow_peak_bytes"] < distinct_bytes


# -- the planted TSV ----------------------------------------------------------------------------


def test_planted_criteo_tsv_has_the_criteo_layout(tmp_path):
    path = write_criteo_tsv(tmp_path / "day_0", rows=5000, ids_per_field=200, seed=3)
    assert path.read_bytes() == write_criteo_tsv(tmp_path / "again", 5000, 200, seed=3).read_bytes()
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    assert len(rows) == 5000 and {len(r) for r in rows} == {40}
    cols = list(zip(*rows))
    assert set(cols[0]) == {"0", "1"}
    ints = [v for c in cols[1:14] for v in c]
    assert "" in ints and any(v.startswith("-") for v in ints)
    assert all(v == "" or v.lstrip("-").isdigit() for v in ints)
    for c in cols[14:]:
        values = set(c) - {""}
        assert len(values) <= 200 and all(len(v) == 8 and int(v, 16) >= 0 for v in values)
    assert "" in cols[14 + 18]  # C19 is often empty, as in Criteo
    c1 = _counted(path, 0)  # Zipf: the most frequent id is far above the median one
    assert max(c1.values()) > 20 * sorted(c1.values())[len(c1) // 2]
    res = convert("criteo", [path], tmp_path / "out", ConvertOptions())
    assert res["rows_skipped"] == 0


# -- Ray -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_output_equals_the_single_process_output(ray_local, tmp_path, monkeypatch):
    """The same output from Ray tasks as from the single process, given a path relative to
    the driver's directory (a Ray worker runs elsewhere: it failed to open it before)."""
    write_criteo_tsv(tmp_path / "day.tsv", rows=20_000, ids_per_field=2000, seed=1)
    monkeypatch.chdir(tmp_path)
    src = "day.tsv"
    with open(src, "ab") as f:  # problems in a late chunk
        f.write(b"1\t2\n" + "\t".join(["0", "x"] + [""] * 38).encode() + b"\n")
    for name, options in [("vocab", ConvertOptions(seed=3)),
                          ("numeric", ConvertOptions(criteo_ints="numeric", max_vocab=300)),
                          ("hashed", ConvertOptions(hash_buckets=5000))]:
        local = convert("criteo", [src], tmp_path / f"{name}-local", options,
                        chunk_bytes=400_000)
        options.ray = True
        distributed = convert("criteo", [src], tmp_path / f"{name}-ray", options,
                              chunk_bytes=400_000)
        assert local["chunks"] > 5 and distributed["ray"] and not local["ray"]
        for key in ("content_hash", "splits", "fields", "rows_skipped", "skipped_examples",
                    "extra"):
            assert distributed[key] == local[key], key
        assert distributed["skipped_examples"][0].endswith(":20001: 2 fields where 40 are "
                                                           "expected")


def test_an_input_a_worker_cannot_read_is_one_sentence(tmp_path):
    from hilomoe.data.convert.chunks import Chunk, read_chunk_bytes
    from hilomoe.data.convert.text import ConvertError

    gone = tmp_path / "gone.tsv"
    with pytest.raises(ConvertError, match=r"gone\.tsv: cannot be read here \(No such file or "
                       r"directory\); on Ray, every node must see the input files at the same "
                       r"path\.$"):
        read_chunk_bytes(Chunk(0, str(gone), "text", 0, 10))


# -- interruption --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_converter_killed_halfway_leaves_no_dataset(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    src = write_criteo_tsv(tmp_path / "train.txt", rows=400_000, ids_per_field=10_000)
    out = tmp_path / "criteo"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # this process's threads
    proc = subprocess.Popen([sys.executable, "-m", "hilomoe", "data", "convert", "--format",
                             "criteo", "--input", str(src), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    # evidence that the conversion is underway: the writer's temporary directory and the parsed
    # chunks of pass 1 exist; then freeze the process, so nothing can race the checks
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if list(tmp_path.glob(".criteo.tmp-*")) and list(tmp_path.glob(".criteo.cache-*/*")):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert proc.poll() is None, "the conversion finished before it could be interrupted"
        assert not out.exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()  # nothing at the target path, let alone something complete
    with pytest.raises(DatasetError, match="no such dataset directory"):
        open_dataset(out)


@pytest.mark.slow
def test_bench_convert_reports_rows_per_second_and_memory(tmp_path):
    from hilomoe.bench.convert import run

    res = run(rows=20_000, ids_per_field=1000, workdir=tmp_path)
    assert res["rows"] == 20_000 and res["ids_per_field"] == 1000
    for key in ("convert_rows_per_s", "convert_peak_rss_mb", "pyarrow_csv_rows_per_s",
                "convert_seconds"):
        assert res[key] > 0, key
    assert json.loads(json.dumps(res)) == res
