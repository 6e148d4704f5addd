"""MLflow tracking for a study, driven from one process (the study driver).

One parent run per study, one nested child run per trial (tag `mlflow.parentRunId`), on an
experiment named after the study. Everything goes through `mlflow.MlflowClient` with explicit
run ids; only model logging uses MLflow's fluent API, because that is all MLflow offers there.

MLflow never stops a study: each public call of `Tracker` becomes an operation that is tried at
once; when MLflow fails (server down, timeout, disk), that operation and every later one wait,
in order, in an in-memory buffer, `on_warning` hears one sentence, and a later call retries the
buffer at most every `retry_every_s` seconds. Operations name trials, not run ids, so a trial
whose run could not be created yet is resolved when its creation is replayed. A refusal that
no retry can cure (an invalid value, a run that does not exist) skips that one step with a
warning instead of holding up the rest. `finish_study` says whether everything reached MLflow.

`load_records` reads a study back: the trial records (`trial.json`) of the latest study run.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hilomoe import jsonio
from hilomoe.errors import HilomoeError

if TYPE_CHECKING:
    import torch

# Set before MLflow is imported or asked anything: a dead server must cost seconds, not minutes.
_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # not the database-migration INFO lines
}

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

_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000
_MAX_KEY = 250
_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow error codes that a retry cannot cure: the step is skipped, not buffered.
_PERMANENT_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE", "BAD_REQUEST", "MALFORMED_REQUEST",
})
# Errors of these libraries are outages too (a locked database, a dropped connection).
_TRANSPORT_MODULES = frozenset({"sqlalchemy", "sqlite3", "requests", "urllib3", "http"})
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def _set_env_defaults() -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else MLflow's own default: `mlflow.db` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _key(name: Any) -> str:
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
            flat[_key(dotted)] = _param_value(value)
    return flat


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
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
            kept[_key(name)] = number
    return kept


def _json_text(obj: Any) -> str:
    return jsonio.dumps(obj, indent=2, sort_keys=True, default=str)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes, outermost first."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _kind(exc: BaseException) -> str:
    """'outage' (buffer and retry), 'refused' (retrying cannot help: skip the step), or
    'unclear' (an error of some other kind: a probe of MLflow decides)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, _Skip):
        return "refused"
    if isinstance(exc, MlflowException) and exc.error_code in _PERMANENT_CODES:
        return "refused"
    for e in _chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return "outage"
        if type(e).__module__.split(".")[0] in _TRANSPORT_MODULES:
            return "outage"            # requests, urllib3, a locked or full SQLite database
        if isinstance(e, MlflowException) and (
                e.error_code == "TEMPORARILY_UNAVAILABLE"
                or ("API request to" in str(e) and "failed with exception" in str(e))):
            return "outage"
    return "unclear"


def _reason(exc: BaseException) -> str:
    """A short cause for a warning: the innermost error's type and first line."""
    inner: BaseException = exc
    seen = {id(inner)}
    while True:
        nxt = inner.__cause__ or inner.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        inner = nxt
    text = str(exc)
    if "timed out" in text.lower() or "timeout" in type(inner).__name__.lower():
        return "Timeout: no answer in time"
    if any(s in text for s in ("NewConnectionError", "Connection refused",
                               "Failed to establish")):
        return "ConnectionError: connection refused"
    if "Max retries exceeded" in text:
        return "ConnectionError: no answer"
    first = (str(inner) or type(inner).__name__).splitlines()[0]
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(inner).__name__}: {first}"


