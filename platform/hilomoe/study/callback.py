"""The Tune callback of a study: Tune's trial events become trial records, an event log,
MLflow runs (one child per trial, through the driver's single `Tracker`) and console lines.

Tune pickles callbacks with the study's state to restore them with it, so this holds paths and
plain data only and opens its tracker and dataset lazily; `setup` runs again on a restore.
Imported after Ray is connected (it subclasses Tune's `Callback`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from hilomoe import jsonio
from hilomoe.model.flops import trial_cost
from hilomoe.report.diagnostics import flat
from hilomoe.report.fields import DESIGN_AXIS, REPEAT_OF
from hilomoe.study.run_dir import EVENTS_FILE, RUNS_FILE, StudyRun
from hilomoe.study.space import SearchSpace
from hilomoe.tracking.records import save_record, trial_record, write_json

EPOCH_PREFIXES = ("train_", "valid_")
# MLflow's "Source" column: what ran the trial
SOURCE_TAGS = {"mlflow.source.name": "hilomoe study run", "mlflow.source.type": "LOCAL"}
EPOCH_KEYS = ("samples_per_s", "epoch_seconds", "elapsed_s")


def numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def epoch_mlflow_metrics(result: dict) -> dict[str, float]:
    """An epoch's metrics for MLflow, prefixed by stage: `joint/valid_auc`."""
    keep = {k: v for k, v in result.items() if k.startswith(EPOCH_PREFIXES) or k in EPOCH_KEYS}
    return numeric({f"{result['stage']}/{k}": v for k, v in keep.items()})


def trial_params(cfg, searched: dict, data_path: str | None) -> dict[str, Any]:
    """A trial's MLflow params: the settings that apply to it, the searched ones apart under
    `search.` (the columns a study compares), the others under their own names.

    A model without experts runs stage 1 only: its MoE and stage-2/3 settings did nothing, so
    they are left out. The data is named as the study file names it (`data_path`, or the
    planted problem's settings), not by the machine path a trial reads it from."""
    from hilomoe.tracking.keys import SEARCH_PREFIX, flatten

    raw = cfg.model_dump(mode="json")
    raw["data"].pop("path")
    if data_path is not None:
        raw["data"].pop("synth")
    fixed = flatten(raw)
    if data_path is not None:
        fixed["data.path"] = data_path
    if not cfg.model.moe.has_experts:
        fixed = {k: v for k, v in fixed.items() if k == "model.moe.variant"
                 or not k.startswith(("model.moe.", "stages.experts.", "stages.joint."))}
    marked = {f"{SEARCH_PREFIX}{k}": v for k, v in flatten(searched).items()}
    return {**{k: v for k, v in fixed.items() if k not in searched}, **marked}


def trial_tags(record: dict) -> dict[str, str]:
    """How the trial ended (`hilomoe.status`), and where a replayed result was trained."""
    from hilomoe.tracking.keys import REUSED_TAG, STATUS_TAG

    status = "reused" if record.get("trial_reused") and record["status"] == "completed" \
        else record["status"]
    tags = {STATUS_TAG: status}
    if record.get("trial_reused"):
        tags[REUSED_TAG] = record.get("reused_from") or "the trial cache"
    return tags


# The live objects (tracker, console) of the studies this process drives, by study directory.
# Tune restores a study's callbacks by unpickling them, so they cannot be handed live objects;
# they look them up here instead.
_ATTACHED: dict[str, dict[str, Any]] = {}


def attach(study_dir: str | Path, tracker, console: Callable[[dict], None] | None) -> None:
    _ATTACHED[str(Path(study_dir).resolve())] = {"tracker": tracker, "console": console}


