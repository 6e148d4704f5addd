"""Canonical datasets: the synthetic writer, the format's guarantees, and the pyarrow reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hilomoe.config import PlantedData, TrainConfig
from hilomoe.data.dataset import (
    META_FILE, DatasetError, DatasetMeta, DatasetWriter, FieldInfo, open_dataset,
)
from hilomoe.data.checks import RowRules
from hilomoe.data.readers import ParquetBatches
from hilomoe.data.synth import BayesAccumulator, write_synth
from hilomoe.session import train_local
from hilomoe.metrics import auc, logloss

from helpers import handwritten, with_value

SPEC = PlantedData(rows=20_000, categorical_fields=4, vocab_size=30, numeric_fields=2, seed=5)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synth"
    write_synth(SPEC, out, chunk_rows=3_000, rows_per_file=6_000)
    return out


def test_synth_writes_a_complete_dataset(synth_dir):
    ds = open_dataset(synth_dir)
    meta = ds.meta
    assert meta.source_format == "synth" and meta.seed == 5
    rows = {s: info.rows for s, info in meta.splits.items()}
    assert sum(rows.values()) == SPEC.rows
    assert rows["valid"] == pytest.approx(SPEC.rows * SPEC.valid_fraction, rel=0.1)
    assert len(meta.splits["train"].files) >= 2  # sharded by rows_per_file
    assert ds.schema.vocab_sizes == (30,) * 4 and ds.schema.numeric == 2
    for split, b in meta.extra["bayes"].items():
        assert 0.5 < b["auc"] < 1 and b["logloss"] > 0, split


def test_synth_is_deterministic_and_seeded(tmp_path, synth_dir):
    again = write_synth(SPEC, tmp_path / "again", chunk_rows=3_000, rows_per_file=6_000)
    other = write_synth(SPEC.model_copy(update={"seed": 6}), tmp_path / "other", chunk_rows=3_000)
    first = json.loads((synth_dir / META_FILE).read_text())
    assert again["content_hash"] == first["content_hash"]
    assert other["content_hash"] != first["content_hash"]


def test_bayes_histogram_auc_matches_exact_auc():
    rng = np.random.default_rng(0)
    prob = rng.beta(0.5, 1.5, 200_000)
    label = (rng.random(200_000) < prob).astype(np.float32)
    acc = BayesAccumulator()
    for lo in range(0, len(prob), 30_000):
        acc.add(prob[lo : lo + 30_000], label[lo : lo + 30_000])
    res = acc.result()
    assert res["auc"] == pytest.approx(auc(label, prob), abs=1e-4)
    assert res["logloss"] == pytest.approx(logloss(label, prob), rel=1e-9)


def test_reader_returns_every_row_once_with_training_dtypes(tmp_path):
    rng = np.random.default_rng(1)
    n = 10_000
    cat = rng.integers(0, 50, (n, 3))
    num = rng.standard_normal((n, 2)).astype(np.float32)
    label = (rng.random(n) < 0.3).astype(np.float32)
    cat[:, 0] = np.arange(n) % 50  # some structure to compare
    num[:, 0] = np.arange(n)  # a unique row id
    fields = [FieldInfo(name=f"c{i}", type="categorical", vocab_size=50) for i in range(3)]
    fields += [FieldInfo(name=f"n{i}", type="numeric") for i in range(2)]
    with DatasetWriter(tmp_path / "ds", 3, 2, rows_per_file=3_000, row_group_rows=1_000) as w:
        for split in ("train", "valid", "test"):
            w.write(split, cat, num, label)
        w.close(DatasetMeta(name="t", source_format="test", fields=fields, splits={}))
    ds = open_dataset(tmp_path / "ds")
    for shuffle in (False, True):
        source = ParquetBatches(ds, "train", batch_size=512, shuffle=shuffle, seed=3,
                                shuffle_buffer=4_000, read_rows=1_500)
        batches = list(source.epoch(0))
        assert all(len(b) == 512 for b in batches[:-1])
        b0 = batches[0]
        assert b0.cat.dtype == torch.int64 and b0.num.dtype == torch.float32
        assert b0.label.dtype == torch.float32
        got_num = torch.cat([b.num for b in batches]).numpy()
        got_cat = torch.cat([b.cat for b in batches]).numpy()
        got_label = torch.cat([b.label for b in batches]).numpy()
        order = np.argsort(got_num[:, 0])
        assert np.array_equal(got_num[order], num)
        assert np.array_equal(got_cat[order], cat)
        assert np.array_equal(got_label[order], label)
        ids = got_num[:, 0]
        if shuffle:
            assert not np.array_equal(ids, np.sort(ids))
            again = torch.cat([b.num for b in source.epoch(1)]).numpy()[:, 0]
            assert not np.array_equal(ids, again)  # reshuffled per epoch
        else:
            assert np.array_equal(ids, np.arange(n))


def test_a_writer_that_fails_leaves_no_dataset(tmp_path):
    out = tmp_path / "half"
    with pytest.raises(RuntimeError):
        with DatasetWriter(out, 2, 0) as w:
            w.write("train", np.zeros((10, 2), int), np.zeros((10, 0)), np.zeros(10))
            raise RuntimeError("killed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too


def test_bad_datasets_get_one_sentence(tmp_path, synth_dir):
    import shutil

    with pytest.raises(DatasetError, match="no such dataset directory"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a dataset \\(no dataset.json"):
        open_dataset(tmp_path / "empty")

    bad = tmp_path / "bad"
    shutil.copytree(synth_dir, bad)
    shard = bad / "train" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:200])  # truncated
    with pytest.raises(DatasetError, match="part-00000.parquet: not a readable Parquet file"):
        open_dataset(bad)

    shutil.rmtree(bad)
    shutil.copytree(synth_dir, bad)
    meta = json.loads((bad / META_FILE).read_text())
    meta["splits"]["valid"]["rows"] += 1
    (bad / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="valid: holds .* rows but dataset.json says"):
        open_dataset(bad)

    del meta["splits"]["test"]
    (bad / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="missing split\\(s\\) test"):
        open_dataset(bad)

    with pytest.raises(DatasetError, match="already exists"):
        write_synth(SPEC, synth_dir)


def test_training_reads_a_dataset_from_disk(synth_dir):
    cfg = TrainConfig.model_validate({
        "data": {"path": str(synth_dir)},
        "model": {"embedding_dim": 4, "backbone": {"mlp": [8], "cross_layers": 1},
                  "moe": {"levels": 2, "experts": 4}},
        "stages": {"base": {"epochs": 1, "lr": 0.01}, "experts": {"epochs": 1},
                   "joint": {"epochs": 1}},
    })
    res = train_local(cfg)
    assert list(res["stages"]) == ["base", "experts", "joint"]
    assert 0.5 < res["test"]["auc"] < res["bayes"]["test"]["auc"]


def test_tabulated_logits_equal_the_latent_model():
    """The per-leaf tables used for speed compute exactly the model's definition."""
    from hilomoe.data.planted import PlantedModel

    model = PlantedModel(SPEC)
    assert model.leaf_table is not None
    rows = model.sample(np.random.default_rng(0), 5_000)
    fast = model.logits(rows.cat, rows.num)
    slow = model.logits(rows.cat, rows.num, tabulated=False)
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12)


