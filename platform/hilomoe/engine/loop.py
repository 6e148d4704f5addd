"""The stage engine: step, epoch and stage API over a CTRModel. Pure PyTorch, no Ray.

    engine = Engine(model, config.stages)
    for stage in engine.plan():
        for record in engine.fit_stage(stage, train_source, valid_source):
            print(record)                      # one EpochRecord per epoch
    test = engine.evaluate(test_source.epoch(0))

A distributed driver (Ray Train) uses the same object: it passes `parallel` (DDP applied after
each stage freezes its parameters, gathered predictions for exact AUC), feeds each worker's
shard, and checkpoints `state_dict()` after each epoch.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from hilomoe.config import StageName, StagesConfig
from hilomoe.data.batches import Batch
from hilomoe.engine.history import EarlyStopping, EpochRecord, stage_results
from hilomoe.engine.losses import objective
from hilomoe.engine.metrics import Predictions, RoutingStats
from hilomoe.engine.optimizers import make_optimizer, make_table_optimizer
from hilomoe.engine.parallel import Parallel
from hilomoe.engine.stages import StageSetup, prepare_stage, stage_plan
from hilomoe.errors import HilomoeError
from hilomoe.model.ctr import CTRModel


class BatchSource(Protocol):
    """Anything that yields an epoch of batches (in memory, Parquet, a Ray Data shard). An
    evaluation source of a sharded model may also yield None: this rank has no rows left but
    another still has (see parallel.lockstep); the model then joins its lookups with none."""

    def epoch(self, epoch: int, batch_size: int | None = None) -> Iterable[Batch]: ...


class Engine:
    """Trains one CTRModel through the stages of `stages`; holds optimizer and stopping state."""

    def __init__(self, model: CTRModel, stages: StagesConfig, device: str | torch.device = "cpu",
                 parallel: Parallel | None = None, autocast: torch.dtype | None = None,
                 keep_stage_models: bool = False):
        """`parallel` wraps the model for training after each stage sets what trains (DDP,
        compile) and combines this process's predictions with other ranks' before metrics are
        computed (engine/parallel.py; default: this process alone); `autocast` is a
        lower-precision dtype (bf16) for forward passes; `keep_stage_models` keeps each
        finished stage's best weights in `stage_models` (and in the state dict), for
        checkpoints that outlive the stage."""
        self.model = model.to(device)
        self.stages = stages
        self.device = torch.device(device)
        self.parallel = parallel or Parallel(device=self.device)
        self.autocast = autocast
        self.module: nn.Module = self.model
        self.setup: StageSetup | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.table_optimizer: torch.optim.Optimizer | None = None  # torch backend's sparse one
        self.stopper: EarlyStopping | None = None
        self.best_state: dict | None = None
        self.completed: list[StageName] = []
        self.next_epoch = 0  # of the current stage: where a resumed engine continues
        self.history: list[EpochRecord] = []
        self.keep_stage_models = keep_stage_models
        self.stage_models: dict[str, dict] = {}

    # -- stages ------------------------------------------------------------------------------

    def plan(self) -> list[StageName]:
        return stage_plan(self.stages, self.model.has_experts)

    def start_stage(self, name: StageName) -> None:
        cfg = self.stages.get(name)
        base_pretrained = StageName.BASE in self.completed
        self.setup = prepare_stage(self.model, name, cfg, base_pretrained)
        self.table_optimizer = make_table_optimizer(self.model.embedding, self.setup.tables)
        self.module = self.parallel.wrap(self.model)
        self.optimizer = make_optimizer(self.setup.param_groups, cfg)
        self.stopper = EarlyStopping(cfg.patience, cfg.min_delta)
        self.best_state = None
        self.next_epoch = 0

    def in_progress(self, name: StageName) -> bool:
        """True when `name` was started (e.g. restored from a checkpoint) and is not finished."""
        return self.setup is not None and self.setup.name == name and name not in self.completed

    def _changing_state(self) -> dict:
        """A copy of the state entries the current stage trains: a frozen part (the tables in
        stage 2, at real vocabularies most of the model) cannot differ from where the stage
        began, so it is neither copied nor checkpointed again."""
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        state = self.model.state_dict()
        return {k: v.clone() for k, v in state.items() if k not in frozen and not (
            k.startswith("embedding.tables.") and not self.model.embedding.trainable)}

    def end_epoch(self, valid_auc: float, epoch: int) -> bool:
        """Early-stopping bookkeeping; keeps a copy of the best weights. True if improved."""
        improved = self.stopper.update(valid_auc, epoch)
        if improved:
            self.best_state = self._changing_state()
        return improved

    def finish_stage(self) -> None:
        """Restore the stage's best weights: the next stage starts from them. With
        `keep_stage_models`, the first stage keeps its whole state and each later one what it
        changed (`stage_weights` layers them back into whole states)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state, strict=False)  # the trained entries
        if self.keep_stage_models:
            self.stage_models[self.setup.name.value] = (
                self._changing_state() if self.stage_models
                else copy.deepcopy(self.model.state_dict()))
        self.completed.append(self.setup.name)

    def adopt_stage(self, name: StageName, weights: dict, history: list[EpochRecord]) -> None:
        """Take a stage that ran elsewhere (the study's stage-1 cache) as if this engine had run
        it: its best weights and its epoch records. The model must be where that stage started
        (seeded, fresh). Only stage 1 is adopted, and its weights are the base parameters:
        exactly the model's state without the experts and routers (which stage 1 does not
        train, and which keep their seeded start), nothing more and nothing less."""
        if self.completed or self.setup is not None:
            raise RuntimeError(f"adopt_stage({name.value}) needs a fresh engine")
        if name != StageName.BASE:
            raise ValueError(f"adopt_stage takes stage {StageName.BASE.value}, not {name.value}")
        state = set(self.model.state_dict())
        base = state - self.model.expert_state_names()
        missing, unexpected = sorted(base - set(weights)), sorted(set(weights) - base)
        if missing or unexpected:
            raise HilomoeError(
                f"stage {name.value} weights do not match this model's base parameters "
                f"(missing {_few(missing)}; unexpected {_few(unexpected)})")
        # not strict only because the experts are absent, by design (checked above)
        self.model.load_state_dict(weights, strict=False)
        self.history.extend(history)
        if self.keep_stage_models:
            self.stage_models[name.value] = copy.deepcopy(self.model.state_dict())
        self.completed.append(name)

    # -- steps and epochs --------------------------------------------------------------------

    def _precision(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def train_step(self, batch: Batch) -> dict[str, float]:
        batch = batch.to(self.device)
        self.module.train()
        with self._precision():
            logit, routings = self.module(batch.cat, batch.num)
        aux = self.setup.config.aux
        keys = [layer.keys() for layer in self.model.moe_layers()] if routings and aux.diversity else []
        loss, parts = objective(logit, batch.label, routings, keys, aux)
        optimizers = [o for o in (self.optimizer, self.table_optimizer) if o is not None]
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()  # fused tables update here, inside the backward pass
        if self.setup.config.grad_clip:  # the dense parameters' norm: fused rows are done
            nn.utils.clip_grad_norm_(
                [p for g in self.setup.param_groups for p in g["params"]],
                self.setup.config.grad_clip,
            )
        for o in optimizers:
            o.step()
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
        """This process's predictions. Runs the bare model, not the DDP wrapper: workers may
        hold different numbers of evaluation batches, and DDP's forward would wait on the
        others."""
        self.model.eval()
        labels, probs, routing = [], [], RoutingStats()
        for batch in batches:
            if batch is None:  # other ranks still evaluate: join their sharded lookups
                self.model.embedding.join()
                continue
            batch = batch.to(self.device)
            with self._precision():
                logit, routings = self.model(batch.cat, batch.num)
            labels.append(batch.label.cpu().numpy())
            probs.append(torch.sigmoid(logit.float()).cpu().numpy())
            routing.add(routings)
        if not labels:  # a worker whose shard of the split is empty
            return Predictions(np.zeros(0, np.float32), np.zeros(0, np.float32), routing)
        return Predictions(np.concatenate(labels), np.concatenate(probs), routing)

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Metrics over every worker's predictions (exact AUC, not a mean of per-worker AUCs)."""
        if self.parallel.world > 1 and self.model.embedding.fused:
            batches = self.parallel.lockstep(batches)
        return self.parallel.gather(self.predict(batches)).metrics()

    def fit_stage(self, name: StageName, train: BatchSource,
                  valid: BatchSource) -> Iterator[EpochRecord]:
        """Run one stage to its epoch budget or early stop, yielding each epoch's record.

        A stage restored mid-way from a checkpoint continues at its next epoch. Each record is
        yielded after the engine's state includes that epoch, so the consumer can checkpoint it.
        """
        if not self.in_progress(name):
            self.start_stage(name)
        for epoch in range(self.next_epoch, self.setup.config.epochs):
            if self.stopper.should_stop:
                break
            t0 = time.perf_counter()
            losses, n = self.train_epoch(train.epoch(epoch, self.setup.config.batch_size))
            seconds = time.perf_counter() - t0
            metrics = self.evaluate(valid.epoch(0))
            improved = self.end_epoch(metrics["auc"], epoch)
            record = EpochRecord(name.value, epoch, losses, metrics, n, seconds, improved)
            self.history.append(record)
            self.next_epoch = epoch + 1
            yield record
        self.finish_stage()

    # -- checkpoints -------------------------------------------------------------------------

    def _table_optimizer_state(self) -> dict | None:
        if self.table_optimizer is not None:
            return self.table_optimizer.state_dict()
        if self.model.embedding.fused and self.model.embedding.trainable:
            return self.model.embedding.optimizer_state()
        return None

    def state_dict(self) -> dict:
        """Plain tensors, numbers and strings only (loads with `weights_only=True`). With
        sharded tables it holds this rank's tables and their optimiser state. What resume
        needs, and nothing twice: an entry of the best weights or of a finished stage's
        weights that equals the model's current one (the best epoch was the last; the tables
        stage 2 keeps frozen) is stored as a reference to it."""
        model = self.model.state_dict()
        return {
            "model": model,
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "table_optimizer": self._table_optimizer_state(),
            "stage": self.setup.name.value if self.setup else None,
            "stopper": asdict(self.stopper) if self.stopper else None,
            "best_state": _refer(self.best_state, model),
            "completed": [s.value for s in self.completed],
            "next_epoch": self.next_epoch,
            "history": [asdict(r) for r in self.history],
            "stage_models": {k: _refer(v, model) for k, v in self.stage_models.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        model = state["model"]
        self.model.load_state_dict(model)
        self.completed = [StageName(s) for s in state["completed"]]
        self.history = [EpochRecord(**r) for r in state.get("history", [])]
        self.stage_models = {k: _resolve(v, model)
                             for k, v in state.get("stage_models", {}).items()}
        if state["stage"] is not None:
            self.start_stage(StageName(state["stage"]))
            if state["optimizer"] is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            tables = state.get("table_optimizer")
            if tables is not None and self.table_optimizer is not None:
                self.table_optimizer.load_state_dict(tables)
            elif tables is not None and self.model.embedding.fused:
                self.model.embedding.load_optimizer_state(tables)
            self.stopper = EarlyStopping(**state["stopper"])
            self.best_state = _resolve(state["best_state"], model)
            self.next_epoch = state.get("next_epoch", 0)


SAME_AS_MODEL = "same-as-model"  # a checkpoint entry equal to the model's entry of that name


def _refer(part: dict | None, model: dict) -> dict | None:
    """`part` (weights by name) with each tensor equal to `model`'s of that name replaced by
    SAME_AS_MODEL. Only plain tensors are compared: a sharded table is left as it is."""
    if part is None:
        return None

    def same(k: str, v) -> bool:
        m = model.get(k)
        return (type(v) is torch.Tensor and type(m) is torch.Tensor and v.dtype == m.dtype
                and v.shape == m.shape and torch.equal(v, m))

    return {k: SAME_AS_MODEL if same(k, v) else v for k, v in part.items()}


def _resolve(part: dict | None, model: dict) -> dict | None:
    """`_refer` undone: copies, since the model trains on in place."""
    if part is None:
        return None
    return {k: model[k].clone() if isinstance(v, str) and v == SAME_AS_MODEL else v
            for k, v in part.items()}


def stage_weights(stage_models: dict[str, dict]) -> dict[str, dict]:
    """Each finished stage's whole best weights, from `Engine.stage_models` (the first stage's
    whole state, then what each later stage changed), in stage order."""
    out, whole = {}, {}
    for name, changed in stage_models.items():
        whole = {**whole, **changed}
        out[name] = whole
    return out


def run_stages(engine: Engine, train: BatchSource, valid: BatchSource, test: BatchSource,
               on_epoch: Callable[[EpochRecord], None] | None = None) -> dict:
    """Every planned stage not yet completed, in order, then test metrics of the final model.

    A restored engine skips its finished stages and continues its current one, so the same call
    serves a fresh run and a resumed one; the stage results cover every epoch exactly once.
    """
    for name in engine.plan():
        if name in engine.completed:
            continue
        for record in engine.fit_stage(name, train, valid):
            if on_epoch:
                on_epoch(record)
    test_metrics = engine.evaluate(test.epoch(0))
    return {"stages": stage_results(engine.history), "test": test_metrics}


def _few(names: list[str], shown: int = 3) -> str:
    """A few names of a long list, for a one-sentence error."""
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
