"""How a study appears in MLflow: its tags, and names and values MLflow accepts.

One parent run per study (`ROLE_TAG` "study"), one nested child run per trial (`ROLE_TAG`
"trial", `TRIAL_TAG`, `PARENT_TAG`), on an experiment named after the study and tagged as model
training, with a saved view of its trials (`VIEW_TAG`, opened at `view_url`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from hilomoe import jsonio

ROLE_TAG = "hilomoe.role"          # "study" on the parent run, "trial" on each child run
TRIAL_TAG = "hilomoe.trial_id"
STATUS_TAG = "hilomoe.status"      # completed, pruned, reused or failed: how a trial ended
REUSED_TAG = "hilomoe.reused_from"  # where a replayed trial's result was trained
PARENT_TAG = "mlflow.parentRunId"  # what MLflow's UI nests runs by
SEARCH_PREFIX = "search."          # the searched settings' params, apart from the fixed ones
# What the experiment is, for MLflow's UI: model training, not GenAI. MLflow 3.17's UI picks its
# view from the URL's `workflowType` (else the browser's last choice, GenAI by default), so the
# links hilomoe prints carry `workflowType=machine_learning` as well.
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
VIEW_KEY = "hilomoe"  # the saved view, `.../runs?workflowType=machine_learning&viewStateShareKey=`
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"

_MAX_PARAM_VALUE = 6000
_MAX_KEY = 250
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def safe_key(name: Any) -> str:
    """A name MLflow accepts as a param or metric key."""
    key = _BAD_KEY_CHARS.sub("_", str(name)).lstrip("/")
    while "//" in key:
        key = key.replace("//", "/")
    return key[:_MAX_KEY] or "_"


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        text = jsonio.dumps(value, default=str)
    else:
        text = str(value)
    return text if len(text) <= _MAX_PARAM_VALUE else text[:_MAX_PARAM_VALUE - 3] + "..."


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> dotted keys with MLflow-safe string values."""
    flat: dict[str, str] = {}
    for name, value in params.items():
        dotted = f"{prefix}{name}"
        if value is None:  # an unset option says nothing a reader can use
            continue
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[safe_key(dotted)] = _param_value(value)
    return flat


def finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Only the finite numbers of `metrics` (strings, None, NaN and inf are left out)."""
    kept: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, (str, bytes)) or value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            kept[safe_key(name)] = number
    return kept


def json_text(obj: Any) -> str:
    return jsonio.dumps(obj, indent=2, sort_keys=True, default=str)


def view_url(base: str, experiment_id: str) -> str:
    """The experiment's saved trials view in MLflow's UI at `base` (e.g. http://127.0.0.1:5000)."""
    # the runs page itself: a redirect to it would add search facets to the URL, and the UI
    # ignores a shared view whenever the URL holds any
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}")