def test_zipf_ids_follow_their_distribution():
    from hilomoe.data.planted import PlantedModel

    spec = SPEC.model_copy(update={"zipf_exponent": 1.2, "vocab_size": 10})
    model = PlantedModel(spec)
    rows = model.sample(np.random.default_rng(1), 200_000)
    counts = np.bincount(rows.cat[:, 0], minlength=10)[model.id_of_rank[0]]  # by rank
    expected = 1.0 / np.arange(1, 11) ** 1.2
    np.testing.assert_allclose(counts / counts.sum(), expected / expected.sum(), atol=0.005)


def batch_rows(batches) -> np.ndarray:
    """Batches -> one (n, F_c + F_n + 1) float array of their rows, in order."""
    batches = list(batches)
    return np.concatenate([torch.cat([b.cat.double() for b in batches]).numpy(),
                           torch.cat([b.num.double() for b in batches]).numpy(),
                           torch.cat([b.label.double() for b in batches]).numpy()[:, None]],
                          axis=1)


def sorted_rows(rows: np.ndarray) -> np.ndarray:
    """The rows in lexicographic order: compares two passes that may differ in order."""
    return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.slow
def test_ray_data_streams_the_same_batches_as_the_pyarrow_reader(ray_local, synth_dir):
    from hilomoe.distributed.ray_data import RayBatches, open_ray_split

    ds = open_dataset(synth_dir)

    def rows(source, epoch=0):
        batches = list(source.epoch(epoch))
        b = batches[0]
        assert b.cat.dtype == torch.int64 and b.num.dtype == torch.float32
        assert b.label.dtype == torch.float32 and b.cat.shape[1] == 4
        table = batch_rows(batches)
        return sorted_rows(table), table

    expected, _ = rows(ParquetBatches(ds, "train", 1024))
    ray_source = RayBatches(open_ray_split(ds, "train"), ds, 1024)
    plain, _ = rows(ray_source)
    np.testing.assert_array_equal(plain, expected)

    class TorchPath:  # Ray's own iter_torch_batches with our Arrow collate function
        def epoch(self, epoch=0):
            return ray_source.torch_batches()

    via_torch, _ = rows(TorchPath())
    np.testing.assert_array_equal(via_torch, expected)
    shuffled = RayBatches(open_ray_split(ds, "train", shuffle_files=True), ds, 1024,
                          shuffle_buffer=4096, seed=1)
    sorted0, order0 = rows(shuffled, 0)
    _, order1 = rows(shuffled, 1)
    np.testing.assert_array_equal(sorted0, expected)  # every row exactly once
    assert not np.array_equal(order0, order1)  # a new local shuffle each epoch


