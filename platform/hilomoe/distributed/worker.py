"""The function every Ray Train worker runs: one training session over this worker's shards.

    TorchTrainer(train_loop, train_loop_config=WorkerJob(...).as_dict(), ...)

It is a thin adapter around `hilomoe.session.Session`: Ray contributes the process group (DDP
for the dense model, TorchRec tables sharded across the ranks, exact metrics gathered over
every rank), each worker's shard of each split, and `ray.train.report` with a checkpoint after
every epoch. A restarted or resumed worker restores the latest checkpoint: the engine skips
finished stages and continues the current one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from hilomoe.config import TrainConfig
from hilomoe.data.batches import Batch
from hilomoe.data.dataset import open_dataset
from hilomoe.engine.local import Data
from hilomoe.engine.loop import Engine, EpochRecord
from hilomoe.session import Session, read_state, write_files
from hilomoe.train.resources import WorkerPlan


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


@contextlib.contextmanager
def checkpoint_dir(files: dict[str, Any]) -> Iterator[Path | None]:
    """A temporary directory holding `files` (see `session.write_files`), for
    `Checkpoint.from_directory`; None when there is nothing to save."""
    if not files:
        yield None
        return
    with tempfile.TemporaryDirectory() as d:
        write_files(files, Path(d))
        yield Path(d)


def read_checkpoint(checkpoint) -> tuple[dict | None, dict | None]:
    """The engine state (every rank's shard merged) and, in a final checkpoint, the summary."""
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as d:
        return read_state(d)


class RayReporter:
    """A session's reports as `report(metrics, checkpoint=...)` of Ray Train or Ray Tune
    (`module`); every rank reports the same number of times, each with its own files."""

    def __init__(self, module, progress=None, rank: int = 0):
        self.module, self.progress, self.rank = module, progress, rank

    def restore(self) -> dict | None:
        return read_checkpoint(self.module.get_checkpoint())[0]

    def report(self, metrics: dict, files: dict, record: EpochRecord | None) -> None:
        with checkpoint_dir(files) as d:
            ckpt = self.module.Checkpoint.from_directory(d) if d else None
            self.module.report(metrics, checkpoint=ckpt)
        if record is not None and self.rank == 0 and self.progress is not None:
            _put(self.progress, {"kind": "epoch", **metrics, "valid": record.valid,
                                 "train": record.train})


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


def worker_sources(cfg: TrainConfig, dataset, rank: int, world: int) -> dict:
    """This rank's shard of each split: its own rows of the files (`reader: parquet`), or the
    Ray Data shard the trainer handed it."""
    import ray.train

    from hilomoe.data.ray_data import RayBatches, row_bytes
    from hilomoe.data.readers import ParquetBatches
    from hilomoe.data.subset import train_subset

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
    cfg = TrainConfig.model_validate(job.config)
    plan = WorkerPlan(**job.plan)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(plan.torch_threads)
    dataset = open_dataset(job.dataset)
    sources = worker_sources(cfg, dataset, rank, world)
    session = Session(cfg, Data(dataset.schema, sources, dataset.meta.extra.get("bayes")),
                      RayReporter(ray.train, job.progress, rank), ray.train.torch.get_device())
    sources["train"] = FaultyBatches(sources["train"], session.engine, cfg, rank,
                                     Path(job.run_dir) / ".fault-injected")
    session.run()


def _put(queue, item: dict) -> None:
    try:
        queue.put_nowait(item)
    except Exception:  # a full or vanished console queue must never stop training
        pass
