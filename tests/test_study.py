"""Studies end to end on a real local Ray: Tune + Optuna trials, the stage-1 cache, MLflow (a
SQLite store, and a real `mlflow server` on loopback that goes away mid-study), the report,
resume after a killed driver, and `hilomoe ui`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import hilomoe, kill_tree, one_json
from mlflow_server import free_port, start_mlflow_server, stop_mlflow_server
from hilomoe.study.space import SearchSpace, config_key
from hilomoe.study.spec import load_study

TINY = {
    "name": "tiny",
    "train": {
        "data": {"synth": {"rows": 6000, "categorical_fields": 4, "vocab_size": 10,
                           "numeric_fields": 1, "depth": 2, "branching": 3}},
        "model": {"embedding_dim": 4, "backbone": {"mlp": [8], "cross_layers": 1},
                  "moe": {"levels": 2, "experts": 4, "top_k": 2}},
        "stages": {"base": {"epochs": 3, "lr": 0.005}, "experts": {"epochs": 2},
                   "joint": {"epochs": 3}},
    },
    "space": {"model.moe.variant": {"choice": ["dense", "hilomoe", "flat"]},
              "model.moe.experts": {"choice": [2, 4]}},
    "budget": {"trials": 4, "concurrency": 2},
    "scheduler": {"type": "none"},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory of its own (the default MLflow store is ./mlflow.db) and a fresh
    cache (datasets, stage 1)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HILOMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def write_study(path: Path, space: dict | None = None, **changes) -> Path:
    """TINY with `space` entries replaced and dotted-path `changes` applied."""
    raw = json.loads(json.dumps(TINY))
    raw["space"].update(space or {})
    for key, value in changes.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


# -- bad input, before Ray ---------------------------------------------------------------------


def test_bad_study_files_are_refused_in_one_sentence(workdir):
    bad = write_study(workdir / "bad.yaml", space={"model.moe.experts": {"choice": []}})
    res = hilomoe("study", "run", str(bad), check=False)
    assert res.returncode == 2
    assert "space.model.moe.experts" in res.stderr and "at least one value" in res.stderr
    assert "Traceback" not in res.stderr and not (workdir / "runs").exists()
    res = hilomoe("study", "run", str(workdir / "missing.yaml"), check=False)
    assert res.returncode == 2 and "no such configuration file" in res.stderr


def test_resume_needs_a_study_directory_and_the_same_file(workdir):
    study = write_study(workdir / "s.yaml")
    res = hilomoe("study", "run", str(study), "--resume", "--out", "nowhere", check=False)
    assert res.returncode == 2 and "not a study directory" in res.stderr
    from hilomoe.study.run_dir import STUDY_FILE, StudyRun
    from hilomoe.study.spec import load_study

    (workdir / "st").mkdir()
    StudyRun(str(workdir / "st"), load_study(study).model_dump(mode="json"), "ds", "tiny",
             "sqlite:///x.db").save()
    assert (workdir / "st" / STUDY_FILE).is_file()
    changed = write_study(workdir / "s2.yaml", **{"budget.trials": 5})
    res = hilomoe("study", "run", str(changed), "--resume", "--out", "st", check=False)
    assert res.returncode == 2 and "the study file changed" in res.stderr
    res = hilomoe("study", "run", str(study), "--out", "st", check=False)
    assert res.returncode == 2 and "already holds a study" in res.stderr


def test_inside_a_ray_job_the_default_study_directory_is_a_stable_place(workdir, monkeypatch):
    """A Ray job's working directory belongs to Ray: without --out, a study asks for one (or
    goes under $HILOMOE_HOME) instead of dying mid-way when Ray replaces the directory."""
    from hilomoe.distributed.runtime import runs_dir

    study = write_study(workdir / "s.yaml")
    job = {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}  # what Ray's job supervisor sets
    res = hilomoe("study", "run", str(study), check=False, env=job)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "inside a Ray job" in res.stderr and "--out" in res.stderr
    assert not (workdir / "runs").exists()
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setenv("HILOMOE_HOME", str(workdir / "home"))
    assert runs_dir("tiny") == workdir / "home" / "runs" / "tiny"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    monkeypatch.delenv("HILOMOE_HOME")
    assert runs_dir("tiny") == Path("runs") / "tiny"


# -- a whole study -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_study_runs_trials_shares_stage_1_tracks_mlflow_and_reports(workdir):
    # the random sampler's draws do not depend on which trials have finished (TPE's do, past its
    # startup trials), so the rerun below proposes the same points
    study = write_study(workdir / "tiny.yaml", sampler="random")
    summary = one_json(hilomoe("study", "run", str(study), "--json").stdout)
    assert {"best", "pareto", "trials", "stage1_reused", "study_dir",
            "mlflow_experiment"} <= summary.keys()
    trials = summary["trials"]
    assert len(trials) == 4 and summary["counts"]["completed"] == 4
    # a dense trial draws no MoE setting, and no two trials train the same model
    for t in trials:
        assert ("model.moe.experts" in t["params"]) == (t["params"]["model.moe.variant"] != "dense")
    space = SearchSpace(load_study(study))
    assert len({space.key(t["params"]) for t in trials}) == 4
    # every trial has the same base: exactly one trains stage 1; the others adopt it
    assert summary["stage1_reused"] == sum(t["stage1_reused"] for t in trials) == 3
    assert summary["trials_reused"] == 0
    assert summary["stage1_saved_s"] > 0
    # the plan came first (plan.json); the run records the actual against it, per phase too
    plan = json.loads((Path(summary["study_dir"]) / "plan.json").read_text())
    cost = summary["plan"]
    assert cost["wall_s"]["predicted"] == plan["wall_s"] > 0
    assert cost["wall_s"]["actual"] == pytest.approx(
        summary["wall_s"] - plan["calibration"]["seconds"])
    assert cost["error"] == pytest.approx(plan["wall_s"] / cost["wall_s"]["actual"] - 1)
    search = cost["phases"][0]
    assert search["phase"] == "search" and search["trials"] == {"predicted": 4, "actual": 4}
    assert 0 < search["wall_s"]["actual"] < cost["wall_s"]["actual"]
    assert [p["trials"]["actual"] for p in cost["phases"][1:]] == [0, 0]
    best = max(trials, key=lambda t: t["valid_auc"])
    assert summary["best"]["trial_id"] == best["trial_id"]
    assert summary["best"]["metrics"]["valid_auc"] == best["valid_auc"]
    assert summary["best"]["config"]["model"]["moe"]["variant"] == best["params"]["model.moe.variant"]
    for p in summary["pareto"]:  # nothing on the front is beaten on both objectives
        assert {"variant", "auc", "flops"} <= p.keys()
        assert not any(t["valid_auc"] > p["auc"] and t["flops"] < p["flops"] for t in trials)

    study_dir = Path(summary["study_dir"])
    assert "## Cost: planned against actual" in (study_dir / "report" / "report.md").read_text()
    assert (study_dir / "report" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # MLflow: one parent, one child per trial, per-stage epoch metrics, the best model
    uri = summary["tracking_uri"]
    assert uri == f"sqlite:///{workdir / 'mlflow.db'}"
    c = client(uri)
    exp = c.get_experiment_by_name(summary["mlflow_experiment"])
    runs = c.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == summary["mlflow_run_id"]][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and parent.info.status == "FINISHED"
    assert "report/report.md" in [a.path for a in c.list_artifacts(parent.info.run_id, "report")]
    base_aucs = set()
    for child in children:
        history = c.get_metric_history(child.info.run_id, "base/valid_auc")
        assert [m.step for m in history] == list(range(len(history))) and history
        base_aucs.add(tuple(m.value for m in history))
        # the searched settings apart; a dense trial carries no MoE setting it ignored
        variant = child.data.params["search.model.moe.variant"]
        assert variant in ("dense", "hilomoe", "flat") and "model.moe.variant" not in \
            child.data.params
        moe = [k for k in child.data.params if k.startswith(("model.moe.", "stages.joint."))]
        assert bool(moe) == (variant != "dense"), moe
        assert "data.path" not in child.data.params and "None" not in child.data.params.values()
        # how it ended, and one value per summary metric, at step 0
        status = child.data.tags["hilomoe.status"]
        assert status in ("completed", "pruned") and child.info.status == "FINISHED"
        assert "test_auc" in child.data.metrics and "flops" in child.data.metrics
        assert [m.step for m in c.get_metric_history(child.info.run_id, "valid_auc")] == [0]
        assert child.data.tags["mlflow.source.name"] == "hilomoe study run"
    # a shared stage 1 is one stage 1: every trial shows the same base-stage epochs
    assert len(base_aucs) == 1
    best_run = next(r for r in children if r.info.run_name == best["trial_id"])
    import mlflow

    mlflow.set_tracking_uri(uri)
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id],
                                         output_format="list")
    # the best model: a LoggedModel of the study run, with the best trial's final metrics
    assert [m.source_run_id for m in models] == [parent.info.run_id]
    assert models[0].tags["hilomoe.trial_run_id"] == best_run.info.run_id
    logged = {m.key: m.value for m in models[0].metrics}
    assert logged["valid_auc"] == pytest.approx(best["valid_auc"])
    assert logged["test_auc"] == pytest.approx(best["test_auc"]) and "flops" in logged
    from mlflow.models import get_model_info

    info = get_model_info(f"models:/{models[0].model_id}")
    # one named column per field, the ids first: what a served model takes
    assert [c.name for c in info.signature.inputs.inputs] == ["C1", "C2", "C3", "C4", "I1"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.hilomoe"])
    columns = json.loads(view["state"])["selectedColumns"]
    assert "params.`search.model.moe.variant`" in columns and "metrics.`valid_auc`" in columns
    assert summary["mlflow_url"].endswith(f"/#/experiments/{exp.experiment_id}/runs?"
                                          f"workflowType=machine_learning&viewStateShareKey=hilomoe")
    # the report MLflow shows: HTML with its plots inlined
    page = c.download_artifacts(parent.info.run_id, "report/report.html", str(workdir / "dl"))
    assert "data:image/png;base64," in Path(page).read_text()

    # the same study again: every configuration was trained before, so every trial replays its
    # result (same metrics, no training)
    rerun = one_json(hilomoe("study", "run", str(study), "--out", "again", "--json").stdout)
    assert rerun["trials_reused"] == 4 and rerun["train_s"] == 0
    first = {json.dumps(t["params"], sort_keys=True): t["valid_auc"] for t in trials}
    assert all(first.get(json.dumps(t["params"], sort_keys=True), t["valid_auc"]) ==
               t["valid_auc"] for t in rerun["trials"])
    # in MLflow a replayed trial says so, names the trial that trained it, and shows the
    # epochs and seconds that training took
    replayed = c.search_runs([exp.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{rerun['mlflow_run_id']}'"))
    ids = {t["trial_id"] for t in trials}
    assert len(replayed) == 4
    for run in replayed:
        assert run.data.tags["hilomoe.status"] == "reused"
        origin = run.data.tags["hilomoe.reused_from"]
        assert origin.startswith("trial ") and origin.split()[1] in ids, origin
        assert run.data.metrics["epochs"] > 0 and run.data.metrics["train_seconds"] > 0

    # the report again, from the study directory and from the MLflow experiment
    again = one_json(hilomoe("study", "report", str(study_dir), "--json").stdout)
    assert again["trials"] == 4 and again["pareto"] == summary["pareto"]
    assert "## Cost: planned against actual" in (study_dir / "report" / "report.md").read_text()
    from_mlflow = one_json(hilomoe("study", "report", "tiny", "--json").stdout)
    assert from_mlflow["pareto"] == rerun["pareto"]  # the experiment's latest study
    assert Path(from_mlflow["markdown"]).is_file()


@pytest.mark.slow
def test_repeats_train_the_baseline_and_the_front_again_and_give_the_interval(workdir):
    """`repeats: 2`: after the search the best dense trial and the HiLoMoE front train again
    with seed 1, each an MLflow child run; the headline's interval comes from those pairs."""
    study = write_study(workdir / "tiny.yaml",
                        space={"model.moe.variant": {"choice": ["dense", "hilomoe"]}},
                        **{"budget.trials": 3, "repeats": 2})
    summary = one_json(hilomoe("study", "run", str(study), "--json").stdout)
    trials, repeats = summary["trials"], summary["repeats"]
    assert len(trials) == 3 and not any("repeat_of" in t for t in trials)  # 3 distinct points
    by_id = {t["trial_id"]: t for t in trials}
    dense = [t for t in trials if t["variant"] == "dense"]
    assert {r["repeat_of"] for r in repeats} >= {dense[0]["trial_id"]}
    for r in repeats:
        original = by_id[r["repeat_of"]]
        assert r["seed"] == original["seed"] + 1 and r["status"] == "completed"
        assert r["params"] == {**original["params"], "seed": r["seed"]}
        assert r["flops"] == original["flops"]
    h = summary["headline"]
    assert h["seeds"] == 2 and h["metric"] == "test_auc"
    ours, base = by_id[h["model_trial"]], by_id[h["baseline_trial"]]
    again = {r["repeat_of"]: r for r in repeats}
    diffs = [ours["test_auc"] - base["test_auc"],
             again[ours["trial_id"]]["test_auc"] - again[base["trial_id"]]["test_auc"]]
    assert h["auc_diff"] == pytest.approx(sum(diffs) / 2)
    half = 12.7062047 * abs(diffs[0] - diffs[1]) / 2  # t(0.975, 1) * sd / sqrt(2)
    assert h["auc_diff_ci"] == pytest.approx([h["auc_diff"] - half, h["auc_diff"] + half])
    assert h["verdict"] in ("within noise", "hilomoe better", "dense better")
    report = Path(summary["report"]).read_text()
    assert "over 2 seeds" in report and h["verdict"] in report

    c = client(summary["tracking_uri"])
    exp = c.get_experiment_by_name(summary["mlflow_experiment"])
    children = c.search_runs([exp.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = "
                                           f"'{summary['mlflow_run_id']}'")
    assert len(children) == len(trials) + len(repeats)
    assert {r.data.params["seed"] for r in children} == {"0", "1"}  # a repeat's seed: plain


@pytest.mark.slow
def test_a_law_design_gives_each_axis_six_values_and_the_laws_are_fitted(workdir):
    """`laws: {axes: [experts, train_size]}`: after a one-trial search, a grid along each axis
    around the best trial; each law has 6 distinct values, a fit and a held-out check, and the
    joint law in parameters and data is fitted on the crossed grids."""
    study = write_study(workdir / "tiny.yaml",
                        space={"model.moe.variant": {"choice": ["hilomoe"]}},
                        **{"budget.trials": 1, "laws": {
                            "axes": ["experts", "train_size"],
                            "values": {"experts": [2, 3, 4, 5, 6, 8]}}})
    summary = one_json(hilomoe("study", "run", str(study), "--json").stdout)
    (center,) = [t for t in summary["trials"] if "design_axis" not in t]
    designed = [t for t in summary["trials"] if "design_axis" in t]
    for axis, field, values in (("experts", "experts", 6), ("train_size", "train_rows", 6)):
        mine = [t for t in designed if t["design_axis"] == axis and t["status"] == "completed"]
        assert len({t[field] for t in mine} | {center[field]}) >= values  # the center is one
        others = {"experts": "train_fraction", "train_size": "experts"}[axis]
        assert {t[others] for t in mine} == {center[others]}  # all else fixed at the center
    rows = sorted(t["train_rows"] for t in designed if t["design_axis"] == "train_size")
    n = center["train_rows"]  # the whole split; the grid's other fractions 1/32 .. 1/2
    assert abs(rows[-1] - n / 2) <= 1 and abs(rows[0] - n / 32) <= 1
    laws = summary["laws"]
    for axis in ("experts", "train_rows"):
        assert axis in laws and ("heldout_mae" in laws[axis])
    report = Path(summary["report"]).read_text()
    assert "| training rows D |" in report and "## Joint law in parameters and data" in report
    # no configuration twice: the center's own value along an axis is the center itself
    spec = load_study(study)
    keys = [config_key(spec.train.with_overrides(**t["params"])) for t in summary["trials"]]
    assert len(set(keys)) == len(keys) == 1 + 5 + 5


@pytest.mark.slow
def test_a_killed_study_driver_resumes_without_rerunning_finished_trials(workdir):
    # 6 distinct points of 10 (dense twice, hilomoe and flat four times each)
    study = write_study(workdir / "tiny.yaml", space={"stages.base.lr": {"choice": [0.005, 0.01]}},
                        **{"budget.trials": 6, "budget.concurrency": 1,
                           "train.data.synth.rows": 20000})
    out = workdir / "runs" / "tiny"
    proc = subprocess.Popen([sys.executable, "-m", "hilomoe", "study", "run", str(study),
                             "--no-cache"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / "trials").glob("*.json"))) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
    finally:
        kill_tree(proc)  # the driver and the Ray it started, nothing else
    finished = {p.stem for p in (out / "trials").glob("*.json")}
    assert 2 <= len(finished) < 6 and not (out / "result.json").exists()
    mark = time.time()
    summary = one_json(hilomoe("study", "run", str(study), "--no-cache", "--resume",
                               "--json").stdout)
    assert len(summary["trials"]) == 6 and summary["counts"]["completed"] == 6
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    retrained = {e["trial_id"] for e in events
                 if e["time"] > mark and e["kind"] == "result" and not e["reused"]}
    assert not retrained & finished  # no epoch of a finished trial ran again
    # the plan the first driver made before its first trial is the plan the study keeps
    plan = json.loads((out / "plan.json").read_text())
    assert summary["plan"]["wall_s"]["predicted"] == plan["wall_s"] > 0
    assert summary["plan"]["resumed"] is True and summary["plan"]["calibration_s"] == 0.0
    # MLflow: still one parent run, one child per trial
    c = client(summary["tracking_uri"])
    exp = c.get_experiment_by_name("tiny")
    runs = c.search_runs([exp.experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert {r.info.run_name for r in children if r.info.status == "FINISHED"} == \
           {t["trial_id"] for t in summary["trials"]}
    # a trial started after Tune's last snapshot was replaced by a new one: its run was closed
    assert all(r.info.status == "KILLED" for r in children
               if r.info.run_name not in {t["trial_id"] for t in summary["trials"]})


def _rest(url: str, path: str, body: dict | None = None, **query: str) -> dict:
    """MLflow's REST API: POST with a JSON body, or GET with query parameters."""
    target = f"{url}/api/2.0/mlflow/{path}"
    if query:
        target += "?" + urllib.parse.urlencode(query)
    req = urllib.request.Request(target, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_a_study_survives_its_mlflow_server_restarting(workdir):
    """A real `mlflow server` on loopback: it stops after the first trial and comes back a
    little later; the study goes on, warns, replays what it buffered, and every trial's run
    can be read back through MLflow's REST API."""
    server_dir = workdir / "server"
    server_dir.mkdir()
    port = free_port()
    server, url = start_mlflow_server(server_dir, port=port)
    # trials of several seconds: the server is down for one of them and back well before the
    # end (the tracker retries every 10 s)
    study = write_study(workdir / "tiny.yaml", **{"budget.trials": 5, "budget.concurrency": 1,
                                                  "train.data.synth.rows": 60000})
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    proc = subprocess.Popen([sys.executable, "-m", "hilomoe", "study", "run", str(study),
                             "--no-cache", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        trials = workdir / "runs" / "tiny" / "trials"
        deadline = time.time() + 300
        while time.time() < deadline and not list(trials.glob("*.json")):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        stop_mlflow_server(server)
        while time.time() < deadline and len(list(trials.glob("*.json"))) < 2:
            time.sleep(0.2)
        server, url = start_mlflow_server(server_dir, port=port)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        kill_tree(proc)
        stop_mlflow_server(server)
        server, url = start_mlflow_server(server_dir, port=port)
    try:
        assert proc.returncode == 0, stderr
        summary = one_json(stdout)
        assert summary["counts"]["completed"] == 5
        assert stderr.count("unreachable") == 1 and "reachable again" in stderr
        exp = _rest(url, "experiments/get-by-name", experiment_name="tiny")["experiment"]
        runs = _rest(url, "runs/search", {"experiment_ids": [exp["experiment_id"]],
                                          "max_results": 100})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        children = [r for r, t in zip(runs, tags) if "mlflow.parentRunId" in t]
        assert len(children) == 5
        for r in children:
            metrics = {m["key"] for m in r["data"]["metrics"]}
            params = {p["key"]: p["value"] for p in r["data"]["params"]}
            stages = ["base"] + (["experts", "joint"]
                                 if params["search.model.moe.variant"] != "dense" else [])
            assert {f"{s}/valid_auc" for s in stages} | {"test_auc", "flops"} <= metrics
            assert r["info"]["status"] == "FINISHED"
    finally:
        stop_mlflow_server(server)


@pytest.mark.slow
def test_hilomoe_ui_serves_the_default_store(workdir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hilomoe", "ui", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the MLflow UI did not answer")
        assert (workdir / "mlflow.db").is_file()  # the store a study in this directory uses
    finally:
        kill_tree(proc)


@pytest.mark.slow
def test_a_trial_with_two_workers_trains_on_a_torch_trainer(workdir):
    """budget.workers_per_trial > 1: the trial runs `hilomoe train`'s worker loop on a
    TorchTrainer of two DDP workers (with Ray Data), reporting to Tune through
    TuneReportCallback; its result, checkpoint and MLflow run are like any other trial's."""
    study = write_study(workdir / "tiny.yaml", space={"model.moe.variant": {"choice": ["hilomoe"]},
                                                      "model.moe.experts": {"choice": [4]}},
                        **{"budget.trials": 1, "budget.concurrency": 1,
                           "budget.workers_per_trial": 2, "budget.cpus_per_trial": 2})
    summary = one_json(hilomoe("study", "run", str(study), "--json").stdout)
    (trial,) = summary["trials"]
    assert trial["status"] == "completed" and trial["test_auc"] > 0.5
    assert f"train-{trial['trial_id']}" in trial["checkpoint"]  # the trial's TorchTrainer run
    c = client(summary["tracking_uri"])
    child = c.search_runs([c.get_experiment_by_name("tiny").experiment_id],
                          filter_string=f"attributes.run_name = '{trial['trial_id']}'")[0]
    # epochs on the run's axis: the joint stage follows the two before it
    stages = [m.step for m in c.get_metric_history(child.info.run_id, "joint/valid_auc")]
    assert stages and stages[0] > 0 and stages == list(range(stages[0], stages[0] + len(stages)))
