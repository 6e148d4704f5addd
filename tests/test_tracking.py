"""MLflow tracking of a study: runs, params, metric histories and records on a SQLite store;
buffering while MLflow is unreachable; a real server killed and restarted mid-study (slow)."""

from __future__ import annotations

import json
import math
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from hilomoe.errors import HilomoeError
from hilomoe.tracking.read import load_records
from hilomoe.tracking.retry import tracking_uri
from hilomoe.tracking.runs import Tracker
from mlflow_server import free_port, start_mlflow_server, stop_mlflow_server

TRIALS = ("t0", "t1")


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    """The variables Tracker sets with setdefault, restored after each test."""
    for key, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
                       "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "1",
                       "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _auc(i: int, epoch: int) -> float:
    return 0.5 + 0.01 * epoch + 0.1 * i


def _record(i: int, trial: str) -> dict:
    return {"trial_id": trial, "params": {"model.moe.experts": 4 * (i + 1)},
            "metrics": {"valid_auc": _auc(i, 2)}, "epochs": 3, "status": "FINISHED"}


def _params(i: int) -> dict:
    return {"model": {"moe": {"experts": 4 * (i + 1), "top_k": 2}}, "stages.joint.lr": 0.01,
            "tags": ["a", "b"], "long": "x" * 7000}


def _run_study(tr: Tracker, tmp_path: Path, model: torch.nn.Module | None = None) -> None:
    tr.start_study({"name": "s", "budget": {"trials": 2, "concurrency": 1}},
                   tags={"hilomoe.study": "s"})
    for i, trial in enumerate(TRIALS):
        tr.start_trial(trial, _params(i), config={"model": {"moe": {"experts": 4 * (i + 1)}}})
        for epoch in range(3):
            tr.log_metrics(trial, {"base/valid_auc": _auc(i, epoch), "base/loss": float("nan"),
                                   "note": "text", "inf": math.inf}, step=epoch)
        tr.finish_trial(trial, {"valid_auc": _auc(i, 2)}, record=_record(i, trial),
                        artifacts={"curves": {"auc": [_auc(i, e) for e in range(3)]}})
    if model is not None:
        tr.log_model(model, input_example=torch.ones(2, 3).numpy(),
                     metrics={"valid_auc": _auc(0, 2), "test_auc": 0.61, "nan": math.nan},
                     params={"model": {"moe": {"experts": 4}}}, tags={"hilomoe.trial_id": "t0"},
                     register="study-a-best")
    report = tmp_path / "report"
    report.mkdir(exist_ok=True)
    (report / "pareto.json").write_text('{"front": [1]}')
    tr.log_study_artifacts(report)
    tr.log_study_metrics({"best/valid_auc": _auc(1, 2)})


def _children(client, experiment_id: str, parent: str) -> dict:
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    return {r.data.tags["hilomoe.trial_id"]: r for r in runs}


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifact_json(client, run_id: str, path: str, dst: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, path, str(dst))).read_text())


def test_tracking_uri_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert tracking_uri() == "http://127.0.0.1:5001"


