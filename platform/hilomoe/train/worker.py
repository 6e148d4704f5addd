"""The function every Ray Train worker runs: the engine's stages over this worker's data shard.

    TorchTrainer(train_loop, train_loop_config=WorkerJob(...).as_dict(), ...)

It wraps `engine.run_stages`, it does not fork it: Ray contributes the DDP wrapper
(`prepare_model`, applied after each stage decides what trains), the worker's shard of each
split, a `gather` that turns every worker's validation and test predictions into one exact
metric, and a `report` with a checkpoint after every epoch. A restarted or resumed worker loads
the latest checkpoint into the engine, which skips finished stages and continues the current one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from hilomoe.config import TrainConfig
from hilomoe.data.batches import Batch
from hilomoe.data.dataset import open_dataset
from hilomoe.engine.local import Data, build_model, summarize
from hilomoe.engine.loop import Engine, EpochRecord, Predictions, run_stages
from hilomoe.train.resources import WorkerPlan

STATE_FILE = "state.pt"
SUMMARY_FILE = "summary.json"
FINAL_SCORE = 1e9  # the final checkpoint outranks every epoch checkpoint


@dataclass
class WorkerJob:
    """Everything a worker needs, as plain data (it travels inside `train_loop_config`)."""

    config: dict  # TrainConfig, JSON form
    dataset: str  # canonical dataset directory
    plan: dict  # WorkerPlan
    run_dir: str  # the driver's output directory (fault-injection marker)
    progress: Any = None  # a ray.util.queue.Queue for the driver's console, or None

    def as_dict(self) -> dict:
        return asdict(self)


def checkpoint_score(stage_index: int, valid_auc: float) -> float:
    """Checkpoints rank by validation AUC within a stage and later stages above earlier ones, so
    Ray keeps the current stage's best `keep_checkpoints`; each finished stage's best weights
    travel inside every later checkpoint (`Engine.stage_models`)."""
    return stage_index + (valid_auc if valid_auc == valid_auc else 0.0)


def epoch_metrics(record: EpochRecord, world: int, stage_index: int, elapsed: float) -> dict:
    """The flat metrics every rank reports after an epoch."""
    samples = record.samples * world  # every rank trains an equal share
    return {
        "stage": record.stage, "stage_index": stage_index, "epoch": record.epoch,
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
            "train_seconds": summary["seconds"]}


@contextlib.contextmanager
def checkpoint_dir(files: dict[str, Any]) -> Iterator[Path | None]:
    """A temporary directory holding `files` (`.json` names as JSON, others with torch.save),
    for `Checkpoint.from_directory`; None when there is nothing to save."""
    if not files:
        yield None
        return
    with tempfile.TemporaryDirectory() as d:
        for name, obj in files.items():
            if name.endswith(".json"):
                (Path(d) / name).write_text(json.dumps(obj))
            else:
                torch.save(obj, Path(d) / name)
        yield Path(d)


def read_checkpoint(checkpoint) -> tuple[dict | None, dict | None]:
    """The engine state and, in a final checkpoint, the run summary (None if absent)."""
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, weights_only=False)
        summary = Path(d) / SUMMARY_FILE
        return state, json.loads(summary.read_text()) if summary.is_file() else None


def gather_predictions(p: Predictions) -> Predictions:
    """All ranks' predictions, concatenated on every rank (each row lives on exactly one rank)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return p
    parts: list[Predictions | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, p)
    return Predictions.concat(parts)


