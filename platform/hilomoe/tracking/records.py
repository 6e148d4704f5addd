"""Trial records: one JSON document per finished trial, what reports and `--json` read; the
record loader of a study directory (`trials/*.json`, the saved `result.json`).

    {"trial_id", "status": completed | pruned | failed, "params": {dotted key: value}, "seed",
     "repeat_of", "design_axis",                       # repeats, law designs (study/design.py)
     "variant", "levels", "experts", "rank", "top_k", "mlp_width", "train_fraction", "train_rows",
     "valid_auc", "valid_logloss", "test_auc", "test_logloss",      # test: completed only
     "flops", "params_total", "params_active", "params_embedding",   # per sample, analytic
     "epochs", "train_seconds", "stage1_reused", "stage1_seconds", "trial_reused", "trial_saved_s",
     "checkpoint",
     "stage_auc", "overfit_gap", "routing"}                           # report/diagnostics.py

`trial_record` builds a record from what a trial reported and its cost (FLOPs and parameter
counts, computed where the trial's configuration and schema are known: study/trial.py
`trial_cost`), so that reading records needs neither torch nor the engine.

A replayed trial (`trial_reused`: its configuration was trained before) trained nothing: its
`train_seconds` is 0 and `trial_saved_s` what the original took.
A trial's validation metrics are those of its final model (the best epoch of its last stage);
a pruned trial's are those of its last epoch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hilomoe import jsonio
from hilomoe.atomic import write_atomic
from hilomoe.report.diagnostics import diagnostics

if TYPE_CHECKING:
    from hilomoe.config import TrainConfig
    from hilomoe.study.spec import StudySpec

TRIALS_DIR = "trials"
RESULT_FILE = "result.json"  # a finished study's summary (study/driver.py)


def trial_record(trial_id: str, params: dict, cfg: TrainConfig, cost: dict, results: list[dict],
                 status: str, checkpoint: str | None, train_rows: int,
                 repeat_of: str | None = None, design_axis: str | None = None) -> dict:
    """A record from a trial's reported results; `status` "done" becomes completed (it reached
    its final report) or pruned (a scheduler stopped it). `cost`: the trial's FLOPs per sample
    and parameter counts (`flops`, `params_total`, `params_active`, `params_embedding`)."""
    last = results[-1] if results else {}
    final = bool(last.get("final"))
    if status == "done":
        status = "completed" if final else "pruned"
    moe = cfg.model.moe
    return {
        "trial_id": trial_id, "status": status, "params": params, "seed": cfg.seed,
        **({"repeat_of": repeat_of} if repeat_of else {}),
        **({"design_axis": design_axis} if design_axis else {}),
        "variant": moe.variant.value if moe.has_experts else "dense",
        "levels": moe.levels if moe.has_experts else 0, "experts": moe.experts,
        "rank": moe.rank, "top_k": moe.top_k,
        "mlp_width": cfg.model.backbone.mlp[0] if cfg.model.backbone.mlp else 0,
        "train_fraction": cfg.data.train_fraction,
        "train_rows": round(train_rows * cfg.data.train_fraction),  # expected, for a subset
        "valid_auc": last.get("valid_auc"), "valid_logloss": last.get("valid_logloss"),
        "test_auc": last.get("test_auc") if final else None,
        "test_logloss": last.get("test_logloss") if final else None,
        **cost,
        "epochs": sum(1 for r in results if "stage" in r and not r.get("reused")),
        "train_seconds": last.get("train_seconds", last.get("elapsed_s", 0.0)),
        "stage1_reused": bool(last.get("stage1_reused")),
        "trial_reused": bool(last.get("trial_reused")),
        **({"reused_from": last["reused_from"]} if last.get("reused_from") else {}),
        "trial_saved_s": float(last.get("trial_saved_s") or 0.0),
        "stage1_seconds": float(last.get("stage1_seconds") or 0.0),
        "checkpoint": checkpoint,
        **diagnostics(results),
    }


def write_json(path: Path, obj: Any) -> None:
    """Written aside under a unique name and renamed: a reader never sees half a file, and two
    writers of the same path (a trial's callback and a resumed driver) never share a temp.
    NaN and infinities are written as null: the file stays valid JSON."""
    write_atomic(path, jsonio.dumps(obj, indent=2, default=str))


def save_record(study_dir: str | Path, record: dict) -> None:
    write_json(Path(study_dir) / TRIALS_DIR / f"{record['trial_id']}.json", record)


def load_records(study_dir: str | Path) -> list[dict]:
    d = Path(study_dir) / TRIALS_DIR
    if not d.is_dir():
        return []
    return sorted((json.loads(p.read_text()) for p in d.glob("*.json")),
                  key=lambda r: r["trial_id"])


def saved_cost(study_dir: str | Path) -> dict | None:
    """The planned-against-actual entry a finished study saved in its summary, if any."""
    path = Path(study_dir) / RESULT_FILE
    return json.loads(path.read_text()).get("plan") if path.is_file() else None


def best_record(spec: StudySpec, records: list[dict]) -> dict | None:
    """The best completed trial by the study's first objective; an undefined (NaN) metric is
    never the best (max and min would keep or skip it depending on where it stands)."""
    obj = spec.objectives[0]
    done = [r for r in records if r["status"] == "completed"
            and isinstance(r.get(obj.metric), (int, float)) and math.isfinite(r[obj.metric])]
    if not done:
        return None
    return (max if obj.mode == "max" else min)(done, key=lambda r: r[obj.metric])
