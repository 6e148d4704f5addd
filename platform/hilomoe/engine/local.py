"""In-process training (no Ray): configuration -> data -> model -> the three stages -> test."""

from __future__ import annotations

import time
from typing import Callable

import torch

from hilomoe.config import TrainConfig
from hilomoe.data.batches import TensorBatches
from hilomoe.data.planted import PlantedProblem, generate_planted
from hilomoe.engine.loop import Engine, EpochRecord, run_stages
from hilomoe.model.ctr import CTRModel
from hilomoe.model.flops import model_cost


def sources(problem: PlantedProblem, cfg: TrainConfig) -> dict[str, TensorBatches]:
    """Batch sources per split: train shuffled per epoch, valid and test in order."""
    out = {}
    for name, split in problem.splits.items():
        train = name == "train"
        out[name] = TensorBatches(
            split.cat, split.num, split.label,
            batch_size=cfg.stages.base.batch_size if train else cfg.eval_batch_size,
            shuffle=train, seed=cfg.seed,
        )
    return out


def build_model(cfg: TrainConfig, problem: PlantedProblem) -> CTRModel:
    torch.manual_seed(cfg.seed)
    return CTRModel(problem.schema, cfg.model)


def train_local(cfg: TrainConfig, on_epoch: Callable[[EpochRecord], None] | None = None,
                problem: PlantedProblem | None = None) -> dict:
    """Train through every enabled stage in this process; return a JSON-ready summary."""
    t0 = time.perf_counter()
    problem = problem or generate_planted(cfg.data.synth)
    model = build_model(cfg, problem)
    engine = Engine(model, cfg.stages)
    src = sources(problem, cfg)
    result = run_stages(engine, src["train"], src["valid"], src["test"], on_epoch)
    cost = model_cost(problem.schema, cfg.model, batch=cfg.eval_batch_size)
    return {
        "stages": {k: v.summary() for k, v in result["stages"].items()},
        "test": {"auc": result["test"]["auc"], "logloss": result["test"]["logloss"],
                 "routing": {k: v for k, v in result["test"].items()
                             if k not in ("auc", "logloss")}},
        "bayes": {"valid": problem.bayes("valid"), "test": problem.bayes("test")},
        "cost": cost.as_dict(),
        "history": [r.as_dict() for s in result["stages"].values() for r in s.history],
        "seconds": time.perf_counter() - t0,
    }

