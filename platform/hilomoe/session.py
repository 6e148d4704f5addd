"""One training session: the stages of a configuration on a dataset, reported through a Reporter.

    session = Session(cfg, load_data(cfg), reporter)      # the seeded model and its engine
    summary = session.run()                                # resumes from reporter.restore()

Every way of training goes through here: `hilomoe train --local` (`train_local`: a reporter
that prints), each Ray Train worker (distributed/worker.py: `ray.train.report`, the rank's process
group) and each Ray Tune trial (study/trial.py: `tune.report`, plus the study's caches). The
session owns what they share: the model and engine of this rank, resuming from the last
checkpoint, the metrics and checkpoint files of every epoch, and the summary at the end. It
imports no Ray: a reporter is the only way out.

Checkpoint files: rank 0 writes `state.pt` (the engine state) and, at the end, `summary.json`.
With TorchRec tables sharded across ranks, rank r > 0 also writes `state.rank{r}.pt` holding
its tables and their optimiser state; a reader merges them (`read_state`), so each rank takes
the tables it holds now, whatever the number of ranks that wrote them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from hilomoe import jsonio
from hilomoe.config import StageName, TrainConfig
from hilomoe.engine.local import Data, build_model, load_data
from hilomoe.engine.history import EpochRecord
from hilomoe.engine.loop import Engine, run_stages
from hilomoe.engine.parallel import Parallel
from hilomoe.errors import HilomoeError
from hilomoe.memory import peak_rss_mb
from hilomoe.model.flops import model_cost

STATE_FILE = "state.pt"
SUMMARY_FILE = "summary.json"
FINAL_SCORE = 1e9  # the final checkpoint outranks every epoch checkpoint


class Reporter(Protocol):
    """Where a session's results go (Ray Train, Ray Tune, the console)."""

    def restore(self) -> dict | None:
        """The engine state of the last checkpoint (`read_state`), or None to start afresh."""

    def report(self, metrics: dict, files: dict[str, Any], record: EpochRecord | None) -> None:
        """Flat metrics after an epoch (`record`) or at the end (`record` None), with this
        rank's checkpoint `files` (name -> object; empty: no checkpoint with this report)."""


# ----------------------------------------------------------------------------------------------
# metrics


def checkpoint_score(stage_index: int, valid_auc: float) -> float:
    """Checkpoints rank by validation AUC within a stage and later stages above earlier ones, so
    Ray keeps the current stage's best `keep_checkpoints`; each finished stage's best weights
    travel inside every later checkpoint (`Engine.stage_models`)."""
    return stage_index + (valid_auc if valid_auc == valid_auc else 0.0)


def epoch_metrics(record: EpochRecord, world: int, stage_index: int, elapsed: float,
                  global_epoch: int = 0) -> dict:
    """The flat metrics every rank reports after an epoch; `epoch` counts within the stage,
    `global_epoch` across the run's stages (the x axis of a whole run's curves)."""
    samples = record.samples * world  # every rank trains an equal share
    return {
        "stage": record.stage, "stage_index": stage_index, "epoch": record.epoch,
        "global_epoch": global_epoch,
        **{f"train_{k}": v for k, v in record.train.items()},
        **{f"valid_{k}": v for k, v in record.valid.items()},
        "samples": samples, "epoch_seconds": record.seconds,
        # 1, 2, ... through the joint stage, 0 before it: early-stopping schedulers compare
        # trials on their joint-stage epochs (a restored Tune trial restarts its iterations)
        "joint_epoch": record.epoch + 1 if record.stage == "joint" else 0,
        "samples_per_s": samples / record.seconds if record.seconds > 0 else 0.0,
        "elapsed_s": elapsed, "improved": record.improved,
        "score": checkpoint_score(stage_index, record.valid["auc"]),
    }


def final_metrics(summary: dict) -> dict:
    """The flat metrics of a finished run: the final model's validation metrics (its last
    stage's best epoch), test metrics and cost; a study's objectives read them."""
    last = list(summary["stages"].values())[-1]
    cost = summary["cost"]
    return {"final": True, "valid_auc": last["auc"], "valid_logloss": last["logloss"],
            "test_auc": summary["test"]["auc"], "test_logloss": summary["test"]["logloss"],
            "flops": cost["flops_analytic"], "params_total": cost["params_total"],
            "params_active": cost["params_active"], "params_embedding": cost["params_embedding"],
            "train_seconds": summary["seconds"], "score": FINAL_SCORE}


