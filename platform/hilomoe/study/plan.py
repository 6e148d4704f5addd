"""`hilomoe study plan`: what a study will cost, before it runs.

    plan = plan_study(spec, dataset)          # calibrate (seconds), then predict
    plan.wall_s, plan.cpu_hours, plan.phases

**Calibration** (study/calibrate.py): a few hundred steps of every stage of the space's cheapest
and dearest points, each stage's step time a line in the FLOPs of its batch.

**Prediction.** The driver's three phases (study/driver.py), simulated:

- search: the study's distinct points drawn at random from the space (TPE's start-up draws
  are random; its later ones lean to good regions of a similar cost);
- design: the law grids (`laws`) around a drawn HiLoMoE point, as the best one is not known yet;
- repeats: the other seeds of a drawn baseline point and of `repeated_points` HiLoMoE points.

Every stage runs its full epochs (a stage that stops early on `patience` makes the study
cheaper than planned), except that ASHA's expected cut of the joint stage applies to search
trials. Stage 1 trains once per base, keyed as the stage-1 cache keys it (a base already in
the cache costs nothing, as does a configuration already in the trial cache), and a trial that
needs a base another trial is training waits for it, as the cache's lock makes it. Trials run
`concurrency` at a time in order, each as soon as a slot frees. The figures are the mean over
`draws` random studies, with the range they span.
"""

from __future__ import annotations

import heapq
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hilomoe.config import StageName, TrainConfig
from hilomoe.data.dataset import open_dataset
from hilomoe.model.flops import model_cost
from hilomoe.study.calibrate import Calibration, calibrate, corners, stage_flops
from hilomoe.study.design import settings_at
from hilomoe.study.keys import config_key
from hilomoe.study.space import SearchSpace
from hilomoe.study.spec import StudySpec

PLAN_FILE = "plan.json"
# Fixed costs outside training, measured on the quickstart (2-core machine, local Ray): the
# driver's Ray start, MLflow parent run and report; a Tuner's start and end; a trial's start
# (actor reuse, data and model set-up) and end; Tune's report of one epoch; a worker group's
# start for a multi-worker trial.
STUDY_S, PHASE_S, TRIAL_S, REPORT_S, WORKER_GROUP_S = 20.0, 8.0, 1.5, 0.15, 20.0
# CPUs the driver keeps busy on a local Ray (Tune's loop, the MLflow tracker, Ray's daemons):
# trials that fill the machine share what is left (measured on the quickstart: two one-CPU
# trials on two cores each train ~1.1-1.2x slower than one alone)
DRIVER_CPUS = 0.25
PHASES = ("search", "design", "repeats")


# ----------------------------------------------------------------------------------------------
# the study's trials


@dataclass
class Job:
    """One trial as the schedule sees it: a shared stage 1 (`base_key`: None when it trains
    none, or trains its own) and the rest of its time."""

    base_key: str | None
    base_s: float
    rest_s: float


