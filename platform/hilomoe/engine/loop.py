"""The stage engine: step, epoch and stage API over a CTRModel. Pure PyTorch, no Ray.

    engine = Engine(model, config.stages)
    for stage in engine.plan():
        for record in engine.fit_stage(stage, train_source, valid_source):
            print(record)                      # one EpochRecord per epoch
    test = engine.evaluate(test_source.epoch(0))

A distributed driver (Ray Train) uses the same object: it passes `wrap` (e.g. Ray's
`prepare_model`, applied after each stage freezes its parameters), feeds each worker's shard,
gathers `predict` outputs for exact AUC, and checkpoints `state_dict()` after each epoch.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from hilomoe.config import StageName, StagesConfig
from hilomoe.data.batches import Batch
from hilomoe.engine.losses import objective
from hilomoe.engine.metrics import RoutingStats, auc, logloss
from hilomoe.engine.stages import StageSetup, make_optimizer, prepare_stage, stage_plan
from hilomoe.model.ctr import CTRModel


class BatchSource(Protocol):
    """Anything that yields an epoch of batches (in memory, Parquet, a Ray Data shard)."""

    def epoch(self, epoch: int, batch_size: int | None = None) -> Iterable[Batch]: ...


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs without the validation AUC improving by more than min_delta."""

    patience: int
    min_delta: float = 0.0
    best: float = float("-inf")
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Record an epoch's score; True when it is the best so far."""
        if score > self.best + self.min_delta or self.best_epoch < 0:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


@dataclass
class EpochRecord:
    stage: str
    epoch: int
    train: dict[str, float]  # mean loss and its parts
    valid: dict[str, float]  # auc, logloss and routing statistics
    samples: int
    seconds: float
    improved: bool

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "samples_per_s": self.samples_per_s}


@dataclass
class StageResult:
    stage: str
    epochs: int = 0
    auc: float = float("nan")
    logloss: float = float("nan")
    best_epoch: int = -1
    history: list[EpochRecord] = field(default_factory=list)

    def summary(self) -> dict:
        return {"epochs": self.epochs, "auc": self.auc, "logloss": self.logloss,
                "best_epoch": self.best_epoch}


@dataclass
class Predictions:
    labels: np.ndarray  # (N,)
    probs: np.ndarray  # (N,)
    routing: RoutingStats

    def metrics(self) -> dict[str, float]:
        return {"auc": auc(self.labels, self.probs), "logloss": logloss(self.labels, self.probs),
                **self.routing.summary()}


