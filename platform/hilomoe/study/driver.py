"""The driver of `hilomoe study run`: Ray Tune with Optuna over the study's space, every trial's
three-stage training, MLflow tracking, and the report at the end. Three phases, each a Tuner:
the search; the scaling-law grids of `laws` (study/design.py); the repeats of the baseline and
the HiLoMoE frontier with more seeds (report/verdict.py).

    summary = run_study(load_study("studies/quickstart.yaml"), "runs/quickstart")
    summary = run_study(spec, "runs/quickstart", resume=True)      # after the driver died

The study directory holds `study.json` (the resolved study, the dataset and the MLflow parent
run), Tune's own state and trial checkpoints per phase (`tune/`, `tune_design/`,
`tune_repeats/`), one record per finished trial
(`trials/<id>.json`), an event log (`events.jsonl`), `result.json` and `report/`. Every trial
event reaches MLflow through one `Tracker` in this process, never from the trials themselves, so
a tracking server that goes away costs buffered metrics, not trials.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from hilomoe import jsonio
from hilomoe.distributed.runtime import check_ray_address
from hilomoe.errors import HilomoeError
from hilomoe.report.verdict import MODEL, repeat_points, search_records
from hilomoe.study.design import design_points
from hilomoe.study.publish import log_best_model, open_tracking, run_links, ui_base
from hilomoe.study.run_dir import (EVENTS_FILE, PHASE_DIRS, RESULT_FILE, STUDY_FILE, StudyRun,
                                   read_events)
from hilomoe.study.space import SearchSpace
from hilomoe.study.spec import StudySpec
from hilomoe.study.trial import TRIAL_CPU, run_trial
from hilomoe.tracking.records import best_record, load_records, write_json

# StudyRun and STUDY_FILE are also imported from here (`hilomoe study recommend`)
__all__ = ["STUDY_FILE", "StudyRun", "run_study"]


def _open_run(spec: StudySpec, study_dir: Path, resume: bool, cache: bool) -> StudyRun:
    from hilomoe.data.dataset import check_unchanged, open_dataset
    from hilomoe.distributed.runtime import cache_dir, dataset_path
    from hilomoe.tracking.retry import tracking_uri

    if resume:
        run = StudyRun.load(study_dir)
        if _without_pace(run.spec) != _without_pace(spec.model_dump(mode="json")):
            raise HilomoeError(f"{study_dir}: the study file changed since the study started; "
                               f"resume it with the same file (only budget.concurrency and "
                               f"budget.time_limit_s may change), or start a new study with "
                               f"another --out.")
        check_unchanged(run.dataset, run.dataset_hash, f"the study in {study_dir}")
        run.spec = spec.model_dump(mode="json")  # the new pace applies to the phases to come
        run.save()
        return run
    if (study_dir / STUDY_FILE).exists():
        raise HilomoeError(f"{study_dir}: already holds a study; continue it with --resume or "
                           f"choose another --out.")
    dataset = dataset_path(spec.train)  # checked (or generated) before Ray starts
    study_dir.mkdir(parents=True, exist_ok=True)
    run = StudyRun(str(study_dir), spec.model_dump(mode="json"), str(dataset), spec.name,
                   tracking_uri(), cache_dir=str(cache_dir()) if cache else None,
                   dataset_hash=open_dataset(dataset, check_shards=False).fingerprint())
    run.save()
    return run


def _without_pace(spec: dict) -> dict:
    """The study minus what may change on resume: how many trials run at once, and for how
    long; neither changes what a trial computes."""
    budget = {k: v for k, v in spec["budget"].items() if k not in ("concurrency", "time_limit_s")}
    return {**spec, "budget": budget}


# ----------------------------------------------------------------------------------------------
# the study


def _tuner(run: StudyRun, callback, resume: bool, phase: str = "search",
           points: list[dict] | None = None):
    """The search's Tuner, or the Tuner of a later phase that trains its fixed `points`."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from hilomoe.study.search import FixedPoints, make_searcher, trials_to_run

    spec = run.study
    budget = spec.budget
    trainable = tune.with_parameters(run_trial, ctx=run.context())
    resources = ({"cpu": budget.cpus_per_trial, "gpu": budget.gpus_per_trial}
                 if budget.workers_per_trial == 1 else {"cpu": TRIAL_CPU})  # workers hold the rest
    trainable = tune.with_resources(trainable, resources)
    name = PHASE_DIRS[phase]
    tune_dir = Path(run.study_dir) / name
    if resume and tune.Tuner.can_restore(str(tune_dir)):
        return tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    space = SearchSpace(spec)
    if phase != "search":  # every fixed point runs to the end
        searcher, samples, scheduler = FixedPoints(points), len(points), FIFOScheduler()
    else:
        searcher, samples = make_searcher(spec, space), trials_to_run(spec, space)
        scheduler = (ASHAScheduler(time_attr="joint_epoch", metric="valid_auc", mode="max",
                                   max_t=spec.train.stages.joint.epochs + 1,  # keep the final report
                                   grace_period=spec.scheduler.grace_epochs,
                                   reduction_factor=spec.scheduler.reduction_factor)
                     if spec.scheduler.type == "asha" and spec.space else FIFOScheduler())
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=samples,
                                    max_concurrent_trials=budget.concurrency,
                                    time_budget_s=budget.time_limit_s,
                                    reuse_actors=True,  # no new process per trial
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=name, storage_path=str(Path(run.study_dir).resolve()),
            callbacks=[callback], verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.train.ray.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )


