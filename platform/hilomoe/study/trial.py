"""One study trial: the three-stage training of a sampled configuration, reported to Ray Tune.

    tune.with_parameters(run_trial, ctx=TrialContext(...))      # the Tune function trainable

A trial is a Reporter adapter around the one training session (`hilomoe.session.Session`).
With one worker the session runs in the trial's own process, reporting through `tune.report`
(a worker group would cost ~20 s of start-up per trial, more than a small trial's training);
with several workers the trial runs `hilomoe train`'s trainer (distributed/trainer.py), whose
workers run the same session and whose reports reach Tune through `TuneReportCallback`. Both
report the same metrics after every epoch, with a checkpoint that a restored study continues
from, and a final report with the test metrics.

Stage 1 of an in-process trial goes through the stage-1 cache: the first trial of each distinct
base trains it and stores it; the others adopt it (reported as `stage1_reused`). A trial whose
whole configuration was trained before replays that result (`trial_reused`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hilomoe.config import StageName, TrainConfig
from hilomoe.data.dataset import open_dataset
from hilomoe.engine.local import Data, parquet_sources
from hilomoe.engine.parallel import Parallel
from hilomoe.errors import HilomoeError, out_of_memory
from hilomoe.distributed.reporter import RayReporter
from hilomoe.model.flops import trial_cost
from hilomoe.session import Reporter, Session
from hilomoe.study.cache import Stage1Cache, Stage1Entry, TrialCache
from hilomoe.study.run_dir import TrialContext
from hilomoe.study.spec import StudySpec


TRIAL_CPU = 0.01  # what a trial holds while its TorchTrainer's workers hold the rest (0 is refused)
# also imported from here: the trial's plain-data context, and its cost (a record's columns)
__all__ = ["TRIAL_CPU", "TrialContext", "run_in_process", "run_trial", "trial_cost"]


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    try:
        _run_trial(params, ctx)
    except RuntimeError as err:  # the trial's error (record, console) says what to change
        message = out_of_memory(err)
        if message is None:
            raise
        raise HilomoeError(message) from None


def trial_device(study: StudySpec) -> torch.device:
    """Where an in-process trial trains: Tune gives a trial that asked for a GPU its own
    (CUDA_VISIBLE_DEVICES). Part of the cache keys (a result depends on the device)."""
    return torch.device("cuda" if study.budget.gpus_per_trial > 0
                        and torch.cuda.is_available() else "cpu")


def _run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    cfg = ctx.config(params)
    if cfg.ray.workers > 1:
        return _run_distributed(cfg, ctx)
    from ray import tune

    run_in_process(cfg, ctx, RayReporter(tune), trial_id=tune.get_context().get_trial_id())


def run_in_process(cfg: TrainConfig, ctx: TrialContext, reporter: Reporter,
                   trial_id: str | None = None) -> None:
    """A one-worker trial in this process, through the trial and stage-1 caches, reporting to
    `reporter` (Tune's, in a study). `trial_id` names it in the trial cache: a later trial
    that replays its result says where the result came from."""
    torch.set_num_threads(ctx.threads)
    dataset = open_dataset(ctx.dataset, training=True)
    data = Data(dataset.schema, parquet_sources(dataset, cfg), dataset.meta.extra.get("bayes"))
    device = trial_device(ctx.study)
    facts = {**trial_cost(cfg, dataset.schema), "stage1_reused": False, "stage1_seconds": 0.0,
             "trial_reused": False}
    session = Session(cfg, data, reporter, device, Parallel.single(cfg, device), facts)
    if not ctx.cache_dir:
        session.run()
        return
    trials = TrialCache(Path(ctx.cache_dir) / "trials")
    key = trials.key(cfg, ctx.dataset, device)
    # one trial per configuration at a time: a second one waits, then replays the first's
    with trials.claim(key):
        cached = trials.get(key) if not session.restored else None
        if cached is not None:  # this configuration was trained before: replay its result
            origin = cached[1].get("trial_id")
            session.facts.update(trial_reused=True, reused_from=(
                f"trial {origin} (trial cache {key[:12]})" if origin
                else f"trial cache {key[:12]}"))
            session.replay(*cached)
            return
        if not session.restored and session.plan[0] == StageName.BASE.value:
            session.facts.update(_stage1(session, cfg, ctx, device))
        summary = session.run()  # the final report: the result stands whatever the cache does
        trials.put(key, {**session.engine.state_dict(), "facts": session.facts},
                   {**summary, "trial_id": trial_id})


def _stage1(session: Session, cfg: TrainConfig, ctx: TrialContext,
            device: torch.device) -> dict:
    """Adopt the cached stage 1 of this trial's base, or train it and store it for the others.
    Returns the trial's stage-1 facts: whether it reused one, and what that saved."""
    cache = Stage1Cache(Path(ctx.cache_dir) / "stage1")
    key = cache.key(cfg, ctx.dataset, device)
    with cache.claim(key):
        entry = cache.get(key)
        if entry is None:
            t0 = time.perf_counter()
            session.fit_stage(StageName.BASE)
            entry = Stage1Entry(session.engine.model.base_state(), list(session.engine.history),
                                time.perf_counter() - t0)
            cache.put(key, entry)  # a failed write warns; this trial goes on regardless
            return {"stage1_reused": False, "stage1_seconds": entry.seconds, "stage1_key": key}
    try:
        session.adopt_stage(StageName.BASE, entry.weights, entry.history)
    except HilomoeError as err:
        raise HilomoeError(f"{cache.path(key)}: {err}, so this cache entry was made for another "
                           f"model; remove it.") from None
    return {"stage1_reused": True, "stage1_seconds": entry.seconds, "stage1_key": key}


def _run_distributed(cfg: TrainConfig, ctx: TrialContext) -> None:
    """Several workers: the worker loop of `hilomoe train` on a TorchTrainer inside the trial.
    The trainer's run lives in the trial's directory, so a restored trial resumes it."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from hilomoe.distributed.resources import plan_workers
    from hilomoe.distributed.trainer import make_trainer

    # the workers and Ray Data share the trial's CPU budget, less what the trial itself holds
    budget = ctx.study.budget
    plan = plan_workers(cfg.ray, {"CPU": budget.cpus_per_trial - TRIAL_CPU,
                                  "GPU": budget.gpus_per_trial})
    trials = str(Path(ctx.study_dir) / "trials")
    make_trainer(cfg, open_dataset(ctx.dataset), plan,
                 name=f"train-{tune.get_context().get_trial_id()}", storage=trials,
                 run_dir=trials, callbacks=[TuneReportCallback()]).fit()