def _guarded(method):
    """Public calls never raise: an unexpected error is one warning, and the study goes on."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self._warn(f"Recording to MLflow failed in {method.__name__} ({_reason(exc)}); "
                       "the study goes on.")
            return None

    return wrapper


class _Skip(Exception):
    """A step that can never succeed (e.g. its trial's run was never created)."""


class _Op:
    """One public call: steps run in order; `done` survives a failure so a replay resumes."""

    def __init__(self, what: str, steps: list[Callable[[], None]], kind: str = "",
                 trial_id: str | None = None):
        self.what = what
        self.steps = steps
        self.kind = kind
        self.trial_id = trial_id
        self.done = 0
        self.calls = 1                       # public calls merged into this operation
        self.metrics: list = []              # for kind == "metrics": the pending Metric list
        self.on_queue: Callable[[], None] | None = None


class Tracker:
    """One parent run per study, one nested child run per trial. Never lets MLflow failures stop a study.

    `on_warning` hears one sentence when MLflow becomes unreachable, one when the buffer is
    written again, one per kind of refused value, and one from `finish_study` if something
    was lost. `artifact_location` is used only when the experiment does not exist yet.
    `pending` counts the calls waiting in the buffer.
    """

    def __init__(self, experiment: str, uri: str | None = None,
                 on_warning: Callable[[str], None] | None = None, retry_every_s: float = 10.0,
                 artifact_location: str | None = None):
        _set_env_defaults()
        self.experiment = experiment
        self.uri = uri or tracking_uri()
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.run_ids: dict[str, str] = {}
        self.retry_every_s = float(retry_every_s)
        self.artifact_location = artifact_location
        self._on_warning = on_warning
        self._client = None
        self._buffer: deque[_Op] = deque()
        self._down = False
        self._next_retry = 0.0
        self._lost = 0                       # steps skipped for good
        self._replayed = 0                   # buffered calls written since the outage began
        self._refusals: set[str] = set()
        self._open_trials: set[str] = set()
        self._lock = threading.RLock()

    # ---- state -------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """True while nothing waits in the buffer."""
        return not self._buffer and not self._down

    @property
    def pending(self) -> int:
        """How many public calls wait in the buffer (not yet fully written)."""
        return sum(op.calls for op in self._buffer)

    def _warn(self, sentence: str) -> None:
        if self._on_warning is None:
            return
        try:
            self._on_warning(sentence)
        except Exception:  # a broken callback must not stop the study either
            pass

    def _c(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    # ---- the buffer ----------------------------------------------------------------------------

    def _run_op(self, op: _Op) -> None:
        """Runs the remaining steps; an outage propagates, a permanent refusal skips its step."""
        while op.done < len(op.steps):
            try:
                op.steps[op.done]()
            except Exception as exc:
                kind = _kind(exc)
                if kind == "unclear":
                    kind = "refused" if self._reachable() else "outage"
                if kind == "outage":
                    raise
                self._lost += 1
                reason = _reason(exc)
                if reason not in self._refusals:    # one warning per kind of refusal
                    self._refusals.add(reason)
                    self._warn(f"MLflow refused to record {op.what} ({reason}); that part is "
                               "skipped and the study goes on.")
            op.done += 1

    def _reachable(self) -> bool:
        """Whether MLflow answers at all: a step that failed while it does is refused for good."""
        try:
            self._c().search_experiments(max_results=1)
            return True
        except Exception:
            return False

    def _submit(self, op: _Op) -> None:
        with self._lock:
            if self._buffer and (time.monotonic() < self._next_retry or not self._drain()):
                self._enqueue(op)           # behind what waits already, in call order
                return
            try:
                self._run_op(op)
            except Exception as exc:
                self._enqueue(op)
                self._went_down(exc)

    def _enqueue(self, op: _Op) -> None:
        last = self._buffer[-1] if self._buffer else None
        if (op.kind == "metrics" and last is not None and last.kind == "metrics"
                and last.trial_id == op.trial_id and last.done == 0
                and len(last.metrics) + len(op.metrics) <= _MAX_METRICS_PER_BATCH):
            last.metrics.extend(op.metrics)   # one batch instead of many on replay
            last.calls += 1
            return
        if op.on_queue is not None:
            op.on_queue()
            op.on_queue = None
        self._buffer.append(op)

    def _went_down(self, exc: BaseException) -> None:
        self._next_retry = time.monotonic() + self.retry_every_s
        if not self._down:
            self._down = True
            self._warn(f"MLflow at {self.uri} is unreachable ({_reason(exc)}); metrics are "
                       "buffered and the study goes on; results are also saved in the study "
                       "directory.")

    def _drain(self) -> bool:
        """Replays the buffer in order; stops at the first outage. True once it is empty."""
        while self._buffer:
            op = self._buffer[0]
            try:
                self._run_op(op)
            except Exception:
                self._next_retry = time.monotonic() + self.retry_every_s
                self._down = True
                return False
            self._buffer.popleft()
            self._replayed += op.calls
        if self._down:
            self._down = False
            self._warn(f"MLflow is reachable again; {self._replayed} buffered operations were "
                       "written.")
        self._replayed = 0
        return True

    def flush(self) -> bool:
        """Tries to write the buffer now; True when nothing is left waiting."""
        with self._lock:
            try:
                return self._drain()
            except Exception:
                return False

    # ---- runs ----------------------------------------------------------------------------------

    def _ensure_experiment(self) -> str:
        if self.experiment_id is None:
            client = self._c()
            found = client.get_experiment_by_name(self.experiment)
            if found is not None:
                if found.lifecycle_stage != "active":
                    client.restore_experiment(found.experiment_id)
                    self._warn(f"The MLflow experiment '{self.experiment}' was deleted; it is "
                               "restored to record this study.")
                self.experiment_id = found.experiment_id
            else:
                self.experiment_id = client.create_experiment(
                    self.experiment, artifact_location=self.artifact_location,
                    tags={KIND_TAG: MODEL_TRAINING})
                self._drop_empty_default()
            if found is not None and found.tags.get(KIND_TAG) != MODEL_TRAINING:
                client.set_experiment_tag(self.experiment_id, KIND_TAG, MODEL_TRAINING)
        return self.experiment_id

    def _drop_empty_default(self) -> None:
        """A new local store creates an empty `Default` experiment the user never asked for;
        hide it (deleted, restorable). A tracking server's experiments belong to its users."""
        if self.uri.startswith(("http://", "https://", "databricks")):
            return
        client = self._c()
        default = client.get_experiment("0")
        if default is not None and default.lifecycle_stage == "active" and not client.search_runs(
                ["0"], max_results=1, run_view_type=3):  # 3: active and deleted runs alike
            client.delete_experiment("0")

    @_guarded
    def set_view(self, columns: list[str], order_by: str, ascending: bool) -> None:
        """The experiment's saved view: the runs table with `columns` (MLflow's column keys,
        e.g. ``metrics.`valid_auc` ``), best first. MLflow's UI opens it at `view_url()`. The
        state is flat, search facets and table state side by side, as MLflow 3.17's UI reads
        a shared view (checked in a browser: tests/test_ui_browser.py); keys left out take
        the UI's defaults."""
        state = {"selectedColumns": columns, "orderByKey": order_by, "orderByAsc": ascending,
                 "runsHiddenMode": "SHOW_ALL",
                 # the trials only: the study's run holds the best model's metrics, and would
                 # sort among them
                 "searchFilter": f"tags.`{ROLE_TAG}` = 'trial'"}
        now = _now_ms()
        envelope = json.dumps({"name": "hilomoe: trials", "createdAt": now, "updatedAt": now,
                               "state": json.dumps(state)})

        def write() -> None:
            self._c().set_experiment_tag(self._ensure_experiment(), VIEW_TAG, envelope)

        self._submit(_Op("the experiment's saved view", [write]))

    def view_url(self, base: str) -> str | None:
        """The experiment's page in MLflow's UI at `base` (e.g. http://127.0.0.1:5000), opened
        on the saved view; None before the experiment exists."""
        if self.experiment_id is None:
            return None
        return _view_url(base, self.experiment_id)

    def _trial_run(self, trial_id: str) -> str:
        run_id = self.run_ids.get(trial_id)
        if run_id is None:
            raise _Skip(f"trial {trial_id} has no MLflow run")
        return run_id

    def _parent(self) -> str:
        if self.parent_run_id is None:
            raise _Skip("the study has no MLflow run")
        return self.parent_run_id

    def _reopen(self, run_id: str, params: dict[str, str], what: str):
        """Marks an existing run RUNNING again; returns the params it lacks (or None if gone)."""
        from mlflow.exceptions import MlflowException

        client = self._c()
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            self._warn(f"MLflow has no run {run_id} to resume for {what}; a new run is started.")
            return None
        if run.info.lifecycle_stage != "active":
            self._warn(f"MLflow run {run_id} of {what} was deleted; a new run is started.")
            return None
        self.experiment_id = self.experiment_id or run.info.experiment_id
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        existing = run.data.params
        changed = [k for k, v in params.items() if k in existing and existing[k] != v]
        if changed:
            self._warn(f"{len(changed)} params of {what} differ from the values MLflow already "
                       f"holds (e.g. {changed[0]}); MLflow keeps the first values.")
        return {k: v for k, v in params.items() if k not in existing}

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = sorted(params.items())
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            chunk = [Param(k, v) for k, v in items[i:i + _MAX_PARAMS_PER_BATCH]]
            self._c().log_batch(run_id, params=chunk, synchronous=True)

    def _start_run_steps(self, what: str, get_id: Callable[[], str | None],
                         set_id: Callable[[str], None], tags: Callable[[], dict[str, str]],
                         run_name: str, params: dict[str, str], start_ms: int,
                         reopen_id: str | None) -> list[Callable[[], None]]:
        """Steps shared by the study and the trial runs: create or reopen, then params."""
        todo: dict[str, Any] = {"params": params}

        def create() -> None:
            experiment_id = self._ensure_experiment()
            if get_id() is not None and todo.get("created"):
                return                                  # created by an earlier, partial try
            if reopen_id is not None and not todo.get("reopen_failed"):
                missing = self._reopen(reopen_id, params, what)
                if missing is not None:
                    set_id(reopen_id)
                    todo["params"] = missing
                    todo["created"] = True
                    return
                todo["reopen_failed"] = True
            run = self._c().create_run(experiment_id, start_time=start_ms, tags=tags(),
                                       run_name=run_name)
            set_id(run.info.run_id)
            todo["created"] = True

        def log_params() -> None:
            run_id = get_id()
            if run_id is None:
                raise _Skip(f"{what} has no MLflow run")
            self._log_params(run_id, todo["params"])

        return [create, log_params]

    # ---- the study -----------------------------------------------------------------------------

    @_guarded
    def start_study(self, params: dict, tags: dict | None = None,
                    run_id: str | None = None) -> str | None:
        """Creates the parent run (or reopens `run_id` for a resumed study); its id, or None
        while MLflow is unreachable (read `parent_run_id` again later)."""
        flat = flatten(params or {})
        extra = {str(k): str(v) for k, v in (tags or {}).items()}
        if run_id is not None:
            self.parent_run_id = run_id

        def run_tags() -> dict[str, str]:
            return {**extra, ROLE_TAG: "study"}

        def set_id(new: str) -> None:
            self.parent_run_id = new

        steps = self._start_run_steps(
            f"the study run of {self.experiment}", lambda: self.parent_run_id, set_id, run_tags,
            self.experiment, flat, _now_ms(), run_id)
        if run_id is None:
            self.parent_run_id = None
        if run_id is not None and extra:
            steps.append(lambda: self._c().log_batch(
                self._parent(), tags=[_tag(k, v) for k, v in extra.items()], synchronous=True))
        self._submit(_Op(f"the study run of {self.experiment}", steps))
        return self.parent_run_id

    @_guarded
    def start_trial(self, trial_id: str, params: dict, config: dict,
                    run_id: str | None = None, tags: dict | None = None) -> None:
        """A child run named after the trial, with its params, `tags` and `config.json`; `run_id`
        reopens the trial's run of a resumed study (params it already holds are not re-logged)."""
        trial_id = str(trial_id)
        flat = flatten(params or {})
        extra = {str(k): str(v) for k, v in (tags or {}).items()}
        config_text = _json_text(config or {})
        what = f"trial {trial_id}"
        self._open_trials.add(trial_id)
        if run_id is not None:
            self.run_ids[trial_id] = run_id
        else:
            self.run_ids.pop(trial_id, None)

        def run_tags() -> dict[str, str]:
            tags = {**extra, ROLE_TAG: "trial", TRIAL_TAG: trial_id}
            if self.parent_run_id is not None:
                tags[PARENT_TAG] = self.parent_run_id
            return tags

        def set_id(new: str) -> None:
            self.run_ids[trial_id] = new

        steps = self._start_run_steps(what, lambda: self.run_ids.get(trial_id), set_id,
                                      run_tags, trial_id, flat, _now_ms(), run_id)
        steps.append(lambda: self._c().log_text(self._trial_run(trial_id), config_text,
                                                "config.json"))
        self._submit(_Op(what, steps, trial_id=trial_id))

    def _metric_op(self, what: str, metrics: dict[str, float], step: int,
                   run: Callable[[], str], trial_id: str | None) -> _Op:
        from mlflow.entities import Metric

        ts = _now_ms()
        op = _Op(what, [], kind="metrics", trial_id=trial_id)
        op.metrics = [Metric(k, v, ts, int(step)) for k, v in metrics.items()]

        def write() -> None:
            run_id = run()
            while op.metrics:           # each batch leaves the list once it is written
                batch = op.metrics[:_MAX_METRICS_PER_BATCH]
                self._c().log_batch(run_id, metrics=batch, synchronous=True)
                del op.metrics[:len(batch)]

        op.steps = [write]
        return op

    @_guarded
    def log_metrics(self, trial_id: str, metrics: dict[str, float], step: int) -> None:
        """Metrics of a trial at `step` (non-finite and non-numeric values are left out)."""
        trial_id = str(trial_id)
        kept = _finite(metrics)
        if kept:
            self._submit(self._metric_op(f"metrics of trial {trial_id}", kept, step,
                                         lambda: self._trial_run(trial_id), trial_id))

    @_guarded
    def finish_trial(self, trial_id: str, metrics: dict[str, float], status: str = "FINISHED",
                     record: dict | None = None,
                     artifacts: dict[str, dict] | None = None,
                     tags: dict | None = None) -> None:
        """Final metrics, `tags`, `trial.json` (the record), one JSON artifact per `artifacts`
        entry, then the run ends with `status` (FINISHED, FAILED or KILLED). The final metrics
        are one value per run, at step 0: cross-run charts draw them as one bar per trial."""
        from mlflow.entities import Metric

        trial_id = str(trial_id)
        status = str(status).upper()
        status = status if status in _STATUSES else "FAILED"
        self._open_trials.discard(trial_id)
        ts = _now_ms()
        final = [Metric(k, v, ts, 0) for k, v in _finite(metrics).items()]
        run_tags = [_tag(str(k), str(v)) for k, v in (tags or {}).items()]
        texts: list[tuple[str, str]] = []
        if record is not None:
            texts.append(("trial.json", _json_text(record)))
        for name, content in (artifacts or {}).items():
            name = str(name) if str(name).endswith(".json") else f"{name}.json"
            texts.append((name, _json_text(content)))

        steps: list[Callable[[], None]] = []
        if run_tags:
            steps.append(lambda: self._c().log_batch(self._trial_run(trial_id), tags=run_tags,
                                                     synchronous=True))
        for i in range(0, len(final), _MAX_METRICS_PER_BATCH):
            chunk = final[i:i + _MAX_METRICS_PER_BATCH]
            steps.append(lambda chunk=chunk: self._c().log_batch(
                self._trial_run(trial_id), metrics=chunk, synchronous=True))
        for name, text in texts:
            steps.append(lambda name=name, text=text: self._c().log_text(
                self._trial_run(trial_id), text, name))
        steps.append(lambda: self._c().set_terminated(self._trial_run(trial_id), status, ts))
        self._submit(_Op(f"the end of trial {trial_id}", steps, trial_id=trial_id))

    @_guarded
    def log_model(self, model: torch.nn.Module, input_example: Any = None,
                  metrics: dict[str, float] | None = None, params: dict | None = None,
                  tags: dict | None = None, register: str | None = None,
                  name: str = "model") -> None:
        """The model as an MLflow 3 LoggedModel of the study run, through `mlflow.pytorch`:
        its signature inferred from `input_example`, `metrics` (the final ones) and `params`
        on the model itself, `tags`; registered as `register` in the model registry when
        given. Metrics the study run holds already are not linked to it."""
        holder = {"model": model}

        def write() -> None:
            self._log_model(self._parent(), holder["model"], name, input_example,
                            _finite(metrics or {}), flatten(params or {}),
                            {str(k): str(v) for k, v in (tags or {}).items()}, register)

        def freeze() -> None:     # the model keeps training: keep what it was at this call
            try:
                holder["model"] = copy.deepcopy(model).cpu()
            except Exception:
                pass

        op = _Op("the best model", [write])
        op.on_queue = freeze
        self._submit(op)

    def _log_model(self, run_id: str, model, name: str, input_example, metrics: dict,
                   params: dict, tags: dict, register: str | None) -> None:
        import mlflow
        import mlflow.pytorch
        from mlflow.entities import Metric
        from mlflow.tracking import fluent
        from mlflow.tracking._tracking_service import utils as tracking_utils

        client = self._c()
        before = client.get_run(run_id).info.status
        saved_uri = getattr(tracking_utils, "_tracking_uri", None)
        saved_env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)          # the fluent API only knows the global URI
        pushed = False
        try:
            mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
            pushed = True
            # "pickle": "pt2" would export the routing's custom kernel; MLflow's warnings about
            # pickle and about the environment say nothing the study can act on.
            quiet = [logging.getLogger(n) for n in ("mlflow.pytorch", "mlflow.models.model",
                                                     "mlflow.models.signature")]
            levels = [q.level for q in quiet]
            for q in quiet:
                q.setLevel(logging.ERROR)
            try:
                info = mlflow.pytorch.log_model(
                    model, name=name, pip_requirements=_pip_requirements(),
                    serialization_format="pickle", input_example=input_example,
                    params=params or None, tags=tags or None, registered_model_name=register,
                    step=-1)  # no study metric sits at step -1: none is linked to the model
            finally:
                for q, level in zip(quiet, levels):
                    q.setLevel(level)
        finally:
            if pushed:
                # Leave the fluent run stack without `end_run`: that would mark the run
                # FINISHED (and, on a dead server, raise and leave the run on the stack).
                stack = fluent._active_run_stack.get()
                if stack and stack[-1].info.run_id == run_id:
                    stack.pop()
            mlflow.set_tracking_uri(saved_uri)
            if saved_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved_env
        if metrics:
            ts = _now_ms()
            client.log_batch(run_id, metrics=[Metric(k, v, ts, 0, model_id=info.model_id)
                                              for k, v in metrics.items()], synchronous=True)
        if before != "RUNNING":                    # start_run set it RUNNING; put it back
            client.update_run(run_id, status=before)

    @_guarded
    def log_study_artifacts(self, directory: Path, artifact_path: str = "report") -> None:
        """The files under `directory` (as they are when written) on the study run."""
        directory = Path(directory)

        def write() -> None:
            if not directory.is_dir():
                raise _Skip(f"{directory} is not a directory")
            self._c().log_artifacts(self._parent(), str(directory), artifact_path)

        self._submit(_Op(f"the study artifacts in {directory}", [write]))

    @_guarded
    def close_orphans(self, keep: set[str]) -> None:
        """End as KILLED the study's child runs still RUNNING whose trial is not in `keep`: a
        driver killed between creating a trial's run and recording it leaves one behind."""
        def close() -> None:
            runs = self._c().search_runs(
                [self._ensure_experiment()],
                filter_string=f"tags.`mlflow.parentRunId` = '{self._parent()}' and "
                              f"attributes.status = 'RUNNING'", max_results=1000)
            for run in runs:
                if run.data.tags.get(TRIAL_TAG) not in keep:
                    self._c().set_terminated(run.info.run_id, "KILLED")

        self._submit(_Op("closing interrupted trials' runs", [close]))

    @_guarded
    def log_study_metrics(self, metrics: dict[str, float]) -> None:
        """Metrics on the study run (step 0)."""
        kept = _finite(metrics)
        if kept:
            self._submit(self._metric_op("the study metrics", kept, 0, self._parent, None))

    def finish_study(self, status: str = "FINISHED") -> bool:
        """Ends trials left open (KILLED) and the study run, then flushes. True if everything
        reached MLflow; otherwise one warning says how much was lost."""
        try:
            status = str(status).upper()
            status = status if status in _STATUSES else "FAILED"
            for trial_id in sorted(self._open_trials):
                self.finish_trial(trial_id, {}, status="KILLED")
            ts = _now_ms()
            self._submit(_Op("the end of the study",
                             [lambda: self._c().set_terminated(self._parent(), status, ts)]))
            ok = self.flush()
            if not ok:
                lost = self.pending
                self._warn(f"MLflow at {self.uri} is still unreachable: {lost} operations were "
                           "not written to MLflow; the study directory still holds the results.")
            return ok and self._lost == 0
        except Exception as exc:  # never raises
            self._warn(f"Finishing the study in MLflow failed ({_reason(exc)}); the study "
                       "directory still holds the results.")
            return False


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)