def summarize(result: dict, cfg: TrainConfig, data: Data, seconds: float, world: int = 1) -> dict:
    """The JSON-ready summary of `run_stages`' result: per-stage bests, test, cost, history
    (samples counted over every rank)."""
    cost = model_cost(data.schema, cfg.model, batch=cfg.eval_batch_size)
    test = result["test"]
    history = [r.as_dict() for s in result["stages"].values() for r in s.history]
    return {
        "stages": {k: v.summary() for k, v in result["stages"].items()},
        "test": {"auc": test["auc"], "logloss": test["logloss"],
                 "routing": {k: v for k, v in test.items() if k not in ("auc", "logloss")}},
        "bayes": data.bayes,
        "cost": cost.as_dict(),
        "history": [{**h, "samples": h["samples"] * world,
                     "samples_per_s": h["samples_per_s"] * world} for h in history],
        "seconds": seconds,
    }


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where asked, or by default on GPUs that support it; None: fp32."""
    if cfg.runtime.precision == "bf16":
        return torch.bfloat16
    if cfg.runtime.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


# ----------------------------------------------------------------------------------------------
# checkpoint files


def write_files(files: dict[str, Any], directory: Path) -> None:
    """`files` into `directory`: `.json` names as JSON, the others with torch.save."""
    for name, obj in files.items():
        if name.endswith(".json"):
            (directory / name).write_text(jsonio.dumps(obj))
        else:
            torch.save(obj, directory / name)


def _union(into: dict, other: dict) -> None:
    """Add `other`'s keys missing from `into`, recursively (rank 0's values win)."""
    for key, value in other.items():
        if key not in into:
            into[key] = value
        elif isinstance(into[key], dict) and isinstance(value, dict):
            _union(into[key], value)


def load_tensors(path: str | Path, mmap: bool = False) -> Any:
    """A saved state of tensors and plain data (dicts, lists, numbers, strings). Checkpoints
    and cache entries live on shared volumes that other users can write, so nothing else is
    unpickled: a file holding any other object is refused before it can run code."""
    import pickle

    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise HilomoeError(f"{path}: refused to load: it holds objects other than tensors and "
                           f"plain data, so it was not written by hilomoe (remove it; "
                           f"checkpoints and caches are only as trusted as who can write "
                           f"them).") from None


def read_state(directory: str | Path) -> tuple[dict | None, dict | None]:
    """The engine state in a checkpoint directory (every rank's shard files merged; tensors
    memory-mapped, so a rank only reads the tables it takes) and the summary of a final one."""
    d = Path(directory)
    files = sorted(d.glob("state.rank*.pt"))
    if not (d / STATE_FILE).is_file():
        return None, None
    state = load_tensors(d / STATE_FILE, mmap=True)
    for f in files:
        _union(state, load_tensors(f, mmap=True))
    summary = d / SUMMARY_FILE
    return state, json.loads(summary.read_text()) if summary.is_file() else None


# ----------------------------------------------------------------------------------------------
# the session


class Session:
    """The stages of `cfg` on `data` for this rank of `parallel`, through `reporter`.

    `facts` are reported with every metric set and saved in every checkpoint (a trial's cost
    and cache facts); a restored session gets them back.
    """

    def __init__(self, cfg: TrainConfig, data: Data, reporter: Reporter,
                 device: str | torch.device = "cpu", parallel: Parallel | None = None,
                 facts: dict | None = None):
        self.cfg, self.data, self.reporter = cfg, data, reporter
        device = torch.device(device)
        self.parallel = parallel or Parallel.current(device, cfg.runtime.compile)
        model = build_model(cfg, data.schema, device, sharded=self.parallel.world > 1)
        self.engine = Engine(model, cfg.stages, device, parallel=self.parallel,
                             autocast=autocast_dtype(cfg, device), keep_stage_models=True)
        self.plan = [s.value for s in self.engine.plan()]
        self.facts = dict(facts or {})
        state = reporter.restore()
        self.restored = state is not None
        if state is not None:  # the engine skips what it finished
            self.engine.load_state_dict(state)
            self.facts.update(state.get("facts", {}))
        # training seconds before a restart (from the restored history), plus this process's
        self._start, self._before = time.perf_counter(), sum(r.seconds for r in self.engine.history)

    @property
    def sharded(self) -> bool:
        return self.parallel.world > 1 and self.engine.model.embedding.fused

    def elapsed(self) -> float:
        return self._before + time.perf_counter() - self._start

    def files(self, summary: dict | None = None) -> dict[str, Any]:
        """This rank's checkpoint files: rank 0's state (and summary), or a shard of tables."""
        rank = self.parallel.rank
        if rank > 0 and not self.sharded:
            return {}  # replicated: rank 0's state holds everything
        files: dict[str, Any] = {
            STATE_FILE if rank == 0 else f"state.rank{rank}.pt":
                {**self.engine.state_dict(), "facts": self.facts}}
        if summary is not None and rank == 0:
            files[SUMMARY_FILE] = summary
        return files

    def on_epoch(self, record: EpochRecord, reused: bool = False) -> None:
        """Report an epoch; a reused one (trained by another session) carries no checkpoint:
        the next trained epoch's holds it."""
        history = self.engine.history  # the record is its latest entry, or (replayed) one of them
        index = next((i for i in range(len(history) - 1, -1, -1) if history[i] is record),
                     len(history))
        metrics = epoch_metrics(record, self.parallel.world, self.plan.index(record.stage),
                                self.elapsed(), global_epoch=index)
        self.reporter.report({**metrics, **self.facts, "reused": reused},
                             {} if reused else self.files(), record)

    # -- pieces a study composes -------------------------------------------------------------

    def fit_stage(self, name: StageName) -> None:
        src = self.data.sources
        for record in self.engine.fit_stage(name, src["train"], src["valid"]):
            self.on_epoch(record)

    def adopt_stage(self, name: StageName, weights: dict, history: list[EpochRecord]) -> None:
        """A stage another session trained (the stage-1 cache), reported as reused."""
        self.engine.adopt_stage(name, weights, history)
        for record in history:
            self.on_epoch(record, reused=True)

    def replay(self, state: dict, summary: dict) -> dict:
        """A whole session trained before (the trial cache): its epochs and final result."""
        self.engine.load_state_dict(state)
        for record in self.engine.history:
            self.on_epoch(record, reused=True)
        self._final({**final_metrics(summary), "train_seconds": 0.0,
                     "trial_saved_s": summary["seconds"]}, summary)
        return summary

    # -- the whole run -----------------------------------------------------------------------

    def run(self) -> dict:
        """Every stage not finished yet, the test metrics, and the final report."""
        src = self.data.sources
        result = run_stages(self.engine, src["train"], src["valid"], src["test"], self.on_epoch)
        summary = summarize(result, self.cfg, self.data, self.elapsed(), self.parallel.world)
        summary["footprint"] = self.parallel.all_gather(self.footprint())
        self._final(final_metrics(summary), summary)
        return summary

    def footprint(self) -> dict:
        """This process's peak resident memory and the bytes its embedding tables and their
        optimiser state hold (a sharded rank: its share)."""
        tensors = list(self.engine.model.embedding.tables().values())
        state = self.engine.state_dict()["table_optimizer"] or {}
        tensors += _tensors(state)
        return {"rank": self.parallel.rank,
                "peak_rss_mb": peak_rss_mb(),
                "embedding_bytes": sum(t.numel() * t.element_size() for t in tensors)}

    def _final(self, metrics: dict, summary: dict) -> None:
        self.reporter.report({**metrics, **self.facts}, self.files(summary), None)


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside nested dicts and lists (an optimiser's state)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


class _Console:
    """The reporter of an in-process run: epoch records to a callback, no checkpoints."""

    def __init__(self, on_epoch: Callable[[EpochRecord], None] | None):
        self.on_epoch = on_epoch

    def restore(self) -> None:
        return None

    def report(self, metrics: dict, files: dict, record: EpochRecord | None) -> None:
        if record is not None and self.on_epoch and not metrics.get("reused"):
            self.on_epoch(record)


def train_local(cfg: TrainConfig, on_epoch: Callable[[EpochRecord], None] | None = None,
                data: Data | None = None, device: str = "cpu") -> dict:
    """Train through every enabled stage in this process; return a JSON-ready summary."""
    t0 = time.perf_counter()
    data = data or load_data(cfg)
    summary = Session(cfg, data, _Console(on_epoch), device, Parallel.single(cfg, device)).run()
    summary["seconds"] = time.perf_counter() - t0
    return summary
