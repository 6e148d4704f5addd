"""The `hilomoe` command as a person and a script use it: real processes, real files."""

from __future__ import annotations


import pytest

from helpers import hilomoe, one_json

EXAMPLE = "studies/train_example.yaml"


def test_model_summary_json_on_the_example():
    res = one_json(hilomoe("model", "summary", EXAMPLE, "--json").stdout)
    for key in ("params_total", "params_active", "params_embedding", "flops_analytic",
                "flops_measured"):
        assert isinstance(res[key], (int, float)) and res[key] > 0, key
    assert res["flops_measured"] == pytest.approx(res["flops_analytic"], rel=0.02)
    assert res["params_active"] < res["params_total"]  # top-k leaves experts unread


def test_model_summary_table_for_a_person():
    out = hilomoe("model", "summary", EXAMPLE).stdout
    assert "FLOPs/sample" in out and "measured" in out and "total" in out


def test_model_summary_reads_the_datasets_vocabularies(tmp_path):
    """With data.path, the summary counts the dataset's real fields and vocabularies (not the
    planted default), and splits the tables' bytes across workers by TorchRec's plan."""
    import yaml

    from hilomoe.config import PlantedData
    from hilomoe.data.synth import write_synth

    data = tmp_path / "data"
    write_synth(PlantedData(rows=2000, categorical_fields=9, vocab_size=5000, numeric_fields=3,
                            depth=2), data)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"path": str(data)},
                                   "model": {"embedding_dim": 8}}))
    one = one_json(hilomoe("model", "summary", str(cfg), "--json").stdout)
    two = one_json(hilomoe("model", "summary", str(cfg), "--json", "--workers", "2").stdout)
    assert one["fields"] == {"categorical": 9, "numeric": 3, "embedding_rows": 45_000}
    assert one["params_embedding"] == (45_000 + 3) * 8
    # one worker holds every table and its row-wise Adagrad state (one float per row)
    (alone,) = one["embedding"]["bytes_per_worker"]
    assert alone == 45_000 * (8 + 1) * 4
    halves = two["embedding"]["bytes_per_worker"]
    assert sum(halves) == alone and max(halves) <= 5 * alone / 9  # whole tables: 5 of 9 at most
    out = hilomoe("model", "summary", str(cfg), "--workers", "2").stdout
    assert "9 categorical fields (45,000 embedding rows)" in out and "per worker" in out


def test_train_local_json(tmp_path):
    """The JSON summary and the progress on stderr (the README runs the full example)."""
    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"synth": {"rows": 6000, "categorical_fields": 4, "vocab_size": 10,
                           "numeric_fields": 1}},
        "model": {"embedding_dim": 4, "backbone": {"mlp": [8], "cross_layers": 1},
                  "moe": {"levels": 2, "experts": 4, "top_k": 2}},
        "stages": {"base": {"epochs": 2}, "experts": {"epochs": 1}, "joint": {"epochs": 1}}}))
    proc = hilomoe("train", str(cfg), "--local", "--json")
    res = one_json(proc.stdout)
    assert list(res["stages"]) == ["base", "experts", "joint"]
    for stage in res["stages"].values():
        assert stage["epochs"] >= 1 and 0.5 < stage["auc"] < 1 and stage["logloss"] > 0
    assert 0.5 < res["test"]["auc"] < 1 and res["test"]["logloss"] > 0
    assert "[   base] epoch   1" in proc.stderr  # progress goes to stderr
    # the footprint `bench scale` reports for its local rows: 4 TorchRec tables of 10 rows,
    # weights plus one row-wise Adagrad float a row
    (worker,) = res["footprint"]
    assert worker["embedding_bytes"] == 4 * 10 * (4 + 1) * 4 and worker["peak_rss_mb"] > 0