class Costing:
    """Seconds of a trial's stages on this study's dataset, from a calibration."""

    def __init__(self, spec: StudySpec, dataset: str, calibration: Calibration,
                 cache_dir: str | None):
        self.spec, self.dataset, self.cal = spec, dataset, calibration
        ds = open_dataset(dataset, training=True)
        self.schema = ds.schema
        self.rows = {s: ds.meta.splits[s].rows for s in ds.meta.splits}
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.slowdown = slowdown(spec)

    def config(self, overrides: dict[str, Any]) -> TrainConfig:
        return self.spec.train.with_overrides(**overrides, **{"data.path": self.dataset})

    def job(self, cfg: TrainConfig, asha: bool) -> Job:
        from hilomoe.study.cache import Stage1Cache, TrialCache
        from hilomoe.study.trial import trial_device

        device = trial_device(self.spec)
        if self.cache_dir and (self.cache_dir / "trials"
                               / TrialCache.key(cfg, self.dataset, device)).is_dir():
            return Job(None, 0.0, TRIAL_S)  # replayed
        stages = ([StageName.BASE] if not cfg.model.moe.has_experts
                  else [s for s in StageName if cfg.stages.get(s).enabled])
        seconds = {s: self.stage_s(cfg, s, asha) for s in stages}
        full = model_cost(self.schema, cfg.model).flops
        rest = TRIAL_S + self.rows.get("test", 0) * self.cal.eval_s(full)
        rest += sum(v for s, v in seconds.items() if s != StageName.BASE)
        base_s = seconds.get(StageName.BASE, 0.0)
        workers = self.spec.budget.workers_per_trial
        if workers > 1:  # no stage-1 sharing; the work divides among the workers
            return Job(None, 0.0, WORKER_GROUP_S + (base_s + rest) / workers)
        if not base_s:
            return Job(None, 0.0, rest)
        key = Stage1Cache.key(cfg, self.dataset, device)
        if self.cache_dir and (self.cache_dir / "stage1" / key).is_dir():
            return Job(key, 0.0, rest)
        return Job(key, base_s, rest)

    def stage_s(self, cfg: TrainConfig, stage: StageName, asha: bool) -> float:
        sc = cfg.stages.get(stage)
        epochs = float(sc.epochs)
        if asha and stage == StageName.JOINT and self.spec.scheduler.type == "asha":
            epochs = asha_epochs(sc.epochs, self.spec.scheduler.grace_epochs,
                                 self.spec.scheduler.reduction_factor)
        rows = self.rows["train"] * (cfg.data.train_fraction or 1.0)
        flops = stage_flops(self.schema, cfg, stage)
        params = model_cost(self.schema, cfg.model).params_total
        epoch = (math.ceil(rows / sc.batch_size) * self.cal.step_s(stage.value, sc.batch_size,
                                                                  flops)
                 + self.rows.get("valid", 0) * self.cal.eval_s(flops)
                 + self.cal.save_s(params) + REPORT_S)
        return epochs * epoch * self.slowdown


def slowdown(spec: StudySpec) -> float:
    """How much slower than calibrated a trial trains when `concurrency` trials and the driver
    oversubscribe this machine's CPUs (1 on a cluster, RAY_ADDRESS, whose size is not known
    here)."""
    if os.environ.get("RAY_ADDRESS"):
        return 1.0
    b = spec.budget
    busy = min(b.concurrency, b.trials) * b.cpus_per_trial + DRIVER_CPUS
    return max(1.0, busy / (os.cpu_count() or 1))


def asha_epochs(epochs: int, grace: int, reduction: float) -> float:
    """Expected joint-stage epochs of a trial under ASHA: all reach the first rung (`grace`),
    and 1/`reduction` of those at each rung go on to the next (rungs below epochs + 1, the
    scheduler's max_t)."""
    expected, survive, done, rung = 0.0, 1.0, 0, grace
    while rung < epochs + 1 and done < epochs:
        reach = min(rung, epochs)
        expected += survive * (reach - done)
        done, survive, rung = reach, survive / reduction, rung * reduction
    return expected + survive * (epochs - done)


def schedule(jobs: list[Job], slots: int, ready: dict[str, float]) -> tuple[float, float]:
    """(makespan, slot-seconds) of `jobs` run `slots` at a time in order, each starting when a
    slot frees; `ready` maps each base key to when its stage 1 is in the cache (updated)."""
    free = [0.0] * max(1, slots)
    busy = 0.0
    for job in jobs:
        start = heapq.heappop(free)
        t = start
        if job.base_key is not None:
            if job.base_key in ready:
                t = max(t, ready[job.base_key])  # the cache's lock: wait for the trainer
            else:
                t += job.base_s
                ready[job.base_key] = t
        t += job.rest_s
        busy += t - start
        heapq.heappush(free, t)
    return (max(free) if jobs else 0.0), busy


# ----------------------------------------------------------------------------------------------
# the plan


@dataclass
class PhasePlan:
    phase: str
    trials: float
    trial_s: float  # slot-seconds: trials' time from start to end, summed
    wall_s: float


