"""Calibration for `hilomoe study plan`: how fast this machine trains a study's points.

A few hundred training steps of every stage, and some evaluation batches, of the space's
cheapest and dearest points by FLOPs per sample (and the cheapest and dearest with experts,
whose expert stages the others lack), on the study's dataset, in this process with the threads
and device a trial gets. A stage's step time is fitted as a line in the FLOPs of its batch
(batch size x the stage's model FLOPs per sample); evaluation time per sample and checkpoint
time per parameter likewise. study/plan.py turns the lines into the study's cost.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass
from itertools import islice

import numpy as np
import torch

from hilomoe.config import StageName, TrainConfig
from hilomoe.data.dataset import open_dataset
from hilomoe.engine.local import base_model_config, build_model, parquet_sources, schema_for
from hilomoe.engine.loop import Engine
from hilomoe.model.flops import model_cost
from hilomoe.study.keys import config_key
from hilomoe.study.spec import StudySpec


@dataclass
class Measure:
    """One calibrated stage: seconds per training step of `batch` samples at `flops`."""

    point: str  # the calibrated configuration, in brief
    stage: str
    batch: int
    flops: float  # the stage's model FLOPs per sample
    step_s: float

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.step_s


@dataclass
class Calibration:
    """Measured rates, and the lines fitted through them."""

    train: list[Measure]
    eval: list[tuple[float, float]]  # (model FLOPs per sample, seconds per evaluated sample)
    save: list[tuple[float, float]]  # (parameters, seconds to checkpoint them)
    device: str
    threads: int
    seconds: float

    def step_s(self, stage: str, batch: int, flops: float) -> float:
        points = [(m.batch * m.flops, m.step_s) for m in self.train if m.stage == stage]
        if not points:  # a stage no calibrated point has: the nearest one's line
            points = [(m.batch * m.flops, m.step_s) for m in self.train]
        return _line(points)(batch * flops)

    def eval_s(self, flops: float) -> float:
        return _line(self.eval)(flops)

    def save_s(self, params: float) -> float:
        per = [s / max(p, 1.0) for p, s in self.save]
        return params * float(np.mean(per)) if per else 0.0

    def as_dict(self) -> dict:
        return {"device": self.device, "threads": self.threads, "seconds": self.seconds,
                "train": [{**asdict(m), "samples_per_s": m.samples_per_s} for m in self.train],
                "eval": [{"flops": f, "seconds_per_sample": s} for f, s in self.eval],
                "save": [{"params": p, "seconds": s} for p, s in self.save]}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls([Measure(m["point"], m["stage"], m["batch"], m["flops"], m["step_s"])
                    for m in d["train"]],
                   [(e["flops"], e["seconds_per_sample"]) for e in d["eval"]],
                   [(v["params"], v["seconds"]) for v in d["save"]],
                   d["device"], d["threads"], d["seconds"])


def _line(points: list[tuple[float, float]]):
    """y = a + b x through `points` by least squares, b >= 0 (more FLOPs never cost less);
    one distinct x: its mean."""
    xs, ys = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    if len(set(xs)) < 2:
        mean = float(ys.mean())
        return lambda x: mean
    b, a = np.polyfit(xs, ys, 1)
    if b < 0:
        mean = float(ys.mean())
        return lambda x: mean
    return lambda x: max(float(a + b * x), float(ys.min()) * 0.5)


def corners(spec: StudySpec, configs: list[TrainConfig]) -> list[TrainConfig]:
    """The cheapest and dearest of `configs` by FLOPs per sample, and the cheapest and dearest
    with experts: the points calibration trains."""
    schema = None
    cost = {}
    for cfg in configs:
        if schema is None:
            schema = schema_for(cfg)  # the space shares one dataset
        cost[config_key(cfg)] = model_cost(schema, cfg.model).flops
    out: dict[str, TrainConfig] = {}
    for group in (configs, [c for c in configs if c.model.moe.has_experts]):
        if group:
            for cfg in (min(group, key=lambda c: cost[config_key(c)]),
                        max(group, key=lambda c: cost[config_key(c)])):
                out.setdefault(config_key(cfg), cfg)
    return list(out.values())


def calibrate(points: list[TrainConfig], steps: int = 200, threads: int = 1,
              device: str = "cpu") -> Calibration:
    """Time `steps` training steps of every stage of each point (after a few warm-up steps),
    its evaluation and its checkpoint, in this process with `threads` torch threads."""
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    train, evals, saves, seen_bases = [], [], [], set()
    try:
        for cfg in points:
            ds = open_dataset(cfg.data.path)
            sources = parquet_sources(ds, cfg)
            torch.manual_seed(cfg.seed)
            model = build_model(cfg, ds.schema, device)
            engine = Engine(model, cfg.stages, device)
            name = _brief(cfg)
            for stage in engine.plan():
                flops = stage_flops(ds.schema, cfg, stage)
                engine.start_stage(stage)
                batch = cfg.stages.get(stage).batch_size
                if stage == StageName.BASE and config_key(_base(cfg)) in seen_bases:
                    engine.finish_stage()  # the same base model timed already
                    continue
                seen_bases.add(config_key(_base(cfg)))
                train.append(Measure(name, stage.value, batch, flops,
                                     _time_steps(engine, sources["train"], batch, steps)))
                evals.append((flops, _time_eval(engine, sources["valid"], steps)))
                engine.finish_stage()
            state = engine.state_dict()
            t = time.perf_counter()
            torch.save(state, io.BytesIO())
            saves.append((float(sum(p.numel() for p in model.parameters())),
                          time.perf_counter() - t))
    finally:
        torch.set_num_threads(before)
    return Calibration(train, evals, saves, str(device), threads, time.perf_counter() - t0)


def _time_steps(engine: Engine, source, batch: int, steps: int, warmup: int = 20,
                block: int = 20) -> float:
    """Seconds per training step (data loading included): the median over blocks of `block`
    steps, of `steps` after `warmup` (first steps allocate; a median shrugs off a stall)."""
    def batches():
        epoch = 0
        while True:  # a small split: go round again
            yield from source.epoch(epoch, batch)
            epoch += 1

    it = batches()
    for b in islice(it, warmup):
        engine.train_step(b)
    times = []
    for _ in range(max(1, steps // block)):
        t0 = time.perf_counter()
        for b in islice(it, block):
            engine.train_step(b)
        times.append((time.perf_counter() - t0) / block)
    return float(np.median(times))


def _time_eval(engine: Engine, source, steps: int) -> float:
    """Seconds per evaluated sample, over at most `steps` evaluation batches."""
    t0 = time.perf_counter()
    n = len(engine.predict(islice(source.epoch(0), max(1, steps // 10))).labels)
    return (time.perf_counter() - t0) / max(n, 1)


def _base(cfg: TrainConfig) -> TrainConfig:
    return cfg.model_copy(update={"model": base_model_config(cfg.model)})


def stage_flops(schema, cfg: TrainConfig, stage: StageName) -> float:
    """FLOPs per sample of the model a stage trains: the base model in stage 1."""
    model = base_model_config(cfg.model) if stage == StageName.BASE else cfg.model
    return model_cost(schema, model).flops


def _brief(cfg: TrainConfig) -> str:
    m = cfg.model
    shape = (f"{m.moe.variant.value} L={m.moe.levels} K={m.moe.experts} r={m.moe.rank}"
             if m.moe.has_experts else "dense")
    return f"{shape} mlp={list(m.backbone.mlp)}"