def test_bench_layer_json_keys():
    res = one_json(hilomoe("bench", "layer", "--json", "--batch", "64", "--dim", "16",
                           "--experts", "4", "--levels", "1", "2", "--repeats", "2").stdout)
    variants = {r["variant"] for r in res["rows"]}
    assert variants == {"dense", "hilomoe", "sequential", "flat", "dense_experts"}
    for r in res["rows"]:
        for key in ("variant", "levels", "experts", "batch", "device", "ms", "flops"):
            assert key in r
        assert r["ms"] > 0 and r["flops"] > 0 and r["batch"] == 64
    assert {r["levels"] for r in res["rows"] if r["variant"] == "hilomoe"} == {1, 2}


@pytest.mark.parametrize("args, fragment", [
    (["model", "summary", "missing.yaml"], "missing.yaml: no such configuration file"),
    (["train"], "give a training configuration (CONFIG.yaml), or --resume DIR"),
    (["train", "--resume", "nowhere"], "nowhere: not a run directory"),
    (["train", EXAMPLE, "--data", "nowhere"], "nowhere"),
    (["train", EXAMPLE, "--workers", "0"], "--workers: must be a positive integer"),
    (["bench", "layer", "--experts", "2", "--top-k", "3"], "--top-k (3) must be at most --experts (2)"),
])
def test_bad_input_gets_one_sentence(args, fragment):
    proc = hilomoe(*args, check=False)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_bad_config_key_names_the_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  moe:\n    experts: 4\n    top_k: 9\n    rnak: 1\n")
    proc = hilomoe("train", str(bad), "--local", check=False)
    assert proc.returncode == 2
    assert "model.moe.rnak: unknown key" in proc.stderr
    assert "top_k (9) must be at most experts (4)" in proc.stderr or "model.moe" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_has_examples():
    for args in (["--help"], ["model", "summary", "--help"], ["train", "--help"],
                 ["bench", "layer", "--help"]):
        assert "example" in hilomoe(*args).stdout


def test_data_synth_json_then_train_on_it(tmp_path):
    out = tmp_path / "synth"
    res = one_json(hilomoe("data", "synth", "--rows", "5000", "--out", str(out), "--seed", "3",
                           "--json").stdout)
    assert res["rows_skipped"] == 0 and res["source_format"] == "synth"
    assert sum(s["rows"] for s in res["splits"].values()) == 5000
    assert (out / "dataset.json").is_file()
    again = hilomoe("data", "synth", "--rows", "5000", "--out", str(out), check=False)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.slow
def test_bench_scale_json_rows():
    """One JSON object: a row per path x backend x vocabulary x stage, the converter against
    pyarrow.csv, and the goals' ratios; two workers hold half of the TorchRec tables each."""
    # ray_2 alone: the local path's rows read the same `hilomoe train --json` footprint, which
    # test_train_local_json checks
    res = one_json(hilomoe("bench", "scale", "--json", "--ids", "20", "200", "--paths",
                           "ray_2", "--backends", "torchrec", "--train-rows", "3000",
                           "--convert-rows", "3000").stdout)
    rows = res["rows"]
    assert {(r["path"], r["ids_per_field"], r["stage"]) for r in rows} == {
        ("ray_2", n, s) for n in (20, 200) for s in ("base", "experts", "joint")}
    for r in rows:
        for key in ("path", "backend", "ids_per_field", "stage", "samples_per_s", "peak_rss_mb"):
            assert key in r, key
        assert r["samples_per_s"] > 0 and r["peak_rss_mb"] > 0
    assert res["convert_rows_per_s"] > 0 and res["pyarrow_csv_rows_per_s"] > 0
    assert set(res["goals"]["torchrec_speed_ratio"]) == {
        f"ray_2/{s}" for s in ("base", "experts", "joint")}
    two = {r["ids_per_field"]: r["embedding_bytes"] for r in rows}
    # 26 equal tables (weights + one row-wise Adagrad float a row), 13 on each worker
    assert two[200] == 26 * 200 * (16 + 1) * 4 / 2