def _pip_requirements() -> list[str]:
    """Explicit requirements, so MLflow does not spend seconds inferring them."""
    import torch

    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    try:
        import cloudpickle

        reqs.append(f"cloudpickle=={cloudpickle.__version__}")
    except ImportError:
        pass
    return reqs


def study_views(uri: str, base: str) -> list[tuple[str, str]]:
    """(experiment, URL of its saved trials view in MLflow's UI at `base`) for every study the
    store at `uri` holds; none when it cannot be read (a store not created yet included)."""
    _set_env_defaults()
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return []  # asking would create an empty store
    try:
        found = MlflowClient(uri).search_experiments(max_results=1000)
    except Exception:
        return []
    return [(e.name, _view_url(base, e.experiment_id)) for e in found if VIEW_TAG in e.tags]


def _view_url(base: str, experiment_id: str) -> str:
    # the runs page itself: a redirect to it would add search facets to the URL, and the UI
    # ignores a shared view whenever the URL holds any
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}")


def load_records(experiment: str, uri: str | None = None) -> tuple[list[dict], str | None]:
    """The trial records (`trial.json` of the child runs) of the latest study run of
    `experiment`, and that run's id, trials in the order they started."""
    _set_env_defaults()
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    try:
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise HilomoeError(f"MLflow at {uri} has no experiment named '{experiment}'.")
        parents = client.search_runs([found.experiment_id],
                                     filter_string=f"tags.`{ROLE_TAG}` = 'study'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise HilomoeError(f"The MLflow experiment '{experiment}' at {uri} has no study runs.")
        parent = parents[0].info.run_id
        children = []
        token = None
        while True:
            page = client.search_runs([found.experiment_id],
                                      filter_string=f"tags.`{PARENT_TAG}` = '{parent}'",
                                      order_by=["attributes.start_time ASC"], max_results=1000,
                                      page_token=token)
            children.extend(page)
            token = page.token
            if not token:
                break
        by_trial: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for i, run in enumerate(children):
                run_id = run.info.run_id
                if not any(f.path == "trial.json" for f in client.list_artifacts(run_id)):
                    continue
                local = client.download_artifacts(run_id, "trial.json", str(Path(tmp) / str(i)))
                record = json.loads(Path(local).read_text())
                by_trial[run.data.tags.get(TRIAL_TAG, run_id)] = record
        return list(by_trial.values()), parent
    except HilomoeError:
        raise
    except Exception as exc:
        raise HilomoeError(f"Could not read the study '{experiment}' from MLflow at {uri} "
                           f"({_reason(exc)}).") from exc
