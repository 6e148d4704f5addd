"""A study directory: its files, and the plain-data identity every part of a study shares.

    run = StudyRun.load("runs/quickstart")       # study.json: the study, its data, its tracking
    ctx = run.context()                          # what every trial gets (pickled by Tune)
    cfg = ctx.config(trial_params)               # a trial's validated training configuration

The driver writes these files, the Tune callback and the trials append to them, and the
reports read them; all of them import the names from here.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hilomoe import jsonio
from hilomoe.config import TrainConfig, TypedView, parse_config
from hilomoe.study.space import SearchSpace
from hilomoe.study.spec import StudySpec, parse_study
from hilomoe.tracking.records import RESULT_FILE, write_json

STUDY_FILE = "study.json"  # the StudyRun
RUNS_FILE = "mlflow_runs.json"  # trial id -> MLflow child run (kept by the study's callback)
EVENTS_FILE = "events.jsonl"  # trial starts, epochs, ends, recoveries and warnings, timed
TUNE_DIR = "tune"
# each phase's Tuner: the search, then the law designs (study/design.py), then the repeats
# behind the verdict (report/verdict.py)
PHASE_DIRS = {"search": TUNE_DIR, "design": "tune_design", "repeats": "tune_repeats"}
# the study's summary once it ended is RESULT_FILE (tracking/records.py: its reader is there)
__all__ = ["EVENTS_FILE", "PHASE_DIRS", "RESULT_FILE", "RUNS_FILE", "STUDY_FILE", "StudyRun",
           "TrialContext", "read_events"]


@dataclass
class TrialContext:
    """What every trial of a study shares, as plain data."""

    spec: dict  # StudySpec, JSON form
    dataset: str  # canonical dataset directory
    study_dir: str
    cache_dir: str | None  # the stage-1 and trial caches; None turns sharing off
    threads: int = 1  # torch threads of an in-process trial

    study = TypedView("spec", "the trial's study",
                      lambda raw, source: parse_config(raw, source, StudySpec))

    def config(self, params: dict[str, Any]) -> TrainConfig:
        """The validated training configuration of a point Tune sampled."""
        return self.config_from(SearchSpace(self.study).overrides(params))

    def config_from(self, overrides: dict[str, Any]) -> TrainConfig:
        """The validated training configuration of a trial's settings (a record's params)."""
        study = self.study
        fixed = {"data.path": self.dataset}
        if study.budget.workers_per_trial > 1:
            fixed.update({"ray.workers": study.budget.workers_per_trial,
                          "ray.gpu": study.budget.gpus_per_trial > 0})
        return study.train.with_overrides(**overrides, **fixed)


@dataclass
class StudyRun:
    """A study directory's identity: what is searched, on which data, tracked where."""

    study_dir: str
    spec: dict  # StudySpec, JSON form
    dataset: str
    experiment: str  # MLflow experiment
    tracking_uri: str
    parent_run_id: str | None = None
    cache_dir: str | None = None
    dataset_hash: str = ""  # Dataset.fingerprint() when the study started: resume pins it

    # validated once (every corner of the space), however often it is asked for
    study = TypedView("spec", lambda run: str(Path(run.study_dir) / STUDY_FILE), parse_study)

    def save(self) -> None:
        write_json(Path(self.study_dir) / STUDY_FILE, asdict(self))

    @classmethod
    def load(cls, study_dir: str | Path) -> StudyRun:
        return cls(**jsonio.read_dict(
            Path(study_dir) / STUDY_FILE, f"{study_dir}: not a study directory (no "
            f"{STUDY_FILE}); --resume continues a study started with the same --out."))

    def context(self) -> TrialContext:
        budget = self.study.budget
        return TrialContext(self.spec, self.dataset, self.study_dir, self.cache_dir,
                            threads=max(1, int(budget.cpus_per_trial)))


def read_events(study_dir: str | Path) -> list[dict]:
    """The study's event log, less a last line a killed driver cut short."""
    path = Path(study_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line a killed driver cut short
            events.append(json.loads(line))
    return events
