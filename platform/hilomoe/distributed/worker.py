"""The function every Ray Train worker runs: one training session over this worker's shards.

    make_trainer(cfg, dataset, plan, ...)        # trainer.py: train_loop on every worker

It is a Reporter adapter around `hilomoe.session.Session`: Ray contributes the process group
(DDP for the dense model, TorchRec tables sharded across the ranks, exact metrics gathered over
every rank), each worker's shard of each split, and `ray.train.report` with a checkpoint after
every epoch (reporter.py). A restarted or resumed worker restores the latest checkpoint: the
engine skips finished stages and continues the current one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from hilomoe.config import StageName, TrainConfig, TypedView
from hilomoe.data.batches import Batch
from hilomoe.data.dataset import open_dataset
from hilomoe.distributed.reporter import RayReporter
from hilomoe.distributed.resources import WorkerPlan
from hilomoe.engine.local import Data
from hilomoe.engine.loop import Engine
from hilomoe.errors import HilomoeError
from hilomoe.session import Session

# A test hook, outside the user's configuration: `{"stage": "experts", "epoch": 1, "rank": 1}`
# makes worker `rank` kill its own process once, halfway through `epoch` of `stage`, so that
# Ray Train's failure handling restarts the group from the last checkpoint.
FAULT_ENV = "HILOMOE_TEST_FAIL_AT"


@dataclass
class WorkerJob:
    """Everything a worker needs, as plain data (it travels inside `train_loop_config`)."""

    config: dict  # TrainConfig, JSON form
    dataset: str  # canonical dataset directory
    plan: dict  # WorkerPlan
    run_dir: str  # the driver's output directory (fault-injection marker)
    progress: Any = None  # a ray.util.queue.Queue for the driver's console, or None

    cfg = TypedView("config", "the worker's configuration")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Fault:
    stage: StageName
    epoch: int = 0
    rank: int = 0


def fault_injection(workers: int) -> Fault | None:
    """The fault `HILOMOE_TEST_FAIL_AT` asks for (None when unset), for a run of `workers`."""
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None
    try:
        spec = json.loads(raw)
        fault = Fault(StageName(spec["stage"]), int(spec.get("epoch", 0)), int(spec.get("rank", 0)))
    except (ValueError, KeyError, TypeError) as err:
        raise HilomoeError(f"{FAULT_ENV}: expected JSON like {{\"stage\": \"joint\", \"epoch\": 0, "
                           f"\"rank\": 1}} ({err}).") from None
    if fault.rank >= workers:
        raise HilomoeError(f"{FAULT_ENV}: rank ({fault.rank}) must be below the number of "
                           f"workers ({workers}).")
    return fault


class FaultyBatches:
    """Wraps the train source; kills this process once, halfway through the fault's epoch."""

    def __init__(self, source, engine: Engine, fault: Fault | None, rank: int, marker: Path):
        self.source, self.engine, self.fault, self.rank = source, engine, fault, rank
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


def worker_sources(cfg: TrainConfig, dataset, rank: int, world: int) -> dict:
    """This rank's shard of each split: its own rows of the files (`reader: parquet`), or the
    Ray Data shard the trainer handed it."""
    import ray.train

    from hilomoe.data.readers import ParquetBatches
    from hilomoe.data.subset import train_subset
    from hilomoe.distributed.ray_data import RayBatches, row_bytes

    def shard(split: str):
        train = split == "train"
        size = cfg.stages.base.batch_size if train else cfg.eval_batch_size
        seed = cfg.seed * 1000 + rank
        subset = train_subset(cfg.data) if train else None
        if cfg.ray.reader == "parquet":
            return ParquetBatches(dataset, split, size, shuffle=train, seed=seed,
                                  shuffle_buffer=cfg.ray.shuffle_buffer, rank=rank, world=world,
                                  equal=train, subset=subset)
        # the validation shard is read every epoch: kept after the first pass when small
        # (the same choice on every rank, from metadata alone)
        shard_mb = dataset.meta.splits[split].rows / world * row_bytes(dataset) / 2**20
        return RayBatches(ray.train.get_dataset_shard(split), dataset, size,
                          shuffle_buffer=cfg.ray.shuffle_buffer if train else None, seed=seed,
                          cache=split == "valid" and shard_mb <= cfg.ray.eval_cache_mb,
                          subset=subset)

    return {split: shard(split) for split in ("train", "valid", "test")}


def train_loop(job_dict: dict) -> None:
    import ray.train
    import ray.train.torch

    job = WorkerJob(**job_dict)
    cfg, plan = job.cfg, WorkerPlan(**job.plan)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(plan.torch_threads)
    dataset = open_dataset(job.dataset)
    sources = worker_sources(cfg, dataset, rank, world)
    session = Session(cfg, Data(dataset.schema, sources, dataset.meta.extra.get("bayes")),
                      RayReporter(ray.train, job.progress, rank), ray.train.torch.get_device())
    sources["train"] = FaultyBatches(sources["train"], session.engine, fault_injection(world),
                                     rank, Path(job.run_dir) / ".fault-injected")
    session.run()