def _check_fits(spec: StudySpec, cluster: dict, fixed: bool,
                warn: Callable[[str], None]) -> None:
    """Trials running at once must fit the cluster. Tune sees only what a multi-worker trial
    itself holds, not its workers', so it cannot be left to queue them. A local Ray we started
    cannot grow: refuse. A cluster may autoscale: say what it waits for."""
    b = spec.budget
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    at_once = min(b.concurrency, b.trials)
    if at_once * b.cpus_per_trial > cpus + 1e-9 or at_once * b.gpus_per_trial > gpus + 1e-9:
        need = (f"{at_once} trial(s) at once x {b.cpus_per_trial:g} CPU"
                f"{f' and {b.gpus_per_trial:g} GPU' if b.gpus_per_trial else ''}")
        if fixed:
            raise HilomoeError(
                f"budget: {need} do not fit the local Ray ({cpus:g} CPU, {gpus:g} GPU); lower "
                f"budget.concurrency or the resources per trial, or run on a bigger cluster.")
        warn(f"budget: {need} do not fit the cluster as it is now ({cpus:g} CPU, {gpus:g} "
             f"GPU); trials wait until the autoscaler adds nodes.")
    if b.workers_per_trial > 1:
        from hilomoe.distributed.resources import plan_workers

        plan_workers(spec.train.ray.model_copy(update={"workers": b.workers_per_trial,
                                                       "gpu": b.gpus_per_trial > 0}),
                     {"CPU": b.cpus_per_trial - TRIAL_CPU, "GPU": b.gpus_per_trial})


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def run_study(spec: StudySpec, study_dir: str | Path, resume: bool = False,
              console: Callable[[dict], None] | None = None, cache: bool = True,
              register: str | None = None) -> dict:
    """Run (or continue) a study; returns the summary also written to result.json. The best
    model is logged to MLflow, and registered as `register` in its model registry if given."""
    t0 = time.perf_counter()
    study_dir = Path(study_dir).resolve()
    run = _open_run(spec, study_dir, resume, cache)  # before Ray: bad input fails fast
    check_ray_address()  # and an unreachable cluster, before the plan's calibration
    plan = _plan(run, console)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # lose little on a killed driver
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV/TBX/JSON per trial
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    with _inside(study_dir):
        return _drive(run, resume, console, t0, plan, register)


def _plan(run: StudyRun, console: Callable[[dict], None] | None) -> dict:
    """The study's cost plan (study/plan.py), made once, before its first trial, and shown."""
    from hilomoe.study.plan import PLAN_FILE, plan_study

    path = Path(run.study_dir) / PLAN_FILE
    if path.is_file():  # a resumed study keeps the plan it started with
        plan = json.loads(path.read_text())
        plan["calibration"]["seconds"] = 0.0  # none in this driver
        plan["resumed"] = True  # this driver's wall time is not the whole study's
    else:
        made = plan_study(run.study, run.dataset, run.cache_dir)
        plan = {**made.as_dict(), "sentence": made.sentence()}
        write_json(path, plan)
    if console:
        console({"kind": "phase", "message": plan["sentence"]})
    else:  # --json: stdout holds the summary alone
        print(f"hilomoe: {plan['sentence']}", file=sys.stderr)
    return plan