class StudyCallback(Callback):
    def __init__(self, study_dir: str | Path):
        self.study_dir = Path(study_dir).resolve()
        self._live: dict[str, Any] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_live": None}

    def live(self) -> dict[str, Any]:
        if self._live is None:
            from hilomoe.data.dataset import open_dataset

            run = StudyRun.load(self.study_dir)
            attached = _ATTACHED.get(str(self.study_dir))
            if attached is None:  # driven by another process: open our own tracker
                from hilomoe.tracking.runs import Tracker

                tracker = Tracker(run.experiment, run.tracking_uri, on_warning=self._warn)
                tracker.start_study({}, run_id=run.parent_run_id)
                attached = {"tracker": tracker, "console": None}
            tracker = attached["tracker"]
            runs = self.study_dir / RUNS_FILE
            if runs.is_file():
                for trial_id, run_id in json.loads(runs.read_text()).items():
                    tracker.run_ids.setdefault(trial_id, run_id)
            dataset = open_dataset(run.dataset)
            self._live = {"ctx": run.context(), "space": SearchSpace(run.study),
                          "schema": dataset.schema, "results": {},
                          "train_rows": dataset.meta.splits["train"].rows, **attached}
        return self._live

    def _warn(self, message: str) -> None:
        self._event({"kind": "warning", "message": message})

    def _event(self, event: dict) -> None:
        with open(self.study_dir / EVENTS_FILE, "a") as f:
            f.write(jsonio.dumps({"time": time.time(), **event}, default=str) + "\n")
        console = self.live()["console"]
        if console is not None:
            console(event)

    # -- Tune's hooks ------------------------------------------------------------------------

    def setup(self, **info) -> None:
        self.live()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        live = self.live()
        params = live["space"].overrides(trial.config)
        cfg = live["ctx"].config(trial.config)
        study = live["ctx"].study
        searched = {k: v for k, v in params.items() if k in study.space}  # not a repeat's seed
        tracker = live["tracker"]
        tracker.start_trial(trial.trial_id,
                            params=trial_params(cfg, searched, study.train.data.path),
                            config=cfg.model_dump(mode="json"),
                            run_id=tracker.run_ids.get(trial.trial_id), tags=SOURCE_TAGS)
        write_json(self.study_dir / RUNS_FILE, tracker.run_ids)
        live["results"].setdefault(trial.trial_id, [])
        self._event({"kind": "trial_start", "trial_id": trial.trial_id, "params": params})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        live = self.live()
        live["results"].setdefault(trial.trial_id, []).append(
            {k: v for k, v in result.items() if not isinstance(v, dict)})
        if "stage" in result and not result.get("final"):
            # stepped by the run's epoch: a trial's stages follow each other on one axis
            live["tracker"].log_metrics(trial.trial_id, epoch_mlflow_metrics(result),
                                        step=result.get("global_epoch", result["epoch"]))
            self._event({"kind": "result", "trial_id": trial.trial_id, "stage": result["stage"],
                         "epoch": result["epoch"], "valid_auc": result.get("valid_auc"),
                         "reused": bool(result.get("reused"))})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "failed")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        # its process or node died: Tune restarts it from its last checkpoint
        self._event({"kind": "trial_recover", "trial_id": trial.trial_id})

    def on_experiment_end(self, trials, **info) -> None:
        self.live()["tracker"].flush()

    def _finish(self, trial, status: str) -> None:
        live = self.live()
        results = live["results"].get(trial.trial_id) or [trial.last_result or {}]
        checkpoint = (trial.checkpoint.path if trial.checkpoint
                      else results[-1].get("checkpoint_path"))
        cfg = live["ctx"].config(trial.config)
        record = trial_record(trial.trial_id, live["space"].overrides(trial.config), cfg,
                              trial_cost(cfg, live["schema"]), results, status,
                              checkpoint, live["train_rows"],
                              repeat_of=trial.config.get(REPEAT_OF),
                              design_axis=trial.config.get(DESIGN_AXIS))
        if status == "failed" and trial.error_file:
            record["error"] = _last_line(trial.error_file)
        save_record(self.study_dir, record)
        final = {k: record[k] for k in ("valid_auc", "valid_logloss", "test_auc",
                                        "test_logloss", "flops", "params_total", "params_active",
                                        "params_embedding", "epochs", "train_seconds",
                                        "stage1_seconds")}
        final.update(flat(record))
        if record.get("trial_reused"):  # the model it holds: the epochs and seconds it took
            final.update(epochs=sum(1 for r in results if "stage" in r),
                         train_seconds=record["trial_saved_s"])
        # a pruned trial ended as the scheduler meant it to: FINISHED, marked by its tag
        status = "FAILED" if record["status"] == "failed" else "FINISHED"
        live["tracker"].finish_trial(trial.trial_id, numeric(final), status=status, record=record,
                                     tags=trial_tags(record))
        self._event({"kind": "trial_end", "trial_id": trial.trial_id, "record": record})


def _last_line(path: str) -> str:
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1] if lines else ""
    except OSError:
        return ""