def _table_rows(tables) -> np.ndarray:
    """Arrow tables of the canonical layout -> one (n, F_c + F_n + 1) float array of rows."""
    import pyarrow as pa

    t = pa.concat_tables(list(tables))
    cat = t.column("cat").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
    num = t.column("num").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
    return np.concatenate([cat, num, t.column("label").to_numpy()[:, None]], axis=1)


def test_row_group_read_tasks_cover_every_row_once_and_reshuffle_per_execution(synth_dir):
    """The Ray Data source without a cluster: its read tasks, run in turn, give every row of the
    split once; small row groups are packed into tasks; a seeded source orders its tasks the
    same way for the same execution and differently for the next one."""
    import pyarrow.parquet as pq
    from ray.data import DataContext

    from hilomoe.distributed.ray_source import ParquetRowGroups

    files = open_dataset(synth_dir).files("train")
    expected = _table_rows(pq.read_table(f) for f in files)
    source = ParquetRowGroups(files, task_rows=5_000)  # the shards hold 3,000-row groups
    groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)
    assert 1 < len(source.tasks) < groups  # packed, two groups would exceed 5,000 only
    assert all(sum(g.rows for g in t) <= 5_000 or len(t) == 1 for t in source.tasks)

    def run(tasks):
        assert sum(t.metadata.num_rows for t in tasks) == len(expected)
        return _table_rows(block for t in tasks for block in t())

    np.testing.assert_array_equal(run(source.get_read_tasks(4)), expected)  # file order
    seeded = ParquetRowGroups(files, seed=3, task_rows=5_000)
    contexts = []
    for execution in (0, 0, 1):
        ctx = DataContext()
        ctx._execution_idx = execution
        contexts.append(run(seeded.get_read_tasks(4, data_context=ctx)))
    np.testing.assert_array_equal(contexts[0], contexts[1])
    assert not np.array_equal(contexts[0], contexts[2])
    for rows in contexts:
        np.testing.assert_array_equal(sorted_rows(rows), sorted_rows(expected))


def test_a_read_task_names_a_file_that_went_bad(tmp_path, synth_dir):
    import shutil

    from hilomoe.distributed.ray_source import ParquetRowGroups

    shutil.copytree(synth_dir, tmp_path / "d")
    files = open_dataset(tmp_path / "d").files("valid")
    task = ParquetRowGroups(files).get_read_tasks(1)[0]
    files[0].write_bytes(files[0].read_bytes()[:300])  # truncated after the footers were read
    with pytest.raises(DatasetError, match=r"valid/part-00000.parquet: not a readable Parquet"):
        list(task())