def test_bench_data_json_keys():
    res = one_json(hilomoe("bench", "data", "--rows", "20000", "--batch", "1024", "--skip-ray",
                           "--json").stdout)
    paths = {r["path"] for r in res["rows"]}
    assert paths == {"synth_write", "pyarrow_reader"}
    for r in res["rows"]:
        assert r["rows_per_s"] > 0 and r["rows"] > 0


@pytest.mark.slow
def test_bench_data_ray_paths_read_every_train_row():
    res = one_json(hilomoe("bench", "data", "--rows", "20000", "--batch", "1024", "--json").stdout)
    rows = [r for r in res["rows"] if r["path"] != "synth_write"]
    assert {r["path"] for r in rows} == {"pyarrow_reader", "ray_data", "ray_read_parquet"}
    assert len({r["rows"] for r in rows}) == 1  # every path, every epoch: the whole split


@pytest.mark.slow
def test_bench_train_json_trains_every_path_on_the_same_samples():
    res = one_json(hilomoe("bench", "train", "--rows", "30000", "--epochs", "1", "--workers", "1",
                           "--readers", "ray_data", "--json").stdout)
    rows = {r["mode"]: r for r in res["rows"]}
    assert list(rows) == ["memory_ceiling", "local_parquet", "ray_1"]
    # three stages of one epoch over the ~24,000-row train split; the ceiling is measured twice
    assert rows["local_parquet"]["samples"] == rows["ray_1"]["samples"]
    assert rows["ray_1"]["samples"] % 3 == 0 and 22_000 < rows["ray_1"]["samples"] / 3 < 26_000
    assert rows["memory_ceiling"]["samples"] == 2 * rows["local_parquet"]["samples"]
    for r in rows.values():
        assert r["samples_per_s"] > 0 and r["epoch_wall_s"] > 0 and r["startup_s"] >= 0
    assert 0.0 <= rows["ray_1"]["overhead_fraction"] < 1.0


def test_data_convert_json_reports_skipped_rows(tmp_path):
    src = tmp_path / "day_0"
    good = "\t".join(["1"] + ["3"] * 13 + ["68fd1e64"] * 26)
    src.write_text("\n".join([good, good, "0\tbroken", good]) + "\n")
    proc = hilomoe("data", "convert", "--format", "criteo", "--input", str(src), "--out",
                   str(tmp_path / "out"), "--min-count", "1", "--json")
    res = one_json(proc.stdout)
    assert res["rows_skipped"] == 1 and res["source_format"] == "criteo"
    assert "day_0:3: 2 fields where 40 are expected" in proc.stderr
    strict = hilomoe("data", "convert", "--format", "criteo", "--input", str(src), "--out",
                     str(tmp_path / "strict"), "--strict", check=False)
    assert strict.returncode == 2 and "day_0:3" in strict.stderr and "Traceback" not in strict.stderr


@pytest.mark.parametrize("argv, sentence", [
    (["bench", "layer", "--levels", "1", "0"],
     "hilomoe: error: --levels: must be a positive integer, got 0"),
    (["train", "--max-failures", "-1"],
     "hilomoe: error: --max-failures: must be zero or more, got -1"),
    (["data", "synth", "--rows", "many", "--out", "x"],
     "hilomoe: error: --rows: must be a positive integer, got 'many'"),
    (["study", "recommend", "runs/x", "--flops", "nan"],
     "hilomoe: error: --flops: must be a positive number, got nan"),
    (["cache", "prune", "--older-than", "3x"],
     "hilomoe: error: --older-than: '3x' is not a duration"),
])
def test_a_refused_flag_value_is_one_sentence_before_anything_runs(argv, sentence, capsys):
    """The argparse `type=` validators refuse a value as every bad input ends: one line, status 2."""
    from hilomoe.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(sentence) and len(err.strip().splitlines()) == 1, err