class FaultyBatches:
    """Wraps the train source; kills this process once, halfway through the configured epoch."""

    def __init__(self, source, engine: Engine, cfg: TrainConfig, rank: int, marker: Path):
        self.source, self.engine, self.fault, self.rank = source, engine, cfg.ray.fail_at, rank
        self.marker = marker

    def epoch(self, epoch: int, batch_size: int | None = None) -> Iterator[Batch]:
        hit = (self.fault is not None and self.rank == self.fault.rank
               and self.engine.setup.name == self.fault.stage and epoch == self.fault.epoch
               and not self.marker.exists())
        for i, batch in enumerate(self.source.epoch(epoch, batch_size)):
            if hit and i == 2:
                self.marker.write_text(f"{self.fault.stage.value} {epoch} {self.rank}\n")
                os._exit(17)  # a hard crash: no cleanup, no exception for Ray to catch
            yield batch


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where asked, or by default on GPUs that support it; None: fp32."""
    if cfg.ray.precision == "bf16":
        return torch.bfloat16
    if cfg.ray.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def train_loop(job_dict: dict) -> None:
    import ray.train
    import ray.train.torch

    from hilomoe.data.ray_data import RayBatches, row_bytes
    from hilomoe.data.readers import ParquetBatches

    job = WorkerJob(**job_dict)
    cfg = TrainConfig.model_validate(job.config)
    plan = WorkerPlan(**job.plan)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(plan.torch_threads)
    device = ray.train.torch.get_device()

    dataset = open_dataset(job.dataset)
    model = build_model(cfg, dataset.schema)  # seeded: every rank starts from the same weights

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if world > 1 or device.type != "cpu":
            module = ray.train.torch.prepare_model(module)
        return torch.compile(module) if cfg.ray.compile else module

    engine = Engine(model, cfg.stages, device, wrap=wrap, gather=gather_predictions,
                    autocast=autocast_dtype(cfg, device), keep_stage_models=True)
    state, _ = read_checkpoint(ray.train.get_checkpoint())
    if state is not None:
        engine.load_state_dict(state)

    def shard(split: str, train: bool):
        size = cfg.stages.base.batch_size if train else cfg.eval_batch_size
        seed = cfg.seed * 1000 + rank
        if cfg.ray.reader == "parquet":
            return ParquetBatches(dataset, split, size, shuffle=train, seed=seed,
                                  shuffle_buffer=cfg.ray.shuffle_buffer, rank=rank, world=world,
                                  equal=train)
        # the validation shard is read every epoch: kept after the first pass when small
        # (the same choice on every rank, from metadata alone)
        shard_mb = dataset.meta.splits[split].rows / world * row_bytes(dataset) / 2**20
        return RayBatches(ray.train.get_dataset_shard(split), dataset, size,
                          shuffle_buffer=cfg.ray.shuffle_buffer if train else None, seed=seed,
                          cache=split == "valid" and shard_mb <= cfg.ray.eval_cache_mb)

    train = FaultyBatches(shard("train", True), engine, cfg, rank,
                          Path(job.run_dir) / ".fault-injected")
    valid, test = shard("valid", False), shard("test", False)
    plan_names = [s.value for s in engine.plan()]
    # training seconds before a restart (from the restored history), plus this process's
    start, before = time.perf_counter(), sum(r.seconds for r in engine.history)

    def elapsed() -> float:
        return before + time.perf_counter() - start

    def report(metrics: dict, files: dict[str, Any]) -> None:
        # every rank reports the same number of times; only rank 0 carries a checkpoint
        with checkpoint_dir(files if rank == 0 else {}) as d:
            ckpt = ray.train.Checkpoint.from_directory(d) if d else None
            ray.train.report(metrics, checkpoint=ckpt)

    def on_epoch(record: EpochRecord) -> None:
        metrics = epoch_metrics(record, world, plan_names.index(record.stage), elapsed())
        report(metrics, {STATE_FILE: engine.state_dict()})
        if rank == 0 and job.progress is not None:
            _put(job.progress, {"kind": "epoch", **metrics, "valid": record.valid,
                                "train": record.train})

    result = run_stages(engine, train, valid, test, on_epoch)
    data = Data(dataset.schema, {}, dataset.meta.extra.get("bayes"))
    summary = summarize(result, cfg, data, elapsed())
    summary["history"] = [{**h, "samples": h["samples"] * world,
                           "samples_per_s": h["samples_per_s"] * world}
                          for h in summary["history"]]
    report({**final_metrics(summary), "score": FINAL_SCORE},
           {STATE_FILE: engine.state_dict(), SUMMARY_FILE: summary})


def _put(queue, item: dict) -> None:
    try:
        queue.put_nowait(item)
    except Exception:  # a full or vanished console queue must never stop training
        pass