def test_ray_read_tasks_do_not_import_torch():
    """Ray unpickles the source in its coordinator and read-task processes; torch would add
    seconds to each of their start-ups."""
    import subprocess
    import sys

    code = ("import sys, hilomoe.distributed.ray_source, hilomoe.data.parquet; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_an_evaluation_shard_is_kept_after_its_first_pass(ray_local, synth_dir):
    from hilomoe.distributed.ray_data import RayBatches, open_ray_split

    ds = open_dataset(synth_dir)

    class Counting:  # the real Ray dataset, counting the executions asked of it
        def __init__(self, data):
            self.data, self.passes = data, 0

        def iter_batches(self, **kwargs):
            self.passes += 1
            return self.data.iter_batches(**kwargs)

    data = Counting(open_ray_split(ds, "valid"))
    source = RayBatches(data, ds, 1000, cache=True)
    first, second = batch_rows(source.epoch(0)), batch_rows(source.epoch(1))
    np.testing.assert_array_equal(second, first)  # the same rows, in the same order
    expected = batch_rows(ParquetBatches(ds, "valid", 1000).epoch(0))
    np.testing.assert_array_equal(sorted_rows(first), sorted_rows(expected))
    assert data.passes == 1
    streamed = RayBatches(Counting(open_ray_split(ds, "valid")), ds, 1000)
    for e in range(2):
        list(streamed.epoch(e))
    assert streamed.data.passes == 2


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_parquet_shards_partition_the_split(tmp_path, world):
    """Rank shards cover every row exactly once; `equal` gives every rank N // world rows."""
    spec = PlantedData(rows=3000, categorical_fields=3, vocab_size=50, numeric_fields=1, seed=4)
    write_synth(spec, tmp_path / "d", chunk_rows=700, rows_per_file=900)
    ds = open_dataset(tmp_path / "d")
    whole = np.concatenate([b.cat.numpy() for b in ParquetBatches(ds, "train", 256).epoch(0)])
    shards = [ParquetBatches(ds, "train", 256, rank=r, world=world) for r in range(world)]
    parts = [np.concatenate([b.cat.numpy() for b in s.epoch(0)]) for s in shards]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert [len(p) for p in parts] == [len(s) for s in shards]
    equal = [ParquetBatches(ds, "train", 256, shuffle=True, rank=r, world=world, equal=True)
             for r in range(world)]
    assert {sum(len(b) for b in s.epoch(3)) for s in equal} == {len(whole) // world}


# -- training-set subsets -----------------------------------------------------------------


def _rows(batches) -> set[tuple]:
    """Every row of `batches` as a tuple (ids, numeric values, label): comparable as sets."""
    cat = torch.cat([b.cat for b in batches]).numpy()
    num = torch.cat([b.num for b in batches]).numpy()
    label = torch.cat([b.label for b in batches]).numpy()
    return {(*c, *n, lab) for c, n, lab in zip(cat.tolist(), num.tolist(), label.tolist())}


def test_train_subsets_are_nested_seeded_and_the_same_on_every_reader(synth_dir):
    from hilomoe.data.subset import Subset

    ds = open_dataset(synth_dir)
    whole = _rows(list(ParquetBatches(ds, "train", 4096).epoch(0)))
    n = len(whole)
    kept = {}
    for fraction in (0.125, 0.25, 0.5):
        subset = Subset(fraction, seed=0)
        rows = _rows(list(ParquetBatches(ds, "train", 512, shuffle=True, seed=1,
                                         shuffle_buffer=3000, subset=subset).epoch(0)))
        # two ranks' shards, reshuffled: the same rows
        ranks = set().union(*(_rows(list(ParquetBatches(ds, "train", 512, shuffle=True, seed=r,
                                                        rank=r, world=2, subset=subset).epoch(2)))
                              for r in range(2)))
        assert rows == ranks
        sd = (n * fraction * (1 - fraction)) ** 0.5
        assert abs(len(rows) - n * fraction) < 4 * sd  # a binomial draw of the rows
        kept[fraction] = rows
    assert kept[0.125] < kept[0.25] < kept[0.5] < whole  # nested
    other = _rows(list(ParquetBatches(ds, "train", 4096, subset=Subset(0.25, seed=1)).epoch(0)))
    assert other != kept[0.25] and abs(len(other) - len(kept[0.25])) < 8 * (n * 0.19) ** 0.5

    # the training configuration's setting: the train split only, in memory and on disk
    from hilomoe.data.planted import generate_planted
    from hilomoe.engine.local import memory_sources, parquet_sources

    cfg = TrainConfig.model_validate({"data": {"train_fraction": 0.25, "path": str(synth_dir)}})
    sources = parquet_sources(ds, cfg)
    assert _rows(list(sources["train"].epoch(0))) == kept[0.25]
    assert len(_rows(list(sources["valid"].epoch(0)))) == ds.meta.splits["valid"].rows
    problem = generate_planted(SPEC)
    memory = memory_sources(problem, cfg)
    split = problem.splits["train"]
    mask = Subset(0.25).mask(np.asarray(split.cat), np.asarray(split.label))
    assert len(memory["train"]) == mask.sum() and len(memory["valid"]) == len(
        problem.splits["valid"].label)


# -- values the readers refuse (issue 15: items 8-10) -------------------------------------------


BAD_VALUES = {  # what the train split holds -> what the one sentence says
    "id at vocab_size": (dict(cat=with_value((200, 3), (150, 1), 50, np.int64)),
                         r"train/part-00000.parquet: categorical field C1 holds id 50, but its ids "
                         r"must lie in 0\.\.49 \(vocab_size 50 in dataset.json\)\.$"),
    "negative id": (dict(cat=with_value((200, 3), (107, 2), -3, np.int64)),
                    r"part-00000.parquet: categorical field C2 holds id -3, but its ids must lie "
                    r"in 0\.\.49"),
    "label 2": (dict(label=with_value((200,), 199, 2, np.float32)),
                r"part-00000.parquet: holds the label 2\.0, but labels must be 0 or 1\.$"),
    "label NaN": (dict(label=with_value((200,), 103, np.nan, np.float32)),
                  r"holds the label nan, but labels must be 0 or 1\."),
    "numeric NaN": (dict(num=with_value((200, 2), (110, 1), np.nan, np.float32)),
                    r"part-00000.parquet: numeric field N1 holds nan, but numeric features must "
                    r"be finite numbers\.$"),
    "numeric inf": (dict(num=with_value((200, 2), (110, 0), -np.inf, np.float32)),
                    r"numeric field N0 holds -inf, but numeric features must be finite"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_the_reader_refuses_values_outside_their_field(tmp_path, case):
    """An id outside its field's vocabulary would read another field's embedding rows; a label
    outside {0, 1} or a NaN numeric would poison the loss: refused in one sentence naming the
    shard, the field and the value, by the pyarrow reader and by the Ray Data read tasks."""
    from hilomoe.distributed.ray_source import ParquetRowGroups

    values, message = BAD_VALUES[case]
    ds = open_dataset(handwritten(tmp_path / "ds", **values))  # the footers are fine
    with pytest.raises(DatasetError, match=message):
        list(ParquetBatches(ds, "train", 64).epoch(0))
    with pytest.raises(DatasetError, match=message):  # the shard of the rank holding row >= 100
        list(ParquetBatches(ds, "train", 64, shuffle=True, rank=1, world=2).epoch(0))
    source = ParquetRowGroups(ds.files("train"), rules=RowRules.of(ds.meta))
    with pytest.raises(DatasetError, match=message):  # a Ray Data read task, run here
        [block for task in source.get_read_tasks(1) for block in task()]
    list(ParquetBatches(ds, "valid", 64).epoch(0))  # the other splits hold good values


def test_ids_at_the_edges_of_the_vocabulary_are_read(tmp_path):
    cat = np.array([[0, 49, 0], [49, 0, 49]] * 100)
    ds = open_dataset(handwritten(tmp_path / "ds", cat=cat))
    got = torch.cat([b.cat for b in ParquetBatches(ds, "train", 64).epoch(0)]).numpy()
    np.testing.assert_array_equal(got, cat)


def test_a_categorical_field_without_a_vocab_size_is_refused(tmp_path):
    out = handwritten(tmp_path / "ds", null_vocab=True)
    for check in (True, False):
        with pytest.raises(DatasetError, match=r"dataset.json: categorical field C1 has "
                                               r"vocab_size null; give it its number of ids"):
            open_dataset(out, check_shards=check)


@pytest.mark.parametrize("labels, message", [
    (np.ones(200, np.float32), r"valid: the validation split holds only the label\(s\) 1, so "
                               r"its AUC is undefined; it needs rows of both classes"),
    (np.zeros(0, np.float32), r"valid: the validation split is empty, so no validation AUC"),
])
def test_a_validation_split_without_both_classes_is_refused_for_training(tmp_path, labels,
                                                                          message):
    out = handwritten(tmp_path / "ds", valid_label=labels)
    if len(labels) == 0:  # the writer skips empty writes: an empty split by its metadata
        meta = json.loads((out / META_FILE).read_text())
        for f in meta["splits"]["valid"]["files"]:
            (out / "valid" / f).unlink()
        meta["splits"]["valid"] = {"rows": 0, "files": []}
        (out / META_FILE).write_text(json.dumps(meta))
    open_dataset(out)  # still a dataset (to read or convert from)
    with pytest.raises(DatasetError, match=message):
        open_dataset(out, training=True)
    cfg = TrainConfig.model_validate({"data": {"path": str(out)},
                                      "model": {"moe": {"variant": "dense"}}})
    with pytest.raises(DatasetError, match=message):  # refused before training starts
        train_local(cfg)
