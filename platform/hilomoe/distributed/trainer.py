"""The one TorchTrainer of the package: `hilomoe train`'s run and a study's multi-worker trial.

    trainer = make_trainer(cfg, dataset, plan, name="run-1", storage="runs/x/checkpoints",
                           run_dir="runs/x")
    result = trainer.fit()

Each of `plan.workers` workers runs `worker.train_loop` (a Session behind Ray Train's
reporter) on its shard of each split: Ray Data shards handed over by the trainer, or its own
rows of the files (`reader: parquet`).
"""

from __future__ import annotations

import os
from typing import Any

from hilomoe.config import TrainConfig
from hilomoe.distributed.resources import WorkerPlan
from hilomoe.distributed.worker import FAULT_ENV, WorkerJob, fault_injection, train_loop


def _shard_config(workers: int):
    """Train splits equally (every DDP rank must take the same number of steps); evaluation
    splits keep every row (exact metrics over the whole split). One worker reads in order, so a
    seeded single-worker run is bit-reproducible."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    class ShardConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                parts = ds.streaming_split(world_size, equal=name == "train", locality_hints=hints)
                for i, part in enumerate(parts):
                    out[i][name] = part
            return out

    return ShardConfig(execution_options=ExecutionOptions(preserve_order=workers == 1),
                       enable_shard_locality=False)


def ray_datasets(cfg: TrainConfig, dataset, plan: WorkerPlan) -> dict:
    """The TorchTrainer's Ray Data inputs (none when workers read the files themselves)."""
    if cfg.ray.reader == "parquet":
        return {}
    from hilomoe.distributed.ray_data import open_ray_split

    return {"datasets": {split: open_ray_split(dataset, split, shuffle_files=split == "train",
                                               seed=cfg.seed)
                         for split in ("train", "valid", "test")},
            "dataset_config": _shard_config(plan.workers)}


def make_trainer(cfg: TrainConfig, dataset, plan: WorkerPlan, name: str, storage: str,
                 run_dir: str, progress: Any = None, callbacks: list | None = None):
    """The TorchTrainer of a run (`hilomoe train`, or a study trial with several workers):
    `plan.workers` workers running `train_loop` on `cfg` and `dataset`, keeping the best
    checkpoints, restarting after worker failures, reading Ray Data shards unless workers read
    the files. `run_dir` holds the fault-injection marker of the tests; `progress` is a queue
    for the driver's console (or None)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    job = WorkerJob(config=cfg.model_dump(mode="json"), dataset=str(dataset.path),
                    plan=plan.as_dict(), run_dir=run_dir, progress=progress)
    env = {"OMP_NUM_THREADS": str(plan.torch_threads)}
    if fault_injection(plan.workers):  # the tests' hook, checked here, reaches the workers
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    return TorchTrainer(
        train_loop,
        train_loop_config=job.as_dict(),
        scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=cfg.ray.gpu,
                                     resources_per_worker=plan.resources()),
        run_config=RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.ray.keep_checkpoints, checkpoint_score_attribute="score",
                checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=callbacks or [],
            # Ray pins OMP_NUM_THREADS to a worker's whole CPUs (1 for a fractional CPU),
            # which set_num_threads alone does not undo
            worker_runtime_env={"env_vars": env},
        ),
        **ray_datasets(cfg, dataset, plan),
    )