@contextlib.contextmanager
def _inside(directory: Path) -> Iterator[None]:
    """Work from `directory`. Tune resolves paths against the working directory, and the
    working directory of a `ray job submit` can be removed under a running job (seen on a
    one-machine multi-node cluster, whose nodes share it, as soon as the driver joins)."""
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        if os.path.isdir(cwd):
            os.chdir(cwd)


def _warner(console: Callable[[dict], None] | None, study_dir: str) -> Callable[[str], None]:
    def warn(message: str) -> None:  # one sentence, on the console or else on stderr
        if console:
            console({"kind": "warning", "message": message})
        else:
            print(f"hilomoe: warning: {message}", file=sys.stderr)
        with open(Path(study_dir) / EVENTS_FILE, "a") as f:  # and in the study's event log
            f.write(jsonio.dumps({"time": time.time(), "kind": "warning", "message": message})
                    + "\n")

    return warn


def _fit(run: StudyRun, resume: bool, warn: Callable[[str], None], phase: str = "search",
         points: list[dict] | None = None) -> None:
    """One phase's Tuner, run to its end. When a node is lost, Tune can error a trial however
    many restarts `ray.max_failures` allows: the lost actor's second in-flight call fails after
    Tune has begun to recover the trial, and a trial already pending counts that as its own
    error. Trials lost to the cluster like this resume from their checkpoints once, as
    `--resume` would resume them."""
    from hilomoe.study.callback import StudyCallback

    results = _tuner(run, StudyCallback(run.study_dir), resume, phase, points).fit()
    lost = sum(lost_to_the_cluster(error) for error in results.errors)
    if lost:
        warn(f"{lost} trial(s) of the {phase} phase lost to the cluster (a process or node "
             f"went away); resuming them from their last checkpoints")
        _tuner(run, StudyCallback(run.study_dir), True, phase, points).fit()


def lost_to_the_cluster(error: BaseException | None) -> bool:
    """Whether a trial's error is Ray losing its process or node, not the trial's own: an
    actor that died or became unreachable, a dead node or worker, a lost object (or Tune's
    text of such an error, when it could not keep the exception itself)."""
    from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError

    if isinstance(error, (RayActorError, NodeDiedError, WorkerCrashedError, ObjectLostError)):
        return True
    text = str(error or "")
    return text.startswith("The actor ") and ("unavailable" in text or "died" in text)


def _drive(run: StudyRun, resume: bool, console: Callable[[dict], None] | None,
           t0: float, plan: dict, register: str | None = None) -> dict:
    from hilomoe.distributed.runtime import connect_ray
    from hilomoe.tracking.runs import Tracker

    spec, warn = run.study, _warner(console, run.study_dir)
    tracker = Tracker(run.experiment, run.tracking_uri, on_warning=warn)
    # the parent run (and a new store's tables) while Ray starts: both take seconds
    opening = threading.Thread(target=open_tracking, args=(tracker, run))
    opening.start()
    try:
        started = connect_ray()
    except BaseException:
        opening.join()
        tracker.finish_study("FAILED")  # no parent run left RUNNING
        raise
    opening.join()
    run.parent_run_id = tracker.parent_run_id  # None while MLflow is unreachable
    run.save()
    import ray

    from hilomoe.study.callback import attach

    try:
        _check_fits(spec, ray.cluster_resources(), fixed=started, warn=warn)
        attach(run.study_dir, tracker, console)
        try:
            _fit(run, resume, warn)
            for phase in ("design", "repeats"):
                points = _phase_points(spec, phase, load_records(run.study_dir))
                if points or (resume and _restorable(run, phase)):
                    if console:
                        console({"kind": "phase", "trials": len(points),
                                 "message": _PHASE_LINES[phase].format(
                                     n=len(points), axes=", ".join(spec.laws.axes),
                                     seeds=spec.repeats, model=MODEL)})
                    _fit(run, resume, warn, phase, points)
        except KeyboardInterrupt:
            raise HilomoeError(f"interrupted; continue the study with `hilomoe study run "
                               f"STUDY.yaml --out {run.study_dir} --resume`") from None
        if console:
            console({"kind": "end"})
        return _conclude(run, tracker, time.perf_counter() - t0, plan, register)
    finally:
        if started:
            ray.shutdown()


_PHASE_LINES = {
    "design": "scaling-law grids along {axes}: {n} trials",
    "repeats": "the baseline and the {model} frontier again with {seeds} seeds: {n} trials",
}


