"""The driver of `hilomoe train`: the run directory, the worker plan, the trainer, the results.

    run = TrainRun.create(cfg, out_dir="runs/example")          # or TrainRun.load(dir) to resume
    summary = train_ray(run, on_event=print)

One Ray Train run holds all three stages (stage boundaries inside the worker loop): the worker
group starts once, and stage N+1 starts from stage N's best weights inside the same engine. The
run directory holds `run.json` (config, Ray run name, storage), Ray's checkpoints, and at the end
`result.json`, `model.pt` (final weights) and `models/<stage>.pt` (each stage's best weights).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from hilomoe import jsonio
from hilomoe.config import TrainConfig, TypedView
from hilomoe.data.dataset import check_unchanged, open_dataset
from hilomoe.distributed.reporter import read_checkpoint
from hilomoe.distributed.resources import WorkerPlan, plan_workers
from hilomoe.distributed.runtime import connect_ray, dataset_path
from hilomoe.distributed.trainer import make_trainer
from hilomoe.engine.loop import stage_weights
from hilomoe.errors import HilomoeError, hilomoe_cause, out_of_memory

RUN_FILE = "run.json"


@dataclass
class TrainRun:
    """A run directory: what to train, and where Ray keeps its checkpoints."""

    out_dir: str
    config: dict  # TrainConfig, JSON form (the resolved configuration)
    dataset: str
    name: str  # the Ray Train run name under `storage`
    storage: str  # directory or URI
    dataset_hash: str = ""  # Dataset.fingerprint() when the run started: resume pins it

    cfg = TypedView("config", lambda run: str(Path(run.out_dir) / RUN_FILE))

    @classmethod
    def create(cls, cfg: TrainConfig, out_dir: str | Path) -> TrainRun:
        out = Path(out_dir).resolve()
        if (out / RUN_FILE).exists():
            raise HilomoeError(f"{out}: already holds a run; continue it with --resume {out_dir} "
                               f"or choose another --out.")
        dataset = dataset_path(cfg)
        out.mkdir(parents=True, exist_ok=True)
        storage = cfg.ray.storage or str(out / "checkpoints")
        run = cls(str(out), cfg.model_dump(mode="json"), str(dataset),
                  f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage,
                  open_dataset(dataset, check_shards=False).fingerprint())
        (out / RUN_FILE).write_text(jsonio.dumps(asdict(run), indent=2))
        return run

    @classmethod
    def load(cls, out_dir: str | Path) -> TrainRun:
        run = cls(**jsonio.read_dict(
            Path(out_dir) / RUN_FILE, f"{out_dir}: not a run directory (no {RUN_FILE}); --resume "
            f"takes the --out directory of an earlier `hilomoe train`."))
        open_dataset(run.dataset)
        check_unchanged(run.dataset, run.dataset_hash, f"the run in {out_dir}")
        return run


class _Progress:
    """Drains the workers' progress queue into `on_event` on a background thread."""

    def __init__(self, on_event: Callable[[dict], None] | None):
        from ray.util.queue import Queue

        self.on_event = on_event
        self.queue = Queue(actor_options={"num_cpus": 0}) if on_event else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if on_event:
            self._thread.start()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                self.on_event(self.queue.get(timeout=0.5))
            except Empty:
                if self._stop.is_set():
                    return
            except Exception:
                return

    def close(self) -> None:
        if self.on_event:
            self._stop.set()
            self._thread.join(timeout=10)
            import ray

            ray.kill(self.queue.actor)


def _failure_message(err: Exception, run: TrainRun) -> str:
    failures = getattr(err, "worker_failures", None) or {}
    cause = next(iter(failures.values()), None) or err.__cause__ or err
    if hilomoe_cause(cause) is not None:
        return str(hilomoe_cause(cause))
    if out_of_memory(cause):
        return out_of_memory(cause)
    first = str(cause).strip().splitlines()
    last = first[-1] if first else type(cause).__name__
    return (f"training failed on Ray ({type(cause).__name__}: {last}); the run can continue "
            f"with `hilomoe train --resume {run.out_dir}`.")


def train_ray(run: TrainRun, on_event: Callable[[dict], None] | None = None) -> dict:
    """Run (or continue) `run` on Ray Train; returns the summary also written to result.json."""
    cfg = run.cfg
    dataset = open_dataset(run.dataset, training=True)
    started = connect_ray()  # first: it sets the environment Ray reads on import
    import ray

    progress = None
    try:
        plan = plan_workers(cfg.ray, ray.cluster_resources())
        if on_event:
            on_event({"kind": "start", "plan": plan.as_dict(), "out_dir": run.out_dir,
                      "dataset": run.dataset})
        progress = _Progress(on_event)
        trainer = make_trainer(cfg, dataset, plan, name=run.name, storage=run.storage,
                               run_dir=run.out_dir, progress=progress.queue)
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise HilomoeError(_failure_message(err, run)) from None
        return _collect(run, result, plan)
    finally:
        if progress is not None:
            progress.close()
        if started:
            ray.shutdown()


def _collect(run: TrainRun, result, plan: WorkerPlan) -> dict:
    """Copy the final checkpoint's summary and weights into the run directory."""
    import torch

    out = Path(run.out_dir)
    if result.checkpoint is None:
        raise HilomoeError(f"{run.out_dir}: the Ray run ended without a checkpoint.")
    state, summary = read_checkpoint(result.checkpoint)
    torch.save(state["model"], out / "model.pt")
    (out / "models").mkdir(exist_ok=True)
    for stage, weights in stage_weights(state["stage_models"]).items():
        torch.save(weights, out / "models" / f"{stage}.pt")
    summary.update(out_dir=run.out_dir, workers=plan.workers, plan=plan.as_dict(),
                   checkpoint=result.checkpoint.path, storage=run.storage, run_name=run.name)
    tmp = out / ".result.json.tmp"  # written aside, renamed: never a half-written result
    tmp.write_text(jsonio.dumps(summary, indent=2, default=str))
    tmp.replace(out / "result.json")
    return summary

