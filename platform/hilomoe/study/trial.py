"""One study trial: the three-stage training of a sampled configuration, reported to Ray Tune.

    tune.with_parameters(run_trial, ctx=TrialContext(...))      # the Tune function trainable

A trial with one worker runs the engine in the trial's own process (a worker group would cost
~20 s of start-up per trial, more than a small trial's training); a trial with several workers
runs the same worker loop as `hilomoe train` (train/worker.py) on a TorchTrainer whose reports
reach Tune through `TuneReportCallback`. Both report the same metrics after every epoch, with a
checkpoint that a restored study continues from, and a final report with the test metrics.

Stage 1 of an in-process trial goes through the stage-1 cache: the first trial of each distinct
base trains it and stores it; the others adopt it (reported as `stage1_reused`). A trial whose
whole configuration was trained before replays that result (`trial_reused`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from hilomoe.config import StageName, TrainConfig
from hilomoe.data.dataset import open_dataset
from hilomoe.engine.local import Data, build_model, parquet_sources, summarize
from hilomoe.engine.loop import Engine, EpochRecord, run_stages
from hilomoe.errors import HilomoeError, out_of_memory
from hilomoe.model.flops import model_cost
from hilomoe.study.cache import Stage1Cache, Stage1Entry, TrialCache
from hilomoe.study.space import SearchSpace
from hilomoe.study.spec import StudySpec
from hilomoe.train.worker import (STATE_FILE, SUMMARY_FILE, autocast_dtype, checkpoint_dir,
                                  epoch_metrics, final_metrics, read_checkpoint)


TRIAL_CPU = 0.01  # what a trial holds while its TorchTrainer's workers hold the rest (0 is refused)


@dataclass
class TrialContext:
    """What every trial of a study shares, as plain data."""

    spec: dict  # StudySpec, JSON form
    dataset: str  # canonical dataset directory
    study_dir: str
    cache_dir: str | None  # the stage-1 and trial caches; None turns sharing off
    threads: int = 1  # torch threads of an in-process trial

    @functools.cached_property
    def study(self) -> StudySpec:
        return StudySpec.model_validate(self.spec)

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


def trial_cost(cfg: TrainConfig, schema) -> dict:
    """FLOPs per sample and parameter counts: known before training, reported with every
    result (an objective may minimise them)."""
    c = model_cost(schema, cfg.model, batch=cfg.eval_batch_size).as_dict()
    return {"flops": c["flops_analytic"], "params_total": c["params_total"],
            "params_active": c["params_active"], "params_embedding": c["params_embedding"]}


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    try:
        _run_trial(params, ctx)
    except RuntimeError as err:  # the trial's error (record, console) says what to change
        message = out_of_memory(err)
        if message is None:
            raise
        raise HilomoeError(message) from None


def _run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    cfg = ctx.config(params)
    if cfg.ray.workers > 1:
        return _run_distributed(cfg, ctx)
    from ray import tune

    torch.set_num_threads(ctx.threads)
    dataset = open_dataset(ctx.dataset)
    sources = parquet_sources(dataset, cfg)
    # Tune gives a trial that asked for a GPU its own (CUDA_VISIBLE_DEVICES)
    device = torch.device("cuda" if ctx.study.budget.gpus_per_trial > 0
                          and torch.cuda.is_available() else "cpu")
    engine = Engine(build_model(cfg, dataset.schema), cfg.stages, device,
                    autocast=autocast_dtype(cfg, device), keep_stage_models=True)
    plan = [s.value for s in engine.plan()]
    fixed = {**trial_cost(cfg, dataset.schema), "stage1_reused": False, "stage1_seconds": 0.0,
             "trial_reused": False}
    state, _ = read_checkpoint(tune.get_checkpoint())
    if state is not None:  # a restored trial: the engine skips what it finished
        engine.load_state_dict(state)
        fixed.update(state.get("trial", {}))
    # training seconds before a restore (from the restored history), plus this process's
    start, before = time.perf_counter(), sum(r.seconds for r in engine.history)

    def report(metrics: dict, files: dict | None = None) -> None:
        with checkpoint_dir(files or {}) as d:
            tune.report({**metrics, **fixed},
                        checkpoint=tune.Checkpoint.from_directory(d) if d else None)

    def state_files() -> dict:
        return {STATE_FILE: {**engine.state_dict(), "trial": fixed}}

    def on_epoch(record: EpochRecord, reused: bool = False) -> None:
        m = epoch_metrics(record, 1, plan.index(record.stage),
                          before + time.perf_counter() - start)
        # a cached epoch carries no checkpoint: the next trained epoch's holds it
        report({**m, "reused": reused}, None if reused else state_files())

    trials = TrialCache(Path(ctx.cache_dir) / "trials") if ctx.cache_dir else None
    key = trials.key(cfg, ctx.dataset) if trials else None
    cached = trials.get(key) if trials and state is None else None
    if cached is not None:  # this configuration was trained before: replay its result
        state, summary = cached
        fixed.update(trial_reused=True)
        engine.load_state_dict(state)
        for record in engine.history:
            on_epoch(record, reused=True)
        report({**final_metrics(summary), "train_seconds": 0.0,
                "trial_saved_s": summary["seconds"]},
               {**state_files(), SUMMARY_FILE: summary})
        return
    if state is None and ctx.cache_dir and plan[0] == StageName.BASE.value:
        fixed.update(_stage1(engine, cfg, ctx, sources, on_epoch))
    result = run_stages(engine, sources["train"], sources["valid"], sources["test"], on_epoch)
    data = Data(dataset.schema, {}, dataset.meta.extra.get("bayes"))
    summary = summarize(result, cfg, data, before + time.perf_counter() - start)
    if trials:
        trials.put(key, {**engine.state_dict(), "trial": fixed}, summary)
    report(final_metrics(summary), {**state_files(), SUMMARY_FILE: summary})


def _stage1(engine: Engine, cfg: TrainConfig, ctx: TrialContext, sources: dict,
            on_epoch: Callable[..., None]) -> dict:
    """Adopt the cached stage 1 of this trial's base, or train it and store it for the others.
    Returns the trial's stage-1 facts: whether it reused one, and what that saved."""
    cache = Stage1Cache(Path(ctx.cache_dir) / "stage1")
    key = cache.key(cfg, ctx.dataset)
    with cache.claim(key):
        entry = cache.get(key)
        if entry is None:
            t0 = time.perf_counter()
            for record in engine.fit_stage(StageName.BASE, sources["train"], sources["valid"]):
                on_epoch(record)
            entry = Stage1Entry(engine.model.base_state(), list(engine.history),
                                time.perf_counter() - t0)
            cache.put(key, entry)
            return {"stage1_reused": False, "stage1_seconds": entry.seconds, "stage1_key": key}
    engine.adopt_stage(StageName.BASE, entry.weights, entry.history)
    for record in entry.history:
        on_epoch(record, reused=True)
    return {"stage1_reused": True, "stage1_seconds": entry.seconds, "stage1_key": key}