@dataclass
class Plan:
    wall_s: float
    wall_range_s: tuple[float, float]
    cpu_hours: float
    gpu_hours: float
    concurrency: int
    phases: list[PhasePlan]
    calibration: Calibration
    draws: int
    assumptions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"wall_s": self.wall_s, "wall_range_s": list(self.wall_range_s),
                "cpu_hours": self.cpu_hours, "gpu_hours": self.gpu_hours,
                "concurrency": self.concurrency, "draws": self.draws,
                "phases": [asdict(p) for p in self.phases],
                "calibration": self.calibration.as_dict(), "assumptions": self.assumptions}

    def sentence(self) -> str:
        lo, hi = self.wall_range_s
        trials = sum(p.trials for p in self.phases)
        hours = f"{self.cpu_hours:.2f} CPU-hours" + (f", {self.gpu_hours:.2f} GPU-hours"
                                                     if self.gpu_hours else "")
        return (f"plan: about {_minutes(self.wall_s)} of wall time ({_minutes(lo)}-"
                f"{_minutes(hi)} over the draws), {trials:.0f} trials "
                f"{self.concurrency} at a time, {hours} (calibrated in "
                f"{self.calibration.seconds:.0f} s)")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def draw_points(space: SearchSpace, n: int, seed: int) -> list[dict]:
    """`n` distinct points (as overrides) drawn at random, as the search's start-up draws are
    (fewer when the space holds fewer)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out, seen = [], set()
    for _ in range(50 * max(n, 1)):
        if len(out) >= n:
            break
        trial = study.ask()
        point = space.sample(trial)
        study.tell(trial, 0.0)
        key = space.key(point)
        if key not in seen:
            seen.add(key)
            out.append(space.overrides(point))
    return out


def phase_points(spec: StudySpec, search: list[dict], rng: np.random.Generator,
                 moe: list[dict]) -> dict[str, list[dict]]:
    """The overrides each phase trains, for one random study whose search drew `search`
    (`moe`: those with experts)."""
    out = {"search": search, "design": [], "repeats": []}
    fixed = spec.train
    if spec.laws.axes and search:
        center = dict((moe or search)[rng.integers(len(moe or search))])
        own = config_key(fixed.with_overrides(**center))
        for axis in spec.laws.axes:
            for value in spec.laws.grid(axis):
                settings = settings_at(center, axis, value, fixed)
                if config_key(fixed.with_overrides(**settings)) != own:
                    out["design"].append(settings)
    if spec.repeats > 1:
        dense = [p for p in search if p not in moe]
        targets = ([dense[rng.integers(len(dense))]] if dense else [])
        targets += [moe[i] for i in rng.permutation(len(moe))[:spec.budget.repeated_points]]
        seed0 = spec.train.seed
        out["repeats"] = [{**t, "seed": s} for t in targets
                          for s in range(seed0 + 1, seed0 + spec.repeats)]
    return out


def predict(spec: StudySpec, dataset: str, calibration: Calibration,
            cache_dir: str | None = None, draws: int = 16) -> Plan:
    from hilomoe.study.search import trials_to_run

    space = SearchSpace(spec)
    costing = Costing(spec, dataset, calibration, cache_dir)
    budget = spec.budget
    n = trials_to_run(spec, space)
    walls, per_phase = [], {p: [] for p in PHASES}
    for d in range(draws):
        rng = np.random.default_rng([spec.seed, d])
        search = draw_points(space, n, seed=int(rng.integers(2**31)))
        moe = [p for p in search if costing.config(p).model.moe.has_experts]
        ready: dict[str, float] = {}
        wall = STUDY_S
        for phase, points in phase_points(spec, search, rng, moe).items():
            jobs = [costing.job(costing.config(p), asha=phase == "search"
                                and bool(spec.space)) for p in points]
            # a base an earlier phase trained is in the cache from the start of this one
            ready = dict.fromkeys(ready, 0.0)
            span, busy = schedule(jobs, budget.concurrency, ready)
            if phase == "search" and budget.time_limit_s:
                span = min(span, budget.time_limit_s)
            span += PHASE_S if jobs else 0.0
            wall += span
            per_phase[phase].append((len(jobs), busy, span))
        walls.append(wall)
    phases = [PhasePlan(p, *(float(np.mean([v[i] for v in per_phase[p]])) for i in range(3)))
              for p in PHASES]
    slot_hours = sum(p.trial_s for p in phases) / 3600
    assumptions = [
        "every stage runs its full epochs (early stopping on patience makes the study cheaper)",
        "search points are drawn at random from the space; the design grids centre on a drawn "
        "HiLoMoE point",
    ]
    if budget.gpus_per_trial and calibration.device == "cpu":
        assumptions.append("calibrated on the CPU: trials on GPUs will be faster than planned")
    if budget.workers_per_trial > 1:
        assumptions.append(f"{budget.workers_per_trial} workers per trial divide its work "
                           f"evenly, after a {WORKER_GROUP_S:.0f} s worker-group start")
    return Plan(float(np.mean(walls)), (float(min(walls)), float(max(walls))),
                slot_hours * budget.cpus_per_trial, slot_hours * budget.gpus_per_trial,
                budget.concurrency, phases, calibration, draws, assumptions)


def plan_study(spec: StudySpec, dataset: str | Path, cache_dir: str | None = None,
               steps: int = 200, draws: int = 16) -> Plan:
    """Calibrate on the space's cheapest and dearest points, then predict the study."""
    dataset = str(dataset)
    space = SearchSpace(spec)
    points = space.points()  # every distinct point of a discrete space; else 200 random ones
    candidates = (draw_points(space, 200, spec.seed) if points is None
                  else [space.overrides(p) for p in points])
    configs = [spec.train.with_overrides(**p, **{"data.path": dataset}) for p in candidates]
    budget = spec.budget
    device = ("cuda" if budget.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")
    cal = calibrate(corners(spec, configs), steps=steps,
                    threads=max(1, int(budget.cpus_per_trial)), device=device)
    return predict(spec, dataset, cal, cache_dir, draws)


# ----------------------------------------------------------------------------------------------
# planned against actual


def actual_phases(records: list[dict], events: list[dict]) -> dict[str, dict]:
    """Per phase, the trials the study ran and the wall time from its first trial's start to
    its last trial's end (from the event log)."""
    from hilomoe.report.fields import DESIGN_AXIS, REPEAT_OF

    def phase(r: dict) -> str:
        return "design" if r.get(DESIGN_AXIS) else "repeats" if r.get(REPEAT_OF) else "search"

    of = {r["trial_id"]: phase(r) for r in records}
    out = {}
    for p in PHASES:
        times = [e["time"] for e in events if of.get(e.get("trial_id")) == p
                 and e["kind"] in ("trial_start", "trial_end")]
        out[p] = {"trials": sum(v == p for v in of.values()),
                  "wall_s": (max(times) - min(times)) if times else 0.0}
    return out


def compare(plan: dict, actual_wall_s: float, records: list[dict],
            events: list[dict]) -> dict:
    """The `plan` entry of a study's summary: predicted and actual wall time, per phase too."""
    actual = actual_phases(records, events)
    return {"wall_s": {"predicted": plan["wall_s"], "actual": actual_wall_s},
            "error": (plan["wall_s"] - actual_wall_s) / actual_wall_s if actual_wall_s else None,
            "wall_range_s": plan["wall_range_s"], "cpu_hours": plan["cpu_hours"],
            "gpu_hours": plan["gpu_hours"], "calibration_s": plan["calibration"]["seconds"],
            "resumed": bool(plan.get("resumed")),
            "phases": [{"phase": p["phase"], "trials": {"predicted": p["trials"],
                                                        "actual": actual[p["phase"]]["trials"]},
                        "wall_s": {"predicted": p["wall_s"],
                                   "actual": actual[p["phase"]]["wall_s"]}}
                       for p in plan["phases"]]}