def _restorable(run: StudyRun, phase: str) -> bool:
    """A phase a killed driver had started: its Tuner continues (its unfinished points)."""
    from ray import tune

    return tune.Tuner.can_restore(str(Path(run.study_dir) / PHASE_DIRS[phase]))


def _phase_points(spec: StudySpec, phase: str, records: list[dict]) -> list[dict]:
    if phase == "design":
        return design_points(spec.laws, spec.train, records)
    return repeat_points(records, spec.repeats, spec.budget.repeated_points)


def _conclude(run: StudyRun, tracker, wall_s: float, plan: dict,
              register: str | None = None) -> dict:
    """Report, best model and summary: what the study found, in files and in MLflow."""
    from hilomoe.study.plan import compare
    from hilomoe.study.recommend import load_recommendations
    from hilomoe.report.writer import write_report

    spec = run.study
    study_dir = Path(run.study_dir)
    everything = load_records(study_dir)
    # the plan's own calibration is not part of what it predicts
    cost = compare(plan, wall_s - plan["calibration"]["seconds"], everything,
                   read_events(study_dir))
    records = search_records(everything)  # the repeats only feed the headline
    # a trial a killed driver had started after Tune's last snapshot is gone for good (Tune
    # sampled another in its place): its MLflow run ends as KILLED, not RUNNING forever
    tracker.close_orphans({r["trial_id"] for r in everything})
    report = write_report(everything, study_dir / "report", title=spec.name,
                          meta={"description": spec.description} if spec.description else None,
                          recommendations=load_recommendations(study_dir), cost=cost,
                          links=run_links(tracker))
    best = best_record(spec, records)
    if best is not None and best.get("checkpoint"):
        log_best_model(run, tracker, best, register)
    summary = _summary(run, best, report, cost, everything, records, wall_s)
    summary["mlflow_url"] = tracker.view_url(ui_base(run.tracking_uri))
    counts = summary["counts"]
    tracker.log_study_metrics({"best_valid_auc": best["valid_auc"] if best else float("nan"),
                               "trials_completed": counts["completed"],
                               "trials_pruned": counts["pruned"],
                               "trials_failed": counts["failed"],
                               "stage1_reused": summary["stage1_reused"],
                               "stage1_saved_s": summary["stage1_saved_s"]})
    tracker.log_study_artifacts(study_dir / "report")
    summary["mlflow_complete"] = tracker.finish_study("FINISHED")
    if run.parent_run_id is None and tracker.parent_run_id:  # created once MLflow came back
        run.parent_run_id = summary["mlflow_run_id"] = tracker.parent_run_id
        run.save()
    write_json(study_dir / RESULT_FILE, summary)
    return summary


def _summary(run: StudyRun, best: dict | None, report, cost: dict, everything: list[dict],
             records: list[dict], wall_s: float) -> dict:
    """The study's result: the best trial, the headline and laws, what it cost and saved, and
    where it is (the MLflow view's address aside, which the tracker knows)."""
    reused = [r for r in records if r["stage1_reused"]]
    counts = {s: sum(r["status"] == s for r in records) for s in ("completed", "pruned", "failed")}
    return {
        "best": None if best is None else {
            "trial_id": best["trial_id"], "params": best["params"],
            "config": run.context().config_from(best["params"]).model_dump(mode="json"),
            "metrics": {k: best.get(k) for k in ("valid_auc", "valid_logloss", "test_auc",
                                                  "test_logloss", "flops", "params_active",
                                                  "params_total")}},
        "headline": report.headline,
        "laws": report.laws(),
        "plan": cost,
        "pareto": report.pareto,
        "trials": records,
        "repeats": [r for r in everything if r not in records],
        "counts": counts,
        "stage1_reused": len(reused),
        "stage1_saved_s": sum(r["stage1_seconds"] for r in reused),
        "trials_reused": sum(r.get("trial_reused", False) for r in records),
        "trials_saved_s": sum(r.get("trial_saved_s", 0.0) for r in records),
        "train_s": sum(r["train_seconds"] or 0.0 for r in everything),
        "wall_s": wall_s,
        "study_dir": str(Path(run.study_dir)),
        "report": str(report.markdown),
        "mlflow_experiment": run.experiment,
        "mlflow_run_id": run.parent_run_id,
        "tracking_uri": run.tracking_uri,
    }
