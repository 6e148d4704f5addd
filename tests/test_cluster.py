"""Studies on a real multi-node Ray cluster on loopback (infra/local_cluster.py): `ray job submit`
of a study from the repository, with a real MLflow server, and a worker node lost mid-study."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import submit_job, kill_tree, one_json
from mlflow_server import start_mlflow_server, stop_mlflow_server
from test_study import TINY, _rest

REPO = Path(__file__).resolve().parents[1]


def cluster_env(cluster: dict, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, **cluster["env"], **extra}


@pytest.mark.slow
def test_ray_job_submit_runs_a_study_into_mlflow_and_the_storage_path(loopback_cluster,
                                                                     tmp_path):
    """The README's cluster path: `ray job submit --working-dir . -- hilomoe study run
    studies/smoke.yaml` against a head with its job server and a second node; the trials land
    in a real MLflow server and the results in the given storage path."""
    server, url = start_mlflow_server(tmp_path / "mlflow")
    try:
        out = tmp_path / "shared" / "studies" / "smoke"
        runtime = {"env_vars": {"MLFLOW_TRACKING_URI": url,
                                "HILOMOE_CACHE": str(tmp_path / "shared" / "cache")}}
        env = cluster_env(loopback_cluster)
        env.pop("RAY_ADDRESS", None)  # the job gets the cluster's own address
        submit = ["ray", "job", "submit", "--address", loopback_cluster["dashboard"],
                  "--working-dir", ".", "--runtime-env-json", json.dumps(runtime), "--",
                  "hilomoe", "study", "run", "studies/smoke.yaml", "--out", str(out), "--json"]
        proc = submit_job(submit, env, REPO)
        summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
        assert summary["counts"]["completed"] == 2 and summary["study_dir"] == str(out)
        assert json.loads((out / "result.json").read_text())["best"] == summary["best"]
        assert len(list((out / "trials").glob("*.json"))) == 2
        assert (out / "report" / "report.md").is_file()
        exp = _rest(url, "experiments/get-by-name", experiment_name="smoke")["experiment"]
        runs = _rest(url, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        children = [r for r in runs if any(t["key"] == "mlflow.parentRunId"
                                           for t in r["data"].get("tags", []))]
        assert len(runs) == 3 and len(children) == 2
        assert all(r["info"]["status"] == "FINISHED" for r in runs)
    finally:
        stop_mlflow_server(server)


def both_nodes_busy(events_file: Path) -> bool:
    """A trial has ended and two others are training (each has reported an epoch): with one
    CPU per node and one per trial, one of them is on the worker node. Waiting for the first
    trial file alone raced Tune: when the worker node's trial ended first, the node could be
    removed before the next trial was placed on it."""
    if not events_file.is_file():
        return False
    text = events_file.read_text()
    events = [json.loads(ln) for ln in text[:text.rfind("\n") + 1].splitlines()]  # whole lines
    started = {e["trial_id"] for e in events if e["kind"] == "trial_start"}
    ended = {e["trial_id"] for e in events if e["kind"] == "trial_end"}
    training = {e["trial_id"] for e in events if e["kind"] == "result"}
    running = started - ended
    return bool(ended) and len(running) == 2 and running <= training


@pytest.mark.slow
def test_a_study_survives_losing_a_worker_node(loopback_cluster, tmp_path):
    """Two trials at a time on a head and a worker node; the worker node is removed once a
    trial has ended and two others train. The trial it held restarts from its checkpoint on the
    head, the study finishes, and no trial that had finished runs again."""
    raw = json.loads(json.dumps(TINY))
    # trials of three stages and ~8 s: Tune notices the node's loss ~3 s after it, and the
    # trial it held must still be training then
    raw["train"]["data"]["synth"]["rows"] = 100000
    raw["train"]["stages"] = {name: {"epochs": epochs, "patience": epochs} for name, epochs
                              in (("base", 6), ("experts", 4), ("joint", 6))}
    raw["space"]["model.moe.variant"] = {"choice": ["hilomoe", "flat"]}
    raw["budget"] = {"trials": 4, "concurrency": 2, "cpus_per_trial": 1}
    study = tmp_path / "tiny.yaml"
    study.write_text(yaml.safe_dump(raw))
    out = tmp_path / "study"
    env = cluster_env(loopback_cluster, HILOMOE_CACHE=str(tmp_path / "cache"),
                      MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    driver = subprocess.Popen([sys.executable, "-m", "hilomoe", "study", "run", str(study),
                               "--out", str(out), "--no-cache", "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        deadline = time.time() + 300
        while not both_nodes_busy(out / "events.jsonl"):
            assert driver.poll() is None, driver.stderr.read()
            assert time.time() < deadline, "two trials never trained at once after one ended"
            time.sleep(0.1)
        finished = {p.stem for p in (out / "trials").glob("*.json")}
        killed_at = time.time()
        loopback_cluster["proc"].send_signal(signal.SIGUSR1)
        assert json.loads(loopback_cluster["proc"].stdout.readline())["removed_node"]
        stdout, stderr = driver.communicate(timeout=600)
    finally:
        kill_tree(driver)
    assert driver.returncode == 0, stderr[-3000:]
    summary = one_json(stdout)
    assert summary["counts"]["completed"] == 4
    events = [json.loads(ln) for ln in (out / "events.jsonl").read_text().splitlines()]
    recovered = {e["trial_id"] for e in events if e["kind"] == "trial_recover"}
    assert recovered, "no trial was on the lost node"
    assert not recovered & finished
    rerun = {e["trial_id"] for e in events
             if e["kind"] == "result" and e["time"] > killed_at and not e["reused"]}
    assert not rerun & finished  # finished trials are neither lost nor run again


@pytest.mark.slow
def test_the_local_cluster_stops_cleanly_on_sigterm():
    """SIGTERM (what the fixture and `kill <pid>` send) stops every node and exits with 0;
    Ray's own handler, which each added node installs, would stop one node and exit with 1."""
    proc = subprocess.Popen([sys.executable, str(REPO / "infra" / "local_cluster.py"),
                             "--workers", "1", "--object-store-mb", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        host, port = info["gcs"].rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()  # the head answers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(OSError):  # and is gone
            socket.create_connection((host, int(port)), timeout=5).close()
    finally:
        kill_tree(proc)