def _run_distributed(cfg: TrainConfig, ctx: TrialContext) -> None:
    """Several workers: the worker loop of `hilomoe train` on a TorchTrainer inside the trial.
    The trainer's run lives in the trial's directory, so a restored trial resumes it."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from hilomoe.train.driver import ray_datasets
    from hilomoe.train.resources import plan_workers
    from hilomoe.train.worker import WorkerJob, train_loop

    # the workers and Ray Data share the trial's CPU budget, less what the trial itself holds
    budget = ctx.study.budget
    plan = plan_workers(cfg.ray, {"CPU": budget.cpus_per_trial - TRIAL_CPU,
                                  "GPU": budget.gpus_per_trial})
    trial = tune.get_context()
    job = WorkerJob(config=cfg.model_dump(mode="json"), dataset=ctx.dataset,
                    plan=plan.as_dict(), run_dir=str(Path(ctx.study_dir) / "trials"))
    trainer = TorchTrainer(
        train_loop, train_loop_config=job.as_dict(),
        scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=cfg.ray.gpu,
                                     resources_per_worker=plan.resources()),
        run_config=RunConfig(
            name=f"train-{trial.get_trial_id()}",
            storage_path=str(Path(ctx.study_dir) / "trials"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.keep_checkpoints,
                                               checkpoint_score_attribute="score",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=[TuneReportCallback()],
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(plan.torch_threads)}},
        ),
        **ray_datasets(cfg, open_dataset(ctx.dataset), plan),
    )
    trainer.fit()
