"""`hilomoe bench study`: how much of a study's wall time goes to anything but training.

The study (the quickstart by default) runs in a temporary directory with its own MLflow SQLite
store and empty caches (stage 1, trials), as a first run on a fresh machine would; its dataset
is generated before the clock starts. Its trials report
their training seconds (data loading, the three stages, validation and test, inside the trial);
everything else is overhead: Ray and Tune start-up, trial start-up, MLflow logging, checkpoint
I/O, the report, and slots left idle while the last trials finish.

    overhead_fraction = 1 - sum(trial training seconds) / (wall seconds x slots)

with slots = min(concurrency, trials), the trials the machine runs at once. The study's cost
plan (`hilomoe study plan`, made first) is left out of the wall time: `plan_s` is its
calibration, `planned_wall_s` what it predicted and `plan_error` its relative error. The parts:
`startup_s` (the call to the first trial's start), `trial_overhead_s` (trials' wall time
outside training, summed), `idle_slot_s` (slot-seconds with no trial running) and `tail_s`
(the last trial's end to the call's return: report, best model, MLflow).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from hilomoe.study.spec import load_study, parse_study


def run(study: str, trials: int | None = None) -> dict:
    from hilomoe.study.driver import run_study
    from hilomoe.distributed.runtime import dataset_path

    spec = load_study(study)
    if trials is not None:
        raw = spec.model_dump(mode="json")
        raw["budget"]["trials"] = trials
        spec = parse_study(raw, "command line")
    with tempfile.TemporaryDirectory(prefix="hilomoe-bench-study-") as tmp:
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
               "HILOMOE_CACHE": f"{tmp}/cache"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            dataset_path(spec.train)  # data preparation is not study overhead
            t0 = time.time()
            summary = run_study(spec, Path(tmp) / "study")
            t1 = time.time()
            events = [json.loads(line) for line in
                      (Path(tmp) / "study" / "events.jsonl").read_text().splitlines()]
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return measure(summary, events, t0, t1, spec.budget.concurrency)


def measure(summary: dict, events: list[dict], t0: float, t1: float, concurrency: int) -> dict:
    """The overhead figures from a study's summary and event log (times in seconds)."""
    records = summary["trials"] + summary.get("repeats", [])  # every trial the study trained
    starts = {e["trial_id"]: e["time"] for e in events if e["kind"] == "trial_start"}
    ends = {e["trial_id"]: e["time"] for e in events if e["kind"] == "trial_end"}
    train_s = sum(r["train_seconds"] or 0.0 for r in records)
    plan = summary.get("plan") or {}
    plan_s = plan.get("calibration_s", 0.0)
    t0 += plan_s  # the plan's calibration precedes the study it predicts
    wall = t1 - t0
    planned = (plan.get("wall_s") or {}).get("predicted")
    slots = max(1, min(concurrency, len(records)))
    busy = sum(ends[t] - starts[t] for t in ends if t in starts)
    return {
        "trials": len(records),
        "wall_s": wall,
        "train_s": train_s,
        "slots": slots,
        "overhead_fraction": 1.0 - train_s / (wall * slots) if wall > 0 else float("nan"),
        "startup_s": (min(starts.values()) - t0) if starts else wall,
        "trial_overhead_s": busy - train_s,
        "idle_slot_s": wall * slots - busy,
        "tail_s": (t1 - max(ends.values())) if ends else 0.0,
        "plan_s": plan_s,
        "planned_wall_s": planned,
        "plan_error": (planned - wall) / wall if planned is not None and wall > 0 else None,
        "stage1_reused": summary["stage1_reused"],
        "stage1_saved_s": summary["stage1_saved_s"],
        "best_valid_auc": (summary["best"] or {}).get("metrics", {}).get("valid_auc"),
    }
