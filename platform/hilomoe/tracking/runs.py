"""MLflow tracking of a study, driven from one process (the study driver): the run mapping.

One parent run per study, one nested child run per trial (tag `mlflow.parentRunId`), on an
experiment named after the study (tracking/keys.py). Everything goes through
`mlflow.MlflowClient` with explicit run ids; only model logging uses MLflow's fluent API
(tracking/logged_model.py), because that is all MLflow offers there.

MLflow never stops a study: `Tracker` is a `BufferedClient` (tracking/retry.py), so each public
call is an operation that waits, in order, while MLflow is down and is replayed once it is back.
Operations name trials, not run ids, so a trial whose run could not be created yet is resolved
when its creation is replayed. `finish_study` says whether everything reached MLflow.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hilomoe.tracking.keys import (KIND_TAG, MODEL_TRAINING, PARENT_TAG, ROLE_TAG, TRIAL_TAG,
                                   VIEW_TAG, finite, flatten, json_text, view_url)
from hilomoe.tracking.logged_model import log_pytorch_model
from hilomoe.tracking.retry import BufferedClient, Op, Skip, guarded, now_ms, reason

if TYPE_CHECKING:
    import torch

_MAX_PARAMS_PER_BATCH = 100
_STATUSES = ("FINISHED", "FAILED", "KILLED")


class Tracker(BufferedClient):
    """One parent run per study, one nested child run per trial. Never lets MLflow failures stop a study.

    `on_warning` hears one sentence when MLflow becomes unreachable, one when the buffer is
    written again, one per kind of refused value, and one from `finish_study` if something
    was lost. `artifact_location` is used only when the experiment does not exist yet.
    `pending` counts the calls waiting in the buffer.
    """

    GOES_ON = "the study goes on"
    OUTAGE_NOTE = ("metrics are buffered and the study goes on; results are also saved in the "
                   "study directory.")

    def __init__(self, experiment: str, uri: str | None = None,
                 on_warning: Callable[[str], None] | None = None, retry_every_s: float = 10.0,
                 artifact_location: str | None = None):
        super().__init__(uri, on_warning, retry_every_s)
        self.experiment = experiment
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.run_ids: dict[str, str] = {}
        self.artifact_location = artifact_location
        self._open_trials: set[str] = set()

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

    @guarded
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
        now = now_ms()
        envelope = json.dumps({"name": "hilomoe: trials", "createdAt": now, "updatedAt": now,
                               "state": json.dumps(state)})

        def write() -> None:
            self._c().set_experiment_tag(self._ensure_experiment(), VIEW_TAG, envelope)

        self.submit(Op("the experiment's saved view", [write]))

    def view_url(self, base: str) -> str | None:
        """The experiment's page in MLflow's UI at `base` (e.g. http://127.0.0.1:5000), opened
        on the saved view; None before the experiment exists."""
        if self.experiment_id is None:
            return None
        return view_url(base, self.experiment_id)

    def _trial_run(self, trial_id: str) -> str:
        run_id = self.run_ids.get(trial_id)
        if run_id is None:
            raise Skip(f"trial {trial_id} has no MLflow run")
        return run_id

    def _parent(self) -> str:
        if self.parent_run_id is None:
            raise Skip("the study has no MLflow run")
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
                raise Skip(f"{what} has no MLflow run")
            self._log_params(run_id, todo["params"])

        return [create, log_params]

    # ---- the study -----------------------------------------------------------------------------

    @guarded
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
            self.experiment, flat, now_ms(), run_id)
        if run_id is None:
            self.parent_run_id = None
        if run_id is not None and extra:
            steps.append(lambda: self._c().log_batch(
                self._parent(), tags=[_tag(k, v) for k, v in extra.items()], synchronous=True))
        self.submit(Op(f"the study run of {self.experiment}", steps))
        return self.parent_run_id

    @guarded
    def start_trial(self, trial_id: str, params: dict, config: dict,
                    run_id: str | None = None, tags: dict | None = None) -> None:
        """A child run named after the trial, with its params, `tags` and `config.json`; `run_id`
        reopens the trial's run of a resumed study (params it already holds are not re-logged)."""
        trial_id = str(trial_id)
        flat = flatten(params or {})
        extra = {str(k): str(v) for k, v in (tags or {}).items()}
        config_text = json_text(config or {})
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
                                      run_tags, trial_id, flat, now_ms(), run_id)
        steps.append(lambda: self._c().log_text(self._trial_run(trial_id), config_text,
                                                "config.json"))
        self.submit(Op(what, steps))

    def _metric_op(self, what: str, metrics: dict[str, float], step: int,
                   run: Callable[[], str], trial_id: str | None) -> Op:
        """Metrics at `step`, one batch: while it waits, later metrics of the same run join it."""
        from mlflow.entities import Metric

        ts = now_ms()
        op = Op(what, [], batch_key=("metrics", trial_id))
        op.batch = [Metric(k, v, ts, int(step)) for k, v in metrics.items()]

        def write() -> None:
            run_id = run()
            while op.batch:             # each batch leaves the list once it is written
                batch = op.batch[:self.MAX_BATCH]
                self._c().log_batch(run_id, metrics=batch, synchronous=True)
                del op.batch[:len(batch)]

        op.steps = [write]
        return op

    @guarded
    def log_metrics(self, trial_id: str, metrics: dict[str, float], step: int) -> None:
        """Metrics of a trial at `step` (non-finite and non-numeric values are left out)."""
        trial_id = str(trial_id)
        kept = finite(metrics)
        if kept:
            self.submit(self._metric_op(f"metrics of trial {trial_id}", kept, step,
                                         lambda: self._trial_run(trial_id), trial_id))

    @guarded
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
        ts = now_ms()
        final = [Metric(k, v, ts, 0) for k, v in finite(metrics).items()]
        run_tags = [_tag(str(k), str(v)) for k, v in (tags or {}).items()]
        texts: list[tuple[str, str]] = []
        if record is not None:
            texts.append(("trial.json", json_text(record)))
        for name, content in (artifacts or {}).items():
            name = str(name) if str(name).endswith(".json") else f"{name}.json"
            texts.append((name, json_text(content)))

        steps: list[Callable[[], None]] = []
        if run_tags:
            steps.append(lambda: self._c().log_batch(self._trial_run(trial_id), tags=run_tags,
                                                     synchronous=True))
        for i in range(0, len(final), self.MAX_BATCH):
            chunk = final[i:i + self.MAX_BATCH]
            steps.append(lambda chunk=chunk: self._c().log_batch(
                self._trial_run(trial_id), metrics=chunk, synchronous=True))
        for name, text in texts:
            steps.append(lambda name=name, text=text: self._c().log_text(
                self._trial_run(trial_id), text, name))
        steps.append(lambda: self._c().set_terminated(self._trial_run(trial_id), status, ts))
        self.submit(Op(f"the end of trial {trial_id}", steps))

    @guarded
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
            log_pytorch_model(self._c(), self.uri, self._parent(), holder["model"], name,
                              input_example, finite(metrics or {}), flatten(params or {}),
                              {str(k): str(v) for k, v in (tags or {}).items()}, register)

        def freeze() -> None:     # the model keeps training: keep what it was at this call
            try:
                holder["model"] = copy.deepcopy(model).cpu()
            except Exception:
                pass

        op = Op("the best model", [write])
        op.on_queue = freeze
        self.submit(op)

    @guarded
    def log_study_artifacts(self, directory: Path, artifact_path: str = "report") -> None:
        """The files under `directory` (as they are when written) on the study run."""
        directory = Path(directory)

        def write() -> None:
            if not directory.is_dir():
                raise Skip(f"{directory} is not a directory")
            self._c().log_artifacts(self._parent(), str(directory), artifact_path)

        self.submit(Op(f"the study artifacts in {directory}", [write]))

    @guarded
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

        self.submit(Op("closing interrupted trials' runs", [close]))

    @guarded
    def log_study_metrics(self, metrics: dict[str, float]) -> None:
        """Metrics on the study run (step 0)."""
        kept = finite(metrics)
        if kept:
            self.submit(self._metric_op("the study metrics", kept, 0, self._parent, None))

    def finish_study(self, status: str = "FINISHED") -> bool:
        """Ends trials left open (KILLED) and the study run, then flushes. True if everything
        reached MLflow; otherwise one warning says how much was lost."""
        try:
            status = str(status).upper()
            status = status if status in _STATUSES else "FAILED"
            for trial_id in sorted(self._open_trials):
                self.finish_trial(trial_id, {}, status="KILLED")
            ts = now_ms()
            self.submit(Op("the end of the study",
                             [lambda: self._c().set_terminated(self._parent(), status, ts)]))
            ok = self.flush()
            if not ok:
                lost = self.pending
                self._warn(f"MLflow at {self.uri} is still unreachable: {lost} operations were "
                           "not written to MLflow; the study directory still holds the results.")
            return ok and self.lost == 0
        except Exception as exc:  # never raises
            self._warn(f"Finishing the study in MLflow failed ({reason(exc)}); the study "
                       "directory still holds the results.")
            return False


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)