class Engine:
    """Trains one CTRModel through the stages of `stages`; holds optimizer and stopping state."""

    def __init__(self, model: CTRModel, stages: StagesConfig, device: str | torch.device = "cpu",
                 wrap: Callable[[nn.Module], nn.Module] | None = None):
        self.model = model.to(device)
        self.stages = stages
        self.device = torch.device(device)
        self.wrap = wrap or (lambda m: m)
        self.module: nn.Module = self.model
        self.setup: StageSetup | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.stopper: EarlyStopping | None = None
        self.best_state: dict | None = None
        self.completed: list[StageName] = []

    # -- stages ------------------------------------------------------------------------------

    def plan(self) -> list[StageName]:
        return stage_plan(self.stages, self.model.has_experts)

    def start_stage(self, name: StageName) -> None:
        cfg = self.stages.get(name)
        base_pretrained = StageName.BASE in self.completed
        self.setup = prepare_stage(self.model, name, cfg, base_pretrained)
        self.module = self.wrap(self.model)
        self.optimizer = make_optimizer(self.setup)
        self.stopper = EarlyStopping(cfg.patience, cfg.min_delta)
        self.best_state = None

    def end_epoch(self, valid_auc: float, epoch: int) -> bool:
        """Early-stopping bookkeeping; keeps a copy of the best weights. True if improved."""
        improved = self.stopper.update(valid_auc, epoch)
        if improved:
            self.best_state = copy.deepcopy(self.model.state_dict())
        return improved

    def finish_stage(self) -> None:
        """Restore the stage's best weights: the next stage starts from them."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.completed.append(self.setup.name)

    # -- steps and epochs --------------------------------------------------------------------

    def train_step(self, batch: Batch) -> dict[str, float]:
        batch = batch.to(self.device)
        self.module.train()
        logit, routings = self.module(batch.cat, batch.num)
        aux = self.setup.config.aux
        keys = [layer.keys() for layer in self.model.moe_layers()] if routings and aux.diversity else []
        loss, parts = objective(logit, batch.label, routings, keys, aux)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.setup.config.grad_clip:
            nn.utils.clip_grad_norm_(
                [p for g in self.setup.param_groups for p in g["params"]],
                self.setup.config.grad_clip,
            )
        self.optimizer.step()
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}

    def train_epoch(self, batches: Iterable[Batch]) -> tuple[dict[str, float], int]:
        """One pass; returns the sample-weighted mean of each loss part and the sample count."""
        sums: dict[str, float] = {}
        n = 0
        for batch in batches:
            b = len(batch)
            for k, v in self.train_step(batch).items():
                sums[k] = sums.get(k, 0.0) + v * b
            n += b
        return {k: v / max(n, 1) for k, v in sums.items()}, n

    @torch.no_grad()
    def predict(self, batches: Iterable[Batch]) -> Predictions:
        self.module.eval()
        labels, probs, routing = [], [], RoutingStats()
        for batch in batches:
            batch = batch.to(self.device)
            logit, routings = self.module(batch.cat, batch.num)
            labels.append(batch.label.cpu().numpy())
            probs.append(torch.sigmoid(logit.float()).cpu().numpy())
            routing.add(routings)
        return Predictions(np.concatenate(labels), np.concatenate(probs), routing)

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        return self.predict(batches).metrics()

    def fit_stage(self, name: StageName, train: BatchSource,
                  valid: BatchSource) -> Iterator[EpochRecord]:
        """Run one stage to its epoch budget or early stop, yielding each epoch's record."""
        self.start_stage(name)
        for epoch in range(self.setup.config.epochs):
            t0 = time.perf_counter()
            losses, n = self.train_epoch(train.epoch(epoch, self.setup.config.batch_size))
            seconds = time.perf_counter() - t0
            metrics = self.evaluate(valid.epoch(0))
            improved = self.end_epoch(metrics["auc"], epoch)
            yield EpochRecord(name.value, epoch, losses, metrics, n, seconds, improved)
            if self.stopper.should_stop:
                break
        self.finish_stage()

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "stage": self.setup.name.value if self.setup else None,
            "stopper": asdict(self.stopper) if self.stopper else None,
            "best_state": self.best_state,
            "completed": [s.value for s in self.completed],
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.completed = [StageName(s) for s in state["completed"]]
        if state["stage"] is not None:
            self.start_stage(StageName(state["stage"]))
            if state["optimizer"] is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            self.stopper = EarlyStopping(**state["stopper"])
            self.best_state = state["best_state"]


def run_stages(engine: Engine, train: BatchSource, valid: BatchSource, test: BatchSource,
               on_epoch: Callable[[EpochRecord], None] | None = None) -> dict:
    """Every planned stage in order, then test metrics of the final model."""
    results: dict[str, StageResult] = {}
    for name in engine.plan():
        result = results[name.value] = StageResult(name.value)
        for record in engine.fit_stage(name, train, valid):
            result.history.append(record)
            if on_epoch:
                on_epoch(record)
        result.epochs = len(result.history)
        best = engine.stopper
        result.best_epoch = best.best_epoch
        best_record = result.history[best.best_epoch]
        result.auc, result.logloss = best_record.valid["auc"], best_record.valid["logloss"]
    test_metrics = engine.evaluate(test.epoch(0))
    return {"stages": results, "test": test_metrics}