def test_study_on_sqlite(monkeypatch, tmp_path):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)        # SQLite's default artifact root is ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    warnings: list[str] = []
    tr = Tracker("study-a", uri=uri, on_warning=warnings.append)
    model = torch.nn.Linear(3, 1)
    _run_study(tr, tmp_path, model)
    assert tr.finish_study() is True
    assert warnings == [] and tr.healthy and tr.pending == 0

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("study-a")
    assert exp.experiment_id == tr.experiment_id
    assert Path(urllib.parse.urlparse(exp.artifact_location).path).is_relative_to(tmp_path)
    parent = client.get_run(tr.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "study-a"
    assert parent.data.tags["hilomoe.role"] == "study"
    assert parent.data.tags["hilomoe.study"] == "s"
    assert parent.data.params == {"name": "s", "budget.trials": "2", "budget.concurrency": "1"}
    # its own metrics, and the best model's (MLflow keeps a model's metrics on its run)
    assert parent.data.metrics == {"best/valid_auc": pytest.approx(_auc(1, 2)),
                                   "valid_auc": pytest.approx(_auc(0, 2)), "test_auc": 0.61}
    assert [f.path for f in client.list_artifacts(parent.info.run_id, "report")] == \
        ["report/pareto.json"]

    children = _children(client, tr.experiment_id, tr.parent_run_id)
    assert set(children) == set(TRIALS)
    for i, trial in enumerate(TRIALS):
        run = children[trial]
        assert run.info.run_id == tr.run_ids[trial]
        assert run.info.run_name == trial and run.info.status == "FINISHED"
        params = run.data.params
        assert params["model.moe.experts"] == str(4 * (i + 1))
        assert params["model.moe.top_k"] == "2"
        assert params["stages.joint.lr"] == "0.01"
        assert params["tags"] == '["a", "b"]'
        assert len(params["long"]) == 6000
        assert _history(client, run.info.run_id, "base/valid_auc") == \
            [(e, pytest.approx(_auc(i, e))) for e in range(3)]
        assert {"base/loss", "note", "inf"}.isdisjoint(run.data.metrics)
        # a summary is one value per run, at step 0 (one bar per trial across runs)
        assert _history(client, run.info.run_id, "valid_auc") == [(0, pytest.approx(_auc(i, 2)))]
        dst = tmp_path / "dl" / trial
        assert _artifact_json(client, run.info.run_id, "trial.json", dst) == _record(i, trial)
        assert _artifact_json(client, run.info.run_id, "config.json", dst) == \
            {"model": {"moe": {"experts": 4 * (i + 1)}}}
        assert _artifact_json(client, run.info.run_id, "curves.json", dst) == \
            {"auc": [_auc(i, e) for e in range(3)]}

    # The model: a LoggedModel of the study run with the final metrics (none of the run's
    # own), its params and tags, a signature from the input example, loadable, registered.
    import mlflow.pytorch
    from mlflow.models import Model

    models = client.search_logged_models(experiment_ids=[tr.experiment_id])
    assert [m.source_run_id for m in models] == [tr.parent_run_id]
    logged = models[0]
    assert {m.key: m.value for m in logged.metrics} == \
        {"valid_auc": pytest.approx(_auc(0, 2)), "test_auc": pytest.approx(0.61)}
    assert logged.params["model.moe.experts"] == "4"
    assert logged.tags["hilomoe.trial_id"] == "t0"
    # read from the model's own directory: `models:/` URIs resolve against MLflow's global
    # tracking URI, which another test of this process may have pointed at another store
    local = Path(urllib.parse.urlparse(logged.artifact_location).path)
    assert Model.load(str(local)).signature.inputs.inputs[0].shape == (-1, 3)
    loaded = mlflow.pytorch.load_model(str(local))
    assert torch.equal(loaded.weight, model.weight)
    versions = client.search_model_versions("name = 'study-a-best'")
    assert [client.get_model_version(v.name, v.version).source for v in versions] == \
        [f"models:/{logged.model_id}"]
    assert client.get_experiment(tr.experiment_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"
    assert client.get_experiment("0").lifecycle_stage == "deleted"  # the empty Default

    records, parent_id = load_records("study-a", uri)
    assert parent_id == tr.parent_run_id
    assert records == [_record(0, "t0"), _record(1, "t1")]

    # A resumed study reopens the same runs: known params are not re-logged, new ones are.
    warnings2: list[str] = []
    again = Tracker("study-a", uri=uri, on_warning=warnings2.append)
    assert again.start_study({"name": "s", "budget": {"trials": 4, "concurrency": 1},
                              "resumed": True}, run_id=tr.parent_run_id) == tr.parent_run_id
    assert client.get_run(tr.parent_run_id).info.status == "RUNNING"
    again.start_trial("t1", _params(1), config={"model": {"moe": {"experts": 8}}},
                      run_id=tr.run_ids["t1"])
    again.log_metrics("t1", {"base/valid_auc": 0.75}, step=3)
    again.finish_trial("t1", {"valid_auc": 0.75}, record={**_record(1, "t1"), "epochs": 4})
    assert again.finish_study() is True
    assert len(warnings2) == 1 and "budget.trials" in warnings2[0]   # MLflow keeps the first
    parent = client.get_run(tr.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["resumed"] == "True" and parent.data.params["budget.trials"] == "2"
    children = _children(client, tr.experiment_id, tr.parent_run_id)
    assert set(children) == set(TRIALS) and children["t1"].info.run_id == tr.run_ids["t1"]
    assert _history(client, tr.run_ids["t1"], "base/valid_auc")[-1] == (3, 0.75)
    assert len(client.search_runs([tr.experiment_id])) == 3
    records, _ = load_records("study-a", uri)
    assert records[1]["epochs"] == 4


def test_load_records_errors(monkeypatch, tmp_path):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(HilomoeError, match="no experiment named 'nope'"):
        load_records("nope", uri)
    MlflowClient(uri).create_experiment("empty")
    with pytest.raises(HilomoeError, match="has no study runs"):
        load_records("empty", uri)


def _call_limit(calls: int) -> float:
    """A generous bound for `calls` calls on a dead server: each may try one HTTP request
    (timeout x (1 + retries)); a buffered call costs nothing."""
    per_request = float(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) * \
        (1 + int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]))
    return calls * per_request


@pytest.mark.parametrize("retry_every_s", [3600.0, 0.0])
def test_unreachable_server_buffers(tmp_path, retry_every_s):
    url = f"http://127.0.0.1:{free_port()}"      # nothing listens there
    warnings: list[str] = []
    tr = Tracker("down", uri=url, on_warning=warnings.append, retry_every_s=retry_every_s)
    calls = 0
    start = time.monotonic()
    assert tr.start_study({"name": "s"}) is None
    calls += 1
    for i, trial in enumerate(TRIALS):
        tr.start_trial(trial, _params(i), config={})
        calls += 1
        for epoch in range(6):
            tr.log_metrics(trial, {"base/valid_auc": _auc(i, epoch)}, step=epoch)
            calls += 1
        tr.finish_trial(trial, {"valid_auc": 0.7}, record=_record(i, trial))
        calls += 1
    tr.log_model(torch.nn.Linear(2, 1))
    tr.log_study_metrics({"best": 1.0})
    calls += 2
    elapsed = time.monotonic() - start
    # Retried every call (retry 0) each call costs at most one failed request.
    assert elapsed < _call_limit(1 if retry_every_s else calls)
    assert len(warnings) == 1 and url in warnings[0] and "unreachable" in warnings[0]
    assert "ConnectionError" in warnings[0]
    assert not tr.healthy and tr.parent_run_id is None and tr.run_ids == {}
    assert tr.pending == calls
    assert tr.flush() is False
    assert tr.finish_study() is False
    assert len(warnings) == 2 and "not written" in warnings[1]
    assert "study directory" in warnings[1]


class _FlakyClient:
    """An MlflowClient whose every call fails with a connection error while `down` is set."""

    def __init__(self, client):
        self.client = client
        self.down = False

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down:
                import requests

                raise requests.exceptions.ConnectionError("connection refused (test)")
            return attr(*args, **kwargs)

        return call


def test_outage_replays_in_order(monkeypatch, tmp_path):
    """Calls made while MLflow is down (a trial's creation included) are written, in order,
    with the steps and times of the calls, once it is back; the model is the one of the call."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    warnings: list[str] = []
    tr = Tracker("flaky", uri=uri, on_warning=warnings.append, retry_every_s=0.0)
    flaky = _FlakyClient(tr._c())
    tr._client = flaky
    tr.start_study({"name": "s"})
    tr.start_trial("t0", {"x": 1}, config={})
    tr.log_metrics("t0", {"m": 0.0}, step=0)

    flaky.down = True
    before = int(time.time() * 1000)
    tr.log_metrics("t0", {"m": 1.0}, step=1)
    tr.start_trial("t1", {"x": 2}, config={"c": 2})
    for step in range(3):
        tr.log_metrics("t1", {"m": 10.0 + step}, step=step)
    model = torch.nn.Linear(2, 1)
    tr.log_model(model)
    expected = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)            # it keeps training after the call
    tr.finish_trial("t1", {"final": 1.0}, record={"trial_id": "t1"})
    assert len(warnings) == 1 and "unreachable" in warnings[0]
    assert tr.pending == 7 and "t1" not in tr.run_ids

    flaky.down = False
    tr.log_metrics("t0", {"m": 2.0}, step=2)   # drains the buffer first, then this
    assert tr.healthy and tr.pending == 0
    assert len(warnings) == 2 and warnings[1] == \
        "MLflow is reachable again; 7 buffered operations were written."
    assert tr.finish_study() is True

    client = MlflowClient(uri)
    assert _history(client, tr.run_ids["t0"], "m") == [(0, 0.0), (1, 1.0), (2, 2.0)]
    t1 = client.get_run(tr.run_ids["t1"])
    assert t1.data.tags["mlflow.parentRunId"] == tr.parent_run_id
    assert t1.info.status == "FINISHED" and t1.data.params == {"x": "2"}
    history = client.get_metric_history(tr.run_ids["t1"], "m")
    assert sorted((m.step, m.value) for m in history) == [(0, 10.0), (1, 11.0), (2, 12.0)]
    assert all(m.timestamp >= before for m in history)
    assert t1.info.start_time >= before
    import mlflow.pytorch

    models = client.search_logged_models(experiment_ids=[tr.experiment_id])
    local = Path(urllib.parse.urlparse(models[0].artifact_location).path)
    assert torch.equal(mlflow.pytorch.load_model(str(local)).weight, expected)
    records, _ = load_records("flaky", uri)
    assert records == [{"trial_id": "t1"}]


def test_refused_value_is_skipped(monkeypatch, tmp_path):
    """A step MLflow refuses for good (a run id that does not exist) is skipped with one
    warning; the rest of the study is written."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    warnings: list[str] = []
    tr = Tracker("refused", uri=uri, on_warning=warnings.append)
    tr.start_study({"name": "s"}, run_id="0" * 32)          # gone: a new study run instead
    assert tr.parent_run_id not in (None, "0" * 32)
    assert len(warnings) == 1 and "new run" in warnings[0]
    tr.log_metrics("never-started", {"m": 1.0}, step=0)     # no run for this trial
    assert len(warnings) == 2 and "refused" in warnings[1]
    assert tr.healthy
    assert tr.finish_study() is False                      # something was lost


# ---- a real server, killed and restarted mid-study ------------------------------------------

def _api(url: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
    full = f"{url}/api/2.0/mlflow/{path}"
    if query:
        full += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _rest_history(url: str, run_id: str, key: str) -> list[tuple[int, float]]:
    out = _api(url, "metrics/get-history", query={"run_id": run_id, "metric_key": key})
    return sorted((int(m.get("step", 0)), m["value"]) for m in out.get("metrics", []))


@pytest.mark.slow
def test_server_killed_and_restarted(tmp_path):
    proc, url = start_mlflow_server(tmp_path)
    port = int(url.rsplit(":", 1)[1])
    try:
        warnings: list[str] = []
        tr = Tracker("served", uri=url, on_warning=warnings.append, retry_every_s=0.5)
        tr.start_study({"name": "s"})
        for i, trial in enumerate(TRIALS):
            tr.start_trial(trial, _params(i), config={"i": i})
            for epoch in range(2):
                tr.log_metrics(trial, {"base/valid_auc": _auc(i, epoch)}, step=epoch)
        assert warnings == [] and tr.healthy

        runs = _api(url, "runs/search", {"experiment_ids": [tr.experiment_id]})["runs"]
        children = {}
        for run in runs:
            tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
            if tags.get("hilomoe.role") == "trial":
                assert tags["mlflow.parentRunId"] == tr.parent_run_id
                children[tags["hilomoe.trial_id"]] = run["info"]["run_id"]
        assert children == tr.run_ids
        assert _rest_history(url, tr.run_ids["t1"], "base/valid_auc") == \
            [(0, _auc(1, 0)), (1, _auc(1, 1))]

        stop_mlflow_server(proc)                 # the server dies mid-study
        start = time.monotonic()
        for i, trial in enumerate(TRIALS):
            tr.log_metrics(trial, {"base/valid_auc": _auc(i, 2)}, step=2)
            tr.finish_trial(trial, {"valid_auc": _auc(i, 2)}, record=_record(i, trial))
        assert time.monotonic() - start < _call_limit(4)
        assert len(warnings) == 1 and "unreachable" in warnings[0] and not tr.healthy

        proc, url2 = start_mlflow_server(tmp_path, port=port)   # same port, same SQLite
        assert url2 == url
        time.sleep(0.6)                                         # past retry_every_s
        tr.log_study_metrics({"best/valid_auc": _auc(1, 2)})    # drains, then writes this
        assert tr.healthy and len(warnings) == 2 and "reachable again; 4" in warnings[1]
        assert tr.finish_study() is True

        for i, trial in enumerate(TRIALS):
            assert _rest_history(url, tr.run_ids[trial], "base/valid_auc") == \
                [(e, _auc(i, e)) for e in range(3)]
            run = _api(url, "runs/get", query={"run_id": tr.run_ids[trial]})["run"]
            assert run["info"]["status"] == "FINISHED"
        records, parent = load_records("served", url)
        assert parent == tr.parent_run_id and records == [_record(0, "t0"), _record(1, "t1")]
    finally:
        stop_mlflow_server(proc)


def test_runs_a_killed_driver_left_running_are_closed(tmp_path):
    """A driver killed between creating a trial's run and recording it leaves a RUNNING child:
    the resumed study closes every running child whose trial it does not know as KILLED."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker("orphans", uri, artifact_location=str(tmp_path / "artifacts"))
    parent = tr.start_study({"a": 1})
    tr.start_trial("kept", {}, {})
    tr.start_trial("lost", {}, {})
    c = MlflowClient(uri)
    stray = c.create_run(tr.experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
    tr.close_orphans({"kept"})
    assert tr.flush()
    status = {r.info.run_id: r.info.status for r in c.search_runs([tr.experiment_id])}
    assert status[tr.run_ids["kept"]] == "RUNNING"
    assert status[tr.run_ids["lost"]] == status[stray] == "KILLED"
    assert status[parent] == "RUNNING"
