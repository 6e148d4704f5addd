"""Distributed training on Ray Train: exact distributed metrics, restarts, resume, job submit.

The worker plan and bad-input tests need no Ray. The rest run real Ray Train runs, on the
session's local Ray (in-process driver) or on Ray instances the test starts and stops itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import submit_job, hilomoe, kill_tree, one_json
from hilomoe.config import RayConfig, parse_config
from hilomoe.data.dataset import open_dataset
from hilomoe.data.readers import ParquetBatches
from hilomoe.engine.local import build_model
from hilomoe.engine.loop import Engine
from hilomoe.model import RoutingMode
from hilomoe.distributed.resources import ResourceError, plan_workers
from hilomoe.distributed.worker import FAULT_ENV

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "seed": 3,
    "data": {"synth": {"rows": 12_000, "categorical_fields": 4, "vocab_size": 12,
                       "numeric_fields": 2, "depth": 2, "branching": 3, "seed": 5}},
    "model": {"embedding_dim": 4, "backbone": {"mlp": [8], "cross_layers": 1},
              "moe": {"levels": 2, "experts": 4, "top_k": 2}},
    "stages": {"base": {"epochs": 2, "lr": 0.01, "batch_size": 256},
               "experts": {"epochs": 2, "lr": 0.01, "batch_size": 256},
               "joint": {"epochs": 1, "lr": 0.005, "batch_size": 256}},
    "eval_batch_size": 1024,
}


def tiny(**ray) -> dict:
    return {**TINY, "ray": ray}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Synthetic datasets are cached per spec; keep the cache inside the test session."""
    monkeypatch.setenv("HILOMOE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


# ----------------------------------------------------------------------------------------------
# worker plans and bad input (no Ray)


def test_two_workers_on_two_cores_leave_a_cpu_for_ray_data():
    plan = plan_workers(RayConfig(workers=2), {"CPU": 2.0})
    assert plan.cpus_per_worker == 0.5 and plan.data_cpus == 1.0
    assert plan.workers * plan.cpus_per_worker + plan.data_cpus <= 2.0
    assert plan.torch_threads == 1
    # one worker: its own CPU, plus the data CPU when no Ray Data process needs it
    assert plan_workers(RayConfig(workers=1), {"CPU": 2.0}).torch_threads == 1
    assert plan_workers(RayConfig(workers=1, reader="parquet"), {"CPU": 2.0}).torch_threads == 2
    big = plan_workers(RayConfig(workers=4, gpu=True), {"CPU": 64.0, "GPU": 4.0})
    assert big.data_cpus == 6.0 and big.cpus_per_worker == 14.5 and big.gpus_per_worker == 1
    assert big.resources() == {"CPU": 14.5, "GPU": 1.0}


@pytest.mark.parametrize("settings, cluster, fragment", [
    (RayConfig(workers=2, cpus_per_worker=1.0), {"CPU": 2.0},
     "2 worker(s) x 1 CPU need 2 CPUs, but the Ray cluster has 2 and 1 stay free"),
    (RayConfig(workers=20), {"CPU": 2.0}, "use at most 10 worker(s)"),
    (RayConfig(workers=2, gpu=True), {"CPU": 8.0}, "the Ray cluster has 0 GPU(s)"),
])
def test_requests_that_cannot_fit_are_refused_in_one_sentence(settings, cluster, fragment):
    with pytest.raises(ResourceError, match=None) as err:
        plan_workers(settings, cluster)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("change, fragment", [
    ({"model": {"moe": {"experts": 4, "top_k": 5}}}, "top_k (5) must be at most experts (4)"),
    ({"model": {"moe": {"rank": 0}}}, "model.moe.rank: Input should be greater than or equal to 1"),
    ({"ray": {"workerz": 2}}, "ray.workerz: unknown key"),
    ({"ray": {"eval_cache_mb": -1}}, "ray.eval_cache_mb: Input should be greater than or equal to 0"),
    ({"data": {"path": "/no/such/dataset"}}, "/no/such/dataset"),
])
def test_bad_configuration_is_rejected_before_ray_starts(tmp_path, change, fragment):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, **change}))
    proc = hilomoe("train", str(cfg), "--out", str(tmp_path / "run"), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr and "Ray Train:" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
# Ray Train runs (slow)


def _run(tmp_path: Path, raw: dict, name: str = "run"):
    from hilomoe.distributed.driver import TrainRun, train_ray

    events: list[dict] = []
    cfg = parse_config(raw, "test")
    summary = train_ray(TrainRun.create(cfg, tmp_path / name), events.append)
    return summary, [e for e in events if e["kind"] == "epoch"]


def _epochs(history: list[dict]) -> list[tuple[str, int]]:
    return [(h["stage"], h["epoch"]) for h in history]


EXPECTED = [("base", 0), ("base", 1), ("experts", 0), ("experts", 1), ("joint", 0)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchrec", "torch"])
def test_two_workers_report_exact_metrics_equal_to_one_process(ray_local, tmp_path, backend):
    """TorchRec tables sharded across the workers, or the torch table replicated with its
    sparse gradients all-reduced by DDP: either way the distributed metrics are exact."""
    raw = tiny(workers=2)
    raw["model"] = {**raw["model"], "embedding": {"backend": backend}}
    summary, events = _run(tmp_path, raw)
    assert summary["workers"] == 2 and summary["plan"]["cpus_per_worker"] == 0.5
    assert _epochs(summary["history"]) == EXPECTED == [(e["stage"], e["epoch"]) for e in events]
    for e in events:  # every epoch reports the loss, its parts, validation and routing figures
        for key in ("train_loss", "train_task", "valid_auc", "valid_logloss", "samples_per_s",
                    "elapsed_s", "epoch_seconds"):
            assert key in e, key
        if e["stage"] != "base":
            assert {"train_balance", "valid_level1_utilisation", "valid_level2_entropy",
                    "valid_paths"} <= set(e)
    # the final model, evaluated in one process over the whole test split
    out = Path(summary["out_dir"])
    cfg = parse_config(json.loads((out / "run.json").read_text())["config"], "run.json")
    ds = open_dataset(json.loads((out / "run.json").read_text())["dataset"])
    model = build_model(cfg, ds.schema)
    model.load_state_dict(torch.load(out / "model.pt"))
    model.set_routing(RoutingMode.SPARSE)  # the joint stage's routing
    single = Engine(model, cfg.stages).evaluate(ParquetBatches(ds, "test", 999).epoch(0))
    assert summary["test"]["auc"] == pytest.approx(single["auc"], abs=1e-9)
    assert summary["test"]["logloss"] == pytest.approx(single["logloss"], rel=1e-6)
    assert 0.5 < single["auc"] < 1.0
    # each stage's best weights, and Ray's checkpoints, are in the run directory
    assert sorted(p.name for p in (out / "models").iterdir()) == ["base.pt", "experts.pt",
                                                                   "joint.pt"]
    assert json.loads((out / "result.json").read_text())["test"] == summary["test"]


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_last_checkpoint(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, json.dumps({"stage": "experts", "epoch": 1, "rank": 1}))
    summary, events = _run(tmp_path, tiny(workers=2, max_failures=1))
    assert (Path(summary["out_dir"]) / ".fault-injected").read_text().split() == ["experts", "1",
                                                                                  "1"]
    # every epoch exactly once in the final report, and no finished stage ran again
    assert _epochs(summary["history"]) == EXPECTED
    seen = [(e["stage"], e["epoch"]) for e in events]
    assert seen[:3] == EXPECTED[:3]
    after = seen[seen.index(("experts", 0)) + 1:]
    assert ("base", 0) not in after and ("base", 1) not in after
    assert after[-2:] == [("experts", 1), ("joint", 0)]


@pytest.mark.slow
def test_sharded_tables_resume_after_a_worker_kill_with_the_uninterrupted_results(ray_local,
                                                                                  tmp_path,
                                                                                  monkeypatch):
    """Two workers, TorchRec tables sharded between them (each checkpoint holds one shard file
    per rank, with the fused row-wise optimiser state): a worker killed mid-stage restarts the
    group from the last checkpoint, and the run ends with exactly the metrics of a run that
    was never interrupted (both read their rows with pyarrow, in a seeded order)."""
    raw = tiny(workers=2, reader="parquet", max_failures=1)
    clean, _ = _run(tmp_path, raw, "clean")
    monkeypatch.setenv(FAULT_ENV, json.dumps({"stage": "joint", "epoch": 0, "rank": 1}))
    killed, _ = _run(tmp_path, raw, "killed")
    assert (Path(killed["out_dir"]) / ".fault-injected").exists()
    assert _epochs(killed["history"]) == _epochs(clean["history"]) == EXPECTED
    assert killed["test"] == clean["test"]
    for a, b in zip(clean["history"], killed["history"], strict=True):
        assert a["valid"] == b["valid"] and a["train"] == b["train"]
    # the tables were split: each rank held its own share, and wrote it
    assert [w["rank"] for w in clean["footprint"]] == [0, 1]
    ckpt = Path(clean["checkpoint"])
    assert (ckpt / "state.pt").is_file() and (ckpt / "state.rank1.pt").is_file()
    tables = lambda f: {k for k in torch.load(ckpt / f, weights_only=True)["model"]
                        if k.startswith("embedding.tables.")}
    assert tables("state.pt").isdisjoint(tables("state.rank1.pt"))
    assert len(tables("state.pt") | tables("state.rank1.pt")) == 4


@pytest.mark.slow
def test_one_seeded_worker_is_bit_reproducible(ray_local, tmp_path):
    raw = tiny(workers=1)
    raw["stages"] = {**TINY["stages"], "experts": {**TINY["stages"]["experts"], "epochs": 1}}
    a, _ = _run(tmp_path, raw, "a")
    b, _ = _run(tmp_path, raw, "b")
    strip = ("seconds", "samples_per_s")
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert {k: v for k, v in ha.items() if k not in strip} == \
               {k: v for k, v in hb.items() if k not in strip}
    wa = torch.load(Path(a["out_dir"]) / "model.pt")
    wb = torch.load(Path(b["out_dir"]) / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _registered_checkpoints(out: Path) -> list[str]:
    """The checkpoints Ray Train has registered for the run in `out` (its snapshot file)."""
    for snapshot in (out / "checkpoints").glob("*/checkpoint_manager_snapshot.json"):
        try:
            return [c["checkpoint_dir_name"]
                    for c in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (ValueError, KeyError):  # being written
            return []
    return []


@pytest.mark.slow
def test_a_killed_driver_resumes_from_its_last_checkpoint(tmp_path):
    """The driver (with the local Ray it started) is killed mid-run; --resume finishes it."""
    raw = tiny(workers=1)
    raw["stages"] = {**TINY["stages"], "base": {**TINY["stages"]["base"], "epochs": 4}}
    cfg, out = tmp_path / "cfg.yaml", tmp_path / "run"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HILOMOE_CACHE": os.environ["HILOMOE_CACHE"]}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "hilomoe", "train", str(cfg), "--out",
                             str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            # what --resume restores from: checkpoints Ray has registered in its snapshot (a
            # directory alone may not be registered yet when the driver dies)
            ckpts = _registered_checkpoints(out)
            if len(ckpts) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        assert len(ckpts) >= 2, "no registered checkpoint before the deadline"
    finally:
        kill_tree(proc)  # only what this test started
    assert not (out / "result.json").exists()
    res = hilomoe("train", "--resume", str(out), "--json", env=env)
    result = one_json(res.stdout)
    assert "resuming" in res.stderr
    expected = [("base", e) for e in range(4)] + EXPECTED[2:]
    assert _epochs(result["history"]) == expected
    # it continued: the resumed driver printed only the epochs after the last checkpoint
    printed = [line for line in res.stderr.splitlines() if "epoch" in line and "valid auc" in line]
    assert 0 < len(printed) < len(expected)
    assert result["out_dir"] == str(out.resolve()) and result["workers"] == 1


@pytest.mark.slow
def test_ray_job_submit_to_a_two_node_loopback_cluster(loopback_cluster, tmp_path):
    """`ray job submit --working-dir . -- python -m hilomoe train ...` against a real head with
    its job server and a second node: the job joins that cluster (RAY_ADDRESS is set for it)."""
    cluster = loopback_cluster
    assert cluster["nodes"] == 2
    cfg, out = tmp_path / "cfg.yaml", tmp_path / "job-run"
    cfg.write_text(yaml.safe_dump(tiny(workers=2)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({k: v for k, v in cluster["env"].items() if k != "RAY_ADDRESS"})
    submit = ["ray", "job", "submit", "--address", cluster["dashboard"], "--working-dir",
              str(REPO), "--", "python", "-m", "hilomoe", "train", str(cfg), "--out", str(out),
              "--json"]
    proc = submit_job(submit, env, REPO)
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["workers"] == 2 and _epochs(result["history"]) == EXPECTED
    assert result["plan"]["cpus_per_worker"] == 0.5  # sized from the cluster it joined
    assert json.loads((out / "result.json").read_text())["test"] == result["test"]
