"""Converters on small files written in the original layouts, quirks included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hilomoe.data.convert import ConvertError, ConvertOptions, convert
from hilomoe.data.dataset import DatasetError, open_dataset
from hilomoe.data.readers import ParquetBatches


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


CRITEO_ROWS = [
    # label, I1..I13, C1..C26
    ["1", "5", "", "-1", "0", "300"] + [""] * 8 + ["68fd1e64", ""] + ["a1"] * 24,
    ["0", "1", "2", "3", "", ""] + ["7"] * 8 + ["68fd1e64", "80e26c9b"] + ["a2"] * 24,
    ["0", "20", "", "", "", ""] + [""] * 8 + ["fb936136", "80e26c9b"] + ["a1"] * 24,
]


def write_criteo(path, extra_lines=()):
    lines = ["\t".join(r) for r in CRITEO_ROWS] + list(extra_lines)
    path.write_bytes(("\n".join(lines) + "\n").encode())
    return path


def test_criteo_values_field_by_field(tmp_path):
    src = write_criteo(tmp_path / "train.txt")
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
    src = write_criteo(tmp_path / "train.txt")
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
    src = write_criteo(tmp_path / "train.txt", extra_lines=[
        "1\t2\t3",  # line 4: wrong field count
        "\t".join(["1", "x"] + [""] * 38),  # line 5: text in a numeric field
        "\t".join(["2"] + [""] * 39),  # line 6: label other than 0/1
    ])
    with open(src, "ab") as f:
        f.write(b"1" + b"\t" * 39 + b"\xff\xfe\n")  # line 7: undecodable bytes
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


AVAZU_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,"
                "app_category,device_id,device_ip,device_model,device_type,device_conn_type,C14,"
                "C15,C16,C17,C18,C19,C20,C21")


def test_avazu_hour_fields_and_time_split(tmp_path):
    lines = [AVAZU_HEADER]
    for i in range(100):
        day, hour = 21 + i // 40, i % 24
        lines.append(f"{10**18 + i},{i % 2},1410{day}{hour:02d},1005,0,1fbe01fe,f3845767,"
                     f"28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,ddd2926e,44956a24,1,2,"
                     f"15706,320,50,1722,0,35,-1,79")
    src = tmp_path / "train.csv"
    src.write_text("\n".join(lines) + "\n")
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

    spec = tmp_path / "spec.yaml"
    spec.write_text("columns:\n  label: label\n  user: categorical\n  item: categorical\n"
                    "  price: numeric\n  note: ignore\n")
    csv = tmp_path / "frappe.csv"
    csv.write_text("label,user,item,price,note\n1,u1,i1,2.0,x\n0,u2,i1,4.0,y\n1,u1,i2,,z\n"
                   "0,u3,i3,oops,w\n")
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
    (tmp_path / "users.dat").write_bytes(b"1::F::1::10::48067\n2::M::56::16::70072\n")
    (tmp_path / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Café Society (1995)::Drama\n".encode("latin-1"))  # a latin-1 title
    ratings = [f"{1 + i % 2}::{1 + i % 3 // 2}::{1 + i % 5}::{978300760 + i}" for i in range(50)]
    (tmp_path / "ratings.dat").write_text("\n".join(ratings) + "\n")
    inputs = [tmp_path / n for n in ("ratings.dat", "users.dat", "movies.dat")]
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


@pytest.mark.slow
def test_a_converter_killed_halfway_leaves_no_dataset(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(0)
    n = 400_000
    ints = rng.integers(0, 50, (n, 13)).astype(str)
    cats = np.char.add("c", rng.integers(0, 1000, (n, 26)).astype(str))
    lines = ["\t".join(row) for row in np.column_stack([rng.integers(0, 2, n).astype(str),
                                                        ints, cats])]
    src = tmp_path / "train.txt"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "criteo"
    proc = subprocess.Popen([sys.executable, "-m", "hilomoe", "data", "convert", "--format",
                             "criteo", "--input", str(src), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(4.0)
    assert proc.poll() is None, "the conversion finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing at the target path, let alone something complete
    with pytest.raises(DatasetError, match="no such dataset directory"):
        open_dataset(out)
