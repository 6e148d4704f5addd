"""MLflow's UI on a finished smoke study, in a real headless Chromium (tests/browser.py): the
page `hilomoe ui` links to, one trial's page and the study's report, asserted on the rendered
DOM. Skipped, with the reason, where no Chromium can run.

HILOMOE_SCREENSHOT=docs/mlflow-experiment.png also saves the experiment page (the README's)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import browser
from helpers import hilomoe, kill_tree, one_json
from mlflow_server import free_port, wait_healthy

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# The runs table's rows in display order: {"run_id", column key: cell text}. MLflow's table is an
# ag-grid: a row's pinned and scrolled halves are separate elements sharing `row-id`, placed by
# `row-index` rather than by document order.
TABLE_JS = """(() => {
  const rows = {};
  for (const cell of document.querySelectorAll('.ag-row [col-id]')) {
    const row = cell.closest('.ag-row'), id = row.getAttribute('row-id');
    rows[id] = rows[id] || {run_id: id, index: Number(row.getAttribute('row-index'))};
    rows[id][cell.getAttribute('col-id')] = cell.innerText.trim();
  }
  return Object.values(rows).sort((a, b) => a.index - b.index);
})()"""
STATUS = "tags.`hilomoe.status`"
# the MLflow Assistant's side panel, which otherwise takes a fifth of the width
CLOSE_ASSISTANT = "document.querySelector('button[aria-label=Close]')?.click()"


@pytest.fixture(scope="session")
def chromium():
    """A Chromium that starts headless here, or a skip saying why not. Resolved before
    `workdir` points HILOMOE_CACHE at a test directory, so the unpacked browser is reused."""
    try:
        exe = browser.chromium()
        with browser.headless_page(exe):  # it starts here (its libraries load, say)
            pass
    except browser.Unavailable as e:
        pytest.skip(f"no headless Chromium here: {e}")
    return exe


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HILOMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def _ui(workdir: Path):
    """`hilomoe ui` on a free loopback port; returns the process, its base URL and the study
    links it printed (name -> URL)."""
    port = free_port()
    log = workdir / "ui.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "hilomoe", "ui", "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=sink, env={**os.environ,
                                "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "300"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
    except RuntimeError:
        kill_tree(proc)
        raise AssertionError(log.read_text()) from None
    links = dict(re.findall(r"study (\S+): (http\S+)", log.read_text()))
    return proc, base, links


def test_mlflow_ui_shows_the_study_as_model_training_with_statuses_and_the_report(
        chromium, workdir):
    summary = one_json(hilomoe("study", "run", str(REPO / "studies" / "smoke.yaml"),
                               "--json").stdout)
    trials = {t["trial_id"]: t for t in summary["trials"]}
    assert summary["counts"]["completed"] == len(trials) == 2
    proc, base, links = _ui(workdir)
    try:
        # the link `hilomoe ui` prints for the study is the one `study run` gave, on this port
        view = links[summary["mlflow_experiment"]]
        assert view == summary["mlflow_url"].replace("http://127.0.0.1:5000", base)
        experiment = re.search(r"#/experiments/(\w+)", view).group(1)
        # wide enough for the view's columns: the table draws only the columns in sight
        with browser.headless_page(chromium, width=1680, height=900) as page:
            page.goto(view)
            # the model-training view: the runs table with its column picker, not the GenAI
            # overview (traces, token usage, evaluation runs)
            page.wait_for(f"{TABLE_JS}.length >= {len(trials)}",
                          what="the runs table with the study's trials")
            page.evaluate(CLOSE_ASSISTANT)
            rows = page.wait_for(f"(() => {{ const t = {TABLE_JS}; return "
                                 f"t.every(r => '{STATUS}' in r) && t; }})()",
                                 what=f"the runs table's {STATUS} column")
            assert page.evaluate("!!document.querySelector("
                                 "'[data-testid=column-selection-dropdown]')")
            hash_ = page.evaluate("location.hash")
            assert f"/experiments/{experiment}/runs" in hash_ and "/overview" not in hash_
            text = page.text()
            assert "Evaluation runs" not in text and "Token Usage" not in text
            # the saved view: its columns, trials best first, each with how it ended
            assert "shared view" in text
            shown = [r for r in rows if r["attributes.`Run Name`"].split("\n")[-1] in trials]
            assert len(shown) == len(rows)  # the view lists the trials, not the study's run
            names = [r["attributes.`Run Name`"].split("\n")[-1] for r in shown]
            assert names == sorted(trials, key=lambda i: -trials[i]["valid_auc"])
            for name, cells in zip(names, shown):
                assert cells[STATUS] == "completed"
                assert float(cells["metrics.`valid_auc`"]) == pytest.approx(
                    trials[name]["valid_auc"])
            if os.environ.get("HILOMOE_SCREENSHOT"):
                page.screenshot(REPO / os.environ["HILOMOE_SCREENSHOT"])

            # each trial's page: the run FINISHED, its status tag saying how
            for cells in shown:
                page.goto(f"{base}/#/experiments/{experiment}/runs/{cells['run_id']}"
                          f"?workflowType=machine_learning")
                about = page.wait_for(
                    f"(() => {{ const t = document.body.innerText; return "
                    f"t.includes('About this run') && t.includes('{cells['run_id']}') && t; }})()",
                    what=f"the run page of {cells['run_id']}")
                assert re.search(r"Status\s+Finished", about)
                assert re.search(r"hilomoe\.status\s*:\s*completed", about)

            # the study run's report: report.html, its plots inlined, drawn in the viewer's
            # sandboxed frame (which only the DevTools protocol can look into)
            page.goto(f"{base}/#/experiments/{experiment}/runs/{summary['mlflow_run_id']}"
                      f"/artifacts/report/report.html?workflowType=machine_learning")
            page.wait_for("!!document.querySelector('iframe[src^=blob]')",
                          what="the report's frame")
            frame = next(f for f in page.child_frames() if f["url"].startswith("blob:"))
            images = page.wait_for(
                "(() => { const i = [...document.images]; return i.length && "
                "i.every(x => x.complete) && i.map(x => [x.src.slice(0, 22), x.naturalWidth]); "
                "})()", frame=frame["id"], what="the report's images")
            assert images and all(src == "data:image/png;base64," and width > 0
                                  for src, width in images), images
    finally:
        kill_tree(proc)
