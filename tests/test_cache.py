"""The stage-1 and trial caches: keys hold everything that changes a result, a cache failure
never fails a trained trial, concurrent writers never delete each other's output, and
`hilomoe cache ls | prune` bounds what the caches keep."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import hilomoe
from helpers import hilomoe as hilomoe_cli
from helpers import on_dataset, one_json, planted_dataset
from hilomoe.config import StageName, parse_config
from hilomoe.data.dataset import META_FILE, open_dataset
from hilomoe.data.synth import write_synth
from hilomoe.engine.local import build_model
from hilomoe.engine.loop import Engine
from hilomoe.errors import HilomoeError
from hilomoe.study import cache as cache_mod
from hilomoe.study.cache import Stage1Cache, Stage1Entry, TrialCache, source_hash
from hilomoe.tracking.records import write_json
from hilomoe.study.spec import parse_study
from hilomoe.study.trial import TrialContext, run_in_process

TRAIN = {
    "data": {"synth": {"rows": 3000, "categorical_fields": 4, "vocab_size": 10,
                       "numeric_fields": 1, "depth": 2, "branching": 3}},
    "model": {"embedding_dim": 4, "backbone": {"mlp": [8], "cross_layers": 1},
              "moe": {"levels": 2, "experts": 4, "top_k": 2}},
    "stages": {"base": {"epochs": 2}, "experts": {"epochs": 1}, "joint": {"epochs": 1}},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return planted_dataset(tmp_path_factory, TRAIN)


def cfg_with(dataset, **overrides):
    return on_dataset(TRAIN, dataset, **overrides)


def keys(cfg, dataset, device="cpu") -> tuple[str, str]:
    return Stage1Cache.key(cfg, dataset, device), TrialCache.key(cfg, dataset, device)


# -- keys ---------------------------------------------------------------------------------------


def test_keys_change_with_the_package_version_and_torch_version(dataset, monkeypatch):
    cfg = cfg_with(dataset)
    before = keys(cfg, dataset)
    monkeypatch.setattr(hilomoe, "__version__", "99.0.0")
    after_package = keys(cfg, dataset)
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    after_torch = keys(cfg, dataset)
    for after in (after_package, after_torch):
        assert after[0] != before[0] and after[1] != before[1]
    monkeypatch.undo()
    assert keys(cfg, dataset) == before


def test_keys_change_with_the_device_and_the_precision(dataset):
    fp32 = cfg_with(dataset, **{"ray.precision": "fp32"})
    cpu, cuda = keys(fp32, dataset, "cpu"), keys(fp32, dataset, "cuda")
    assert cpu[0] != cuda[0] and cpu[1] != cuda[1]
    bf16 = keys(cfg_with(dataset, **{"ray.precision": "bf16"}), dataset, "cpu")
    assert bf16[0] != cpu[0] and bf16[1] != cpu[1]
    # auto is fp32 on a CPU: the same result, so the same key
    assert keys(cfg_with(dataset, **{"ray.precision": "auto"}), dataset, "cpu") == cpu


def test_the_source_hash_follows_the_model_and_engine_source(tmp_path, monkeypatch):
    package = Path(hilomoe.__file__).parent
    copy = tmp_path / "hilomoe"
    for part in ("model", "engine"):
        shutil.copytree(package / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(package / "session.py", copy / "session.py")
    monkeypatch.setattr(hilomoe, "__file__", str(copy / "__init__.py"))
    try:
        source_hash.cache_clear()
        before = source_hash()
        assert source_hash() == before  # once per process
        (copy / "study").mkdir()
        (copy / "study" / "report.py").write_text("# not training code\n")
        source_hash.cache_clear()
        assert source_hash() == before
        loop = copy / "engine" / "loop.py"
        loop.write_text(loop.read_text() + "\n# an edit\n")
        source_hash.cache_clear()
        edited = source_hash()
        assert edited != before
        monkeypatch.setattr(cache_mod, "source_hash", lambda: edited)
        cfg = parse_config(TRAIN)
        assert cache_mod.run_environment(cfg, "cpu")["source"] == edited
    finally:
        monkeypatch.undo()
        source_hash.cache_clear()


def test_an_edited_shard_copied_with_its_size_and_mtime_changes_the_key(dataset, tmp_path):
    """A dataset written before content hashes (none in dataset.json) is fingerprinted by its
    shards' bytes: `cp -p` of an edited shard keeps its size and modification time, not its
    key."""
    old = tmp_path / "old"
    shutil.copytree(dataset, old)
    meta = json.loads((old / META_FILE).read_text())
    meta["content_hash"] = ""
    (old / META_FILE).write_text(json.dumps(meta))
    cfg = cfg_with(old)
    before = keys(cfg, old)
    shard = old / "train" / meta["splits"]["train"]["files"][0]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte changed, same size
    edited = tmp_path / "edited.parquet"
    edited.write_bytes(bytes(data))
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.copy2(edited, shard)  # cp -p
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = keys(cfg, old)
    assert after[0] != before[0] and after[1] != before[1]


# -- strict adoption ----------------------------------------------------------------------------


def test_adopting_stage_1_takes_exactly_the_base_parameters(dataset):
    cfg = cfg_with(dataset)
    schema = open_dataset(dataset).schema

    def engine():
        return Engine(build_model(cfg, schema), cfg.stages)

    donor = engine()
    base = donor.model.base_state()
    experts = donor.model.expert_state_names()
    assert experts and not experts & base.keys()  # why loading is not strict: no experts
    wrong = {
        "unexpected": {**base, "head.extra": torch.zeros(1)},
        "missing": {k: v for i, (k, v) in enumerate(base.items()) if i},
        "with experts": donor.model.state_dict(),
    }
    for case, weights in wrong.items():
        with pytest.raises(HilomoeError, match="do not match this model's base") as err:
            engine().adopt_stage(StageName.BASE, weights, [])
        assert "\n" not in str(err.value), case
    adopter = engine()
    adopter.adopt_stage(StageName.BASE, base, [])
    assert all(torch.equal(adopter.model.state_dict()[k], v) for k, v in base.items())


# -- a cache failure never fails a trained trial ------------------------------------------------


class Collect:
    """A session reporter that keeps what it is given (Tune's, without Tune)."""

    def __init__(self):
        self.reports: list[dict] = []

    def restore(self):
        return None

    def report(self, metrics, files, record):
        self.reports.append(metrics)


def trial(cfg, dataset, cache_dir: Path) -> dict:
    """One in-process study trial (as Tune runs it); its final report."""
    spec = parse_study({"name": "t", "train": TRAIN, "space": {}})
    ctx = TrialContext(spec.model_dump(mode="json"), str(dataset), str(cache_dir.parent),
                       str(cache_dir))
    reporter = Collect()
    run_in_process(cfg, ctx, reporter)
    assert reporter.reports[-1].get("final"), reporter.reports[-1]
    return reporter.reports[-1]


def leftovers(cache_dir: Path) -> list[str]:
    return [p.name for d in cache_dir.iterdir() if d.is_dir() for p in d.iterdir()
            if p.name.startswith(".")]


def test_a_full_disk_loses_the_cache_entries_not_the_trial(dataset, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    cfg = cfg_with(dataset)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = trial(cfg, dataset, cache_dir)
    monkeypatch.undo()
    assert final["test_auc"] > 0.5 and not final["trial_reused"]
    messages = [str(w.message) for w in caught if "could not store" in str(w.message)]
    # the stage-1 store and the trial store each failed once, each warned once
    assert len(messages) == 2 and all("No space left" in m for m in messages), messages
    assert not leftovers(cache_dir)
    assert not any(p.is_dir() for d in cache_dir.iterdir() for p in d.iterdir())
    # with room again, the next trial trains and stores, and the one after replays
    assert not trial(cfg, dataset, cache_dir)["trial_reused"]
    replayed = trial(cfg, dataset, cache_dir)
    assert replayed["trial_reused"] and replayed["test_auc"] == final["test_auc"]


def test_a_truncated_entry_is_a_miss_with_one_warning(dataset, tmp_path):
    cache_dir = tmp_path / "cache"
    cfg = cfg_with(dataset)
    first = trial(cfg, dataset, cache_dir)
    (entry,) = [p for p in (cache_dir / "trials").iterdir() if p.is_dir()]
    state = entry / TrialCache.STATE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="unreadable trial cache entry") as caught:
        again = trial(cfg, dataset, cache_dir)
    assert len([w for w in caught if "unreadable" in str(w.message)]) == 1
    assert not again["trial_reused"] and again["test_auc"] == first["test_auc"]
    # the damaged entry made way for a whole one
    assert trial(cfg, dataset, cache_dir)["trial_reused"]
    # bad JSON in a stage-1 entry: a miss as well
    stage1 = Stage1Cache(cache_dir / "stage1")
    (key,) = [p.name for p in stage1.root.iterdir() if p.is_dir() and p.name[0] != "."]
    (stage1.path(key) / cache_mod.RECORDS).write_text('{"history": [')
    with pytest.warns(RuntimeWarning, match="unreadable stage1 cache entry"):
        assert stage1.get(key) is None
    assert not stage1.path(key).exists()


# -- concurrent writers -------------------------------------------------------------------------


def test_a_dataset_synthesised_twice_at_once_keeps_the_first(tmp_path, monkeypatch):
    """Job B starts writing the same cached dataset before job A publishes it; A's dataset
    (which A's trials already read) must outlive B's finishing."""
    from hilomoe.data.dataset import DatasetWriter
    from hilomoe.distributed.runtime import synth_dataset

    monkeypatch.setenv("HILOMOE_CACHE", str(tmp_path / "cache"))
    cfg = parse_config(TRAIN)
    target = tmp_path / "cache" / "datasets"
    target.mkdir(parents=True)
    import hashlib

    name = "synth-" + hashlib.sha256(cfg.data.synth.model_dump_json().encode()).hexdigest()[:16]
    late = DatasetWriter(target / name, 4, 1, keep_existing=True)  # B: found nothing yet
    path = synth_dataset(cfg)  # A: writes and publishes
    assert path == target / name
    first = (path / META_FILE).stat().st_ino
    shard = open_dataset(path).files("train")[0]
    inode = shard.stat().st_ino
    meta = open_dataset(path).meta
    late.close(meta)  # B finishes second
    assert (path / META_FILE).stat().st_ino == first and shard.stat().st_ino == inode
    assert [p.name for p in target.iterdir()] == [name]  # B's copy is gone, nothing left over


def test_threads_synthesising_the_same_dataset_get_one_whole_dataset(tmp_path, monkeypatch):
    from hilomoe.distributed.runtime import synth_dataset

    monkeypatch.setenv("HILOMOE_CACHE", str(tmp_path / "cache"))
    cfg = parse_config(TRAIN)
    start = threading.Barrier(3)
    paths, errors = [], []

    def job():
        start.wait()
        try:
            paths.append(synth_dataset(cfg))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    open_dataset(paths[0])  # whole: every shard there and readable
    assert [p.name for p in paths[0].parent.iterdir()] == [paths[0].name]


def test_overwrite_replaces_a_dataset_whole(tmp_path):
    spec = parse_config(TRAIN).data.synth
    out = tmp_path / "ds"
    first = write_synth(spec, out)["content_hash"]
    second = write_synth(spec.model_copy(update={"seed": spec.seed + 1}), out,
                         overwrite=True)["content_hash"]
    assert second != first and open_dataset(out).meta.content_hash == second
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_write_json_writers_of_one_path_never_share_a_temporary_file(tmp_path):
    path = tmp_path / "trials" / "t.json"
    start = threading.Barrier(2)
    errors = []

    def writer(n: int):
        start.wait()
        try:
            for i in range(100):
                write_json(path, {"writer": n, "i": i, "pad": "x" * 20000})
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert json.loads(path.read_text())["i"] == 99
    assert [p.name for p in path.parent.iterdir()] == ["t.json"]


def waiters(lock: Path) -> int:
    """Processes or threads blocked on `lock`'s flock right now (Linux's /proc/locks)."""
    ino = f":{lock.stat().st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "->" in line and ino in line)


def test_a_second_trial_of_a_configuration_waits_for_the_first_then_replays(dataset, tmp_path):
    cache_dir = tmp_path / "cache"
    cfg = cfg_with(dataset)
    first = trial(cfg, dataset, cache_dir)
    trials = TrialCache(cache_dir / "trials")
    key = TrialCache.key(cfg, dataset, "cpu")
    results = []
    with trials.claim(key):  # as if the first were still training
        second = threading.Thread(target=lambda: results.append(trial(cfg, dataset, cache_dir)))
        second.start()
        while not waiters(trials.lock_path(key)) and second.is_alive():
            time.sleep(0.01)
        assert second.is_alive()  # blocked on the key's lock, not training alongside
    second.join()
    assert results[0]["trial_reused"] and results[0]["test_auc"] == first["test_auc"]


# -- hilomoe cache ls | prune -------------------------------------------------------------------


def test_cache_ls_and_prune_through_the_command(tmp_path):
    root = tmp_path / "cache"
    stage1, trials = Stage1Cache(root / "stage1"), TrialCache(root / "trials")
    now = time.time()
    stage1.put("old", Stage1Entry({"w": torch.zeros(1000)}, [], 1.0))
    stage1.put("mid", Stage1Entry({"w": torch.zeros(1000)}, [], 1.0))
    trials.put("new", {"w": torch.zeros(1000)}, {"seconds": 1.0})
    for key, days in (("old", 40), ("mid", 2)):
        t = now - days * 86400
        os.utime(stage1.path(key), (t, t))
    with stage1.claim("other"):  # a lock file and a write in progress are not entries
        (stage1.root / ".mid-unfinished").mkdir()
    env = {"HILOMOE_CACHE": str(root)}
    listed = one_json(hilomoe_cli("cache", "ls", "--json", env=env).stdout)
    assert [(e["kind"], e["key"]) for e in listed["entries"]] == [
        ("stage1", "old"), ("stage1", "mid"), ("trial", "new")]  # least recently used first
    assert all(e["bytes"] > 4000 and e["age_s"] >= 0 for e in listed["entries"])
    assert listed["entries"][0]["last_used_s"] > 39 * 86400
    assert listed["bytes"] == sum(e["bytes"] for e in listed["entries"])
    table = hilomoe_cli("cache", "ls", env=env).stdout
    assert "stage1" in table and "trial" in table and "last used" in table

    # reading an entry is using it
    assert stage1.get("mid") is not None
    assert [e.key for e in cache_mod.cache_entries(root)] == ["old", "new", "mid"]

    pruned = one_json(hilomoe_cli("cache", "prune", "--older-than", "30d", "--json",
                                  env=env).stdout)
    assert [e["key"] for e in pruned["removed"]] == ["old"] and not stage1.path("old").exists()
    new_size = next(e["bytes"] for e in listed["entries"] if e["key"] == "new")
    os.utime(stage1.path("mid"), (now - 60, now - 60))  # mid: used before new
    pruned = one_json(hilomoe_cli("cache", "prune", "--max-size", str(new_size), "--json",
                                  "--dir", str(root)).stdout)
    assert [e["key"] for e in pruned["removed"]] == ["mid"] and pruned["bytes"] == new_size
    assert trials.get("new") is not None

    bad = hilomoe_cli("cache", "prune", "--max-size", "lots", check=False, env=env)
    assert bad.returncode == 2 and "--max-size: 'lots' is not a size" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    none = hilomoe_cli("cache", "prune", check=False, env=env)
    assert none.returncode == 2 and "--older-than" in none.stderr


def test_prune_leaves_an_entry_in_use_alone(tmp_path):
    root = tmp_path / "cache"
    stage1 = Stage1Cache(root / "stage1")
    stage1.put("busy", Stage1Entry({"w": torch.zeros(10)}, [], 1.0))
    with stage1.claim("busy"):
        assert cache_mod.prune_cache(root, max_bytes=0) == []
    assert [e.key for e in cache_mod.prune_cache(root, max_bytes=0)] == ["busy"]
